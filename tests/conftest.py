"""Suite-wide settings: quiet logs, and the shared test helpers.

The test folders have no ``__init__.py`` and more than one of them owns a
``strategies.py``, so each folder's helpers are loaded under a name of their
own (``ram_strategies``, ``xbzrle_strategies``) here, once, where every
folder's tests can import them.

Events below warning are dropped by a processor rather than by the bound
logger's level, so ``structlog.testing.capture_logs`` (which swaps the
processor chain) still sees debug events such as ``hook_trace``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import structlog

_LEVEL = logging.getLevelNamesMapping().get(os.environ.get("SAVEVM_TEST_LOG_LEVEL", "warning").upper(), 30)


def _drop_below(_logger: object, method: str, event: dict) -> dict:
    if logging.getLevelNamesMapping().get(method.upper(), 0) < _LEVEL:
        raise structlog.DropEvent
    return event


def _configure() -> None:
    structlog.configure(
        processors=[_drop_below, structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)],
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.BoundLogger,
        cache_logger_on_first_use=False,
    )


_configure()


def _load_helpers(name: str, path: Path) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)


for _folder in ("ram", "xbzrle"):
    _load_helpers(f"{_folder}_strategies", Path(__file__).with_name(_folder) / "strategies.py")


@pytest.fixture(autouse=True)
def _test_logging() -> None:
    """Tests that run the CLI's main() reconfigure logging: put the suite's back each time."""
    _configure()


def pytest_configure(config: object) -> None:
    """In CI (``SAVEVM_REQUIRE_QEMU=1``, set by .ci/run) a missing QEMU is an error, not a skip."""
    import shutil

    if os.environ.get("SAVEVM_REQUIRE_QEMU") == "1" and shutil.which("qemu-system-x86_64") is None:
        raise pytest.UsageError("SAVEVM_REQUIRE_QEMU=1 but qemu-system-x86_64 is not on PATH: "
                                "the QEMU oracle tests must run here (apt-get install qemu-system-x86)")
