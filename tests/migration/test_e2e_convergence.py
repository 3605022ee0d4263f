"""Convergence beyond QEMU's rule, end to end: a source in this process, ``savevm incoming`` in another.

The workload is the one QEMU's stop rule cannot migrate: a few bytes of
every page of a 16 MiB working set rewritten again and again (``--dirty-pattern
sparse``).  Every page is always dirty, so QEMU's figure (dirty pages × 4 KiB
= 16 MiB) never fits in ``bandwidth × downtime-limit`` (16 MiB/s × 300 ms =
4.8 MiB at most), while each page costs ~20 bytes as an XBZRLE delta.

* the wire estimate (the default) completes, untouched by any throttle;
* QEMU's estimate stalls: with ``x-stall-policy=fail`` the migration fails
  and the source keeps running; with ``throttle`` (the default) auto-converge
  starts although the capability is off; with a downtime ramp the limit rises
  until even QEMU's figure fits.
"""

from __future__ import annotations

import time

import pytest
from migration_helpers import MIGRATION_TIMEOUT, Destination, Session, Source, wait_for

from savevm.config import MigrationConfig
from savevm.errors import MigrationStalled
from savevm.migration import Migration
from savevm.stats import MigrationStats

SIZE = "32M"  # two blocks of 16 MiB
WORKING_SET = "16M"  # all of the first block
WS_BYTES = 16 << 20


def _config(**params: object) -> MigrationConfig:
    cfg = (MigrationConfig().set_capability("xbzrle")
           .set_parameter("max-bandwidth", "16M").set_parameter("downtime-limit", 300))
    for name, value in params.items():
        cfg = cfg.set_parameter(name.replace("_", "-"), value)
    return cfg


def _start(session: Session, cfg: MigrationConfig) -> tuple[Destination, Source, Migration]:
    dest = session.destination(size=SIZE)
    src = session.source(cfg, size=SIZE, working_set=WORKING_SET, dirty_pattern="sparse")
    time.sleep(0.2)
    return dest, src, src.migrate(dest.uri)


def _wait(mig: Migration, timeout: float = MIGRATION_TIMEOUT) -> MigrationStats:
    wait_for(mig.finished, timeout, interval=0.1, what="the migration to end")
    return mig.wait(30)


@pytest.mark.slow
def test_wire_estimate_completes_without_throttling(session: Session) -> None:
    dest, src, mig = _start(session, _config(x_stall_policy="continue"))
    st = _wait(mig)
    assert st.status == "completed", (st.error_desc, dest.stderr())
    sums = src.prog.checksums()
    assert src.prog.throttles == [0] or not any(src.prog.throttles)
    q = st.as_qmp()
    conv = q["convergence"]
    assert conv["pending-estimate"] == "wire" and conv["auto-converge-forced"] is False
    recs = mig.records
    assert [r.iteration for r in recs] == sorted({r.iteration for r in recs})
    final = recs[-1]
    assert final.stage == "complete" and final.downtime == st.downtime
    # what decided: the working set was all dirty, and QEMU's figure for it would not have fitted
    assert final.pending_ram >= WS_BYTES // 2
    assert final.pending_wire <= final.threshold < final.pending_ram
    assert final.pages.get("xbzrle", 0) > 0 and final.bytes["xbzrle"] / final.pages["xbzrle"] < 40
    rc, report = dest.finish(60)
    assert rc == 0 and report is not None and report["guest"]["checksums"] == sums


@pytest.mark.slow
def test_qemu_estimate_stalls_and_fail_policy_keeps_the_source_running(session: Session) -> None:
    dest, src, mig = _start(session, _config(x_pending_estimate="qemu", x_stall_policy="fail",
                                             x_stall_iterations=3))
    st = _wait(mig)
    assert st.status == "failed", st.as_qmp()
    assert isinstance(mig.error, MigrationStalled)
    assert "x-stall-policy=fail" in (st.error_desc or "")
    assert mig.runstate == "running" and not src.prog.is_paused
    before = src.prog.pages_dirtied
    wait_for(lambda: src.prog.pages_dirtied > before, 10, what="the workload to go on")
    q = st.as_qmp()
    assert q["convergence"]["stalls"] == 1
    # it never fitted: every record after the bulk copy had QEMU's figure above the threshold,
    # although the wire figure would have fitted
    after_bulk = [r for r in mig.records if r.syncs >= 3]
    assert after_bulk and all(r.estimate == "qemu" for r in after_bulk)
    assert any(r.pending_wire < r.threshold < r.pending_ram for r in after_bulk)
    rc, report = dest.finish(60)
    assert rc != 0 and report is not None and report["status"] == "failed"


@pytest.mark.slow
def test_stall_policy_throttle_starts_auto_converge(session: Session) -> None:
    cfg = _config(x_pending_estimate="qemu", x_stall_iterations=2, cpu_throttle_increment=40)
    assert not cfg.has("auto-converge") and cfg.parameters.x_stall_policy == "throttle"
    dest, src, mig = _start(session, cfg)
    st = _wait(mig)
    assert st.status == "completed", (st.error_desc, dest.stderr())
    q = st.as_qmp()
    assert q["convergence"]["auto-converge-forced"] is True and q["convergence"]["stalls"] >= 1
    raised = [t for t in src.prog.throttles if t]
    assert raised and raised[0] == 20, src.prog.throttles
    assert q["cpu-throttle-percentage-max"] == max(raised)
    sums = src.prog.checksums()
    rc, report = dest.finish(60)
    assert rc == 0 and report is not None and report["guest"]["checksums"] == sums


@pytest.mark.slow
def test_downtime_ramp_raises_the_limit_until_qemus_figure_fits(session: Session) -> None:
    cfg = _config(x_pending_estimate="qemu", x_stall_policy="continue", x_downtime_ramp="100:2000:60000:500")
    dest, src, mig = _start(session, cfg)
    st = _wait(mig)
    assert st.status == "completed", (st.error_desc, dest.stderr())
    recs = mig.records
    limits = [r.downtime_limit for r in recs]
    assert limits[0] == 100 and limits == sorted(limits)
    steps = sorted(set(limits))
    assert len(steps) >= 2 and all((b - a) % 2000 == 0 for a, b in zip(steps, steps[1:]))
    ramp = st.as_qmp()["convergence"]["downtime-ramp"]
    assert ramp["schedule"] == "100:2000:60000:500" and ramp["steps"] >= 1 and ramp["limit"] == limits[-1]
    assert not any(src.prog.throttles)
    sums = src.prog.checksums()
    rc, report = dest.finish(60)
    assert rc == 0 and report is not None and report["guest"]["checksums"] == sums
