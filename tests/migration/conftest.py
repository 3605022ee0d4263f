"""Fixtures for the end-to-end migration tests (helpers live in migration_helpers.py)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from migration_helpers import Session  # noqa: E402


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    # unix socket paths must stay under 108 bytes: a short directory of our own
    sock_dir = Path(tempfile.mkdtemp(prefix="svm-"))
    s = Session(tmp_path, sock_dir)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
