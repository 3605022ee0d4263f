"""One live migration between two processes, configured by a TOML file; says which transport carried it.

``python run.py CONFIG.toml [--uri URI]`` starts ``savevm incoming URI --config CONFIG`` and
``savevm migrate URI --config CONFIG`` with the same program (64 MiB of RAM and a device by
default, ``savevm_ram.demo:DemoProgram``), then prints the transport from the
``query-migrate`` stats, how many pages went inside and outside the stream, and whether the
destination holds exactly the source's state.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--uri", default="tcp:127.0.0.1:0")
    ap.add_argument("--size", default="64M")
    args = ap.parse_args()
    savevm = [sys.executable, "-m", "savevm"]
    guest = ["--guest", "savevm_ram.demo:DemoProgram", "--guest-arg", f"size={args.size}",
             "--guest-arg", "dirty_rate=10M"]
    cfg = ["--config", str(Path(args.config).resolve())]
    dst = subprocess.Popen([*savevm, "incoming", args.uri, "--print-uri", "--json", *cfg, *guest,
                            "--guest-arg", "role=destination", "--timeout", "60"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert dst.stdout is not None
        listening = dst.stdout.readline().strip()
        scheme = args.uri.partition(":")[0]
        # keep the scheme the operator wrote (tcp:), with the port the destination got
        uri = f"{scheme}:{listening.partition(':')[2]}"
        src = subprocess.run([*savevm, "migrate", uri, "--json", *cfg, *guest], capture_output=True, text=True,
                             timeout=300)
        out, _ = dst.communicate(timeout=120)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait()
    if not src.stdout.strip():
        print(src.stderr, file=sys.stderr)
        return 1
    s, d = json.loads(src.stdout.splitlines()[-1]), json.loads(out.splitlines()[-1])
    ram = s.get("ram") or {}
    same = s["status"] == "completed" and s["guest"]["checksums"] == d["guest"]["checksums"]
    print(f"{Path(args.config).name:<10} uri {uri:<22} transport {s['transport']:<5} "
          f"status {s['status']}  total {s['total-time']} ms  downtime {s['downtime']} ms  "
          f"stream {s['stream-bytes']:>10,} B  pages sent {ram.get('normal', 0):>6}, "
          f"of them outside the stream {ram.get('transport-pages', 0):>6}  identical {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
