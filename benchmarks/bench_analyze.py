"""``savevm analyze`` / ``--extract-ram`` / ``savevm rewrite`` throughput, beside a plain read of the same file.

Run: ``PYTHONPATH=.:plugins/ram python benchmarks/bench_analyze.py [--size 1G] [--runs 3]``

The stream is a savevm snapshot of one block: a quarter random pages, the
rest zero (the shape of a mostly idle guest), written once to a temporary
folder.  Each row is timed in-process (no interpreter start-up), median of
``--runs``; the baseline is reading the same file to nowhere in 1 MiB
chunks, measured in the same run, so the ratio says how close each command
comes to the cost of merely reading its input.  Throughput is stream bytes
per second (``GB/s``) and guest RAM represented per second (``RAM GB/s``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _p in (_ROOT, _ROOT / "plugins" / "ram"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import savevm  # noqa: E402
import savevm_ram  # noqa: E402
from savevm.cli.analyze import StreamSource, analyze  # noqa: E402
from savevm.cli.blockfiles import BlockDir  # noqa: E402
from savevm.cli.rewrite import rewrite  # noqa: E402
from savevm.config import parse_size  # noqa: E402


def median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="block size (default 1G)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = parse_size(args.size, "--size") // 4096 * 4096
    d = Path(tempfile.mkdtemp(prefix="savevm-bench-analyze-"))
    try:
        mem = np.zeros(size, dtype=np.uint8)
        quarter = size // 4 // 4096 * 4096
        mem[:quarter] = np.frombuffer(np.random.default_rng(1).bytes(quarter), dtype=np.uint8)
        reg = savevm.SectionRegistry()
        savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", mem)]))
        stream = d / "s.qevm"
        savevm.snapshot(stream, reg)
        image = d / "image.bin"
        image.write_bytes(mem.tobytes())
        del mem, reg
        nbytes = stream.stat().st_size

        def read_all() -> None:
            with open(stream, "rb", buffering=0) as fh:
                buf = bytearray(1 << 20)
                while fh.readinto(buf):
                    pass

        def summary() -> None:
            with StreamSource(str(stream)) as src:
                assert analyze(src).ok

        def extract() -> None:
            out = d / "x"
            shutil.rmtree(out, ignore_errors=True)
            with StreamSource(str(stream)) as src:
                an = analyze(src)
            with BlockDir(str(out)) as bd:
                for b in an.blocks:
                    bd.write_block(b.idstr, b.host[: b.used_length])

        def rewrite_block() -> None:
            out = d / "out.qevm"
            rewrite(str(stream), str(out), {"pc.ram": str(image)})

        read_all()  # warm the page cache: every row reads a cached file
        base = median(read_all, args.runs)
        print(f"savevm analyze / rewrite: {args.size} block, 1/4 random pages, stream {nbytes} bytes, "
              f"median of {args.runs}")
        print(f"{'what':<34} {'seconds':>8} {'GB/s':>7} {'RAM GB/s':>9}  {'baseline GB/s':>13}  ratio  baseline")
        for what, fn in (("analyze (summary)", summary), ("analyze --extract-ram", extract),
                         ("rewrite --ram pc.ram=FILE", rewrite_block)):
            t = median(fn, args.runs)
            print(f"{what:<34} {t:8.3f} {nbytes / t / 1e9:7.2f} {size / t / 1e9:9.2f}  {nbytes / base / 1e9:13.2f}  "
                  f"{base / t:5.2f}  read the file, 1 MiB chunks")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
