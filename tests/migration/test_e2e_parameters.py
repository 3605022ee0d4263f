"""Parameters changed while a migration runs take effect, measured on the wire."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from migration_helpers import MIGRATION_TIMEOUT, Session, wait_for

from savevm.config import MigrationConfig
from savevm.errors import ConfigError
from savevm.migration import Migration

MiB = 1 << 20


def _rate(mig: Migration, seconds: float) -> float:
    """Bytes/s of ``ram.transferred`` over ``seconds``."""
    a = (mig.query().ram or {})["transferred"]
    t0 = time.monotonic()
    time.sleep(seconds)
    b = (mig.query().ram or {})["transferred"]
    return (b - a) / (time.monotonic() - t0)


@pytest.mark.slow
def test_max_bandwidth_change_takes_effect(session: Session) -> None:
    dest = session.destination(size="64M")
    cfg = MigrationConfig().set_parameter("max-bandwidth", "4M")
    src = session.source(cfg, size="64M", dirty_rate="0")
    mig = src.migrate(dest.uri)
    wait_for(lambda: mig.state == "active", 30, what="active")
    time.sleep(0.3)
    slow = _rate(mig, 1.0)
    mig.set_parameter("max-bandwidth", "32M")
    assert mig.config.param("max-bandwidth") == 32 * MiB
    time.sleep(0.2)
    assert mig.state == "active", "finished before the second sample: the test proves nothing"
    fast = _rate(mig, 0.6)
    assert mig.state == "active"

    assert 0.5 * 4 * MiB <= slow <= 1.5 * 4 * MiB, f"{slow / MiB:.2f} MiB/s at max-bandwidth 4M"
    assert fast > 3 * slow, f"{slow / MiB:.2f} -> {fast / MiB:.2f} MiB/s"
    assert fast <= 1.5 * 32 * MiB, f"{fast / MiB:.2f} MiB/s at max-bandwidth 32M"

    st = mig.wait(MIGRATION_TIMEOUT)
    assert st.status == "completed", st.error_desc
    rc, report = dest.finish(60)
    assert rc == 0 and report is not None
    assert report["guest"]["checksums"] == src.prog.checksums()


@pytest.mark.slow
def test_max_bandwidth_set_during_setup_is_not_lost(session: Session) -> None:
    """QEMU applies max-bandwidth to the stream whenever one exists, setup included."""
    dest = session.destination(size="64M")
    cfg = MigrationConfig().set_parameter("max-bandwidth", "4M")
    src = session.source(cfg, size="64M", dirty_rate="0")
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
        assert entered.wait(30)
        assert mig.state == "setup"
        mig.set_parameter("max-bandwidth", "32M")
    finally:
        gate.set()
    wait_for(lambda: mig.state == "active", 30, what="active")
    time.sleep(0.2)
    rate = _rate(mig, 0.5)
    assert rate > 3 * 4 * MiB, f"{rate / MiB:.2f} MiB/s: the 32M set during setup was lost"
    assert rate <= 1.5 * 32 * MiB
    st = mig.wait(MIGRATION_TIMEOUT)
    assert st.status == "completed", st.error_desc
    rc, report = dest.finish(60)
    assert rc == 0 and report is not None
    assert report["guest"]["checksums"] == src.prog.checksums()


@pytest.mark.slow
def test_downtime_limit_change_takes_effect(session: Session) -> None:
    dest = session.destination(size="64M")
    cfg = MigrationConfig().set_parameter("max-bandwidth", "4M")
    src = session.source(cfg, size="64M", dirty_rate="0")
    mig = src.migrate(dest.uri)
    wait_for(lambda: mig.state == "active" and (mig.query().ram or {}).get("transferred", 0) > 2 * MiB,
             30, what="an active migration")
    q = mig.query()
    # 60 MiB to go at 4 MiB/s: far more than 300 ms of downtime would allow
    assert q.expected_downtime is not None and q.expected_downtime > 5000, q.as_qmp()

    with pytest.raises(ConfigError):
        mig.set_parameter("downtime-limit", 2_000_001)  # QEMU's bound is 2,000,000 ms
    assert mig.config.param("downtime-limit") == 300
    assert mig.state == "active"

    t0 = time.monotonic()
    mig.set_parameter("downtime-limit", 30_000)
    assert mig.config.param("downtime-limit") == 30_000
    st = mig.wait(MIGRATION_TIMEOUT)
    took = time.monotonic() - t0
    assert st.status == "completed", st.error_desc
    # without the change the rest would have taken ~15 s at 4 MiB/s
    assert took < 5.0, f"{took:.1f}s after raising downtime-limit"
    ram = st.ram or {}
    assert ram["downtime-bytes"] > 32 * MiB, ram  # the rest went with the program stopped
    rc, report = dest.finish(60)
    assert rc == 0 and report is not None
    assert report["guest"]["checksums"] == src.prog.checksums()
