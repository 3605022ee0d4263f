"""Fixtures for the fault suite: the end-to-end helpers of tests/migration, and a figures log."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MIGRATION = HERE.parent / "migration"
for p in (HERE, MIGRATION):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from migration_helpers import Session  # noqa: E402

#: one JSON line per fault case: what was injected, what each side ended as, and how fast
RESULTS = Path(os.environ.get("SAVEVM_FAULT_RESULTS", tempfile.gettempdir())) / "savevm-faults.jsonl"


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    sock_dir = Path(tempfile.mkdtemp(prefix="svf-"))
    s = Session(tmp_path, sock_dir)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def record(request: pytest.FixtureRequest):  # noqa: ANN201
    """Append this case's figures to the results log (a table for the docs is built from it)."""

    def write(**fields: object) -> None:
        with open(RESULTS, "a") as fh:
            fh.write(json.dumps({"case": request.node.name, **fields}) + "\n")

    return write
