"""structlog set-up, done once by the program (the CLI), never by the library.

Library modules only call ``structlog.get_logger(...)`` and emit events
named after QEMU's trace points; how they are rendered (JSON lines for
tools, console for people) is the application's choice.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

_configured = {"done": False}


class _StreamFactory:
    """Loggers writing to ``stream``, or to whatever ``sys.stderr`` is at the time of the call.

    Looking stderr up per call (not once at configure time) keeps logging
    working when a host program or a test harness swaps sys.stderr.
    """

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream

    def __call__(self, *args: object) -> structlog.PrintLogger:
        return structlog.PrintLogger(self.stream or sys.stderr)


def configure_logging(
    fmt: Literal["json", "console"] = "console", level: str = "warning", stream: TextIO | None = None,
) -> None:
    """Configure structlog output; safe to call more than once (last call wins)."""
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.WARNING)
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_StreamFactory(stream),
        cache_logger_on_first_use=False,
    )
    _configured["done"] = True


def quiet_default() -> None:
    """If the application has not configured structlog, show warnings and errors only.

    structlog's own default prints every level to stdout, which would make a
    library chatty in programs that never asked for its logs.  An
    application that configures structlog (before or after importing
    savevm) keeps full control.
    """
    if not structlog.is_configured():
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
