"""Convergence: the workload QEMU 7.2's stop rule cannot migrate, under the wire estimate and under QEMU's.

Run: ``python benchmarks/bench_convergence.py`` (``--runs`` per row, default 1,
medians reported; ``--timeout`` per run, default 120 s; ``--rows`` to pick rows;
``--plot-dir DIR`` writes each run's ``--plot`` PNG there).

The workload (QEMU measured on this kind of machine): a 512 MiB program that
keeps rewriting a few bytes of every page of a 128 MiB working set, as fast
as it can, migrated with XBZRLE at ``max-bandwidth`` 64 MiB/s with
``downtime-limit`` 300 ms::

    savevm demo --size 512M --working-set 128M --dirty-pattern sparse \\
        --capability xbzrle --set max-bandwidth=64M --set downtime-limit=300

Every page of the working set is dirty at every sync, so QEMU's figure
(dirty pages × 4 KiB = 128 MiB) never fits in ``bandwidth × 300 ms``, while
each page costs about 22 bytes as an XBZRLE delta (720 KiB for all of them).

Rows, each a real ``savevm demo`` (two processes over tcp loopback, the
destination's checksums compared with the source's):

* ``wire``: the default stop rule (``x-pending-estimate=wire``) with an XBZRLE
  cache that holds the working set (``xbzrle-cache-size=128M``);
* ``qemu``: the same with ``x-pending-estimate=qemu`` and
  ``x-stall-policy=continue`` (QEMU's rule and QEMU's behaviour): the baseline;
* ``qemu+throttle``: QEMU's rule with savevm's default stall policy, which
  starts auto-converge when the migration stalls;
* ``wire/64M-cache`` / ``qemu/64M-cache``: the command exactly as above,
  whose XBZRLE cache is QEMU's default 64 MiB: half the working set's pages
  miss it (direct-mapped slots, two pages per slot) and go out whole, so
  each pass costs ~70 MB and neither rule sees the pause fit; the wire rule
  says so rather than pausing on a figure that is wrong.

Columns: status, total time, measured downtime (and the limit), the expected
downtime at the stop, the highest CPU throttle, dirty syncs, bytes sent, and
whether the destination's checksums matched.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
BASE = ["--size", "512M", "--working-set", "128M", "--dirty-pattern", "sparse", "--capability", "xbzrle",
        "--set", "max-bandwidth=64M", "--set", "downtime-limit=300"]
CACHE = ["--set", "xbzrle-cache-size=128M"]
ROWS: dict[str, list[str]] = {
    "wire": CACHE,
    "qemu": [*CACHE, "--set", "x-pending-estimate=qemu", "--set", "x-stall-policy=continue"],
    "qemu+throttle": [*CACHE, "--set", "x-pending-estimate=qemu"],
    "wire/64M-cache": [],
    "qemu/64M-cache": ["--set", "x-pending-estimate=qemu", "--set", "x-stall-policy=continue"],
}


def run(extra: list[str], timeout: float, plot: Path | None) -> dict[str, Any]:
    """One ``savevm demo --json``; its report, plus the wall time."""
    argv = [sys.executable, "-m", "savevm.cli", "demo", *BASE, *extra, "--json", "--timeout", str(timeout)]
    if plot is not None:
        argv += ["--plot", str(plot)]
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 240, cwd=_ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"savevm demo printed no report (rc {r.returncode}):\n{r.stderr[-3000:]}")
    rep: dict[str, Any] = json.loads(lines[-1])
    rep["wall"] = time.monotonic() - t0
    return rep


def summary(reps: list[dict[str, Any]]) -> dict[str, str]:
    """Medians over runs (status: how many completed)."""
    def med(key: Any) -> float | None:
        vals = [v for v in (key(r) for r in reps) if v is not None]
        return statistics.median(vals) if vals else None

    done = [r for r in reps if r["status"] == "completed"]
    down = med(lambda r: r.get("downtime"))
    limit = (reps[0].get("convergence") or {}).get("downtime-limit", 300)
    exp = med(lambda r: r.get("expected-downtime") if r["status"] == "completed" else None)
    tt = med(lambda r: r.get("total-time"))
    thr = med(lambda r: r.get("cpu-throttle-percentage-max", 0))
    syncs = med(lambda r: (r.get("ram") or {}).get("dirty-sync-count"))
    sent = med(lambda r: (r.get("ram") or {}).get("transferred"))
    return {
        "status": f"{len(done)}/{len(reps)} completed" if len(reps) > 1 else reps[0]["status"],
        "total s": f"{tt / 1000:.1f}" if tt is not None else "-",
        "downtime ms": f"{down:.0f} (limit {limit})" if down is not None else "-",
        "expected ms": f"{exp:.0f}" if exp is not None else "-",
        "max throttle": f"{thr:.0f}%" if thr is not None else "-",
        "syncs": f"{syncs:.0f}" if syncs is not None else "-",
        "sent MiB": f"{sent / 2**20:.0f}" if sent is not None else "-",
        "verified": ", ".join(sorted({str(r.get("verified")).lower() for r in reps})),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="runs per row (medians), default 1")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a run is cancelled (default 120)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--plot-dir", type=Path, help="write each run's --plot PNG here")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {list(ROWS)}")
    if args.plot_dir:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
    print(f"savevm demo {' '.join(BASE)}  (+ per row; {args.runs} run(s), timeout {args.timeout:g} s)\n",
          flush=True)
    table: list[tuple[str, dict[str, str]]] = []
    for name in rows:
        reps = []
        for i in range(args.runs):
            plot = None
            if args.plot_dir:
                slug = name.replace("/", "-").replace("+", "-")
                plot = args.plot_dir / f"{slug}-{i + 1}.png"
            rep = run(ROWS[name], args.timeout, plot)
            reps.append(rep)
            print(f"  {name} run {i + 1}: {rep['status']}, total {rep.get('total-time')} ms, "
                  f"downtime {rep.get('downtime')} ms, throttle max {rep.get('cpu-throttle-percentage-max', 0)}%",
                  file=sys.stderr, flush=True)
        table.append((name, summary(reps)))
    cols = list(table[0][1])
    w0 = max(len("row"), *(len(n) for n, _ in table))
    widths = [max(len(c), *(len(s[c]) for _, s in table)) for c in cols]
    print(f"{'row':<{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
    for name, s in table:
        print(f"{name:<{w0}}  " + "  ".join(f"{s[c]:>{w}}" for c, w in zip(cols, widths)))


if __name__ == "__main__":
    main()
