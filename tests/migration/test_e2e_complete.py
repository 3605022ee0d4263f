"""A converging workload migrates between two processes over tcp and unix sockets.

The destination is a ``savevm incoming`` subprocess; the source runs in this
process with a workload that keeps dirtying pages while the migration runs.
The destination's checksums of every block and of the device must equal the
source's, taken after completion (the source stays paused from then on).
"""

from __future__ import annotations

import os
import time

import pytest
from migration_helpers import MIGRATION_TIMEOUT, Session

from savevm.config import MigrationConfig

RAM_KEYS = {"transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "mbps",
            "dirty-sync-count", "dirty-pages-rate", "pages-per-second"}
TOP_KEYS = {"status", "total-time", "downtime", "setup-time", "ram"}
SIZE = 32 << 20


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_converging_workload_completes_with_identical_state(session: Session, transport: str) -> None:
    uri = "tcp:127.0.0.1:0" if transport == "tcp" else session.unix_uri()
    dest = session.destination(uri, size="32M")
    assert dest.uri.startswith(f"{transport}:")
    # a moderate bandwidth so the migration lasts several rounds while the workload writes
    cfg = MigrationConfig().set_parameter("max-bandwidth", "48M")
    src = session.source(cfg, size="32M", dirty_rate="4M")
    time.sleep(0.2)  # the workload is running before the migration starts
    mig = src.migrate(dest.uri)
    st = mig.wait(MIGRATION_TIMEOUT)

    assert st.status == "completed", (st.error_desc, dest.stderr())
    assert mig.error is None
    # after completion the source program stays paused: its state is the migrated state
    assert src.prog.is_paused
    source_sums = src.prog.checksums()
    assert src.prog.pages_dirtied > 0, "the workload never ran during the migration"

    rc, report = dest.finish(60)
    assert rc == 0, dest.stderr()
    assert report is not None and report["status"] == "completed"
    assert report["guest"]["checksums"] == source_sums
    assert report["guest"]["device-counter"] == src.prog.device.counter > 0

    # the source's state sequence, as a migration-notifier plugin saw it
    assert src.recorder.states("source") == ["setup", "active", "device", "completed"]
    # cancel after completion is too late and changes nothing
    mig.cancel()
    assert mig.state == "completed" and mig.error is None
    assert src.recorder.states("source")[-1] == "completed"

    # stats shaped like query-migrate
    q = st.as_qmp()
    assert mig.query().as_qmp() == q  # frozen once completed
    assert TOP_KEYS <= q.keys(), sorted(q)
    assert RAM_KEYS <= q["ram"].keys(), sorted(q["ram"])
    # unlike QEMU (only while running), the prediction made at the stop stays beside the measurement
    assert isinstance(q["expected-downtime"], int) and q["expected-downtime"] >= 0
    ram = q["ram"]
    assert q["status"] == "completed"
    assert q["downtime"] > 0
    assert 0 <= q["setup-time"] <= q["total-time"]
    assert q["downtime"] <= q["total-time"]
    assert ram["total"] == SIZE
    assert ram["remaining"] == 0
    # random fill: no zero pages at all; every page went at least once
    assert ram["duplicate"] == 0
    assert ram["normal"] >= SIZE // 4096
    assert ram["normal-bytes"] == ram["normal"] * 4096
    assert ram["transferred"] >= ram["normal-bytes"]
    assert ram["mbps"] > 0
    assert ram["dirty-sync-count"] >= 2  # setup + at least the final sync
    assert ram["dirty-pages-rate"] >= 0 and ram["pages-per-second"] >= 0
    # completion started only once what was pending fit in bandwidth x downtime-limit
    # (48 MiB/s x 300 ms = 14.4 MiB): what went while paused stays near that
    assert q["iterations"] >= 3
    assert 0 < ram["downtime-bytes"] <= 1.5 * (48 << 20) * 0.3, ram
    assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
    # and the numbers add up against the wire: ram bytes are part of the stream
    assert ram["transferred"] <= q["stream-bytes"]


@pytest.mark.slow
def test_unix_socket_file_is_removed_after_the_migration(session: Session) -> None:
    uri = session.unix_uri("gone.sock")
    path = uri.partition(":")[2]
    dest = session.destination(uri, size="8M")
    src = session.source(MigrationConfig(), size="8M", dirty_rate="0", fill="text")
    mig = src.migrate(dest.uri)
    assert mig.wait(MIGRATION_TIMEOUT).status == "completed"
    rc, report = dest.finish(60)
    assert rc == 0 and report is not None
    assert report["guest"]["checksums"] == src.prog.checksums()
    assert not os.path.exists(path)


@pytest.mark.slow
def test_migrate_and_incoming_commands_by_hand(session: Session) -> None:
    """Both ends as ``savevm`` commands, the way demo.py documents it."""
    dest = session.destination(session.unix_uri(), size="16M")
    src = session.savevm("migrate", dest.uri, "--guest", "savevm_ram.demo:DemoProgram",
                         "--guest-arg", "size=16M", "--guest-arg", "dirty-rate=8M",
                         "--set", "max-bandwidth=64M", "--json", name="source")
    src_rc, src_report = src.finish(MIGRATION_TIMEOUT)
    dest_rc, dest_report = dest.finish(60)
    assert src_rc == 0, src.stderr()
    assert dest_rc == 0, dest.stderr()
    assert src_report is not None and dest_report is not None
    assert src_report["status"] == dest_report["status"] == "completed"
    assert TOP_KEYS <= src_report.keys()
    assert src_report["guest"]["pages-dirtied"] > 0
    assert src_report["guest"]["checksums"] == dest_report["guest"]["checksums"]
