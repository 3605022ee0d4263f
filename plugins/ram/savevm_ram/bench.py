"""The RAM plugin's rows of ``savevm bench``: the bulk stage, in process.

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
from savevm_ram import register_ram
from savevm_ram.block import RAMBlock, RAMList


def _median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bulk_to_devnull(buf: np.ndarray) -> None:
    reg = PluginHost().new_registry()
    register_ram(reg, RAMList([RAMBlock("bench", buf)]))
    f = QEMUFile(FdChannel(os.open(os.devnull, os.O_WRONLY), "null"), writable=True)
    save_stream(f, reg)
    f.close()


def bench_rows(size: int, runs: int) -> list[dict[str, Any]]:
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
    return rows
