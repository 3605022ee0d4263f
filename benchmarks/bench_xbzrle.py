"""Throughput of the batched XBZRLE codec against same-run numpy baselines.

Run: ``PYTHONPATH=.:plugins/xbzrle python benchmarks/bench_xbzrle.py``
(``--mib`` sets the batch size, ``--runs`` the repetitions; defaults keep the
whole script well under a minute on a 2-core machine).

Workload model: ``new`` differs from ``old`` in short clustered runs -- runs of
1..15 changed bytes (mean 8) separated by geometrically distributed gaps whose
mean is chosen so that the requested fraction of bytes changes.  That is what
guest writes to data structures look like at byte level, and it is the hard
case for XBZRLE (many short runs means many headers).  Throughput is in MB/s
of *page data* (n_pages * 4096 bytes / median time), so the codec figures are
directly comparable with the baselines: a numpy copy of the same bytes and an
elementwise old==new compare, measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _p in (_ROOT, _ROOT / "plugins" / "xbzrle"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from savevm_xbzrle.codec import PAGE_SIZE, decode_batch, encode_batch  # noqa: E402


def make_pair(pages: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (old, new) batches where ``fraction`` of the bytes differ."""
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, (pages, PAGE_SIZE), dtype=np.uint8)
    total = pages * PAGE_SIZE
    mean_run = 8.0
    mean_gap = mean_run * (1.0 - fraction) / fraction
    count = int(total / (mean_run + mean_gap) * 1.2) + 16
    runs = rng.integers(1, 16, count)
    gaps = rng.geometric(1.0 / (mean_gap + 1.0), count)  # >= 1, mean = mean_gap + 1
    starts = np.cumsum(gaps + runs) - runs
    keep = starts < total
    starts, ends = starts[keep], np.minimum(starts[keep] + runs[keep], total)
    edge = np.zeros(total + 1, dtype=np.int8)
    edge[starts] += 1
    edge[ends] -= 1
    mask = np.cumsum(edge[:-1], dtype=np.int8).astype(bool).reshape(pages, PAGE_SIZE)
    new = old.copy()
    new[mask] ^= rng.integers(1, 256, int(mask.sum()), dtype=np.uint8)
    return old, new


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up (allocator, caches)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_row(pages: int, fraction: float, runs: int) -> str:
    """Measure one table row; checks the round trip before timing anything."""
    mb = pages * PAGE_SIZE / 1e6
    old, new = make_pair(pages, fraction, seed=int(fraction * 1000))
    encoded = encode_batch(old, new)
    overflowed = np.array([e is None for e in encoded])
    wire = [e if e is not None else b"" for e in encoded]
    work = old.copy()
    decode_batch(wire, work)
    if not np.array_equal(work, np.where(overflowed[:, None], old, new)):
        raise SystemExit("decode_batch did not reproduce the new pages")

    enc = mb / median_seconds(lambda: encode_batch(old, new), runs)
    dec = mb / median_seconds(lambda: decode_batch(wire, work), runs)
    cpy = mb / median_seconds(lambda: new.copy(), runs)
    cmp_ = mb / median_seconds(lambda: np.equal(old, new), runs)
    avg = sum(len(e) for e in wire) / max(1, pages - int(overflowed.sum()))
    return (
        f"{fraction * 100:6.0f}% {enc:8.0f} {dec:8.0f} {cpy:8.0f} {cmp_:8.0f} "
        f"{enc / cmp_:7.3f} {dec / cpy:8.3f} {avg:8.0f} {int(overflowed.sum()):5d}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16, help="page data per batch (MiB)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per figure (median)")
    args = parser.parse_args()
    pages = args.mib * 1024 * 1024 // PAGE_SIZE

    header = (
        f"{'changed':>7} {'encode':>8} {'decode':>8} {'copy':>8} {'compare':>8} "
        f"{'enc/cmp':>7} {'dec/copy':>8} {'bytes/pg':>8} {'ovfl':>5}"
    )
    print(f"XBZRLE batch codec, {pages} pages ({args.mib} MiB), median of {args.runs} runs, MB/s")
    print(header)
    print("-" * len(header))
    for fraction in (0.01, 0.10, 0.50):
        print(bench_row(pages, fraction, args.runs))
    print(
        "encode: encode_batch(old, new); decode: decode_batch(encoded, pages) (re-applying "
        "a delta is idempotent, so the same pages are reused); copy: new.copy(); "
        "compare: np.equal(old, new); ratios are codec / baseline"
    )


if __name__ == "__main__":
    main()
