"""Live migrations of running programs driven through QMP by QEMU's own client tooling (qemu.qmp, qmp-shell)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

pytestmark = pytest.mark.slow

DEMO = ["--guest", "savevm_ram.demo:DemoProgram", "--guest-arg", "size=16M", "--guest-arg", "dirty_rate=8M"]


class Procs:
    """Processes started by one test, killed (by pid) if still running at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []

    def savevm(self, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-m", "savevm", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def wait_socket(self, path: Path, proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.02)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)


@pytest.fixture
def procs() -> Iterator[Procs]:
    d = Path(tempfile.mkdtemp(prefix="svq-"))  # short: unix socket paths are limited to 108 bytes
    p = Procs(d)
    try:
        yield p
    finally:
        p.close()
        shutil.rmtree(d, ignore_errors=True)


async def _events_until(qmp: QMPClient, statuses: set[str], seen: list[dict[str, Any]]) -> None:
    async for ev in qmp.events:
        seen.append({"event": ev["event"], "data": ev.get("data")})
        if ev["event"] == "MIGRATION" and ev["data"]["status"] in statuses:
            return


async def _quit(qmp: QMPClient) -> None:
    try:
        await qmp.execute("quit")
        await qmp.disconnect()
    except EOFError:  # the monitor hangs up as it quits, as QEMU's does
        pass


def test_qemu_qmp_migrates_a_running_program_to_completed(procs: Procs) -> None:
    src_sock, dst_sock = procs.tmp / "src", procs.tmp / "dst"
    src = procs.savevm("run", *DEMO, "--qmp", f"unix:{src_sock}", "--json")
    dst = procs.savevm("incoming", "tcp:127.0.0.1:0", "--print-uri", *DEMO, "--guest-arg", "role=destination",
                       "--qmp", f"unix:{dst_sock}", "--run", "--json")
    assert dst.stdout is not None
    uri = dst.stdout.readline().strip()
    procs.wait_socket(src_sock, src)
    procs.wait_socket(dst_sock, dst)

    async def drive() -> dict[str, Any]:
        s, d = QMPClient("source"), QMPClient("destination")
        await s.connect(str(src_sock))
        await d.connect(str(dst_sock))
        out: dict[str, Any] = {"greeting": s.greeting._asdict() if s.greeting else None}
        out["status-before"] = (await s.execute("query-status"), await d.execute("query-status"))
        await s.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        await s.execute("migrate-set-parameters", {"max-bandwidth": 32 << 20})
        seen: list[dict[str, Any]] = []
        waiter = asyncio.create_task(_events_until(s, {"completed", "failed"}, seen))
        await s.execute("migrate", {"uri": uri})
        with pytest.raises(ExecuteError, match="in progress"):
            await s.execute("migrate", {"uri": uri})
        await asyncio.wait_for(waiter, 60)
        out["events"] = seen
        out["query-migrate"] = await s.execute("query-migrate")
        # the destination records `completed` just after it told the source it runs: a moment later
        for _ in range(200):
            out["dest-query-migrate"] = await d.execute("query-migrate")
            if out["dest-query-migrate"]["status"] != "active":
                break
            await asyncio.sleep(0.05)
        out["status-after"] = (await s.execute("query-status"), await d.execute("query-status"))
        resumed: list[dict[str, Any]] = []
        await s.execute("cont")
        async for ev in s.events:
            resumed.append(ev)
            if ev["event"] == "RESUME":
                break
        out["status-cont"] = await s.execute("query-status")
        await _quit(s)
        await _quit(d)
        return out

    out = asyncio.run(drive())
    assert out["greeting"]["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert [x["status"] for x in out["status-before"]] == ["running", "inmigrate"]
    statuses = [e["data"]["status"] for e in out["events"] if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "device", "completed"]
    passes = [e["data"]["pass"] for e in out["events"] if e["event"] == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 2
    assert "STOP" in [e["event"] for e in out["events"]]
    qm = out["query-migrate"]
    assert qm["status"] == "completed" and qm["transport"] == "tcp" and qm["ram"]["dirty-sync-count"] == passes[-1]
    assert qm["downtime"] >= 0 and qm["ram"]["transferred"] >= 16 << 20
    assert out["dest-query-migrate"]["status"] == "completed"
    # QEMU's postmigrate: the source stays paused until told; the destination runs
    assert [x["status"] for x in out["status-after"]] == ["postmigrate", "running"]
    assert out["status-cont"] == {"status": "running", "singlestep": False, "running": True}

    s_out, s_err = src.communicate(timeout=60)
    d_out, d_err = dst.communicate(timeout=60)
    assert src.returncode == 0 and dst.returncode == 0, (s_err, d_err)
    s_json, d_json = json.loads(s_out.splitlines()[-1]), json.loads(d_out.splitlines()[-1])
    # one shape on both sides
    assert list(s_json)[:10] == list(d_json)[:10] == ["side", "status", "runstate", "transport", "total-time",
                                                      "setup-time", "downtime", "stream-bytes", "ram", "error-desc"]
    assert (s_json["side"], d_json["side"]) == ("source", "destination")
    assert s_json["status"] == d_json["status"] == "completed"
    assert d_json["guest"]["checksums"]  # the destination's program ran the loaded state


def test_incoming_defer_waits_for_migrate_incoming(procs: Procs) -> None:
    src_sock, dst_sock = procs.tmp / "src", procs.tmp / "dst"
    dst = procs.savevm("incoming", "defer", *DEMO, "--guest-arg", "role=destination", "--qmp", f"unix:{dst_sock}")
    src = procs.savevm("run", *DEMO, "--qmp", f"unix:{src_sock}")
    procs.wait_socket(dst_sock, dst)
    procs.wait_socket(src_sock, src)

    async def drive() -> dict[str, Any]:
        s, d = QMPClient("source"), QMPClient("destination")
        await d.connect(str(dst_sock))
        await s.connect(str(src_sock))
        out: dict[str, Any] = {"deferred": await d.execute("query-status"),
                               "dq0": await d.execute("query-migrate")}
        with pytest.raises(ExecuteError, match="waiting for an incoming migration"):
            await d.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        await d.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        with pytest.raises(ExecuteError, match="started already"):
            await d.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        dq = await d.execute("query-migrate")
        assert isinstance(dq, dict)
        addr = dq["socket-address"][0]
        waiter = asyncio.create_task(_events_until(s, {"completed", "failed"}, []))
        await s.execute("migrate", {"uri": f"tcp:{addr['host']}:{addr['port']}"})
        await asyncio.wait_for(waiter, 60)
        out["src"] = await s.execute("query-migrate")
        await _quit(s)
        return out

    out = asyncio.run(drive())
    assert out["deferred"]["status"] == "inmigrate" and out["dq0"] == {}
    assert out["src"]["status"] == "completed"
    # without --run the destination exits once loaded, with the outcome as its exit code
    _, err = dst.communicate(timeout=60)
    assert dst.returncode == 0, err
    src.communicate(timeout=60)


def test_migrate_cancel_resumes_the_source(procs: Procs) -> None:
    src_sock = procs.tmp / "src"
    dst = procs.savevm("incoming", "tcp:127.0.0.1:0", "--print-uri", *DEMO, "--guest-arg", "role=destination")
    src = procs.savevm("run", *DEMO, "--qmp", f"unix:{src_sock}")
    assert dst.stdout is not None
    uri = dst.stdout.readline().strip()
    procs.wait_socket(src_sock, src)

    async def drive() -> tuple[Any, Any, list[dict[str, Any]]]:
        s = QMPClient("source")
        await s.connect(str(src_sock))
        await s.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})  # 16 MiB at 1 MiB/s: slow
        seen: list[dict[str, Any]] = []
        waiter = asyncio.create_task(_events_until(s, {"cancelled", "failed", "completed"}, seen))
        await s.execute("migrate", {"uri": uri})
        await asyncio.sleep(0.5)
        await s.execute("migrate-set-parameters", {"downtime-limit": 100})  # applied to the running migration
        params = await s.execute("query-migrate-parameters")
        await s.execute("migrate_cancel")
        await asyncio.wait_for(waiter, 30)
        status = await s.execute("query-status")
        await _quit(s)
        return params, status, seen

    params, status, seen = asyncio.run(drive())
    assert params["downtime-limit"] == 100 and params["max-bandwidth"] == 1 << 20
    assert [e["data"]["status"] for e in seen if e["event"] == "MIGRATION"][-2:] == ["cancelling", "cancelled"]
    assert status["status"] == "running"
    src.communicate(timeout=60)
    assert src.returncode == 0


@pytest.mark.skipif(shutil.which("qmp-shell") is None, reason="qmp-shell is not installed (pip install qemu.qmp)")
def test_qmp_shell_drives_the_monitor(procs: Procs) -> None:
    src_sock, dst_sock = procs.tmp / "src", procs.tmp / "dst"
    dst = procs.savevm("incoming", "tcp:127.0.0.1:0", "--print-uri", *DEMO, "--guest-arg", "role=destination",
                       "--qmp", f"unix:{dst_sock}")
    src = procs.savevm("run", *DEMO, "--qmp", f"unix:{src_sock}")
    assert dst.stdout is not None
    uri = dst.stdout.readline().strip()
    procs.wait_socket(src_sock, src)
    script = f"query-status\nmigrate uri={uri}\n"
    r = subprocess.run(["qmp-shell", str(src_sock)], input=script, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"status": "running"' in r.stdout and '"return": {}' in r.stdout
    deadline = time.monotonic() + 60
    while True:
        r = subprocess.run(["qmp-shell", str(src_sock)], input="query-migrate\n", capture_output=True, text=True,
                           timeout=60)
        if '"status": "completed"' in r.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert '"status": "completed"' in r.stdout, r.stdout
    subprocess.run(["qmp-shell", str(src_sock)], input="quit\n", capture_output=True, text=True, timeout=60)
    src.communicate(timeout=60)
    dst.communicate(timeout=60)
    assert src.returncode == 0 and dst.returncode == 0


def test_ctrl_c_cancels_and_exits_130(procs: Procs) -> None:
    dst = procs.savevm("incoming", "tcp:127.0.0.1:0", "--print-uri", *DEMO, "--guest-arg", "role=destination")
    assert dst.stdout is not None
    uri = dst.stdout.readline().strip()
    src = procs.savevm("migrate", uri, *DEMO, "--set", "max-bandwidth=1M", "--json")
    time.sleep(2.0)  # well into the migration: 16 MiB at 1 MiB/s
    os.kill(src.pid, signal.SIGINT)
    out, err = src.communicate(timeout=60)
    assert src.returncode == 130, err
    assert "savevm: interrupted: status cancelled" in err and "Traceback" not in err
    assert json.loads(out.splitlines()[-1])["status"] == "cancelled"
    dst.communicate(timeout=60)  # it saw the source go away: a failed load, exit 1
    assert dst.returncode == 1
    # a destination still waiting for its source
    waiting = procs.savevm("incoming", "tcp:127.0.0.1:0", "--print-uri", *DEMO, "--guest-arg", "role=destination",
                           "--json")
    assert waiting.stdout is not None
    waiting.stdout.readline()
    time.sleep(0.5)
    os.kill(waiting.pid, signal.SIGINT)
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 130 and "Traceback" not in err, err
    assert "savevm: interrupted: status cancelled" in err
    rep = json.loads(out.splitlines()[-1])
    assert rep["side"] == "destination" and rep["status"] == "cancelled"
