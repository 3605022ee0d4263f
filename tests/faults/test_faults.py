"""Faults injected into two-process migrations: kill -9, SIGSTOP, a peer that connects first or replays.

Each case asserts the end state (which side runs, what each side reports,
the source's memory unchanged) and the time to detect the fault against
its named bound, and logs its figures (see conftest.RESULTS).  Bounds are
set small here so the suite stays fast; the defaults are in docs/trust.md.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import pytest
from migration_helpers import MIGRATION_TIMEOUT, Session, wait_for

from savevm.config import MigrationConfig
from savevm.migration import HandoverUncertain, Migration

STALL_MS = 2000
HANDOVER_MS = 3000
SWITCHOVER_MS = 2000
#: scheduling slack on a shared 2-core machine, on top of a bound
SLACK = 3.0

pytestmark = pytest.mark.slow


def fast(**params: Any) -> MigrationConfig:
    cfg = (MigrationConfig().set_parameter("x-stall-timeout", STALL_MS)
           .set_parameter("x-handover-timeout", HANDOVER_MS)
           .set_parameter("x-switchover-timeout", SWITCHOVER_MS))
    for k, v in params.items():
        cfg = cfg.set_parameter(k.replace("_", "-"), v)
    return cfg


def dest_args(**params: Any) -> list[str]:
    out = []
    for k, v in {"x-stall-timeout": STALL_MS, "x-handover-timeout": HANDOVER_MS, **params}.items():
        out += ["--set", f"{k}={v}"]
    return out


def _source_intact(src: Any, before: dict[str, str]) -> None:
    assert not src.prog.is_paused, "the source program runs again"
    assert src.prog.checksums() == before, "the source's state is unchanged"


def _dest_never_ran(dest: Any, rc: int, report: dict[str, Any] | None) -> None:
    assert rc != 0
    assert report is not None and report["status"] == "failed", report
    assert report.get("runstate") == "inmigrate", report  # never resumed: the program did not run here


def _active(mig: Migration, min_bytes: int = 1 << 20) -> None:
    wait_for(lambda: mig.state == "active" and (mig.query().stream_bytes or 0) > min_bytes, 30, what="active")


# ----------------------------------------------------------------------------- destination faults
def test_kill9_destination_while_active(session: Session, record: Any) -> None:
    dest = session.destination(size="32M", extra=dest_args())
    src = session.source(fast(max_bandwidth="4M"), size="32M", dirty_rate="0")
    before = src.prog.checksums()
    mig = src.migrate(dest.uri)
    _active(mig)
    t0 = time.monotonic()
    dest.sigkill()
    st = mig.wait(MIGRATION_TIMEOUT)
    dt = time.monotonic() - t0
    assert st.status == "failed"
    _source_intact(src, before)
    assert dt < STALL_MS / 1000 + SLACK
    record(fault="kill -9 destination", phase="active", detect_s=round(dt, 2), bound="x-stall-timeout",
           source=f"{st.status}, running", destination="killed")


def test_sigstop_destination_while_active(session: Session, record: Any) -> None:
    dest = session.destination(size="64M", extra=dest_args())
    src = session.source(fast(max_bandwidth=0), size="64M", dirty_rate="0")
    before = src.prog.checksums()
    mig = src.migrate(dest.uri)
    _active(mig)
    os.kill(dest.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        st = mig.wait(MIGRATION_TIMEOUT)
        dt = time.monotonic() - t0
    finally:
        os.kill(dest.pid, signal.SIGCONT)
    if st.status == "completed":
        pytest.skip("the whole stream fitted in the socket buffers before the stop: nothing to detect")
    assert st.status == "failed"
    assert st.as_qmp().get("bound-fired") in ("x-stall-timeout", "x-switchover-timeout", "x-handover-timeout")
    _source_intact(src, before)
    assert dt < STALL_MS / 1000 + SLACK
    rc, report = dest.finish(60)
    _dest_never_ran(dest, rc, report)
    record(fault="SIGSTOP destination", phase="active", detect_s=round(dt, 2),
           bound=st.as_qmp().get("bound-fired"), source="failed, running", destination="failed, paused")


def test_sigstop_destination_before_loaded(session: Session, record: Any) -> None:
    """The stream is out, the destination is stopped before it says LOADED: the source resumes."""
    dest = session.destination(size="16M", extra=dest_args())
    src = session.source(fast(max_bandwidth=0), size="16M", dirty_rate="0")
    before = src.prog.checksums()
    gate = threading.Event()
    src.prog.pause_gate = gate
    mig = src.migrate(dest.uri)
    assert src.prog.pause_entered.wait(30)
    os.kill(dest.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    gate.set()
    try:
        st = mig.wait(MIGRATION_TIMEOUT)
        dt = time.monotonic() - t0
    finally:
        os.kill(dest.pid, signal.SIGCONT)
    assert st.status == "failed", st
    assert st.as_qmp().get("bound-fired") == "x-handover-timeout"
    _source_intact(src, before)
    assert HANDOVER_MS / 1000 - 0.5 < dt < HANDOVER_MS / 1000 + SLACK
    rc, report = dest.finish(60)  # it loads, says LOADED, then reads the source's ABORT
    _dest_never_ran(dest, rc, report)
    assert "abort" in report["error-desc"].lower() or "without saying go" in report["error-desc"], report
    record(fault="SIGSTOP destination", phase="switchover, before LOADED", detect_s=round(dt, 2),
           bound="x-handover-timeout", source="failed, running", destination="failed, paused (got ABORT)")


def test_kill9_destination_in_switchover(session: Session, record: Any) -> None:
    dest = session.destination(size="16M", extra=dest_args())
    src = session.source(fast(max_bandwidth=0), size="16M", dirty_rate="0")
    before = src.prog.checksums()
    gate = threading.Event()
    src.prog.pause_gate = gate
    mig = src.migrate(dest.uri)
    assert src.prog.pause_entered.wait(30)
    dest.sigkill()
    t0 = time.monotonic()
    gate.set()
    st = mig.wait(MIGRATION_TIMEOUT)
    dt = time.monotonic() - t0
    assert st.status == "failed"
    _source_intact(src, before)
    assert dt < SWITCHOVER_MS / 1000 + SLACK
    record(fault="kill -9 destination", phase="switchover (source paused)", detect_s=round(dt, 2),
           bound="x-switchover-timeout", source="failed, running", destination="killed")


def test_kill9_destination_after_go(session: Session, record: Any) -> None:
    """Dying inside resume(), after GO: the source cannot know whether it ran, so it stays paused."""
    dest = session.destination(guest="migration_guests:DiesOnResumeDemo", size="16M", extra=dest_args())
    src = session.source(fast(), size="16M", dirty_rate="0")
    before = src.prog.checksums()
    mig = src.migrate(dest.uri)
    st = mig.wait(MIGRATION_TIMEOUT)
    assert st.status == "failed" and isinstance(mig.error, HandoverUncertain)
    assert src.prog.is_paused and src.prog.checksums() == before
    assert st.as_qmp()["runstate"] == "postmigrate"
    record(fault="destination dies after GO", phase="handover", detect_s=None, bound="x-handover-timeout",
           source="failed, stays paused (uncertain)", destination="died")
    mig.resume()


# ----------------------------------------------------------------------------- source faults
def _cli_source(session: Session, uri: str, *extra: str) -> Any:
    return session.savevm("migrate", uri, "--guest", "migration_guests:RecordingDemo", "--guest-arg", "size=32M",
                          "--guest-arg", "dirty_rate=0", "--json", *extra, name="source")


def test_kill9_source_while_active(session: Session, record: Any) -> None:
    dest = session.destination(size="32M", extra=dest_args())
    src = _cli_source(session, dest.uri, "--set", "max-bandwidth=4M")
    time.sleep(2.5)  # the source process starts and streams
    assert src.proc.poll() is None
    t0 = time.monotonic()
    src.sigkill()
    rc, report = dest.finish(60)
    dt = time.monotonic() - t0
    _dest_never_ran(dest, rc, report)
    assert dt < STALL_MS / 1000 + SLACK
    record(fault="kill -9 source", phase="active", detect_s=round(dt, 2), bound="(EOF)", source="killed",
           destination="failed, paused")


def test_sigstop_source_while_active(session: Session, record: Any) -> None:
    dest = session.destination(size="32M", extra=dest_args())
    src = _cli_source(session, dest.uri, "--set", "max-bandwidth=4M")
    time.sleep(2.5)
    assert src.proc.poll() is None
    os.kill(src.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        rc, report = dest.finish(60)
        dt = time.monotonic() - t0
    finally:
        os.kill(src.pid, signal.SIGCONT)
    _dest_never_ran(dest, rc, report)
    assert report is not None and report.get("bound-fired") == "x-stall-timeout", report
    assert STALL_MS / 1000 - 0.5 < dt < STALL_MS / 1000 + SLACK
    src_rc, src_report = src.finish(60)  # the source sees the connection closed: fails, resumes
    assert src_rc != 0 and src_report is not None and src_report["status"] == "failed"
    record(fault="SIGSTOP source", phase="active", detect_s=round(dt, 2), bound="x-stall-timeout",
           source="failed after SIGCONT, running", destination="failed, paused")


# ----------------------------------------------------------------------------- hostile peers
def test_peer_that_connects_first_and_stalls(session: Session, record: Any) -> None:
    dest = session.destination(size="16M", extra=dest_args())
    host, port = dest.uri.removeprefix("tcp:").rsplit(":", 1)
    squatter = socket.create_connection((host, int(port)))
    try:
        squatter.sendall(b"QEVM")  # a prefix, then nothing
        time.sleep(0.2)
        src = session.source(fast(), size="16M", dirty_rate="0")
        before = src.prog.checksums()
        t0 = time.monotonic()
        mig = src.migrate(dest.uri)
        st = mig.wait(MIGRATION_TIMEOUT)
        dt_src = time.monotonic() - t0
        assert st.status == "failed"  # refused: the listener takes one stream
        _source_intact(src, before)
        rc, report = dest.finish(60)
        dt_dest = time.monotonic() - t0
    finally:
        squatter.close()
    _dest_never_ran(dest, rc, report)
    assert report is not None and report.get("bound-fired") == "x-stall-timeout", report
    assert dt_dest < STALL_MS / 1000 + SLACK
    record(fault="peer connects first and stalls", phase="accept", detect_s=round(dt_dest, 2),
           bound="x-stall-timeout", source=f"refused in {dt_src:.2f}s, running", destination="failed, paused")


class _Recorder:
    """A tcp proxy that forwards both directions and keeps what the source sent."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp:").rsplit(":", 1)
        self.target = (host, int(port))
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.lst.getsockname()[1]}"
        self.forward = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        a, _ = self.lst.accept()
        b = socket.create_connection(self.target)

        def pump(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
            try:
                while data := src.recv(1 << 16):
                    if keep is not None:
                        keep += data
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        t = threading.Thread(target=pump, args=(b, a, None), daemon=True)
        t.start()
        pump(a, b, self.forward)
        t.join(30)
        a.close()
        b.close()


def test_replayed_stream_cannot_start_a_destination(session: Session, record: Any) -> None:
    first = session.destination(size="16M", extra=dest_args())
    proxy = _Recorder(first.uri)
    src = session.source(fast(), size="16M", dirty_rate="0")
    mig = src.migrate(proxy.uri)
    assert mig.wait(MIGRATION_TIMEOUT).status == "completed", mig.error
    proxy.thread.join(30)
    rc, report = first.finish(60)
    assert rc == 0 and report is not None and report["status"] == "completed"
    recorded = bytes(proxy.forward)
    assert len(recorded) > 16 << 20
    # the same bytes, replayed to a fresh destination
    second = session.destination(size="16M", extra=dest_args())
    host, port = second.uri.removeprefix("tcp:").rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(recorded)
        rc2, report2 = second.finish(60)
    dt = time.monotonic() - t0
    _dest_never_ran(second, rc2, report2)
    assert "replayed" in report2["error-desc"], report2
    record(fault="replayed recording of a good migration", phase="handover", detect_s=round(dt, 2),
           bound="GO nonce", source="-", destination="failed, paused")
