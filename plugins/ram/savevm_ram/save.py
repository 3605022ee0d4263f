"""The RAM section's source side: QEMU's ``ram_save_setup`` / ``_iterate`` / ``_complete`` / ``_pending``.

:class:`RAMSaver` owns what only the source needs for one migration: the
dirty bitmap, the page search, the page pipeline, the rate periods, the
accounting of bytes sent, and the estimate of what the pending pages will
cost on the wire (:mod:`savevm_ram.estimate`).  It is created at ``save_setup`` and dropped at
``save_cleanup``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from savevm.logging import get_logger
from savevm_ram.dirty import DirtyBitmap
from savevm_ram.estimate import WireEstimator, tally_delta
from savevm_ram.pipeline import PagePipeline
from savevm_ram.search import MAX_BATCH_PAGES, PageSearch
from savevm_ram.wire import (
    PAGE_RECORD_SIZE,
    PAGE_SIZE,
    RAM_CONTROL_FINISH,
    RAM_CONTROL_ROUND,
    RAM_CONTROL_SETUP,
    Flag,
)

if TYPE_CHECKING:
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMList
    from savevm_ram.codecs import PageCodec
    from savevm_ram.control import RAMHooks
    from savevm_ram.state import RAMState
    from savevm_ram.stats import RAMCounters

log = get_logger("savevm.ram")

#: QEMU's MAX_WAIT: an iterate call returns after this long.
MAX_WAIT = 0.050

#: Called with (dirty bytes, transferred bytes) of each closed >= 1 s period (auto-converge).
DirtyPeriodListener = Callable[[int, int], None]


class RAMSaver:
    """The source side of one migration's RAM section."""

    def __init__(self, rs: RAMState, ram: RAMList, counters: RAMCounters, hooks: RAMHooks,
                 codecs: list[PageCodec], on_dirty_period: DirtyPeriodListener | None = None,
                 on_sync: Callable[[float, bool], None] | None = None) -> None:
        self.rs = rs
        self.ram = ram
        self.counters = counters
        self.hooks = hooks
        self.codecs = codecs
        self.on_dirty_period = on_dirty_period
        self.on_sync = on_sync
        self._rounds_synced = 0
        #: prices the pending pages from what the last iterations after the bulk stage cost
        self.estimator = WireEstimator()
        self.bitmap = DirtyBitmap(ram)
        self.search = PageSearch(ram, self.bitmap)
        self.pipeline = PagePipeline(rs, self.bitmap, counters, hooks)
        self.last_stage = False
        self._period_xfer = 0
        self._period_pages = 0

    # ------------------------------------------------------------ ram_save_setup
    def setup(self, f: QEMUFile) -> None:
        """MEM_SIZE + block list (+ savevm's codec list) + EOS; every page starts dirty."""
        start = f.pos
        self.search.reset(bulk=True)
        self.pipeline.start(self.codecs)
        for c in self.codecs:
            c.save_setup(self.rs)
        self.bitmap.start()
        self.sync()
        blocks = self.search.blocks
        log.info("ram_save_setup", blocks=len(blocks), total=self.ram.total_bytes,
                 codecs=[c.name for c in self.codecs])
        f.put_be64(self.ram.total_bytes | Flag.MEM_SIZE)
        for b in blocks:
            f.put_counted_string(b.idstr)
            f.put_be64(b.used_length)
        ext = self.pipeline.ext_codecs()
        if ext:
            # savevm extension: name the third-party codecs this stream will use
            f.put_be64(Flag.SAVEVM_CODECS)
            f.put_byte(len(ext))
            for i, c in enumerate(ext):
                f.put_byte(i)
                f.put_counted_string(c.name)
        self.hooks.refresh()
        self.hooks.before_iterate(self.rs, f, RAM_CONTROL_SETUP)
        self.hooks.after_iterate(self.rs, f, RAM_CONTROL_SETUP)
        f.put_be64(Flag.EOS)
        f.flush()
        self._account(f.pos - start, precopy=True)

    # ------------------------------------------------------------ ram_save_iterate
    def iterate(self, f: QEMUFile) -> bool:
        """Send dirty pages until the rate limit trips or 50 ms pass; EOS.  True when none is left."""
        start = f.pos
        oob0 = self.pipeline.oob_bytes
        self._follow_hotplug()
        self.hooks.refresh()
        bulk = self.search.bulk_stage
        sent0 = self.pipeline.tally.snapshot()
        for c in self.codecs:
            c.iteration_start(self.rs)
        self.hooks.before_iterate(self.rs, f, RAM_CONTROL_ROUND)
        t0 = time.monotonic()
        done = False
        search, pipeline = self.search, self.pipeline
        while not f.rate_limit_exceeded():
            found = search.find_dirty_batch(_batch_budget(f))
            if found is None:
                done = True
                break
            bi, pages = found
            pipeline.save(f, search.blocks[bi], pages, last_stage=False)
            if time.monotonic() - t0 > MAX_WAIT:
                break
        pipeline.drain(f)
        self.hooks.after_iterate(self.rs, f, RAM_CONTROL_ROUND)
        f.put_be64(Flag.EOS)
        f.flush()
        self._account(f.pos - start + self.pipeline.oob_bytes - oob0, precopy=True)
        if not bulk and not search.bulk_stage:
            self.estimator.add_iteration(tally_delta(self.pipeline.tally.snapshot(), sent0))
        return done

    # ------------------------------------------------------------ ram_save_complete
    def complete(self, f: QEMUFile) -> None:
        """Final sync, every remaining page, EOS (the program is paused)."""
        start = f.pos
        oob0 = self.pipeline.oob_bytes
        self.last_stage = True
        self._follow_hotplug()
        self.sync(final=True)
        self.hooks.refresh()
        self.hooks.before_iterate(self.rs, f, RAM_CONTROL_FINISH)
        search, pipeline = self.search, self.pipeline
        while (found := search.find_dirty_batch()) is not None:
            bi, pages = found
            pipeline.save(f, search.blocks[bi], pages, last_stage=True)
        pipeline.drain(f)
        self.hooks.after_iterate(self.rs, f, RAM_CONTROL_FINISH)
        f.put_be64(Flag.EOS)
        f.flush()
        self._account(f.pos - start + self.pipeline.oob_bytes - oob0, precopy=False)

    # ------------------------------------------------------------ ram_save_pending
    def pending(self, threshold: int) -> int:
        """Dirty bytes; re-sync first when already below ``threshold``."""
        remaining = self.bitmap.remaining_bytes
        if remaining < threshold:
            self.sync()
            remaining = self.bitmap.remaining_bytes
        return remaining

    def pending_wire(self, threshold: int) -> int:
        """Expected wire bytes of the dirty pages; re-sync first when already below ``threshold``."""
        est = self.estimator.estimate(self.bitmap.remaining_bytes // PAGE_SIZE)
        if est < threshold:
            self.sync()
            est = self.estimator.estimate(self.bitmap.remaining_bytes // PAGE_SIZE)
        return est

    def cleanup(self) -> None:
        """Logging off and codecs released, whatever the outcome."""
        self.pipeline.discard()
        self.bitmap.stop()
        for c in self.codecs:
            c.save_cleanup(self.rs)

    # ------------------------------------------------------------ internals
    def _follow_hotplug(self) -> None:
        """A block was added or removed since the last chunk: QEMU's ram_state_reset.

        The search restarts, the next page carries its block name again, and
        the bitmap follows the new block list before anything is searched.
        """
        if not self.search.blocks_changed():
            return
        self.search.reset(bulk=False)
        self.pipeline.last_sent_block = None
        self.bitmap.follow_blocks()
        self.counters.total = self.ram.total_bytes

    def sync(self, *, final: bool = False) -> None:
        """migration_bitmap_sync: fold dirt in, and close a >= 1 s rate period.

        The ``final`` sync (completion) closes any period of at least 100 ms,
        so a migration shorter than a second still reports its rates.
        """
        t0 = time.monotonic()
        self.bitmap.sync(final=final)
        self.counters.dirty_sync_count = self.bitmap.sync_count
        for c in self.codecs:
            c.on_sync(self.rs)
        if self.on_sync is not None and not final:
            # a pass over dirty memory ended if the search went round since the last sync (a sync in
            # mid-pass, when what is left looked small enough, continues the same pass)
            rounds = self.search.rounds
            self.on_sync(time.monotonic() - t0, rounds != self._rounds_synced)
            self._rounds_synced = rounds
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
        for c in self.codecs:
            c.on_period(self.rs, pages)
        if self.on_dirty_period is not None:
            self.on_dirty_period(dirty_pages * PAGE_SIZE, xfer)

    def _account(self, nbytes: int, *, precopy: bool) -> None:
        self.counters.transferred += nbytes
        if precopy:
            self.counters.precopy_bytes += nbytes
        else:
            self.counters.downtime_bytes += nbytes


def _batch_budget(f: QEMUFile) -> int:
    """Pages the next batch may hold so the window's budget is passed by at most one page.

    QEMU checks ``qemu_file_rate_limit`` before every page; we check between
    batches, so a batch must not be longer than what is left of the budget,
    or a 4 MiB batch would overshoot a small ``max-bandwidth`` many times over.
    """
    limit = f.rate_limit_max
    if not limit:
        return MAX_BATCH_PAGES
    left = limit - f.rate_limit_used
    return max(1, min(MAX_BATCH_PAGES, left // PAGE_RECORD_SIZE + 1))
