"""Dirty logging and the migration bitmap.

Two providers, chosen per block:

* ``tracked``: the program writes through :meth:`RAMBlock.write` or calls
  :meth:`RAMBlock.mark_dirty`; marks land in a per-block log (one byte per
  page, guarded by a lock so any thread may write) which a sync folds into
  the migration bitmap.  Costs 1 byte per 4 KiB page (256 KiB per GiB).
* ``compare``: no cooperation needed.  A shadow copy of the block is taken
  when logging starts and each sync compares memory with it chunk by chunk
  in numpy, refreshing the shadow for pages that differ.  Costs **a full
  copy of the block** (1 GiB of RAM for a 1 GiB block) and reads twice the
  block size per sync (about 0.1 s per GiB here).

One :class:`DirtyBitmap` per migration holds the bitmap (one bool per page,
per block) and QEMU's counters: dirty pages in the current period, the
dirty page rate and the bitmap sync count.

The tracked provider trusts the program; :class:`TrackerAudit` checks that
trust cheaply.  At a sync (at most every :data:`AUDIT_INTERVAL` seconds,
and always at the final one) it fingerprints a rotating sample of pages
and re-checks the sample of the previous check: a sampled page whose
contents changed although no write was logged for it since was written
around the tracker, and the migration fails before the destination can take
over a copy that differs (the check runs at the final sync too, while the
program is paused).  Checking at every sync cost ~27 ms a sync for two
256 MiB blocks, and a migration near convergence syncs many times a
second; the logs of the syncs between two checks are folded together, so
nothing is missed, only found up to a second later (and always before the handover).
"""

from __future__ import annotations

import time

import numpy as np

# Imported here, when the plugin loads, rather than inside a migration's setup: the audit's first
# np.random.default_rng() imports numpy.random (about 19 ms here) and its first np.unique() imports
# numpy.ma (about 12 ms), one-time costs that otherwise land in the first migration's setup time.
import numpy.ma  # noqa: F401
import numpy.random  # noqa: F401

from savevm.errors import MigrationError
from savevm.logging import get_logger
from savevm_ram.block import RAMBlock, RAMList
from savevm_ram.fingerprint import fingerprints_at
from savevm_ram.wire import PAGE_SIZE

log = get_logger("savevm.ram")

#: Pages compared per numpy call by the compare provider (16 MiB).
COMPARE_CHUNK_PAGES = 4096
#: Pages of a tracked block the audit keeps fingerprints of (32 MiB: ~6 ms to re-check at a sync).
AUDIT_SAMPLE_PAGES = 8192
#: Sampled pages replaced by fresh ones at each check, so the sample walks the whole block.
AUDIT_ROTATE_PAGES = 1024
#: Seconds between two checks of one block's sample (the final sync always checks).
AUDIT_INTERVAL = 1.0


class UntrackedWriteError(MigrationError):
    """Pages changed although nobody marked them dirty: the destination would hold stale copies."""


