"""zlib page compression (capability ``compress``, RAM_SAVE_FLAG_COMPRESS_PAGE).

Wire body, as QEMU 7.2 writes it: ``be32 clen`` + one complete zlib-format
stream (RFC 1950 header and Adler-32 trailer) of the 4096-byte page.  The
loader rejects ``clen > compressBound(4096) = 4110`` and anything that does
not inflate to exactly one page.

Both deflate libraries release the GIL while they work, but each call
takes it back, and threads that outnumber the CPUs only queue for it: with
8 threads on 2 CPUs a page cost 1.6x the CPU time of one thread, for no
more pages per second.  So a batch is cut into one equal share per thread,
``min(compress-threads, usable CPUs)`` of them (``benchmarks/bench_compress.py``
prints the cost per page).  The shares go to the compress threads and the
saving thread writes the previous batch meanwhile (:attr:`overlaps`, as
QEMU's migration thread collects finished pages while its threads work):
without that, the threads waited while each batch's records were built and
written.  The destination cuts runs the same way with ``decompress-threads``.  Like
QEMU, compression stops once XBZRLE takes over after the bulk stage
(``save_page_use_compression``).

Which deflate runs (:func:`page_compressor`): at ``compress-level`` 1-3,
ISA-L's level 1 when the optional ``isal`` package is installed
(``pip install 'savevm-ram[isal]'``): on English-like text it leaves 0.401
of a page, less than zlib (QEMU) leaves at levels 1-3 (0.417-0.410), at
about 2.4x zlib-ng's speed.  Otherwise, and at the other levels, zlib-ng
at the level that compresses at least as well as zlib (:data:`ZLIB_NG_LEVEL`).
Every backend writes a standard zlib stream, so the destination (ours or
QEMU's) inflates any of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from zlib_ng import zlib_ng

from savevm.errors import CorruptStreamError
from savevm.host import usable_cpus
from savevm.logging import get_logger
from savevm_ram.codecs import PageCodec
from savevm_ram.wire import PAGE_SIZE, Flag

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMBlock
    from savevm_ram.codecs import PageResult
    from savevm_ram.state import RAMState

log = get_logger("savevm.ram")

#: compressBound(4096) for zlib
COMPRESS_BOUND = 4110
#: compress-level -> zlib-ng level, where zlib-ng's own level compresses less than zlib's.
#: zlib-ng's level 1 is a different algorithm (deflate_quick: static Huffman codes only),
#: faster and weaker than zlib's level 1: on English-like text it leaves 0.54 of a page where
#: zlib leaves 0.42.  Its level 2 leaves 0.40, so compress-level 1 means zlib-ng level 2;
#: at every other level zlib-ng shrinks text at least as much as zlib does
#: (``benchmarks/bench_compress.py`` prints the table).
ZLIB_NG_LEVEL = {1: 2, 9: 8}


def zlib_ng_level(level: int) -> int:
    """The zlib-ng level that compresses at least as well as zlib (QEMU) at ``compress-level``."""
    return ZLIB_NG_LEVEL.get(level, level)


#: compress-level -> ISA-L level, where ISA-L compresses at least as well as zlib does at that level
#: (its level 3, 0.397 of a page, is larger than zlib's 0.394 from level 4 up: zlib-ng runs those)
ISAL_LEVEL = {1: 1, 2: 1, 3: 1}
#: the smallest batch the source splits across compress threads
BATCH = 32
#: the shortest run of compressed pages the destination splits across decompress threads
PARALLEL_MIN = 16


@functools.cache
def _isal_zlib() -> Any | None:
    """ISA-L's zlib-format module, if the optional ``isal`` package is installed (looked up once)."""
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    return isal_zlib


def _isal_compress() -> Callable[..., bytes] | None:
    """ISA-L's compress, or None without the ``isal`` extra."""
    mod = _isal_zlib()
    return None if mod is None else mod.compress  # type: ignore[no-any-return]


