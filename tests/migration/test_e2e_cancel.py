"""Cancel in each running state: setup, active and device.

To cancel *in* setup and *in* device deterministically, the test holds the
migration thread there: the RAM section's ``save_setup`` (setup) or the
program's ``pause()`` (device) waits on an event until the test has called
``mig.cancel()``.  Whatever the state, the end is the same: ``cancelled``,
``MigrationCancelled``, the program running (not paused), and a destination
that reports failure instead of completion.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from migration_helpers import Destination, Session, Source, wait_for

from savevm.config import MigrationConfig
from savevm.errors import MigrationCancelled, MigrationError


def _assert_cancelled(src: Source, dest: Destination, states: list[str]) -> None:
    mig = src.mig
    assert mig is not None
    st = mig.wait(30)
    assert st.status == "cancelled", st.error_desc
    assert mig.state == "cancelled"
    assert isinstance(mig.error, MigrationCancelled)
    assert isinstance(mig.error, MigrationError)
    assert "cancel" in (st.error_desc or "")
    assert src.recorder.states() == states
    # the program was handed back: not paused, not throttled, and it keeps running
    assert not src.prog.is_paused
    assert src.prog.current_throttle == 0
    if src.prog.rate:
        before = src.prog.pages_dirtied
        wait_for(lambda: src.prog.pages_dirtied > before, 10, what="the workload to run again")
    # cancel again is harmless
    mig.cancel()
    assert mig.state == "cancelled"

    rc, report = dest.finish(60)
    assert rc != 0, "the destination claims success after a cancelled migration"
    assert report is not None, dest.stderr()
    assert report["status"] == "failed"
    assert "guest" not in report  # the program was not handed over
    assert report.get("error-desc")


@pytest.mark.slow
def test_cancel_in_setup(session: Session) -> None:
    dest = session.destination(size="16M")
    src = session.source(MigrationConfig(), size="16M", dirty_rate="4M")
    handlers = src.ram_handlers()
    entered, gate = threading.Event(), threading.Event()
    real_setup = handlers.save_setup

    def held_setup(f: Any, ctx: Any) -> None:
        entered.set()
        gate.wait(30)
        real_setup(f, ctx)

    handlers.save_setup = held_setup
    mig = src.migrate(dest.uri)
    try:
        assert entered.wait(30), "save_setup was never called"
        assert mig.state == "setup"
        mig.cancel()  # from this thread, while the migration thread sits in setup
        assert mig.state == "cancelling"
    finally:
        gate.set()
    _assert_cancelled(src, dest, ["setup", "cancelling", "cancelled"])
    assert ("pause", 0) not in src.prog.events
    assert mig.query().setup_time is None  # setup never finished


@pytest.mark.slow
def test_cancel_in_active(session: Session) -> None:
    dest = session.destination(size="32M")
    cfg = MigrationConfig().set_parameter("max-bandwidth", "4M")
    src = session.source(cfg, size="32M", dirty_rate="2M")
    mig = src.migrate(dest.uri)
    wait_for(lambda: mig.state == "active" and (mig.query().ram or {}).get("transferred", 0) > 1 << 20,
             30, what="an active migration with bytes on the wire")
    mig.cancel()
    _assert_cancelled(src, dest, ["setup", "active", "cancelling", "cancelled"])
    assert ("pause", 0) not in src.prog.events  # never got as far as stopping the program


@pytest.mark.slow
def test_cancel_in_device(session: Session) -> None:
    dest = session.destination(size="16M")
    src = session.source(MigrationConfig(), size="16M", dirty_rate="4M")
    src.prog.pause_gate = threading.Event()
    time.sleep(0.1)
    mig = src.migrate(dest.uri)
    try:
        assert src.prog.pause_entered.wait(30), "the migration never tried to pause the program"
        assert mig.state == "device"
        mig.cancel()
        assert mig.state == "cancelling"
    finally:
        src.prog.pause_gate.set()
    _assert_cancelled(src, dest, ["setup", "active", "device", "cancelling", "cancelled"])
    kinds = [k for k, _ in src.prog.events if k in ("pause", "resume")]
    assert kinds == ["pause", "resume"]