class TrackerAudit:
    """A rotating sample of one tracked block's pages, with their fingerprints at the last sync."""

    def __init__(self, block: RAMBlock, seed: int) -> None:
        self.block = block
        self._rng = np.random.default_rng(seed)
        self.pages = np.empty(0, dtype=np.intp)
        self.fps = np.empty(0, dtype=np.uint64)
        #: pages seen changed without a mark at the last check (cleared if the mark comes by the next)
        self.suspects = np.empty(0, dtype=np.intp)
        #: pages checked so far (for the stats and the tests)
        self.checked = 0
        #: the logs of the syncs since the last check, folded together
        self._logged: np.ndarray | None = None
        self._last_check = float("-inf")

    def observe(self, logged: np.ndarray, *, final: bool = False) -> None:
        """A sync took ``logged``: check now if :data:`AUDIT_INTERVAL` has passed (or ``final``), else fold it in."""
        acc = self._logged
        if acc is None or acc.shape != logged.shape:
            acc = logged.copy()
        else:
            acc |= logged
        now = time.monotonic()
        if final or now - self._last_check >= AUDIT_INTERVAL:
            self._logged = None
            self._last_check = now
            self.check(acc, final=final)
        else:
            self._logged = acc

    def check(self, logged: np.ndarray, *, final: bool = False) -> None:
        """After a sync's log was taken: verify unlogged sampled pages, then rotate the sample.

        ``logged`` is the tracker's log of this period (True = a write was
        recorded).  A program may write a page and mark it a moment later
        (``RAMBlock.write`` does exactly that), so a changed, unlogged page
        is only a suspect until the next sync: if its mark arrived by then
        it was a tracked write.  At the final sync the program is paused and
        every mark is in, so a change without one is a verdict.
        """
        b = self.block
        view = b.host[: b.pages * PAGE_SIZE].reshape(-1, PAGE_SIZE)
        untracked = self.suspects[self.suspects < b.pages]
        untracked = untracked[~logged[untracked]]
        keep = self.pages < b.pages
        pages, fps = self.pages[keep], self.fps[keep]
        suspects = np.empty(0, dtype=np.intp)
        if pages.size:
            now = fingerprints_at(view, pages)
            quiet = ~logged[pages]
            changed = pages[quiet & (now != fps)]
            self.checked += int(np.count_nonzero(quiet))
            if final:
                untracked = np.union1d(untracked, changed)
            else:
                suspects = changed
            fps = now
        self.suspects = suspects
        if untracked.size:
            raise UntrackedWriteError(
                f"RAMBlock {b.idstr!r}: {int(untracked.size)} sampled page(s) (e.g. page {int(untracked[0])}) "
                "changed without being marked dirty, so the destination would hold stale copies: write "
                "through RAMBlock.write() or call mark_dirty(), or register the block with dirty='compare'")
        # rotate: drop the oldest, add fresh random pages
        if pages.size >= AUDIT_SAMPLE_PAGES:
            pages, fps = pages[AUDIT_ROTATE_PAGES:], fps[AUDIT_ROTATE_PAGES:]
        want = min(AUDIT_ROTATE_PAGES if pages.size else AUDIT_SAMPLE_PAGES, b.pages)
        if want:
            fresh = np.unique(self._rng.integers(0, b.pages, want, dtype=np.intp))
            fresh = np.setdiff1d(fresh, pages, assume_unique=True)
            pages = np.concatenate([pages, fresh])
            fps = np.concatenate([fps, fingerprints_at(view, fresh)])
        self.pages, self.fps = pages, fps


