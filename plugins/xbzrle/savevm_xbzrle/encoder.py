"""XBZRLE as a page codec of the RAM plugin (QEMU's save_xbzrle_page / load_xbzrle).

Pipeline rules, as in QEMU 7.2:

* only after the bulk stage (the search's first complete round);
* cache miss → the page is inserted (not in the last stage) and sent as a
  normal page *from the copy that was cached*, so what the destination
  holds and what the cache holds are byte-identical even if the program
  writes the page again before the socket write;
* unchanged page → nothing sent; overflow → normal page, cache refreshed;
* a page sent as zero refreshes its cache entry; the last stage never
  updates the cache.

Unlike QEMU 7.2, a new ``xbzrle-cache-size`` set while migrating takes
effect at the next iteration (QEMU keeps the old cache until the next
migration).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from savevm.errors import CorruptStreamError
from savevm.logging import get_logger
from savevm_ram.codecs import SKIP, NormalFrom, PageCodec, PageResult
from savevm_ram.wire import ENCODING_FLAG_XBZRLE, PAGE_SIZE, Flag
from savevm_xbzrle.cache import KIND_MISS, KIND_OVERFLOW, KIND_UNCHANGED, KIND_XBZRLE, PageCache, xbzrle_save_batch
from savevm_xbzrle.codec import decode, parse_runs
from savevm_xbzrle.stats import XbzrleStats

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMBlock
    from savevm_ram.state import RAMState

log = get_logger("savevm.xbzrle")

#: A rate period whose cache-miss rate is at least this counts towards thrashing ...
THRASH_MISS_RATE = 0.25
#: ... and this many such periods in a row (each ~1 s) make the warning.
THRASH_PERIODS = 3

#: The encoding flag and be16 length that precede every XBZRLE body, by length.
_PREFIX = [bytes((ENCODING_FLAG_XBZRLE,)) + n.to_bytes(2, "big") for n in range(PAGE_SIZE + 1)]



class XbzrleCodec(PageCodec):
    """XBZRLE delta pages against a direct-mapped page cache."""

    name = "xbzrle"
    wire_flag = int(Flag.XBZRLE)
    priority = 10

    def __init__(self) -> None:
        self.cache: PageCache | None = None
        self.stats = XbzrleStats()
        self._pending_size: int | None = None
        self._thrash_periods = 0
        self._thrash_warned = False

    # ------------------------------------------------------------ source
    def enabled(self, config: MigrationConfig) -> bool:
        return config.has("xbzrle")

    def save_setup(self, rs: RAMState) -> None:
        size = rs.config.parameters.xbzrle_cache_size
        self.cache = PageCache(size)
        self.stats = XbzrleStats(cache_size=size)
        self._pending_size = None
        self._thrash_periods = 0
        self._thrash_warned = False

    def configure(self, rs: RAMState, config: MigrationConfig) -> None:
        size = config.parameters.xbzrle_cache_size
        if self.cache is not None and size != self.cache.size_bytes:
            self._pending_size = size  # applied at the next iteration start

    def iteration_start(self, rs: RAMState) -> None:
        if self._pending_size is not None and self.cache is not None:
            old = self.cache.size_bytes
            self.cache.resize(self._pending_size)
            self.stats.cache_size = self._pending_size
            log.info("xbzrle_cache_resize", old=old, new=self._pending_size)
            self._pending_size = None

    def active(self, rs: RAMState) -> bool:
        return not rs.bulk_stage

    def encode_pages(self, rs: RAMState, block: RAMBlock, pages: np.ndarray, data: np.ndarray,
                     last_stage: bool) -> list[PageResult]:
        assert self.cache is not None
        addrs = block.offset + np.asarray(pages, dtype=np.int64) * PAGE_SIZE
        # the pipeline's own copy of the pages (see PageCodec.encode_pages): cached, encoded and, for misses
        # and overflows, sent (r.copies) from the same bytes, without another copy
        r = xbzrle_save_batch(self.cache, addrs, data, rs.sync_count, last_stage, snapshot=True)
        st = self.stats
        st.cache_miss += r.cache_miss
        st.pages += r.pages
        st.overflow += r.overflow
        st.bytes += PAGE_SIZE * r.overflow
        out: list[PageResult] = []
        prefix = _PREFIX
        copies = r.copies
        enc_bytes = 0
        for k, (kind, enc) in enumerate(zip(r.kind.tolist(), r.encoded)):
            if kind == KIND_XBZRLE:
                assert enc is not None
                body = prefix[len(enc)] + enc
                enc_bytes += len(body)
                out.append(body)
            elif kind == KIND_UNCHANGED:
                out.append(SKIP)
            elif kind in (KIND_MISS, KIND_OVERFLOW):
                src = copies.get(k)
                out.append(NormalFrom((data[k] if src is None else src).data))
            else:
                out.append(None)
        st.bytes += enc_bytes
        return out

    def zero_pages(self, rs: RAMState, block: RAMBlock, pages: np.ndarray, last_stage: bool) -> None:
        if self.cache is None:
            return
        addrs = block.offset + np.asarray(pages, dtype=np.int64) * PAGE_SIZE
        self.cache.insert_batch(addrs, None, rs.sync_count)

    def on_period(self, rs: RAMState, pages_sent_delta: int) -> None:
        self.stats.update_rates(pages_sent_delta)
        if pages_sent_delta > 0 and not rs.bulk_stage:
            self._check_thrashing(rs)

    def _check_thrashing(self, rs: RAMState) -> None:
        """Say once when the cache is too small for what the program rewrites.

        A direct-mapped cache smaller than the working set cannot be fixed
        by any stop rule: the pages that lose their slot go out whole every
        pass, so the migration stalls or converges only by throttling.
        Three rate periods (~3 s) in a row with a quarter or more of the
        pages missing, past the cold first pass, is that case; the size
        suggested is what would have held the pages that hit and missed.
        """
        st = self.stats
        if st.cache_miss_rate >= THRASH_MISS_RATE:
            self._thrash_periods += 1
        else:
            self._thrash_periods = 0
        if self._thrash_periods < THRASH_PERIODS or self._thrash_warned or self.cache is None:
            return
        self._thrash_warned = True
        size = self.cache.size_bytes
        ram = max(1, sum(b.used_length for b in rs.ram))
        want = size / max(1e-6, 1.0 - min(st.cache_miss_rate, 0.99))
        suggest = min(1 << max(0, int(want - 1).bit_length()), 1 << max(0, int(ram - 1).bit_length()))
        log.warning("xbzrle_cache_thrashing", cache_size=size, cache_miss_rate=round(st.cache_miss_rate, 3),
                    suggested_cache_size=suggest,
                    hint=f"a {size >> 20} MiB xbzrle-cache-size holds fewer pages than the program rewrites; "
                         f"missed pages go out whole every pass: set xbzrle-cache-size={suggest >> 20}M or more")

    def query_stats(self) -> dict[str, Any]:
        return {"xbzrle-cache": self.stats.as_qmp()}

    # ------------------------------------------------------------ destination
    def load_page(self, f: QEMUFile, block: RAMBlock, page: int, dest: np.ndarray, offset: int) -> None:
        if self._load_staged(f, dest):
            return
        # the record is split across reads, or it is corrupt: the careful path says where and why
        flag_off = f.pos
        flag = f.get_byte()
        if flag != ENCODING_FLAG_XBZRLE:
            raise CorruptStreamError(f"XBZRLE page with wrong encoding flag 0x{flag:02x}, expected 0x01", flag_off)
        len_off = f.pos
        n = f.get_be16()
        if n > PAGE_SIZE:
            raise CorruptStreamError(f"XBZRLE length {n} exceeds the page size {PAGE_SIZE}", len_off)
        body_off = f.pos
        self._apply(f.get_bytes(n, limit=PAGE_SIZE), block, page, dest, body_off)

    @staticmethod
    def _load_staged(f: QEMUFile, dest: np.ndarray) -> bool:
        """The common case in one pass: a valid record wholly in the read stage, applied from there.

        The encoding is validated straight out of the stage (no copy) by the
        same parser the careful path uses, and only then written into
        ``dest`` and consumed.  Anything else (a record not yet staged, a
        malformed one) returns False with nothing consumed or written, for
        the careful path to handle and report with its offset.
        """
        buf = f.buffered()
        avail = len(buf)
        if avail < 3 or buf[0] != ENCODING_FLAG_XBZRLE:
            return False
        end = 3 + ((buf[1] << 8) | buf[2])
        if end - 3 > PAGE_SIZE or avail < end or not isinstance(dest, np.ndarray) or dest.shape != (PAGE_SIZE,):
            return False
        body = buf[3:end]
        try:
            runs, _ = parse_runs(body)  # type: ignore[arg-type]  # a memoryview indexes like bytes
        except CorruptStreamError:
            return False
        mv = dest.data
        for d, i, count in runs:
            mv[d : d + count] = body[i : i + count]
        f.consume(end)
        return True

    @staticmethod
    def _apply(enc: bytes, block: RAMBlock, page: int, dest: np.ndarray, body_off: int) -> None:
        """Validate the whole encoding, then write its runs into ``dest`` (unchanged if it is corrupt)."""
        try:
            if isinstance(dest, np.ndarray) and dest.shape == (PAGE_SIZE,) and dest.dtype == np.uint8:
                runs, _ = parse_runs(enc)
                mv = dest.data
                for d, s, k in runs:
                    mv[d : d + k] = enc[s : s + k]
            else:
                decode(enc, dest)
        except CorruptStreamError as exc:
            inner = exc.offset or 0
            raise CorruptStreamError(
                f"XBZRLE page {block.idstr!r}@0x{page * PAGE_SIZE:x} does not decode: {exc.detail}",
                body_off + inner) from exc
