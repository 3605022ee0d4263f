"""The codec: one page in, a self-delimiting compressed body out (or None: not worth it).

Wire form of a page body (after the RAM page header savevm writes, flag
0x800 and the codec id the stream announced at setup): ``be16 length`` then
``length`` bytes of one zstd frame that decompresses to exactly 4096 bytes.
The body must carry its own length: on the destination nothing else tells
where it ends, and the next record begins right after it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyzstd

from savevm.errors import CorruptStreamError
from savevm_ram import PageCodec

PAGE_SIZE = 4096
#: a body longer than this would not have been sent (it saves nothing); refuse it unread
MAX_BODY = PAGE_SIZE - 3


class ZstdCodec(PageCodec):
    """zstd per page; pages that do not shrink go as normal pages."""

    name = "zstd"
    capability = "zstd"
    #: after XBZRLE (10) and zlib (20): a delta of a cached page beats compressing it afresh
    priority = 60

    def __init__(self, level: int = 3) -> None:
        self.level = level
        self.pages = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.not_worth_it = 0

    # ------------------------------------------------------------ source
    def encode_pages(self, rs: Any, block: Any, pages: np.ndarray, data: np.ndarray,
                     last_stage: bool) -> list[Any]:
        """A batch of non-zero pages: compress each; keep it only if header + body beat the raw page."""
        out: list[Any] = []
        level = self.level
        for row in data:
            packed = pyzstd.compress(row.tobytes(), level)
            if len(packed) > MAX_BODY - 1:
                out.append(None)
                self.not_worth_it += 1
                continue
            out.append(len(packed).to_bytes(2, "big") + packed)
            self.pages += 1
            self.bytes_in += PAGE_SIZE
            self.bytes_out += 2 + len(packed)
        return out

    def query_stats(self) -> dict[str, Any]:
        """One key named after the codec, as QEMU's ``xbzrle-cache`` and ``compression`` are."""
        ratio = round(self.bytes_in / self.bytes_out, 2) if self.bytes_out else 0
        return {"zstd": {"pages": self.pages, "bytes": self.bytes_out, "compression-ratio": ratio,
                         "not-worth-it": self.not_worth_it, "level": self.level}}

    # ------------------------------------------------------------ destination
    def load_page(self, f: Any, block: Any, page: int, dest: np.ndarray, offset: int) -> None:
        """Read our body and write the page; every length is bounded before it is trusted."""
        n = f.get_be16()
        if not 0 < n <= MAX_BODY:
            raise CorruptStreamError(f"zstd page body of {n} bytes (expected 1..{MAX_BODY})", offset)
        packed = f.get_bytes(n, limit=MAX_BODY)
        d = pyzstd.ZstdDecompressor()
        try:
            raw = d.decompress(packed, PAGE_SIZE + 1)  # never more than a page plus one byte
        except pyzstd.ZstdError as exc:
            raise CorruptStreamError(f"zstd page does not decompress: {exc}", offset) from exc
        if len(raw) != PAGE_SIZE or not d.eof or d.unused_data:
            raise CorruptStreamError(f"zstd page decompressed to {len(raw)} bytes, expected one frame of "
                                     f"exactly {PAGE_SIZE}", offset)
        dest[:] = np.frombuffer(raw, dtype=np.uint8)
