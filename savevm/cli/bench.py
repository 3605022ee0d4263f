"""``savevm bench``: a quick, in-process measure of the hot paths on this machine.

The full benchmarks (two processes, sockets) are the scripts in
``benchmarks/``; this command needs nothing but the installed packages.
Every figure is a median, next to a baseline measured in the same run.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from savevm.channels.fd import FdChannel
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile
from savevm.save import save_stream


def _median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bulk_to_devnull(buf: np.ndarray) -> None:
    import savevm_ram

    reg = PluginHost().new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("bench", buf)]))
    f = QEMUFile(FdChannel(os.open(os.devnull, os.O_WRONLY), "null"), writable=True)
    save_stream(f, reg)
    f.close()


def run_bench(size: int, runs: int) -> list[dict[str, Any]]:
    """Rows of {what, seconds, GB/s, baseline, baseline GB/s, ratio}."""
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(1)
    rand = np.frombuffer(rng.bytes(size), dtype=np.uint8).copy()
    zero = np.zeros(size, dtype=np.uint8)
    scratch = np.empty_like(rand)
    copy_s = _median(lambda: np.copyto(scratch, rand), runs)
    for name, buf in (("RAM bulk stage, random pages -> /dev/null", rand),
                      ("RAM bulk stage, zero pages -> /dev/null", zero)):
        s = _median(functools.partial(_bulk_to_devnull, buf), runs)
        rows.append({"what": name, "seconds": s, "GB/s": size / s / 1e9,
                     "baseline": "numpy copy of the same bytes", "baseline GB/s": size / copy_s / 1e9,
                     "ratio": copy_s / s})
    try:
        from savevm_xbzrle import decode_batch, encode_batch
    except ImportError:
        return rows
    n = min(size // 4096, 4096)
    old = rand[: n * 4096].reshape(n, 4096)
    new = old.copy()
    runs_per_page = 8  # 10% changed bytes in short runs
    for r in range(runs_per_page):
        new[:, r * 512 : r * 512 + 51] ^= 0x5A
    enc: list[Any] = []
    cmp_s = _median(lambda: np.equal(old, new), runs)
    e_s = _median(lambda: enc.__setitem__(slice(None), encode_batch(old, new)), runs)
    pages = old.copy()
    d_s = _median(lambda: decode_batch(enc, pages), runs)
    nbytes = n * 4096
    for what, s in (("XBZRLE encode, 10% changed", e_s), ("XBZRLE decode, 10% changed", d_s)):
        rows.append({"what": what, "seconds": s, "GB/s": nbytes / s / 1e9,
                     "baseline": "numpy compare of the pages", "baseline GB/s": nbytes / cmp_s / 1e9,
                     "ratio": cmp_s / s})
    return rows
