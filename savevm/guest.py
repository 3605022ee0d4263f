"""What the migrated program offers the migration: pause, resume, throttle.

QEMU stops vCPUs (``vm_stop``), restarts them, and slows them down for
auto-converge (``cpu_throttle_set``).  A Python program does the same by
implementing :class:`Guest`; :class:`NullGuest` is for state that nobody
writes while it migrates.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Guest(Protocol):
    """The migrated program, as the migration thread sees it."""

    def pause(self) -> None:
        """Stop changing migrated state; return once nothing will write any more."""
        ...

    def resume(self) -> None:
        """Continue (after a failed or cancelled migration on the source, or after load on the destination)."""
        ...

    def set_throttle(self, percent: int) -> None:
        """Slow down to ``100 - percent`` % of full speed (0 = no throttle)."""
        ...


class NullGuest:
    """A guest with nothing to pause."""

    def __init__(self) -> None:
        self.paused = False
        self.throttle = 0

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def set_throttle(self, percent: int) -> None:
        self.throttle = percent


@runtime_checkable
class Program(Guest, Protocol):
    """A migratable program as the CLI loads it with ``--guest module:callable``.

    Besides the :class:`Guest` controls it registers its own sections (RAM
    blocks through ``savevm_ram.register_ram``, devices through
    ``registry.register_device``).  Optional methods the CLI uses when
    present: ``start()`` (begin running before the migration),
    ``stop()`` (end it), ``report() -> dict`` (extra JSON for ``--json``).
    """

    def register(self, registry: Any) -> None:
        """Register the program's sections into a migration's registry."""
        ...
