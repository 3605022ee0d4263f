"""Whole RAM blocks as RAM section records: a complete image, not a migration.

``savevm rewrite`` writes a stream that a destination loads in one go: the
block list, then every page of every block once, as QEMU's first pass
would (a zero page as ``ZERO`` + fill byte 0, anything else as ``PAGE``;
the first record of a block names it, the rest carry ``CONTINUE``).  No
dirty tracking, no codecs: nothing changes while an image is written.

Records are built a chunk of pages at a time with numpy (the hot-path
rule): a run of same-kind records sits at a fixed stride in the output
buffer, so its headers and bodies are filled by two strided assignments,
not by a Python step per page.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs
import numpy as np

from savevm_ram.wire import PAGE_RECORD_SIZE, PAGE_SIZE, Flag

if TYPE_CHECKING:
    from savevm.qemufile import QEMUFile

_ZERO_RECORD_SIZE = 8 + 1
_BE64 = np.dtype(">u8")


@attrs.define
class ImageCounts:
    """Records an image wrote, by kind."""

    zero: int = 0
    normal: int = 0


def put_block_list(f: QEMUFile, blocks: Sequence[tuple[str, int]]) -> None:
    """``MEM_SIZE`` with the total, then each block's counted idstr and be64 used length (ram_save_setup)."""
    total = sum(length for _, length in blocks)
    f.put_be64(total | int(Flag.MEM_SIZE))
    for idstr, length in blocks:
        f.put_counted_string(idstr)
        f.put_be64(length)


def put_eos(f: QEMUFile) -> None:
    """End of a RAM chunk."""
    f.put_be64(int(Flag.EOS))


def put_block_pages(f: QEMUFile, idstr: str, chunks: Iterable[np.ndarray], counts: ImageCounts) -> None:
    """Every page of one block, in order; ``chunks`` are consecutive ``(k, 4096)`` uint8 arrays.

    The chunks may be reused buffers: every record is copied into a fresh
    output buffer before it is queued.
    """
    first = 0
    named = False
    for pages in chunks:
        k = len(pages)
        if k == 0:
            continue
        nonzero = np.asarray(np.ascontiguousarray(pages).view(np.uint64).reshape(k, PAGE_SIZE // 8).any(axis=1))
        kinds = np.where(nonzero, int(Flag.PAGE), int(Flag.ZERO)).astype(np.uint64)
        headers = (np.arange(first, first + k, dtype=np.uint64) << np.uint64(12)) | kinds | np.uint64(Flag.CONTINUE)
        if not named:
            # the block's first record names it, without CONTINUE
            head = int(headers[0]) & ~int(Flag.CONTINUE)
            f.put_be64(head)
            f.put_counted_string(idstr)
            if nonzero[0]:
                f.put_buffer(np.ascontiguousarray(pages[0]).data)
                counts.normal += 1
            else:
                f.put_byte(0)
                counts.zero += 1
            named = True
            _put_records(f, pages[1:], nonzero[1:], headers[1:], counts)
        else:
            _put_records(f, pages, nonzero, headers, counts)
        first += k


def _put_records(f: QEMUFile, pages: np.ndarray, nonzero: np.ndarray, headers: np.ndarray,
                 counts: ImageCounts) -> None:
    k = len(pages)
    if k == 0:
        return
    sizes = np.where(nonzero, PAGE_RECORD_SIZE, _ZERO_RECORD_SIZE)
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    hdr_bytes = headers.astype(_BE64).view(np.uint8).reshape(k, 8)
    edges = np.flatnonzero(np.diff(nonzero.view(np.int8))) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [k]))
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    for a, b in zip(starts.tolist(), ends.tolist()):
        n = b - a
        o = int(offsets[a])
        if nonzero[a]:
            recs = out[o : o + n * PAGE_RECORD_SIZE].reshape(n, PAGE_RECORD_SIZE)
            recs[:, :8] = hdr_bytes[a:b]
            recs[:, 8:] = pages[a:b]
            counts.normal += n
        else:
            recs = out[o : o + n * _ZERO_RECORD_SIZE].reshape(n, _ZERO_RECORD_SIZE)
            recs[:, :8] = hdr_bytes[a:b]
            recs[:, 8] = 0
            counts.zero += n
    f.put_buffer_async(out.data)


__all__ = ["ImageCounts", "put_block_list", "put_block_pages", "put_eos"]
