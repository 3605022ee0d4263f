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

from zlib_ng import zlib_ng  # noqa: E402

from savevm_ram.compress import page_compressor  # noqa: E402
from savevm_ram.demo import english_like_text  # noqa: E402


def _measure(fn: object, pages: list[bytes], runs: int) -> tuple[float, float]:
    """(wire/RAM, MB/s) of compressing every page on its own."""
    compress = fn  # type: ignore[assignment]
    out = sum(len(compress(p)) for p in pages)  # type: ignore[operator]
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


if __name__ == "__main__":
    main()
