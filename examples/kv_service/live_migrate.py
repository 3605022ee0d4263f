"""Live-migrate the key-value service between two processes while clients keep using it.

What it does, step by step (each step is what an operator would do by hand):

1. start the source: ``savevm run --guest service:KVService --qmp unix:SRC.qmp``;
2. start the destination: ``savevm incoming tcp:127.0.0.1:0 --guest service:KVService
   --qmp unix:DST.qmp --run`` (its clients wait at the gate until the state arrives);
3. start clients that write unique keys and read some back, against the source;
4. over the source's QMP monitor (the ``qemu.qmp`` library, as for a QEMU VM):
   ``client_migrate_info`` (where clients go next) and ``migrate``, then wait for the
   ``MIGRATION`` event that says ``completed``;
5. keep the clients running on the destination, stop them, and read every acknowledged
   write back from the destination; ``quit`` both processes.

It prints the pause the clients saw beside the downtime savevm reported, and exits 1 if an
acknowledged write was lost or read back wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from client import KVClient, Worker
from qemu.qmp import QMPClient

HERE = Path(__file__).resolve().parent


def _wait_for(path: Path, proc: subprocess.Popen[Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not ready after {timeout}s")
        time.sleep(0.02)


async def _migrate(qmp_path: str, uri: str, client_target: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """client_migrate_info + migrate over QMP; wait for the end; return query-migrate and the events."""
    qmp = QMPClient("kv-source")
    await qmp.connect(qmp_path)
    events: list[dict[str, Any]] = []
    try:
        host, _, port = client_target.rpartition(":")
        await qmp.execute("client_migrate_info", {"protocol": "kv", "hostname": host, "port": int(port)})
        await qmp.execute("migrate", {"uri": uri})
        async for ev in qmp.events:
            events.append({"event": ev["event"], "data": ev.get("data")})
            if ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed", "failed", "cancelled"):
                break
        info = await qmp.execute("query-migrate")
    finally:
        await qmp.disconnect()
    assert isinstance(info, dict)
    return info, events


async def _quit(qmp_path: str) -> str:
    qmp = QMPClient("kv-quit")
    await qmp.connect(qmp_path)
    status = await qmp.execute("query-status")
    try:
        await qmp.execute("quit")
        await qmp.disconnect()
    except EOFError:  # the monitor closes as it quits, as QEMU's does
        pass
    assert isinstance(status, dict)
    return str(status["status"])


def _longest_silence(workers: list[Worker], start: float, end: float) -> float:
    """The longest stretch inside [start, end] in which no client got any answer."""
    done = sorted(t0 + lat for w in workers for t0, lat in w.latencies if start <= t0 + lat <= end)
    points = [start, *done, end]
    return max(b - a for a, b in zip(points, points[1:]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--slots", type=int, default=262144, help="table slots of 256 bytes (default: 64 MiB)")
    ap.add_argument("--before", type=float, default=1.5, help="seconds of traffic before migrating")
    ap.add_argument("--after", type=float, default=1.0, help="seconds of traffic after the handover")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kv-"))
    src_qmp, dst_qmp = tmp / "src.qmp", tmp / "dst.qmp"
    savevm = [sys.executable, "-m", "savevm"]
    guest = ["--guest", "service:KVService", "--guest-arg", f"slots={args.slots}"]
    src_cmd = [*savevm, "run", *guest, "--guest-arg", f"addr_file={tmp / 'src.addr'}", "--qmp", f"unix:{src_qmp}"]
    dst_cmd = [*savevm, "incoming", "tcp:127.0.0.1:0", "--print-uri", *guest,
               "--guest-arg", f"addr_file={tmp / 'dst.addr'}", "--qmp", f"unix:{dst_qmp}", "--run"]
    logs = {n: open(tmp / f"{n}.log", "w") for n in ("source", "destination")}
    procs: list[subprocess.Popen[Any]] = []
    try:
        src = subprocess.Popen(src_cmd, cwd=HERE, stdout=logs["source"], stderr=subprocess.STDOUT)
        procs.append(src)
        dst = subprocess.Popen(dst_cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=logs["destination"], text=True)
        procs.append(dst)
        assert dst.stdout is not None
        uri = dst.stdout.readline().strip()
        for path, proc, what in ((tmp / "src.addr", src, "source"), (src_qmp, src, "source QMP"),
                                 (tmp / "dst.addr", dst, "destination"), (dst_qmp, dst, "destination QMP")):
            _wait_for(path, proc, what)
        src_addr, dst_addr = (tmp / "src.addr").read_text(), (tmp / "dst.addr").read_text()
        if not args.json:
            print(f"source      pid {src.pid}, clients on {src_addr}, QMP unix:{src_qmp}")
            print(f"destination pid {dst.pid}, clients on {dst_addr}, migration stream on {uri}")

        stop = threading.Event()
        workers = [Worker(i, [src_addr, dst_addr], stop) for i in range(args.clients)]
        for w in workers:
            w.start()
        time.sleep(args.before)
        t_mig = time.monotonic()
        info, events = asyncio.run(_migrate(str(src_qmp), uri, dst_addr))
        t_done = time.monotonic()
        time.sleep(args.after)
        stop.set()
        for w in workers:
            w.join(30)
        errors = [f"client {w.wid}: {w.error!r}" for w in workers if w.error]

        # every acknowledged write, read back from the destination
        check = KVClient([dst_addr])
        acked = {k: v for w in workers for k, v in w.acked.items()}
        lost = [k for k, v in acked.items() if check.get(k) != v]
        stats = check.request("STATS")
        check.close()
        dst_status, src_status = asyncio.run(_quit(str(dst_qmp))), asyncio.run(_quit(str(src_qmp)))
        for p in procs:
            p.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for fh in logs.values():
            fh.close()

    lat = sorted(x for w in workers for _, x in w.latencies)
    window = [x for w in workers for t0, x in w.latencies if t_mig <= t0 <= t_done]
    result = {
        "migration": info.get("status"),
        "downtime-ms": info.get("downtime"),
        "total-time-ms": info.get("total-time"),
        "passes": sum(1 for e in events if e["event"] == "MIGRATION_PASS"),
        "transferred": (info.get("ram") or {}).get("transferred"),
        "clients": args.clients,
        "requests": len(lat),
        "acknowledged-writes": len(acked),
        "lost-writes": len(lost),
        "stale-reads": sum(w.stale_reads for w in workers),
        "moves": sum(w.client.moves for w in workers),
        "client-pause-ms": round(max(window, default=0.0) * 1000, 1),
        "no-answer-gap-ms": round(_longest_silence(workers, t_mig, t_done + args.after) * 1000, 1),
        "latency-p50-ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
        "latency-p99-ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
        "destination-stats": stats,
        "ram": info.get("ram"),
        "source-runstate-at-quit": src_status,
        "destination-runstate-at-quit": dst_status,
        "client-errors": errors,
        "events": [e["event"] + (f" {e['data']}" if e["data"] else "") for e in events],
    }
    ok = (result["migration"] == "completed" and not lost and not errors and result["stale-reads"] == 0
          and result["moves"] >= 1)
    result["result"] = "PASS" if ok else "FAIL"
    if args.json:
        print(json.dumps(result))
    else:
        print(f"migrated    {result['migration']} in {result['total-time-ms']} ms, {result['passes']} passes, "
              f"{result['transferred']} bytes; downtime reported by savevm: {result['downtime-ms']} ms")
        print(f"clients     {args.clients} clients, {len(lat)} requests, {len(acked)} acknowledged writes, "
              f"{result['moves']} handovers to the destination")
        print(f"pause       longest request during the migration: {result['client-pause-ms']} ms; longest time no "
              f"client got any answer: {result['no-answer-gap-ms']} ms")
        print(f"latency     p50 {result['latency-p50-ms']} ms, p99 {result['latency-p99-ms']} ms (whole run)")
        print(f"verified    {len(acked) - len(lost)}/{len(acked)} acknowledged writes read back from the "
              f"destination ({stats}); lost {len(lost)}, stale reads {result['stale-reads']}")
        print(f"runstates   source {src_status}, destination {dst_status} (at quit)")
        for e in errors:
            print(f"error       {e}")
        print(f"RESULT: {result['result']}")
    if not ok:
        print(f"logs in {tmp}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
