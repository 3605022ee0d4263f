"""Does the pause stay inside downtime-limit?  Expected against measured downtime, on the user's path.

Run: ``python benchmarks/bench_downtime.py`` (``--size`` default 1G, ``--runs`` default 1 per cell,
``--limit`` the downtime-limit in ms, default 300).

Each cell is one ``savevm demo --json`` (two fresh processes over tcp loopback, nothing
pre-touched, verified) over the matrix fill (random, text, zero) x max-bandwidth (0 = unlimited,
128M) x dirty rate (0, 20M).  The table shows the downtime the stop decision expected (the
source counts what is in flight but not yet loaded by the destination, reported over the return
path, and uses the slower of its sending and the destination's loading) beside the downtime
measured from the pause to the destination's RESUMED, and whether it stayed within the limit
plus 50 ms.  The baseline is the limit itself: the ratio column is measured / limit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time


def run_cell(size: str, fill: str, bw: str, dirty: str, limit: int) -> dict:
    cmd = [sys.executable, "-m", "savevm", "demo", "--size", size, "--blocks", "1", "--fill", fill,
           "--dirty-rate", dirty, "--set", f"max-bandwidth={bw}", "--set", f"downtime-limit={limit}", "--json",
           "--timeout", "300"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        return {"status": "no output", "error": r.stderr[-300:], "wall": wall}
    d = json.loads(lines[-1])
    d["wall"] = wall
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--limit", type=int, default=300, help="downtime-limit in ms")
    args = ap.parse_args()
    print(f"downtime on the user's path: savevm demo --size {args.size} (one block), tcp loopback, "
          f"downtime-limit {args.limit} ms, {args.runs} run(s) per cell, median; load average "
          f"{os.getloadavg()[0]:.2f}")
    head = (f"{'fill':<7}{'max-bw':>7}{'dirty':>7}  {'status':<10}{'expected ms':>12}{'measured ms':>12}"
            f"{'ratio':>7}  within limit+50  total s  verified")
    print(head)
    print("-" * len(head))
    worst = 0
    misses = 0
    for fill, bw, dirty in itertools.product(("random", "text", "zero"), ("0", "128M"), ("0", "20M")):
        cells = [run_cell(args.size, fill, bw, dirty, args.limit) for _ in range(args.runs)]
        ok = [c for c in cells if c.get("status") == "completed"]
        if not ok:
            print(f"{fill:<7}{bw:>7}{dirty:>7}  {cells[0].get('status', '?'):<10}  {cells[0].get('error-desc', '')}")
            misses += 1
            continue
        measured = statistics.median(c["downtime"] for c in ok)
        expected = statistics.median(c.get("expected-downtime") or 0 for c in ok)
        total = statistics.median(c["total-time"] for c in ok) / 1000
        within = measured <= args.limit + 50
        misses += not within
        worst = max(worst, measured)
        print(f"{fill:<7}{bw:>7}{dirty:>7}  {'completed':<10}{expected:>12.0f}{measured:>12.0f}"
              f"{measured / args.limit:>7.2f}  {'yes' if within else 'NO':<15}  {total:7.2f}  "
              f"{all(c.get('verified') for c in ok)}")
    print(f"worst measured downtime {worst:.0f} ms against a limit of {args.limit} ms; "
          f"{misses} cell(s) outside limit + 50 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
