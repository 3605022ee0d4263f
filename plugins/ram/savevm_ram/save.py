"""The RAM section's live handlers: setup, iterate, complete, pending.

The search and the page pipeline follow QEMU's migration/ram.c
(``ram_save_setup``, ``ram_find_and_save_block``, ``find_dirty_block``,
``ram_save_target_page``), but work on *runs* of contiguous dirty pages
(up to 1 MiB) rather than on single pages, so that every per-page decision
is a numpy operation and every page leaves as a memoryview of the
program's memory (see the DESIGN's hot-path rule).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from savevm.handlers import SaveVMHandlers
from savevm_ram.codecs import SKIP, NormalFrom, PageCodec
from savevm_ram.dirty import DirtyBitmap
from savevm_ram.stats import RAMCounters
from savevm_ram.wire import (
    PAGE_BITS,
    PAGE_SIZE,
    QEMU_CODEC_FLAGS,
    RAM_CONTROL_FINISH,
    RAM_CONTROL_ROUND,
    RAM_CONTROL_SETUP,
    RAM_SAVE_CONTROL_DELAYED,
    RAM_SAVE_CONTROL_NOT_SUPP,
    ZERO_RECORD,
    Flag,
)

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.plugins import PluginHost
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMBlock, RAMList

log = structlog.get_logger("savevm.ram")

#: Most pages handled as one batch (4 MiB): a batch is one numpy pass and one write.
MAX_RUN_PAGES = 1024
#: QEMU's MAX_WAIT: an iterate call returns after this long.
MAX_WAIT = 0.050
#: Bitmap window scanned per numpy call while searching.
SEARCH_WINDOW = 1 << 16

_CONT = np.uint64(Flag.CONTINUE)
_ZERO_C = np.uint64(Flag.ZERO | Flag.CONTINUE)
_PAGE_C = np.uint64(Flag.PAGE | Flag.CONTINUE)
_SHIFT = np.uint64(PAGE_BITS)
_REC = 8 + PAGE_SIZE
# plain ints for per-page code: IntFlag arithmetic costs microseconds per operation
_F_ZERO = int(Flag.ZERO)
_F_PAGE = int(Flag.PAGE)
_F_CONT = int(Flag.CONTINUE)
_F_EXT = int(Flag.SAVEVM_ENCODED)


class RAMHooks:
    """Typed calls of the RAM hooks, skipping hooks nobody implements.

    ``refresh()`` runs once per iteration: that is when a plugin could have
    appeared; per-run code only tests booleans.
    """

    def __init__(self, plugins: PluginHost | None) -> None:
        self.plugins = plugins
        self.before = self.after = self.save_page = self.load_hook = False
        self.refresh()

    def refresh(self) -> None:
        p = self.plugins
        if p is None:
            return
        self.before = p.has_impl("ram_control_before_iterate")
        self.after = p.has_impl("ram_control_after_iterate")
        self.save_page = p.has_impl("ram_control_save_page")
        self.load_hook = p.has_impl("ram_control_load_hook")

    def before_iterate(self, rs: Any, f: QEMUFile, flags: int) -> None:
        if self.before:
            assert self.plugins is not None
            self.plugins.hook("ram_control_before_iterate")(rs=rs, f=f, flags=flags)

    def after_iterate(self, rs: Any, f: QEMUFile, flags: int) -> None:
        if self.after:
            assert self.plugins is not None
            self.plugins.hook("ram_control_after_iterate")(rs=rs, f=f, flags=flags)

    def control_save_page(self, rs: Any, f: QEMUFile, block: RAMBlock, offset: int, size: int) -> int | None:
        assert self.plugins is not None
        return self.plugins.hook("ram_control_save_page")(rs=rs, f=f, block=block, offset=offset, size=size)

    def control_load_hook(self, rs: Any, f: QEMUFile, flags: int, data: Any) -> bool | None:
        if not self.load_hook:
            return None
        assert self.plugins is not None
        return self.plugins.hook("ram_control_load_hook")(rs=rs, f=f, flags=flags, data=data)


class RAMHandlers(SaveVMHandlers):
    """The ``ram`` section (instance 0, version 4) for one migration, either side."""

    def __init__(self, ram: RAMList, *, config: MigrationConfig, plugins: PluginHost | None) -> None:
        self.ram = ram
        self.config = config
        self.plugins = plugins
        self.hooks = RAMHooks(plugins)
        self.codecs: list[PageCodec] = _collect_codecs(plugins, config)
        self.counters = RAMCounters()
        self.bitmap = DirtyBitmap(ram)
        #: per-migration scratch space for transport plugins (RDMA-style)
        self.transport_state: dict[str, Any] = {}
        #: called with (dirty_bytes_period, transferred_bytes_period) at each >= 1 s sync period
        self.throttle_listener: Any = None
        self.last_stage = False
        #: a transport claimed this migration's pages (ram_control_save_page is called)
        self._pages_claimed = False
        # search state (RAMState)
        self._blocks: list[RAMBlock] = list(ram)
        self._ram_version = ram.version
        self.last_seen_block = 0
        self.last_page = 0
        self.last_sent_block: RAMBlock | None = None
        #: True until the search wraps once (QEMU: !xbzrle_enabled)
        self.bulk_stage = True
        self._period_xfer = 0
        self._period_pages = 0
        self._oob_bytes = 0
        self._save_codecs: list[PageCodec] = []
        # destination state
        self.load_last_block: RAMBlock | None = None
        self._codec_by_flag: dict[int, PageCodec] = {}
        self._ext_codecs: dict[int, PageCodec] = {}
        self._ext_ids: dict[int, int] = {}
        #: packed (header + page) records of one batch; reused, flushed per batch
        self._scratch = np.empty((MAX_RUN_PAGES, _REC), dtype=np.uint8)

    # ================================================================ source
    def save_setup(self, f: QEMUFile) -> None:
        """MEM_SIZE + block list + EOS (ram_save_setup); all pages start dirty."""
        start = f.pos
        self._blocks = list(self.ram)
        self._ram_version = self.ram.version
        self.last_seen_block = self.last_page = 0
        self.last_sent_block = None
        self.bulk_stage = True
        self.counters = RAMCounters(total=self.ram.total_bytes)
        # fresh codecs for this migration, from the plugins registered by now
        self.codecs = _collect_codecs(self.plugins, self.config)
        self._save_codecs = [c for c in self.codecs if c.enabled(self.config)]
        for c in self._save_codecs:
            c.save_setup(self)
        self.bitmap.start()
        self.sync()
        log.info("ram_save_setup", blocks=len(self._blocks), total=self.ram.total_bytes,
                 codecs=[c.name for c in self._save_codecs])
        f.put_be64(self.ram.total_bytes | Flag.MEM_SIZE)
        for b in self._blocks:
            f.put_counted_string(b.idstr)
            f.put_be64(b.used_length)
        ext = [c for c in self._save_codecs if c.wire_flag not in QEMU_CODEC_FLAGS]
        self._ext_ids = {id(c): i for i, c in enumerate(ext)}
        if ext:
            # savevm extension: name the third-party codecs this stream will use
            f.put_be64(Flag.SAVEVM_CODECS)
            f.put_byte(len(ext))
            for i, c in enumerate(ext):
                f.put_byte(i)
                f.put_counted_string(c.name)
        self.hooks.refresh()
        self._pages_claimed = False
        self.hooks.before_iterate(self, f, RAM_CONTROL_SETUP)
        self.hooks.after_iterate(self, f, RAM_CONTROL_SETUP)
        f.put_be64(Flag.EOS)
        f.flush()
        self._account(f.pos - start, precopy=True)

    def save_live_iterate(self, f: QEMUFile) -> bool:
        """Send dirty pages until the rate limit trips or 50 ms pass; EOS."""
        start = f.pos
        oob0 = self._oob_bytes
        self._follow_hotplug()
        self.hooks.refresh()
        for c in self._save_codecs:
            c.iteration_start(self)
        self.hooks.before_iterate(self, f, RAM_CONTROL_ROUND)
        t0 = time.monotonic()
        done = False
        while not f.rate_limit_exceeded():
            batch = self.find_dirty_batch(_run_budget(f))
            if batch is None:
                done = True
                break
            self._save_batch(f, *batch, last_stage=False)
            if time.monotonic() - t0 > MAX_WAIT:
                break
        self.hooks.after_iterate(self, f, RAM_CONTROL_ROUND)
        f.put_be64(Flag.EOS)
        f.flush()
        self._account(f.pos - start + self._oob_bytes - oob0, precopy=True)
        return done

    def save_live_complete_precopy(self, f: QEMUFile) -> None:
        """Final sync, every remaining page, EOS (ram_save_complete)."""
        start = f.pos
        oob0 = self._oob_bytes
        self.last_stage = True
        self._follow_hotplug()
        self.sync(final=True)
        self.hooks.refresh()
        self.hooks.before_iterate(self, f, RAM_CONTROL_FINISH)
        while (batch := self.find_dirty_batch()) is not None:
            self._save_batch(f, *batch, last_stage=True)
        self.hooks.after_iterate(self, f, RAM_CONTROL_FINISH)
        f.put_be64(Flag.EOS)
        f.flush()
        self._account(f.pos - start + self._oob_bytes - oob0, precopy=False)

    def _follow_hotplug(self) -> None:
        """A block was added or removed since the last chunk: QEMU's ram_state_reset.

        The search restarts, the next page carries its block name again, and
        the bitmap follows the new block list before anything is searched.
        """
        if self.ram.version == self._ram_version:
            return
        self._blocks = list(self.ram)
        self._ram_version = self.ram.version
        self.last_sent_block = None
        self.last_seen_block = self.last_page = 0
        self.bitmap.follow_blocks()
        self.counters.total = self.ram.total_bytes

    def save_live_pending(self, threshold: int) -> int:
        """Dirty bytes; re-sync first when already below ``threshold`` (ram_save_pending)."""
        remaining = self.bitmap.remaining_bytes
        if remaining < threshold:
            self.sync()
            remaining = self.bitmap.remaining_bytes
        return remaining

    def claim_pages(self) -> None:
        """A transport takes pages through ``ram_control_save_page`` in this migration."""
        self._pages_claimed = True

    def configure(self, config: MigrationConfig) -> None:
        self.config = config
        for c in self._save_codecs:
            c.configure(self, config)

    def save_cleanup(self) -> None:
        self.bitmap.stop()
        for c in self._save_codecs:
            c.save_cleanup(self)
        self._close_transport_state()

    def _close_transport_state(self) -> None:
        for st in self.transport_state.values():
            close = getattr(st, "close", None)
            if close is not None:
                close()
        self.transport_state.clear()

    def load_cleanup(self) -> None:
        self._close_transport_state()

    def cancel(self) -> None:
        self.bitmap.stop()

    def query_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ram": self.counters.as_qmp(self.bitmap.remaining_bytes)}
        for c in self._save_codecs:
            out.update(c.query_stats())
        return out

    # ---------------------------------------------------------------- sync
    def sync(self, *, final: bool = False) -> None:
        """migration_bitmap_sync: fold dirt in, and close a >= 1 s rate period.

        The ``final`` sync (completion) closes any period of at least 100 ms,
        so a migration shorter than a second still reports its rates.
        """
        self.bitmap.sync()
        self.counters.dirty_sync_count = self.bitmap.sync_count
        for c in self._save_codecs:
            c.on_sync(self)
        first = self.counters.dirty_pages_rate == 0 and self.counters.pages_per_second == 0
        period = self.bitmap.end_period_if_due(0.1 if final and first else 1.0)
        if period is None:
            return
        elapsed, dirty_pages = period
        xfer = self.counters.transferred - self._period_xfer
        pages = self.counters.target_pages - self._period_pages
        self._period_xfer = self.counters.transferred
        self._period_pages = self.counters.target_pages
        self.counters.dirty_pages_rate = self.bitmap.dirty_pages_rate
        self.counters.pages_per_second = int(pages / elapsed)
        for c in self._save_codecs:
            c.on_period(self, pages)
        if self.throttle_listener is not None:
            self.throttle_listener(dirty_pages * PAGE_SIZE, xfer)

    def _account(self, nbytes: int, *, precopy: bool) -> None:
        self.counters.transferred += nbytes
        if precopy:
            self.counters.precopy_bytes += nbytes
        else:
            self.counters.downtime_bytes += nbytes

    # ---------------------------------------------------------------- search
    def find_dirty_run(self, max_pages: int | None = None) -> tuple[int, int, int] | None:
        """Next run of contiguous dirty pages: (block index, first page, count), or None.

        :meth:`find_dirty_batch` restricted to its leading contiguous pages,
        with the search resuming right after them.
        """
        found = self.find_dirty_batch(max_pages)
        if found is None:
            return None
        bi, idx = found
        first = int(idx[0])
        gaps = np.flatnonzero(np.diff(idx) != 1)
        run = int(gaps[0]) + 1 if gaps.size else len(idx)
        self.last_seen_block, self.last_page = bi, first + run
        return bi, first, run

    def find_dirty_batch(self, max_pages: int | None = None) -> tuple[int, np.ndarray] | None:
        """Up to ``max_pages`` dirty pages of one block, in order, from where the search stopped.

        The same walk as :meth:`find_dirty_run` (and QEMU's find_dirty_block),
        but the pages need not be contiguous: one ``flatnonzero`` over a bitmap
        window finds them all, so a sparse bitmap (a live workload's random
        writes) costs one numpy call per batch instead of several per page.
        """
        blocks = self._blocks
        if not blocks:
            return None
        if max_pages is None:
            max_pages = MAX_RUN_PAGES
        bi, page = self.last_seen_block, self.last_page
        if bi >= len(blocks):
            bi, page = 0, 0
        start_bi, start_page = bi, page
        complete_round = False
        bitmaps = self.bitmap.bitmaps
        while True:
            b = blocks[bi]
            bm = bitmaps[b.idstr]
            n = b.pages
            if complete_round and bi == start_bi:
                n = min(n, start_page)  # back where we began: only what lies before it
            while page < n:
                end = min(n, page + SEARCH_WINDOW)
                nz = np.flatnonzero(bm[page:end])
                if nz.size:
                    idx = nz[:max_pages] + page
                    self.last_seen_block, self.last_page = bi, int(idx[-1]) + 1
                    return bi, idx
                page = end
            if complete_round and bi == start_bi:
                return None
            bi += 1
            page = 0
            if bi == len(blocks):
                bi = 0
                complete_round = True
                if self.bulk_stage:
                    self.bulk_stage = False
                    log.debug("ram_bulk_stage_end", sync_count=self.bitmap.sync_count)

    # ---------------------------------------------------------------- pipeline
    def _save_batch(self, f: QEMUFile, bi: int, pages: np.ndarray, last_stage: bool) -> None:
        """Send a batch from :meth:`find_dirty_batch`: contiguous runs go zero-copy."""
        n = len(pages)
        first = int(pages[0])
        if int(pages[-1]) - first == n - 1:
            self._save_run(f, bi, first, n, last_stage)
            return
        if self.hooks.save_page and self._pages_claimed:
            # transports take contiguous ranges, as ram_control_save_page does
            cuts = (np.flatnonzero(np.diff(pages) != 1) + 1).tolist()
            for lo, hi in zip([0, *cuts], [*cuts, n]):
                self._save_run(f, bi, int(pages[lo]), hi - lo, last_stage)
            return
        b = self._blocks[bi]
        self.bitmap.clear_pages(b, pages)
        self.counters.target_pages += n
        data = b.host[: b.pages * PAGE_SIZE].reshape(-1, PAGE_SIZE)[pages]  # gathered copy, for the checks
        zero = _zero_pages(data)
        codecs = [c for c in self._save_codecs if c.active(self)] if self._save_codecs else []
        if codecs:
            self._save_pages_codecs(f, b, pages, data, zero, codecs, last_stage)
        else:
            self._save_pages_plain(f, b, pages, zero, data)

    def _save_run(self, f: QEMUFile, bi: int, first: int, n: int, last_stage: bool) -> None:
        b = self._blocks[bi]
        self.bitmap.clear(b, first, n)
        self.counters.target_pages += n
        if self.hooks.save_page and self._pages_claimed:
            r = self.hooks.control_save_page(self, f, b, first * PAGE_SIZE, n * PAGE_SIZE)
            if r is not None and r != RAM_SAVE_CONTROL_NOT_SUPP:
                nbytes = n if r == RAM_SAVE_CONTROL_DELAYED else int(r)
                f.account(nbytes)
                self._oob_bytes += nbytes
                self.counters.control += n
                self.counters.normal += n
                return
        data = b.page_view(first, n)
        zero = _zero_pages(data)
        pages = np.arange(first, first + n, dtype=np.int64)
        codecs = [c for c in self._save_codecs if c.active(self)] if self._save_codecs else []
        if codecs:
            self._save_pages_codecs(f, b, pages, data, zero, codecs, last_stage)
        else:
            self._save_pages_plain(f, b, pages, zero, data)

    def _save_pages_plain(self, f: QEMUFile, b: RAMBlock, pages: np.ndarray, zero: np.ndarray,
                          data: np.ndarray) -> None:
        """Zero and normal pages only: records packed by numpy, one write per batch.

        Normal pages are copied (header + page) into a reused scratch buffer
        rather than queued as two iovecs each: measured with
        benchmarks/bench_ram.py, a 4 KiB memcpy costs far less than the
        Python and kernel work of two iovecs per page (1.8 -> 9 GB/s to
        /dev/null, 45% -> 80% of a plain socket copy over tcp).  The buffer
        is flushed before the next batch reuses it.
        """
        n = len(pages)
        hdr = (pages.astype(np.uint64) << _SHIFT) | np.where(zero, _ZERO_C, _PAGE_C)
        parts: list[Any] = []
        nbytes = 0
        k = 0
        if self.last_sent_block is not b:
            name = b.idstr.encode()
            h0 = int(hdr[0]) & ~int(Flag.CONTINUE)
            head = h0.to_bytes(8, "big") + bytes([len(name)]) + name
            if zero[0]:
                parts.append(head + b"\x00")
                nbytes += len(head) + 1
            else:
                parts.append(head + data[0].tobytes())
                nbytes += len(head) + PAGE_SIZE
            self.last_sent_block = b
            k = 1
        nzero = int(np.count_nonzero(zero))
        self.counters.duplicate += nzero
        self.counters.normal += n - nzero
        if k < n:
            hb = hdr.astype(">u8").view(np.uint8).reshape(n, 8)
            scratch = self._scratch
            row = 0
            sub = zero[k:]
            cuts = (np.flatnonzero(sub[1:] != sub[:-1]) + 1 + k).tolist()
            bounds = [k, *cuts, n]
            for i, j in zip(bounds, bounds[1:]):
                if zero[i]:
                    rec = np.empty(j - i, dtype=ZERO_RECORD)
                    rec["hdr"] = hdr[i:j]
                    rec["fill"] = 0
                    parts.append(rec.tobytes())
                    nbytes += 9 * (j - i)
                else:
                    out = scratch[row : row + (j - i)]
                    out[:, :8] = hb[i:j]
                    out[:, 8:] = data[i:j]
                    parts.append(out.reshape(-1).data)
                    nbytes += _REC * (j - i)
                    row += j - i
        f.put_iovecs(parts, nbytes)
        f.flush()  # the scratch buffer is reused by the next batch

    def _save_pages_codecs(self, f: QEMUFile, b: RAMBlock, pages: np.ndarray, data: np.ndarray,
                           zero: np.ndarray, codecs: list[PageCodec], last_stage: bool) -> None:
        """The general pipeline: zero → codecs in order → normal page."""
        n = len(pages)
        results: list[Any] = [None] * n
        flags: list[int] = [0] * n
        todo = np.flatnonzero(~zero)
        for c in codecs:
            if todo.size == 0:
                break
            res = c.encode_pages(self, b, pages[todo], data[todo], last_stage)
            keep = []
            for k, r in zip(todo.tolist(), res):
                if r is None:
                    keep.append(k)
                else:
                    ext_id = self._ext_ids.get(id(c))
                    if ext_id is None:
                        results[k] = r
                        flags[k] = c.wire_flag
                    elif r is SKIP or isinstance(r, NormalFrom):
                        results[k] = r
                    else:
                        results[k] = bytes((ext_id,)) + bytes(r)
                        flags[k] = _F_EXT
            todo = np.asarray(keep, dtype=np.int64)
        if zero.any():
            zpages = pages[zero]
            for c in codecs:
                c.zero_pages(self, b, zpages, last_stage)
        pm = b.mv
        plist = pages.tolist()
        parts: list[Any] = []
        nbytes = 0
        name_rec = bytes([len(b.idstr.encode())]) + b.idstr.encode()
        cnt = self.counters
        for k in range(n):
            off = plist[k] << PAGE_BITS
            if zero[k]:
                flag = _F_ZERO
                body: Any = b"\x00"
                cnt.duplicate += 1
            else:
                r = results[k]
                if r is None:
                    flag = _F_PAGE
                    body = pm[off : off + PAGE_SIZE]
                    cnt.normal += 1
                elif r is SKIP:
                    continue
                elif isinstance(r, NormalFrom):
                    flag = _F_PAGE
                    body = r.data
                    cnt.normal += 1
                else:
                    flag = flags[k]
                    body = r
                    cnt.encoded += 1
            if self.last_sent_block is b:
                head = (off | flag | _F_CONT).to_bytes(8, "big")
            else:
                head = (off | flag).to_bytes(8, "big") + name_rec
                self.last_sent_block = b
            parts.append(head)
            parts.append(body)
            nbytes += len(head) + (body.nbytes if isinstance(body, memoryview) else len(body))
        if parts:
            f.put_iovecs(parts, nbytes)

    # ================================================================ destination
    def load_setup(self) -> None:
        self.load_last_block = None
        self._codec_by_flag = {}
        self.codecs = _collect_codecs(self.plugins, self.config)
        self._ext_codecs = {}
        for c in self.codecs:
            c.load_setup(self)
            if c.wire_flag in QEMU_CODEC_FLAGS:
                self._codec_by_flag[c.wire_flag] = c
        self.hooks.refresh()

    def load_state(self, f: QEMUFile, version_id: int) -> None:
        from savevm_ram.load import ram_load

        ram_load(self, f, version_id)

    def codec_for(self, flag: int) -> PageCodec | None:
        """The destination codec for a wire flag."""
        return self._codec_by_flag.get(flag)

    def announce_codecs(self, names: dict[int, str], offset: int) -> None:
        """Destination: the source named its third-party codecs; refuse if one is missing."""
        from savevm.errors import ConfigurationMismatchError

        by_name = {c.name: c for c in self.codecs}
        missing = sorted(n for n in names.values() if n not in by_name)
        if missing:
            raise ConfigurationMismatchError(
                f"the stream uses page codec(s) {', '.join(map(repr, missing))} but no installed plugin "
                f"provides them (have: {', '.join(sorted(by_name)) or 'none'})", offset)
        self._ext_codecs = {i: by_name[n] for i, n in names.items()}

    def has_ext_codecs(self) -> bool:
        """Did the stream announce third-party codecs?"""
        return bool(self._ext_codecs)

    def ext_codec(self, codec_id: int) -> PageCodec | None:
        """Destination: the third-party codec announced under ``codec_id``."""
        return self._ext_codecs.get(codec_id)


def _run_budget(f: QEMUFile) -> int:
    """Pages the next run may hold so the window's budget is passed by at most one page.

    QEMU checks ``qemu_file_rate_limit`` before every page; we check between
    runs, so a run must not be longer than what is left of the budget, or a
    1 MiB run would overshoot a small ``max-bandwidth`` many times over.
    """
    limit = f.rate_limit_max
    if not limit:
        return MAX_RUN_PAGES
    left = limit - f.rate_limit_used
    return max(1, min(MAX_RUN_PAGES, left // (PAGE_SIZE + 8) + 1))


def _zero_pages(data: np.ndarray) -> np.ndarray:
    """Which of the (n, 4096) pages are all zero (QEMU's buffer_is_zero), vectorised.

    Most non-zero pages have a non-zero first word, so only pages whose first
    word is zero get the full check (an OR-reduce, faster than ``any``).
    """
    w = data.view(np.uint64)
    cand = w[:, 0] == 0
    if not cand.any():
        return cand
    if cand.all():
        return np.bitwise_or.reduce(w, axis=1) == 0
    idx = np.flatnonzero(cand)
    cand[idx] = np.bitwise_or.reduce(w[idx], axis=1) == 0
    return cand


def _collect_codecs(plugins: PluginHost | None, config: MigrationConfig) -> list[PageCodec]:
    if plugins is None or not plugins.has_impl("ram_page_codecs"):
        return []
    out: list[PageCodec] = []
    for lst in plugins.hook("ram_page_codecs")(config=config):
        if lst:
            out.extend(lst)
    flags = [c.wire_flag for c in out if c.wire_flag]
    names = [c.name for c in out]
    if len(set(flags)) != len(flags) or len(set(names)) != len(names):
        from savevm.errors import PluginError

        raise PluginError(
            f"two page codecs claim the same wire flag or name: {[(c.name, c.wire_flag) for c in out]}")
    return sorted(out, key=lambda c: c.priority)
