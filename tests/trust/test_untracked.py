"""A program that writes around the dirty tracker never gets a "completed" migration."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MIGRATION = Path(__file__).resolve().parent.parent / "migration"
if str(MIGRATION) not in sys.path:
    sys.path.insert(0, str(MIGRATION))

from migration_guests import SneakyDemo  # noqa: E402
from migration_helpers import MIGRATION_TIMEOUT, Session  # noqa: E402

from savevm.config import MigrationConfig  # noqa: E402
from savevm.migration import Migration  # noqa: E402
from savevm.plugins import PluginHost  # noqa: E402


@pytest.fixture
def session(tmp_path: Path):  # noqa: ANN201
    import shutil
    import tempfile

    sock_dir = Path(tempfile.mkdtemp(prefix="svu-"))
    s = Session(tmp_path, sock_dir)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.slow
def test_writes_around_the_tracker_fail_the_migration(session: Session) -> None:
    dest = session.destination(size="32M")
    prog = SneakyDemo(size="32M", role="source", dirty_rate="0")
    reg = PluginHost(MigrationConfig()).new_registry()
    prog.register(reg)
    prog._thread = None
    import threading

    prog._thread = threading.Thread(target=prog._run, daemon=True)
    prog._thread.start()
    try:
        mig = Migration(reg, dest.uri, guest=prog, config=MigrationConfig().set_parameter("max-bandwidth", "16M"))
        mig.start()
        st = mig.wait(MIGRATION_TIMEOUT)
    finally:
        prog.stop()
    assert st.status == "failed", st.as_qmp()
    assert "without being marked dirty" in (st.error_desc or "")
    assert not prog.is_paused, "refused before the handover: the source keeps running"
    rc, report = dest.finish(60)
    assert rc != 0 and report is not None and report["status"] == "failed" and report["runstate"] == "inmigrate"