def _inflate() -> Callable[[Any], bytes]:
    """The fastest installed whole-buffer zlib inflate (ISA-L's, else zlib-ng's)."""
    mod = _isal_zlib()
    return zlib_ng.decompress if mod is None else mod.decompress  # type: ignore[no-any-return]


def page_compressor(level: int) -> tuple[str, Callable[[Any], bytes]]:
    """(name, compress one page into a zlib stream) for QEMU's ``compress-level``."""
    fast = _isal_compress() if level in ISAL_LEVEL else None
    if fast is not None:
        lv = ISAL_LEVEL[level]
        return f"isal {lv}", functools.partial(fast, level=lv)
    lv = zlib_ng_level(level)
    return f"zlib-ng {lv}", functools.partial(zlib_ng.compress, level=lv)


def compress_page(page: Any, compress: Callable[[Any], bytes]) -> bytes | None:
    """One page -> the wire body (be32 length + zlib stream), or None if it does not shrink.

    Fast deflate levels can expand incompressible data past zlib's
    compressBound(4096) = 4110, which a QEMU destination rejects; such a
    page (anything not smaller than a raw page) goes out as a normal page.
    """
    c = compress(page)
    if len(c) + 4 >= PAGE_SIZE:
        return None
    return len(c).to_bytes(4, "big") + c


