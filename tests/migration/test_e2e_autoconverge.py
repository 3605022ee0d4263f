"""A workload that dirties memory faster than the link carries it, rescued by auto-converge.

16 MiB of RAM, ``max-bandwidth`` 8 MiB/s and a workload rewriting 12 MiB/s
of random pages: every round re-dirties more than half of what it sent, so
what is pending never fits in ``bandwidth × downtime-limit`` (2.4 MiB).

With ``auto-converge`` QEMU's rule applies: when the pages dirtied in a
>= 1 s period exceed ``throttle-trigger-threshold`` (50 %) of the bytes sent
in it, twice in a row, the program is throttled, first to
``cpu-throttle-initial`` (20 %), then ``cpu-throttle-increment`` more each
time.  The increment is raised to 30 so the test converges in a few seconds
(20 % → 50 %); the sequence the program is told must still follow the rule.
"""

from __future__ import annotations

import time

import pytest
from migration_helpers import Session, wait_for

from savevm.config import MigrationConfig
from savevm.errors import MigrationCancelled

SIZE = "16M"
DIRTY_RATE = "12M"
#: how long the migration without auto-converge must keep failing to converge
NO_CONVERGE_SECONDS = 5.0
#: generous: it converges in about 8 s here (throttle 20 % at ~3.5 s, 50 % at ~6 s)
AC_TIMEOUT = 45.0


def _config() -> MigrationConfig:
    return (MigrationConfig()
            .set_parameter("max-bandwidth", "8M")
            .set_parameter("cpu-throttle-increment", 30))


@pytest.mark.slow
def test_without_auto_converge_it_does_not_converge(session: Session) -> None:
    dest = session.destination(size=SIZE)
    # QEMU's behaviour: a stalled migration goes on as it is (savevm's default would start auto-converge)
    src = session.source(_config().set_parameter("x-stall-policy", "continue"), size=SIZE, dirty_rate=DIRTY_RATE)
    time.sleep(0.2)
    mig = src.migrate(dest.uri)
    wait_for(lambda: mig.state != "setup", 30, what="the end of setup")
    time.sleep(NO_CONVERGE_SECONDS)

    q = mig.query().as_qmp()
    assert q["status"] == "active", q
    # it did try: the bulk stage is over and it synced the bitmap again and again
    assert q["ram"]["dirty-sync-count"] >= 3, q
    assert q["ram"]["transferred"] > 20 << 20, q  # more than the RAM's 16 MiB: pages went again
    assert q["ram"]["remaining"] > 0
    assert "expected-downtime" in q and "downtime" not in q
    assert q["cpu-throttle-percentage"] == 0
    assert src.prog.throttles == [] or set(src.prog.throttles) == {0}

    mig.cancel()
    st = mig.wait(30)
    assert st.status == "cancelled"
    assert isinstance(mig.error, MigrationCancelled)
    assert not src.prog.is_paused
    assert src.recorder.states() == ["setup", "active", "cancelling", "cancelled"]
    # the program keeps running after the cancel
    before = src.prog.pages_dirtied
    wait_for(lambda: src.prog.pages_dirtied > before, 10, what="the workload to continue")

    rc, report = dest.finish(60)
    assert rc != 0
    assert report is not None and report["status"] == "failed"
    assert "guest" not in report


@pytest.mark.slow
def test_auto_converge_throttles_until_it_completes(session: Session) -> None:
    dest = session.destination(size=SIZE)
    cfg = _config().set_capability("auto-converge")
    src = session.source(cfg, size=SIZE, dirty_rate=DIRTY_RATE)
    time.sleep(0.2)
    t0 = time.monotonic()
    mig = src.migrate(dest.uri)
    seen_throttle = 0
    while mig.is_running():
        q = mig.query().as_qmp()
        seen_throttle = max(seen_throttle, q.get("cpu-throttle-percentage") or 0)
        if time.monotonic() - t0 > AC_TIMEOUT:
            pytest.fail(f"auto-converge did not complete within {AC_TIMEOUT}s: {q}")
        time.sleep(0.1)
    st = mig.wait(30)
    assert st.status == "completed", (st.error_desc, dest.stderr())
    source_sums = src.prog.checksums()

    # the throttle was raised by QEMU's rule and dropped once the migration ended
    thr = src.prog.throttles
    assert thr, "the program was never throttled"
    assert thr[-1] == 0, thr
    raised = thr[:-1]
    assert raised and raised[0] == 20, thr  # cpu-throttle-initial
    assert all(b - a == 30 or b == 99 for a, b in zip(raised, raised[1:])), thr
    assert seen_throttle >= 20 and seen_throttle in raised
    assert src.prog.current_throttle == 0
    assert st.cpu_throttle_percentage == 0
    assert st.as_qmp()["cpu-throttle-percentage-max"] == max(raised)
    # while throttled the workload really slowed down (it still wrote)
    assert src.prog.pages_dirtied > 0

    rc, report = dest.finish(60)
    assert rc == 0, dest.stderr()
    assert report is not None and report["status"] == "completed"
    assert report["guest"]["checksums"] == source_sums
    assert src.recorder.states() == ["setup", "active", "device", "completed"]
