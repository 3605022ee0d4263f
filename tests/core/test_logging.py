"""Logging: quiet and unconfigured on import, trace events with QEMU's names, one context per migration."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import structlog
from structlog.testing import LogCapture

import savevm_ram
from savevm.channels import memory_pipe
from savevm.config import MigrationConfig
from savevm.guest import NullGuest
from savevm.migration import Incoming, Migration
from savevm.plugins import PluginHost


@pytest.fixture
def events() -> Iterator[LogCapture]:
    """Capture every event with its contextvars (capture_logs alone drops them)."""
    cap = LogCapture()
    old = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, cap],
                        wrapper_class=structlog.make_filtering_bound_logger(0))
    try:
        yield cap
    finally:
        structlog.configure(**old)


def test_import_does_not_configure_structlog() -> None:
    code = "import structlog, savevm, savevm_ram, savevm_xbzrle; print(structlog.is_configured())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_unconfigured_events_go_to_stdlib_logging(caplog: pytest.LogCaptureFixture) -> None:
    from savevm.logging import get_logger

    structlog.reset_defaults()
    with caplog.at_level("INFO", logger="savevm"):
        get_logger("savevm.test").info("ram_save_setup", blocks=1)
    assert any(r.name == "savevm.test" and "ram_save_setup" in r.getMessage() for r in caplog.records)


def _pair(size: int, seed: int) -> tuple[Migration, Incoming, np.ndarray, np.ndarray]:
    src_buf = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    dst_buf = np.zeros(size, dtype=np.uint8)
    wch, rch = memory_pipe()
    src_reg = PluginHost(MigrationConfig()).new_registry()
    savevm_ram.register_ram(src_reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", src_buf)]))
    dst_reg = PluginHost(MigrationConfig()).new_registry()
    savevm_ram.register_ram(dst_reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", dst_buf)]))
    return (Migration(src_reg, channel=wch, guest=NullGuest()), Incoming(dst_reg, channel=rch, guest=NullGuest()),
            src_buf, dst_buf)


def test_two_migrations_in_one_process_are_told_apart(events: LogCapture) -> None:
    pairs = [_pair(1 << 20, seed) for seed in (1, 2)]
    for mig, inc, _, _ in pairs:
        inc.start()
        mig.start()
    for mig, inc, src, dst in pairs:
        assert mig.wait(30).status == "completed"
        assert inc.wait(30).status == "completed"
        assert np.array_equal(src, dst)
    ids = {mig.id for mig, *_ in pairs} | {inc.id for _, inc, *_ in pairs}
    assert len(ids) == 4
    for mig, inc, *_ in pairs:
        mine = [e for e in events.entries if e.get("migration") == mig.id]
        assert mine and all(e["side"] == "source" for e in mine)
        names = [e["event"] for e in mine]
        # QEMU's trace point names, in order: state changes around the RAM section's setup
        assert "ram_save_setup" in names
        states = [(e["old"], e["new"]) for e in mine if e["event"] == "migrate_set_state"]
        assert states == [("none", "setup"), ("setup", "active"), ("active", "device"), ("device", "completed")]
        theirs = [e for e in events.entries if e.get("migration") == inc.id]
        assert theirs and all(e["side"] == "destination" for e in theirs)
        assert [(e["old"], e["new"]) for e in theirs if e["event"] == "migrate_set_state"] == [
            ("none", "active"), ("active", "completed")]


def test_migration_throttle_event(events: LogCapture) -> None:
    """Auto-converge (QEMU's migration_trigger_throttle): two periods dirtier than half the transfer."""
    mig, _, _, _ = _pair(8192, 3)
    mig.config = mig.config.set_capability("auto-converge")
    seen: list[int] = []
    mig.guest = type("G", (NullGuest,), {"set_throttle": lambda self, p: seen.append(p)})()
    for _ in range(4):
        mig.convergence.dirty_period(dirty_bytes=100, xfer_bytes=100)  # 100 > 50% of 100
    throttles = [e for e in events.entries if e["event"] == "migration_throttle"]
    assert [e["percent"] for e in throttles] == [20, 30] == seen
    threading.Event().wait(0)  # nothing left running: the migration was never started