class CompressCodec(PageCodec):
    """QEMU's multi-threaded zlib page compression."""

    name = "compress"
    wire_flag = int(Flag.COMPRESS_PAGE)
    priority = 20
    overlaps = True

    def __init__(self) -> None:
        self.level = 1
        self.backend, self._compress = page_compressor(1)
        self.threads = 8
        self._pool: ThreadPoolExecutor | None = None
        self.pages = 0
        self.compressed_size = 0
        self._inflate_fn = _inflate()
        self._shares = 1
        self._helpers = 0
        self._load_pool: ThreadPoolExecutor | None = None

    def enabled(self, config: MigrationConfig) -> bool:
        return config.has("compress")

    def save_setup(self, rs: RAMState) -> None:
        p = rs.config.parameters
        self.level = p.compress_level
        self.backend, self._compress = page_compressor(self.level)
        self.threads = p.compress_threads
        self._shares = min(self.threads, usable_cpus())
        log.info("ram_compress_setup", level=self.level, backend=self.backend, threads=self.threads,
                 running=self._shares)
        self.pages = self.compressed_size = 0
        if self._shares > 1:
            # one worker per share: the saving thread writes the previous batch meanwhile
            self._pool = ThreadPoolExecutor(max_workers=self._shares, thread_name_prefix="savevm-compress")

    def active(self, rs: RAMState) -> bool:
        # once XBZRLE is enabled (after the first round) compression stops
        return not (rs.config.has("xbzrle") and not rs.bulk_stage)

    def encode_pages(self, rs: RAMState, block: RAMBlock, pages: np.ndarray, data: np.ndarray,
                     last_stage: bool) -> list[PageResult]:
        return self.submit_pages(rs, block, pages, data, last_stage)()

    def submit_pages(self, rs: RAMState, block: RAMBlock, pages: np.ndarray, data: np.ndarray,
                     last_stage: bool) -> Callable[[], list[PageResult]]:
        """Every share goes to the pool, so the saving thread is free to write the previous batch."""
        n = len(pages)
        pool = self._pool
        if pool is None or n <= BATCH:
            out = self._count(self._work(data, 0, n))
            return lambda: out
        step = -(-n // self._shares)
        futs = [pool.submit(self._work, data, lo, min(lo + step, n)) for lo in range(0, n, step)]

        def collect() -> list[PageResult]:
            out: list[bytes | None] = []
            for fut in futs:
                out.extend(fut.result())
            return self._count(out)

        return collect

    def _work(self, data: np.ndarray, lo: int, hi: int) -> list[bytes | None]:
        compress = self._compress
        return [compress_page(data[i], compress) for i in range(lo, hi)]

    def _count(self, out: list[bytes | None]) -> list[PageResult]:
        done = [b for b in out if b is not None]
        self.pages += len(done)
        self.compressed_size += sum(len(b) - 4 for b in done)
        return list(out)

    def save_cleanup(self, rs: RAMState) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def query_stats(self) -> dict[str, Any]:
        rate = (self.pages * PAGE_SIZE / self.compressed_size) if self.compressed_size else 0
        return {"compression": {"pages": self.pages, "busy": 0, "busy-rate": 0,
                                "compressed-size": self.compressed_size, "compression-rate": round(rate, 3)}}

    def load_setup(self, rs: RAMState) -> None:
        # decompress-threads counts the loading thread: it inflates one share of each run itself
        self._inflate_fn = _inflate()
        helpers = min(rs.config.parameters.decompress_threads, usable_cpus()) - 1
        self._helpers = helpers
        if helpers > 0 and self._load_pool is None:
            self._load_pool = ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="savevm-decompress")

    def load_cleanup(self, rs: RAMState) -> None:
        if self._load_pool is not None:
            self._load_pool.shutdown(wait=True)
            self._load_pool = None

    def inflate_page(self, data: Any) -> bytes | None:
        """One page's zlib stream -> its 4096 bytes, or None if it is not exactly one complete page.

        On None the loader falls back to :meth:`load_page`, which raises with
        the record's offset.  ISA-L inflates where installed (about 1.1-1.5x
        zlib-ng here).
        """
        try:
            out = self._inflate_fn(data)
        except Exception:  # noqa: BLE001  # each library's own error class: the careful path names the fault
            return None
        return out if len(out) == PAGE_SIZE else None

    def _inflate_share(self, bodies: list[Any]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for b in bodies:
            page = self.inflate_page(b)
            out.append(page)
            if page is None:
                break
        return out

    def inflate_pages(self, bodies: list[Any]) -> list[bytes | None]:
        """Inflate a run of pages across ``decompress-threads``, in order; None marks a failed page.

        The caller stops at the first None (each share stops at its own).

        Both libraries release the GIL while they inflate, so on a run long
        enough to pay for the hand-off the helpers and the loading thread
        inflate equal shares at once.  Every share is waited for before this
        returns, even after a failure: the bodies are views of the stream's
        staging buffer, which the loader reuses as soon as it moves on.
        """
        pool = self._load_pool
        n = len(bodies)
        if pool is None or n < PARALLEL_MIN:
            return self._inflate_share(bodies)
        step = -(-n // (self._helpers + 1))
        futs = [pool.submit(self._inflate_share, bodies[lo : lo + step]) for lo in range(step, n, step)]
        out = self._inflate_share(bodies[:step])
        for fut in futs:
            out.extend(fut.result())
        return out

    def load_page(self, f: QEMUFile, block: RAMBlock, page: int, dest: np.ndarray, offset: int) -> None:
        clen_off = f.pos
        clen = f.get_be32()
        if clen > COMPRESS_BOUND:
            raise CorruptStreamError(
                f"compressed page length {clen} exceeds compressBound(4096) = {COMPRESS_BOUND}", clen_off)
        data = f.get_bytes(clen, limit=COMPRESS_BOUND)
        try:
            d = zlib_ng.decompressobj()
            out = d.decompress(data, PAGE_SIZE + 1)
            if not d.eof or len(out) != PAGE_SIZE:
                raise ValueError(f"inflates to {len(out)} bytes{'' if d.eof else ' (no stream end)'}")
        except (zlib_ng.error, ValueError) as exc:  # type: ignore[misc]  # zlib_ng.error is an exception class
            raise CorruptStreamError(
                f"compressed page {block.idstr!r}@0x{page * PAGE_SIZE:x} does not decompress to one page: {exc}",
                offset) from exc
        dest[:] = np.frombuffer(out, dtype=np.uint8)
