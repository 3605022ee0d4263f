"""The XBZRLE plugin's rows of ``savevm bench``: the batched codec beside a numpy compare."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from savevm_ram.wire import PAGE_SIZE
from savevm_xbzrle.codec import decode_batch, encode_batch


def _median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_rows(size: int, runs: int) -> list[dict[str, Any]]:
    """Encode and decode of pages with 10% of their bytes changed in short runs.

    At most 4096 pages (16 MiB): the codec's speed per byte does not depend
    on the batch size beyond that, and a larger batch only costs memory.
    """
    n = max(1, min(size // PAGE_SIZE, 4096))
    rng = np.random.default_rng(2)
    old = rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
    new = old.copy()
    for r in range(8):  # 10% changed bytes, in eight runs of 51 bytes per page
        new[:, r * 512 : r * 512 + 51] ^= 0x5A
    enc: list[Any] = []
    cmp_s = _median(lambda: np.equal(old, new), runs)
    e_s = _median(lambda: enc.__setitem__(slice(None), encode_batch(old, new)), runs)
    pages = old.copy()
    d_s = _median(lambda: decode_batch(enc, pages), runs)
    nbytes = n * PAGE_SIZE
    return [{"what": what, "seconds": s, "GB/s": nbytes / s / 1e9, "baseline": "numpy compare of the pages",
             "baseline GB/s": nbytes / cmp_s / 1e9, "ratio": cmp_s / s}
            for what, s in (("XBZRLE encode, 10% changed", e_s), ("XBZRLE decode, 10% changed", d_s))]
