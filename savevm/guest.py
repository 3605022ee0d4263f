"""What the migrated program offers the migration: pause, resume, throttle.

QEMU stops vCPUs (``vm_stop``), restarts them, and slows them down for
auto-converge (``cpu_throttle_set``).  A Python program does the same by
implementing :class:`Guest`; :class:`NullGuest` is for state that nobody
writes while it migrates.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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