class DirtyBitmap:
    """The migration bitmap over a RAMList, and the sync that feeds it."""

    def __init__(self, ram: RAMList) -> None:
        self.ram = ram
        self.bitmaps: dict[str, np.ndarray] = {}
        self._shadows: dict[str, np.ndarray] = {}
        #: migration_dirty_pages: bits set in the bitmap
        self.dirty_pages = 0
        #: ram_counters.dirty_sync_count
        self.sync_count = 0
        #: pages newly dirtied since the period started (num_dirty_pages_period)
        self.dirty_pages_period = 0
        #: pages per second over the last completed period (>= 1 s)
        self.dirty_pages_rate = 0
        self.period_start = time.monotonic()
        self.started = False
        #: tracked blocks' audits (see TrackerAudit); off with audit=False
        self.audit = True
        self._audits: dict[str, TrackerAudit] = {}

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Every page dirty (bulk stage), logging on (ram_init_bitmaps)."""
        for b in self.ram:
            self._start_block(b)
        self.started = True
        self.period_start = time.monotonic()

    def _start_block(self, b: RAMBlock) -> None:
        bm = np.zeros(b.max_length // PAGE_SIZE, dtype=np.bool_)
        bm[: b.pages] = True
        self.bitmaps[b.idstr] = bm
        self.dirty_pages += b.pages
        if b.dirty_provider == "tracked":
            b._start_log()
            if self.audit:
                self._audits[b.idstr] = TrackerAudit(b, seed=len(self._audits) + 1)
        else:
            self._shadows[b.idstr] = b.host[: b.max_length].copy()

    def stop(self) -> None:
        """Logging off; shadows freed."""
        for b in self.ram:
            b._stop_log()
        self._shadows.clear()
        self._audits.clear()
        self.started = False

    # ------------------------------------------------------------ sync
    def follow_blocks(self) -> int:
        """Follow hotplug: a new block starts all dirty, a removed one is forgotten.

        Returns the pages added (already counted in ``dirty_pages``).
        """
        present = {b.idstr for b in self.ram}
        for name in [n for n in self.bitmaps if n not in present]:
            self.dirty_pages -= int(np.count_nonzero(self.bitmaps.pop(name)))
            self._shadows.pop(name, None)
            self._audits.pop(name, None)
        added = 0
        for b in self.ram:
            if b.idstr not in self.bitmaps:
                self._start_block(b)
                added += b.pages
        return added

    def sync(self, *, final: bool = False) -> int:
        """Fold new dirt into the bitmap (migration_bitmap_sync); return newly dirty pages.

        ``final``: the program is paused (the last sync), so the tracker
        audit gives its verdict on every sampled page.
        """
        t0 = time.monotonic()
        # hot-added blocks: everything is dirty (counted in dirty_pages by _start_block)
        added = self.follow_blocks()
        newly = 0
        for b in self.ram:
            bm = self.bitmaps[b.idstr]
            if b.dirty_provider == "tracked":
                new = b._take_log()
                new[b.pages :] = False
                audit = self._audits.get(b.idstr)
                if audit is not None:
                    audit.observe(new, final=final)
                fresh = new & ~bm
                n = int(np.count_nonzero(fresh))
                if n:
                    bm |= new
            else:
                n = self._compare_block(b, bm)
            newly += n
        self.dirty_pages += newly
        newly += added
        self.dirty_pages_period += newly
        self.sync_count += 1
        now = time.monotonic()
        log.debug("migration_bitmap_sync_end", dirty_pages=newly, sync_count=self.sync_count,
                  ms=round((now - t0) * 1000, 2))
        return newly

    def _compare_block(self, b: RAMBlock, bm: np.ndarray) -> int:
        shadow = self._shadows[b.idstr]
        n_pages = b.pages
        newly = 0
        for first in range(0, n_pages, COMPARE_CHUNK_PAGES):
            cnt = min(COMPARE_CHUNK_PAGES, n_pages - first)
            a, z = first * PAGE_SIZE, (first + cnt) * PAGE_SIZE
            cur = b.host[a:z].view(np.uint64).reshape(cnt, PAGE_SIZE // 8)
            sh = shadow[a:z].view(np.uint64).reshape(cnt, PAGE_SIZE // 8)
            changed = (cur != sh).any(axis=1)
            idx = np.flatnonzero(changed)
            if idx.size:
                # refresh the shadow before anything is sent: a write racing this
                # copy is either in the copy (and sent, since the page is dirty) or
                # after it (and found by the next sync)
                sh[idx] = cur[idx]
                seg = bm[first : first + cnt]
                newly += int(np.count_nonzero(~seg[idx]))
                seg[idx] = True
        return newly

    def end_period_if_due(self, min_seconds: float = 1.0) -> tuple[float, int] | None:
        """Close the rate period if it lasted ``min_seconds``; return (seconds, pages)."""
        now = time.monotonic()
        elapsed = now - self.period_start
        if elapsed < min_seconds:
            return None
        pages = self.dirty_pages_period
        self.dirty_pages_rate = int(pages / elapsed)
        self.dirty_pages_period = 0
        self.period_start = now
        return elapsed, pages

    # ------------------------------------------------------------ queries
    def bitmap(self, b: RAMBlock) -> np.ndarray:
        """The block's bitmap (bool per page, max_length pages)."""
        return self.bitmaps[b.idstr]

    def clear(self, b: RAMBlock, first: int, count: int) -> None:
        """Clear bits of pages about to be sent (they are known set).

        A compared block's shadow takes the pages' content here, before
        they are read for sending: the next sync must compare against what
        the destination got, not against the last sync.  Otherwise a page
        changed after that sync, sent, and changed back before the next one
        would read as clean while the destination holds the changed copy.
        A write after this copy is found by the next sync (and sent again if
        it was already in what was sent).
        """
        self.bitmaps[b.idstr][first : first + count] = False
        self.dirty_pages -= count
        shadow = self._shadows.get(b.idstr)
        if shadow is not None:
            a, z = first * PAGE_SIZE, (first + count) * PAGE_SIZE
            shadow[a:z] = b.host[a:z]

    def clear_pages(self, b: RAMBlock, pages: np.ndarray) -> None:
        """Clear the bits of pages about to be sent (known set), by index; see :meth:`clear`."""
        self.bitmaps[b.idstr][pages] = False
        self.dirty_pages -= len(pages)
        shadow = self._shadows.get(b.idstr)
        if shadow is not None:
            n = b.pages * PAGE_SIZE
            shadow[:n].reshape(-1, PAGE_SIZE)[pages] = b.host[:n].reshape(-1, PAGE_SIZE)[pages]

    @property
    def remaining_bytes(self) -> int:
        """Dirty pages × page size (query-migrate ``remaining``)."""
        return self.dirty_pages * PAGE_SIZE
