"""Logging: library modules emit structlog events; only the application configures output.

Importing savevm changes nothing process-wide.  Library modules take their
logger from :func:`get_logger` and emit events named after QEMU's trace
points (``migrate_set_state``, ``ram_save_setup``, ``migration_throttle``);
where the events end up is the application's choice:

* an application that configured structlog gets them through its own
  processors and logger factory, like its own events;
* otherwise they go to the standard library's ``logging`` under the
  ``savevm.*`` logger names, so an unconfigured program shows nothing but
  warnings and errors (Python's own default), and ``logging`` configuration
  applies as for any library.

The CLI calls :func:`configure_logging` once (``--log-format``,
``--log-level``).  A migration binds ``side``, ``uri`` and ``migration``
(an id) to every event of its thread through structlog's contextvars.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog


class _EventSink:
    """The final destination of one library logger's events, chosen per event.

    Looked up per call (not once at import) so an application may configure
    structlog, or swap ``sys.stderr``, at any time and still receive them.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def _target(self) -> Any:
        if structlog.is_configured():
            return structlog.get_config()["logger_factory"](self.name)
        return logging.getLogger(self.name)

    def _emit(self, method: str, *args: Any, **kwargs: Any) -> Any:
        target = self._target()
        fn = getattr(target, method, None) or target.msg
        return fn(*args, **kwargs)

    def msg(self, *args: Any, **kwargs: Any) -> Any:
        """structlog's generic output method."""
        return self._emit("info", *args, **kwargs)

    def debug(self, *args: Any, **kwargs: Any) -> Any:
        """Debug-level event."""
        return self._emit("debug", *args, **kwargs)

    def info(self, *args: Any, **kwargs: Any) -> Any:
        """Info-level event."""
        return self._emit("info", *args, **kwargs)

    def warning(self, *args: Any, **kwargs: Any) -> Any:
        """Warning-level event."""
        return self._emit("warning", *args, **kwargs)

    warn = warning

    def error(self, *args: Any, **kwargs: Any) -> Any:
        """Error-level event."""
        return self._emit("error", *args, **kwargs)

    def critical(self, *args: Any, **kwargs: Any) -> Any:
        """Critical-level event."""
        return self._emit("critical", *args, **kwargs)

    fatal = critical

    def exception(self, *args: Any, **kwargs: Any) -> Any:
        """Error-level event with the current exception."""
        return self._emit("error", *args, **kwargs)


def get_logger(name: str) -> Any:
    """The structlog logger a savevm (or plugin) module logs through.

    Processors and filtering come from the application's structlog config
    when there is one (read lazily, so ``structlog.testing.capture_logs``
    sees every event); the destination is :class:`_EventSink`.
    """
    return structlog.wrap_logger(_EventSink(name))


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
    """Configure structlog output for an application (the CLI); safe to call more than once."""
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
