"""The page pipeline (QEMU's ``ram_save_target_page`` for a batch of pages).

Two steps per batch of dirty pages of one block:

1. :meth:`PagePipeline.prepare` — clear their dirty bits, count them, view
   their contents (no copy when contiguous), find the zero pages, and pick
   the codecs active for this pass;
2. :meth:`PagePipeline.emit` — write the records: zero pages as ``ZERO``,
   codec results under the codec's flag, the rest as ``PAGE``.

Before both, a transport that claimed the migration (RDMA-style) is offered
each contiguous run through ``ram_control_save_page`` and may take it out
of band.  Everything here is a numpy operation over the batch; nothing is
per page except the codec path's record assembly.

Every record written is counted by kind in :attr:`PagePipeline.tally`
(``zero``, ``normal``, the codec's name, ``transport``): what pending pages
are expected to cost on the wire is priced from those counts
(:mod:`savevm_ram.estimate`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from savevm_ram.codecs import SKIP, NormalFrom, PageCodec, PageResult
from savevm_ram.estimate import SentTally
from savevm_ram.search import MAX_BATCH_PAGES
from savevm_ram.wire import (
    PAGE_BITS,
    PAGE_RECORD_SIZE,
    PAGE_SIZE,
    QEMU_CODEC_FLAGS,
    RAM_SAVE_CONTROL_DELAYED,
    RAM_SAVE_CONTROL_NOT_SUPP,
    ZERO_RECORD,
    Flag,
)

if TYPE_CHECKING:
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMBlock
    from savevm_ram.control import RAMHooks
    from savevm_ram.dirty import DirtyBitmap
    from savevm_ram.state import RAMState
    from savevm_ram.stats import RAMCounters

_ZERO_C = np.uint64(Flag.ZERO | Flag.CONTINUE)
_PAGE_C = np.uint64(Flag.PAGE | Flag.CONTINUE)
_SHIFT = np.uint64(PAGE_BITS)
# plain ints for per-page code: IntFlag arithmetic costs microseconds per operation
_F_ZERO = int(Flag.ZERO)
_F_PAGE = int(Flag.PAGE)
_F_CONT = int(Flag.CONTINUE)
_F_EXT = int(Flag.SAVEVM_ENCODED)


@attrs.define
class Batch:
    """Dirty pages of one block, examined and ready to be written."""

    block: RAMBlock
    #: page numbers in the block, ascending
    pages: np.ndarray
    #: (n, 4096) contents: a view of the block when contiguous, else a gathered copy
    data: np.ndarray
    #: which pages are all zero
    zero: np.ndarray
    #: the codecs active for this pass, in priority order
    codecs: list[PageCodec]


def zero_pages(data: np.ndarray) -> np.ndarray:
    """Which of the (n, 4096) pages are all zero (QEMU's buffer_is_zero), vectorised.

    Most non-zero pages have a non-zero first word, so only pages whose first
    word is zero get the full check (an OR-reduce, faster than ``any``).
    """
    w = data.view(np.uint64)
    cand = w[:, 0] == 0
    if not cand.any():
        return cand
    if cand.all():
        if not w.max():  # all zero, the common case for zero memory: one pass, twice as fast as per row
            return cand
        return np.bitwise_or.reduce(w, axis=1) == 0
    idx = np.flatnonzero(cand)
    cand[idx] = np.bitwise_or.reduce(w[idx], axis=1) == 0
    return cand


@attrs.define
class _Pending:
    """A batch handed to an overlapping codec, waiting to be written."""

    batch: Batch
    last_stage: bool
    wait: Callable[[], list[PageResult]]


class PagePipeline:
    """Turns batches of dirty pages into records on a QEMUFile (source side)."""

    def __init__(self, rs: RAMState, bitmap: DirtyBitmap, counters: RAMCounters, hooks: RAMHooks) -> None:
        self.rs = rs
        self.bitmap = bitmap
        self.counters = counters
        self.hooks = hooks
        #: the codecs the source uses in this migration (enabled by capability), in priority order
        self.codecs: list[PageCodec] = []
        #: third-party codec -> the id announced at setup (by ``id()`` of the codec)
        self.ext_ids: dict[int, int] = {}
        #: the block named by the last page record (later records of it carry CONTINUE)
        self.last_sent_block: RAMBlock | None = None
        #: a transport claimed this migration's pages (ram_control_save_page is offered runs)
        self.pages_claimed = False
        #: bytes transports reported for pages they took out of band
        self.oob_bytes = 0
        #: pages and bytes written in this migration, by kind
        self.tally = SentTally()
        #: packed (header + page) records of one batch; reused, flushed per batch
        self._scratch = np.empty((MAX_BATCH_PAGES, PAGE_RECORD_SIZE), dtype=np.uint8)
        #: the batch an overlapping codec is encoding, written by the next save() or drain()
        self._pending: _Pending | None = None

    def start(self, codecs: list[PageCodec]) -> None:
        """A migration begins with these codecs enabled."""
        self.codecs = codecs
        ext = [c for c in codecs if c.wire_flag not in QEMU_CODEC_FLAGS]
        self.ext_ids = {id(c): i for i, c in enumerate(ext)}
        self.last_sent_block = None
        self.pages_claimed = False
        self.oob_bytes = 0
        self.tally = SentTally()

    def ext_codecs(self) -> list[PageCodec]:
        """The third-party codecs setup announces, in id order."""
        return [c for c in self.codecs if id(c) in self.ext_ids]

    # ------------------------------------------------------------ entry
    def save(self, f: QEMUFile, block: RAMBlock, pages: np.ndarray, last_stage: bool) -> None:
        """Send a batch found by the page search.

        With an overlapping codec (compression) alone in the pass, the batch
        is handed to the codec and the previous one written meanwhile, so the
        codec's threads never wait for the writing; its records reach ``f``
        in order, at the next call or at :meth:`drain`.
        """
        n = len(pages)
        contiguous = int(pages[-1]) - int(pages[0]) == n - 1
        if self.pages_claimed and self.hooks.has_save_page:
            self.drain(f)
            # transports take contiguous ranges, as ram_control_save_page does
            cuts = [] if contiguous else (np.flatnonzero(np.diff(pages) != 1) + 1).tolist()
            for lo, hi in zip([0, *cuts], [*cuts, n]):
                self._offer(f, block, pages[lo:hi], last_stage)
            return
        batch = self.prepare(block, pages, contiguous)
        codecs = batch.codecs
        if len(codecs) == 1 and codecs[0].overlaps and not self.pages_claimed:
            todo = np.flatnonzero(~batch.zero)
            # data[todo] is a copy (fancy indexing): the snapshot the codec is promised
            wait = codecs[0].submit_pages(self.rs, block, pages[todo], batch.data[todo], last_stage)
            self.drain(f)
            self._pending = _Pending(batch, last_stage, wait)
            return
        self.drain(f)
        self.emit(f, batch, last_stage)

    def _offer(self, f: QEMUFile, block: RAMBlock, pages: np.ndarray, last_stage: bool) -> None:
        """One contiguous run: a claiming transport may take it, else the normal path."""
        self._take(block, pages, True)
        n = len(pages)
        first = int(pages[0])
        r = self.hooks.control_save_page(self.rs, f, block, first * PAGE_SIZE, n * PAGE_SIZE)
        if r is not None and r != RAM_SAVE_CONTROL_NOT_SUPP:
            nbytes = n if r == RAM_SAVE_CONTROL_DELAYED else int(r)
            f.account(nbytes)
            self.oob_bytes += nbytes
            self.counters.control += n
            self.counters.normal += n
            self.tally.add("transport", n, nbytes)
            return
        self.emit(f, self._examine(block, pages, True), last_stage)

    def drain(self, f: QEMUFile) -> None:
        """Write the batch an overlapping codec is encoding, if any (the end of every iteration)."""
        p = self._pending
        if p is None:
            return
        self._pending = None
        self._emit_codecs(f, p.batch, p.last_stage, p.wait())

    def discard(self) -> None:
        """Forget a batch still encoding (the migration failed; its pages are not sent)."""
        self._pending = None

    # ------------------------------------------------------------ step 1
    def prepare(self, block: RAMBlock, pages: np.ndarray, contiguous: bool) -> Batch:
        """Clear the pages' dirty bits, count them, and examine their contents."""
        self._take(block, pages, contiguous)
        return self._examine(block, pages, contiguous)

    def _take(self, block: RAMBlock, pages: np.ndarray, contiguous: bool) -> None:
        if contiguous:
            self.bitmap.clear(block, int(pages[0]), len(pages))
        else:
            self.bitmap.clear_pages(block, pages)
        self.counters.target_pages += len(pages)

    def _examine(self, block: RAMBlock, pages: np.ndarray, contiguous: bool) -> Batch:
        if contiguous:
            data = block.page_view(int(pages[0]), len(pages))
        else:
            data = block.host[: block.pages * PAGE_SIZE].reshape(-1, PAGE_SIZE)[pages]  # gathered copy
        codecs = [c for c in self.codecs if c.active(self.rs)] if self.codecs else []
        return Batch(block, pages, data, zero_pages(data), codecs)

    # ------------------------------------------------------------ step 2
    def emit(self, f: QEMUFile, batch: Batch, last_stage: bool) -> None:
        """Write the batch's records."""
        if batch.codecs:
            self._emit_codecs(f, batch, last_stage)
        else:
            self._emit_plain(f, batch)

    def _emit_plain(self, f: QEMUFile, batch: Batch) -> None:
        """Zero and normal pages only: records packed by numpy, one write per batch.

        Normal pages are copied (header + page) into a reused scratch buffer
        rather than queued as two iovecs each: a 4 KiB memcpy costs far less
        than the Python and kernel work of two iovecs per page (measured:
        1.8 -> 7.4 GB/s to /dev/null).  The buffer is flushed before the
        next batch reuses it.
        """
        b, pages, zero, data = batch.block, batch.pages, batch.zero, batch.data
        n = len(pages)
        hdr = (pages.astype(np.uint64) << _SHIFT) | np.where(zero, _ZERO_C, _PAGE_C)
        parts: list[Any] = []
        nbytes = 0
        k = 0
        name_bytes = 0  # the block name the first record carries, counted with its kind
        if self.last_sent_block is not b:
            name = b.idstr.encode()
            h0 = int(hdr[0]) & ~_F_CONT
            head = h0.to_bytes(8, "big") + bytes([len(name)]) + name
            if zero[0]:
                parts.append(head + b"\x00")
                nbytes += len(head) + 1
            else:
                parts.append(head + data[0].tobytes())
                nbytes += len(head) + PAGE_SIZE
            name_bytes = len(head) - 8
            self.last_sent_block = b
            k = 1
        nzero = int(np.count_nonzero(zero))
        self.counters.duplicate += nzero
        self.counters.normal += n - nzero
        zero_first = bool(zero[0]) and name_bytes > 0
        self.tally.add("zero", nzero, 9 * nzero + (name_bytes if zero_first else 0))
        self.tally.add("normal", n - nzero, PAGE_RECORD_SIZE * (n - nzero) + (0 if zero_first else name_bytes))
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
                    nbytes += PAGE_RECORD_SIZE * (j - i)
                    row += j - i
        f.put_iovecs(parts, nbytes)
        f.flush()  # the scratch buffer is reused by the next batch

    def _emit_codecs(self, f: QEMUFile, batch: Batch, last_stage: bool,
                     first: list[PageResult] | None = None) -> None:
        """The general pipeline: zero → codecs in order → normal page.

        Per page there is only what cannot be vectorised: sorting out each
        codec answer, and laying header and body side by side.  Flags,
        headers and the byte counts are numpy operations over the batch, and
        the records go out as one buffer: XBZRLE records are ~20 bytes, and
        two iovecs per page cost more than copying them (and the occasional
        4 KiB page) once.  ``first`` is the first codec's answer when it was
        encoded ahead (:meth:`save`).
        """
        b, pages, data, zero, codecs = batch.block, batch.pages, batch.data, batch.zero, batch.codecs
        n = len(pages)
        nk = len(codecs)
        zero_kind, normal_kind = nk, nk + 1
        bodies: list[Any] = [None] * n
        kind_of = np.where(zero, zero_kind, normal_kind)
        flag_of = np.where(zero, _ZERO_C, _PAGE_C)
        skipped = [0] * nk
        todo = np.flatnonzero(~zero)
        for ci, c in enumerate(codecs):
            if todo.size == 0:
                break
            if ci == 0 and first is not None:
                res = first
            else:
                # data[todo] is a copy (fancy indexing): the snapshot codecs are promised
                res = c.encode_pages(self.rs, b, pages[todo], data[todo], last_stage)
            ext_id = self.ext_ids.get(id(c))
            keep: list[int] = []
            mine: list[int] = []
            skip: list[int] = []
            for k, r in zip(todo.tolist(), res):
                if r is None:
                    keep.append(k)
                elif r is SKIP:
                    skip.append(k)
                elif isinstance(r, NormalFrom):
                    bodies[k] = r.data  # a normal page, from the codec's copy
                else:
                    bodies[k] = r if ext_id is None else bytes((ext_id,)) + bytes(r)  # type: ignore[arg-type]
                    mine.append(k)
            if mine:
                kind_of[mine] = ci
                flag_of[mine] = np.uint64((c.wire_flag if ext_id is None else _F_EXT) | _F_CONT)
            if skip:
                kind_of[skip] = -1  # unchanged: the codec's page, costing nothing
                skipped[ci] += len(skip)
            todo = np.asarray(keep, dtype=np.int64)
        if zero.any():
            zpages = pages[zero]
            for c in codecs:
                c.zero_pages(self.rs, b, zpages, last_stage)
        emit = np.flatnonzero(kind_of >= 0)
        tally = self.tally
        for ci, c in enumerate(codecs):
            tally.add(c.name, skipped[ci], 0)
        if emit.size == 0:
            return
        plist = pages.tolist()
        pm = b.mv
        for k in np.flatnonzero(kind_of == normal_kind).tolist():
            if bodies[k] is None:
                off = plist[k] << PAGE_BITS
                bodies[k] = pm[off : off + PAGE_SIZE]
        for k in np.flatnonzero(zero).tolist():
            bodies[k] = b"\x00"
        hb = ((pages.astype(np.uint64) << _SHIFT) | flag_of).astype(">u8").tobytes()
        parts: list[Any] = []
        ap = parts.append
        for k in emit.tolist():
            ap(hb[8 * k : 8 * k + 8])
            ap(bodies[k])
        name_extra = 0
        if self.last_sent_block is not b:
            # the first record names the block and carries no CONTINUE
            idstr = b.idstr.encode()
            k0 = int(emit[0])
            h0 = (int.from_bytes(hb[8 * k0 : 8 * k0 + 8], "big") & ~_F_CONT).to_bytes(8, "big")
            parts[0] = h0 + bytes([len(idstr)]) + idstr
            name_extra = 1 + len(idstr)
            self.last_sent_block = b
        kinds = kind_of[emit]
        sizes = np.fromiter(map(len, parts[1::2]), dtype=np.int64, count=emit.size) + 8
        sizes[0] += name_extra
        kind_pages = np.bincount(kinds, minlength=nk + 2)
        kind_bytes = np.bincount(kinds, weights=sizes, minlength=nk + 2).astype(np.int64)
        for ci, c in enumerate(codecs):
            tally.add(c.name, int(kind_pages[ci]), int(kind_bytes[ci]))
        tally.add("zero", int(kind_pages[zero_kind]), int(kind_bytes[zero_kind]))
        tally.add("normal", int(kind_pages[normal_kind]), int(kind_bytes[normal_kind]))
        cnt = self.counters
        cnt.duplicate += int(kind_pages[zero_kind])
        cnt.normal += int(kind_pages[normal_kind])
        cnt.encoded += int(kind_pages[:nk].sum())
        cnt.encoded_bytes += int(kind_bytes[:nk].sum())
        blob = b"".join(parts)
        f.put_iovecs([blob], len(blob))
        # out now, not when a megabyte has gathered: in the pause the destination decodes these records
        # while the next batch is encoded (a batch of XBZRLE records is ~20 kB; the write is one syscall)
        f.flush()
