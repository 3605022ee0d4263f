"""The page search (QEMU's ``PageSearchStatus`` and ``find_dirty_block``).

Where the last batch ended (block, page), whether the walk has wrapped
once (the bulk stage: every page is dirty and XBZRLE is not yet used), and
the dirty-batch search itself.  QEMU looks for one dirty page at a time; we
look for up to a batch of them with one ``flatnonzero`` over a window of
the bitmap, so a sparse bitmap (a live workload's random writes) costs one
numpy call per batch instead of several per page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from savevm.logging import get_logger

if TYPE_CHECKING:
    from savevm_ram.block import RAMBlock, RAMList
    from savevm_ram.dirty import DirtyBitmap

log = get_logger("savevm.ram")

#: Most pages handled as one batch (4 MiB): a batch is one numpy pass and one write.
MAX_BATCH_PAGES = 1024
#: Bitmap window scanned per numpy call while searching (64 Ki pages = 256 MiB of RAM).
SEARCH_WINDOW = 1 << 16


class PageSearch:
    """Where the search stands over one RAMList's blocks, and the walk itself."""

    def __init__(self, ram: RAMList, bitmap: DirtyBitmap) -> None:
        self.ram = ram
        self.bitmap = bitmap
        self.blocks: list[RAMBlock] = list(ram)
        #: ram_list.version the block list was taken at (hotplug changes it)
        self.ram_version = ram.version
        self.last_seen_block = 0
        self.last_page = 0
        #: True until the search wraps once (QEMU: !xbzrle_enabled)
        self.bulk_stage = True
        #: times the search has wrapped past the last block: passes over dirty memory completed
        self.rounds = 0

    def reset(self, *, bulk: bool) -> None:
        """QEMU's ram_state_reset: take the block list again and start from the first page."""
        self.blocks = list(self.ram)
        self.ram_version = self.ram.version
        self.last_seen_block = self.last_page = 0
        if bulk:
            self.bulk_stage = True

    def blocks_changed(self) -> bool:
        """Was a block added or removed since the list was taken?"""
        return self.ram.version != self.ram_version

    def find_dirty_batch(self, max_pages: int | None = None) -> tuple[int, np.ndarray] | None:
        """Up to ``max_pages`` dirty pages of one block, in order, from where the search stopped.

        Returns (block index, page numbers) or None when no page is dirty.
        The pages need not be contiguous.  Wrapping past the last block ends
        the bulk stage, as QEMU's find_dirty_block does.
        """
        blocks = self.blocks
        if not blocks:
            return None
        if max_pages is None:
            max_pages = MAX_BATCH_PAGES
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
                self.rounds += 1
                if self.bulk_stage:
                    self.bulk_stage = False
                    log.debug("ram_bulk_stage_end", sync_count=self.bitmap.sync_count)

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
