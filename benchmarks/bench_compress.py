"""Page compression on English-like text: zlib (what QEMU uses) against zlib-ng, level by level.

Run: ``python benchmarks/bench_compress.py`` (``--pages`` default 4096, ``--runs`` default 3,
medians reported).

The pages are ``savevm demo --fill text`` memory (``savevm_ram.demo.english_like_text``),
each compressed on its own into one zlib stream, as ``COMPRESS_PAGE`` records carry them.
For every level: the bytes out per byte in (wire/RAM, smaller is better) and MB/s of pages
in one thread, for Python's zlib (the same library and algorithm as QEMU 7.2) and for
zlib-ng, plus what savevm runs for that ``compress-level`` (``savevm_ram.compress.page_compressor``:
ISA-L at levels 1-3 when the ``isal`` extra is installed, else a zlib-ng level), which must shrink
pages at least as much as zlib does at that level.  The same-run baseline is zlib itself.

A second table prices the threads at ``compress-level`` 1, per page, in wall and CPU time:
savevm's codec (``CompressCodec.encode_pages`` on batches of 1024 pages, as the RAM pipeline
hands them over, and ``inflate_pages`` on runs of 1024) with ``compress-threads`` /
``decompress-threads`` 1, 2 and 8, beside the same-run baseline of one 32-page task per
worker on ``compress-threads`` workers (what savevm did before: with more threads than CPUs,
the CPU time per page grows and the pages per second do not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _p in (_ROOT, _ROOT / "plugins" / "ram"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
from zlib_ng import zlib_ng  # noqa: E402

from savevm.config import MigrationConfig  # noqa: E402
from savevm.host import usable_cpus  # noqa: E402
from savevm_ram.compress import CompressCodec, compress_page, page_compressor  # noqa: E402
from savevm_ram.demo import english_like_text  # noqa: E402


def _measure(fn: object, pages: list[bytes], runs: int) -> tuple[float, float]:
    """(wire/RAM, MB/s) of compressing every page on its own."""
    compress = fn  # type: ignore[assignment]
    out = sum(len(compress(p)) for p in pages)  # type: ignore[operator, misc]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for p in pages:
            compress(p)  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    raw = 4096 * len(pages)
    return out / raw, raw / statistics.median(times) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=4096, help="pages of text to compress (default 4096)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs, medians reported (default 3)")
    args = ap.parse_args()
    text = english_like_text(1, args.pages * 4096)
    pages = [text[i : i + 4096].tobytes() for i in range(0, len(text) - 4095, 4096)]
    print(f"page compression of {len(pages)} pages of English-like text, median of {args.runs}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"{'level':>5}  {'zlib wire':>9}  {'zlib MB/s':>9}  {'zlib-ng wire':>12}  {'zlib-ng MB/s':>12}  "
          f"{'savevm runs':>11}  {'savevm wire':>11}  {'savevm MB/s':>11}  speed")
    for level in range(1, 10):
        zw, zs = _measure(lambda p, lv=level: zlib.compress(p, lv), pages, args.runs)
        nw, ns = _measure(lambda p, lv=level: zlib_ng.compress(p, lv), pages, args.runs)
        ours, fn = page_compressor(level)
        sw, ss = (nw, ns) if ours == f"zlib-ng {level}" else _measure(fn, pages, args.runs)
        flag = "" if sw <= zw else "  (larger than zlib!)"
        print(f"{level:>5}  {zw:9.3f}  {zs:9.0f}  {nw:12.3f}  {ns:12.0f}  {ours:>11}  "
              f"{sw:11.3f}  {ss:11.0f}  {ss / zs:.1f}x zlib{flag}")
    threads_table(text, args.runs)


def _timed(fn: object, runs: int, n: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per page of ``fn()`` over ``n`` pages, medians of ``runs``."""
    walls, cpus = [], []
    for _ in range(runs):
        c, t = time.process_time(), time.perf_counter()
        fn()  # type: ignore[operator]
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls) / n * 1e6, statistics.median(cpus) / n * 1e6


def threads_table(text: np.ndarray, runs: int) -> None:
    """Wall and CPU time per page of savevm's codec across thread counts, beside 32-page tasks."""
    data = text[: len(text) // 4096 * 4096].reshape(-1, 4096)
    n = len(data)
    print(f"\ncompress-level 1 with threads, {n} pages in batches of 1024, median of {runs}; "
          f"{usable_cpus()} usable CPUs; microseconds per page")
    print(f"{'threads':>7}  {'32-page tasks wall':>18}  {'cpu':>5}  {'savevm wall':>11}  {'cpu':>5}  "
          f"{'inflate wall':>12}  {'cpu':>5}")
    _name, comp = page_compressor(1)
    bodies = [compress_page(p, comp)[4:] for p in data]  # type: ignore[index]
    for threads in (1, 2, 8):
        tw, tc, ow, oc, iw, ic = _thread_row(threads, data, bodies, runs)
        print(f"{threads:>7}  {tw:18.1f}  {tc:5.1f}  {ow:11.1f}  {oc:5.1f}  {iw:12.1f}  {ic:5.1f}")


def _compress_tasks(pool: ThreadPoolExecutor, batch: np.ndarray, comp: object) -> int:
    """The baseline: one 32-page task per worker, as many tasks as the batch needs."""
    def task(lo: int) -> list[bytes | None]:
        return [compress_page(batch[i], comp) for i in range(lo, min(lo + 32, len(batch)))]  # type: ignore[arg-type]

    return sum(len(fut.result()) for fut in [pool.submit(task, k) for k in range(0, len(batch), 32)])


def _thread_row(threads: int, data: np.ndarray, bodies: list[bytes], runs: int) -> tuple[float, ...]:
    n = len(data)
    batches = [data[lo : lo + 1024] for lo in range(0, n, 1024)]
    _name, comp = page_compressor(1)
    cfg = (MigrationConfig().set_parameter("compress-threads", str(threads))
           .set_parameter("decompress-threads", str(threads)))
    rs = SimpleNamespace(config=cfg)
    codec = CompressCodec()
    codec.save_setup(rs)  # type: ignore[arg-type]
    codec.load_setup(rs)  # type: ignore[arg-type]
    pages = np.arange(1024)
    with ThreadPoolExecutor(threads) as pool:
        tw, tc = _timed(lambda: [_compress_tasks(pool, b, comp) for b in batches], runs, n)
    ow, oc = _timed(lambda: [codec.encode_pages(rs, None, pages[: len(b)], b, False)  # type: ignore[arg-type]
                             for b in batches], runs, n)
    iw, ic = _timed(lambda: [codec.inflate_pages(bodies[lo : lo + 1024]) for lo in range(0, n, 1024)], runs, n)
    codec.save_cleanup(rs)  # type: ignore[arg-type]
    codec.load_cleanup(rs)  # type: ignore[arg-type]
    return tw, tc, ow, oc, iw, ic


if __name__ == "__main__":
    main()
