"""Loading sparse memory: zero and normal pages alternating, against dense memory of the same size.

Run: ``python benchmarks/bench_ram_sparse.py`` (``--size``, default 64M; ``--runs``, default 5,
medians reported).

Why: real memory (a hash table, a heap) is sparse, so a RAM stream interleaves short runs of
ZERO and PAGE records.  The loader's fast path applies runs of equal records with numpy; it once
examined every header left in its 4 MiB staging buffer at each run, which made sparse streams load
in quadratic time.  This measures ``savevm.restore`` of a snapshot file into a fresh, pre-touched
block for four layouts; the baseline is a ``numpy`` copy of the same number of bytes, measured in
the same run.  ``records`` is how many page records the stream holds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _p in (_ROOT, _ROOT / "plugins" / "ram"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import savevm  # noqa: E402
import savevm_ram  # noqa: E402
from savevm.config import parse_size  # noqa: E402

PAGE = 4096


def _layout(name: str, size: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    mem = np.frombuffer(rng.bytes(size), dtype=np.uint8).copy()
    pages = mem.reshape(-1, PAGE)
    if name == "alternating":
        pages[1::2] = 0
    elif name == "1 in 3 used":
        pages[np.arange(len(pages)) % 3 != 0] = 0
    elif name == "random 10% used":
        pages[rng.random(len(pages)) >= 0.10] = 0
    return mem


def _registry(mem: np.ndarray) -> savevm.SectionRegistry:
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("m", mem)]))
    return reg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64M")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    size = parse_size(args.size) // PAGE * PAGE
    tmp = Path(tempfile.mkdtemp(prefix="bench-sparse-"))
    print(f"restore of {size >> 20} MiB into a pre-touched block, median of {args.runs}")
    print(f"{'layout':<16} {'records':>8} {'savevm s':>9} {'pages/s':>10} {'baseline s':>11}  baseline")
    for name in ("dense", "alternating", "1 in 3 used", "random 10% used"):
        src = _layout(name, size)
        path = tmp / "s.mig"
        savevm.snapshot(path, _registry(src))
        dst = np.ones(size, dtype=np.uint8)  # touched: first-touch cost is not what is measured
        times, base = [], []
        for _ in range(args.runs):
            reg = _registry(dst)
            t0 = time.perf_counter()
            savevm.restore(path, reg)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.copyto(dst, src)
            base.append(time.perf_counter() - t0)
        assert np.array_equal(src, dst)
        t, b = statistics.median(times), statistics.median(base)
        n = size // PAGE
        print(f"{name:<16} {n:>8} {t:>9.3f} {n / t:>10,.0f} {b:>11.4f}  numpy copy of {size >> 20} MiB")


if __name__ == "__main__":
    main()
