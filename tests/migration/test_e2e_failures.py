"""Failures between processes: a peer killed mid-stream, a destination that refuses.

* destination SIGKILLed while pages flow: the source fails with a
  MigrationError that keeps its cause, resumes the program and leaves its
  memory exactly as it was;
* source SIGKILLed while pages flow: the destination fails on the truncated
  stream, does not resume its program and never reports completion;
* destination without one of the source's sections: it refuses the stream
  and says why over the return path; the source fails with that reason.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from migration_guests import RecordingDemo
from migration_helpers import MIGRATION_TIMEOUT, ChildProcess, Session, wait_for

from savevm.config import MigrationConfig
from savevm.errors import ChannelError, MigrationError, StreamError, TruncatedStreamError
from savevm.migration import Incoming
from savevm.plugins import PluginHost


def _uri(session: Session, transport: str) -> str:
    return "tcp:127.0.0.1:0" if transport == "tcp" else session.unix_uri()


# --------------------------------------------------------------------------- destination killed
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_destination_killed_mid_stream(session: Session, transport: str) -> None:
    dest = session.destination(_uri(session, transport), size="32M")
    cfg = MigrationConfig().set_parameter("max-bandwidth", "4M")
    src = session.source(cfg, size="32M", dirty_rate="0")  # nothing writes: memory must stay as is
    before = src.prog.checksums()
    mig = src.migrate(dest.uri)
    wait_for(lambda: mig.state == "active" and (mig.query().ram or {}).get("transferred", 0) > 1 << 20,
             30, what="pages on the wire")

    dest.sigkill()
    assert dest.proc.returncode == -9
    st = mig.wait(30)

    assert st.status == "failed", st.as_qmp()
    err = mig.error
    assert isinstance(err, MigrationError)
    assert err.__cause__ is not None, f"the error lost its cause: {err!r}"
    assert isinstance(err.__cause__, OSError)
    assert st.error_desc and str(err) in st.error_desc
    assert src.recorder.states() == ["setup", "active", "failed"]
    # the program is handed back untouched
    assert not src.prog.is_paused
    assert ("pause", 0) not in src.prog.events
    assert src.prog.checksums() == before
    assert (st.ram or {})["transferred"] < 32 << 20  # it really was cut off mid-stream


# --------------------------------------------------------------------------- source killed
def _start_cli_source(session: Session, uri: str) -> ChildProcess:
    return session.savevm("migrate", uri, "--guest", "savevm_ram.demo:DemoProgram", "--guest-arg", "size=32M",
                          "--set", "max-bandwidth=4M", "--json", "--log-format", "json", "--log-level", "info",
                          name="source")


def _wait_source_active(src: ChildProcess, timeout: float = 45.0) -> None:
    """Until the source process logs its move to ``active``."""

    def active() -> bool:
        if src.proc.poll() is not None:
            raise AssertionError(f"the source exited early ({src.proc.returncode}):\n{src.stderr()}")
        for line in Path(src.stderr_path).read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "migrate_set_state" and ev.get("new") == "active":
                return True
        return False

    wait_for(active, timeout, interval=0.05, what="the source to become active")


@pytest.mark.slow
def test_source_killed_mid_stream_cli_destination(session: Session) -> None:
    dest = session.destination(session.unix_uri(), size="32M")
    src = _start_cli_source(session, dest.uri)
    _wait_source_active(src)
    time.sleep(0.5)  # about 2 MiB at 4 MiB/s
    src.sigkill()

    rc, report = dest.finish(60)
    assert rc != 0
    assert report is not None, dest.stderr()
    assert report["status"] == "failed"
    assert "guest" not in report
    desc = report.get("error-desc", "")
    # EOF, or a reset: a killed process with return-path messages unread makes its kernel reset
    assert "stream ended" in desc or "truncated" in desc.lower() or "the peer reset the connection" in desc, desc


@pytest.mark.slow
def test_source_killed_mid_stream_incoming_in_process(session: Session) -> None:
    prog = RecordingDemo(size="32M", role="destination")
    cfg = MigrationConfig()
    reg = PluginHost(cfg).new_registry()
    prog.register(reg)
    inc = Incoming(reg, "tcp:127.0.0.1:0", guest=prog, config=cfg)
    inc.accept_timeout = 60
    uri = inc.listen()
    inc.start()
    try:
        src = _start_cli_source(session, uri)
        _wait_source_active(src)
        wait_for(lambda: inc._f is not None and inc._f.pos > 1 << 20, 30, what="bytes at the destination")
        src.sigkill()
        st = inc.wait(30)
    finally:
        if inc.is_running():
            inc.cancel()
            inc.wait(10)
    assert st.status == "failed"
    if isinstance(inc.error, ChannelError):
        # the killed source's kernel reset the connection (return-path bytes it never read)
        assert "the peer reset the connection" in str(inc.error), repr(inc.error)
        assert int(str(inc.error).split("offset ")[1].split(":")[0]) >= 1 << 20
    else:
        assert isinstance(inc.error, TruncatedStreamError), repr(inc.error)
        assert isinstance(inc.error, StreamError) and inc.error.offset is not None
        assert inc.error.offset >= 1 << 20
    # the half-loaded program was not handed over
    assert ("resume", 0) not in prog.events


# --------------------------------------------------------------------------- refused
@pytest.mark.slow
def test_destination_without_the_device_refuses(session: Session) -> None:
    dest = session.destination(guest="migration_guests:RamOnlyDemo", size="16M")
    src = session.source(MigrationConfig(), size="16M", dirty_rate="0")
    before = src.prog.checksums()
    mig = src.migrate(dest.uri)
    st = mig.wait(MIGRATION_TIMEOUT)

    assert st.status == "failed"
    msg = str(mig.error)
    assert "destination refused" in msg and "demo-device" in msg, msg
    assert isinstance(mig.error, MigrationError)
    # it got as far as stopping the program, and gave it back
    assert src.recorder.states() == ["setup", "active", "device", "failed"]
    assert [k for k, _ in src.prog.events if k != "throttle"] == ["pause", "resume"]
    assert not src.prog.is_paused
    assert src.prog.checksums() == before

    rc, report = dest.finish(60)
    assert rc != 0
    assert report is not None and report["status"] == "failed"
    assert "demo-device" in report["error-desc"]
    assert "guest" not in report


@pytest.mark.slow
def test_destination_without_ram_refuses_while_pages_flow(session: Session) -> None:
    dest = session.destination(guest="migration_guests:DeviceOnlyDemo", size="16M")
    cfg = MigrationConfig().set_parameter("max-bandwidth", "8M")
    src = session.source(cfg, size="16M", dirty_rate="0")
    before = src.prog.checksums()
    mig = src.migrate(dest.uri)
    st = mig.wait(MIGRATION_TIMEOUT)

    assert st.status == "failed"
    msg = str(mig.error)
    assert "destination refused" in msg and "'ram'" in msg, msg
    assert "device" not in src.recorder.states()
    assert not src.prog.is_paused
    assert src.prog.checksums() == before

    rc, report = dest.finish(60)
    assert rc != 0
    assert report is not None and report["status"] == "failed"
    assert "unknown section 'ram'" in report["error-desc"]


def test_destination_dying_while_taking_over_leaves_the_source_paused(session: Session) -> None:
    # the destination loaded, got GO and died inside resume(): it may have run the program, so
    # the source must not resume on its own (two copies would run); it fails, stays paused, and
    # runs again only when told to
    from savevm.migration import HandoverUncertain

    dest = session.destination(guest="migration_guests:DiesOnResumeDemo", size="16M")
    src = session.source(MigrationConfig(), size="16M", dirty_rate="0")
    before = src.prog.checksums()
    mig = src.migrate(dest.uri)
    st = mig.wait(MIGRATION_TIMEOUT)
    assert st.status == "failed", st
    assert isinstance(mig.error, HandoverUncertain), mig.error
    assert "stays paused" in str(mig.error)
    assert st.as_qmp()["runstate"] == "postmigrate"
    assert src.prog.is_paused
    assert src.prog.checksums() == before
    rc, _ = dest.finish(60)
    assert rc == 3
    mig.resume()  # the operator knows the destination died
    assert not src.prog.is_paused


def test_incoming_cancel_while_loading() -> None:
    """The destination's cancel ends its load as cancelled; the source fails, resumed."""
    import threading

    import savevm
    from savevm.migration import Incoming, Migration
    from savevm_ram.demo import DemoProgram

    dprog = DemoProgram(size="16M", role="destination")
    dreg = savevm.PluginHost().new_registry()
    dprog.register(dreg)
    inc = Incoming(dreg, "tcp:127.0.0.1:0")
    uri = inc.listen()
    inc.start()
    sprog = DemoProgram(size="16M", dirty_rate="0")
    sreg = savevm.PluginHost().new_registry()
    sprog.register(sreg)
    before = sprog.checksums()
    mig = Migration(sreg, uri, guest=sprog, config=MigrationConfig().set_parameter("max-bandwidth", "2M"))
    mig.start()
    wait_for(lambda: inc.state == "active" and (inc.query().stream_bytes or 0) > 100_000, 20, what="loading")
    threading.Thread(target=inc.cancel).start()
    ist = inc.wait(20)
    assert ist.status == "failed"
    assert isinstance(inc.error, savevm.MigrationCancelled)
    st = mig.wait(30)
    assert st.status == "failed"
    assert not sprog._paused.is_set(), "the source program runs again"
    assert sprog.checksums() == before
