"""Suite-wide settings: quiet logs.

Events below warning are dropped by a processor rather than by the bound
logger's level, so ``structlog.testing.capture_logs`` (which swaps the
processor chain) still sees debug events such as ``hook_trace``.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_LEVEL = logging.getLevelNamesMapping().get(os.environ.get("SAVEVM_TEST_LOG_LEVEL", "warning").upper(), 30)


def _drop_below(_logger: object, method: str, event: dict) -> dict:
    if logging.getLevelNamesMapping().get(method.upper(), 0) < _LEVEL:
        raise structlog.DropEvent
    return event


structlog.configure(
    processors=[_drop_below, structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)],
    logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    cache_logger_on_first_use=False,
)
