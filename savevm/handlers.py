"""SaveVMHandlers: what a live section implements (QEMU's register.h).

A live section (RAM, a device with a lot of state) is iterated while the
program runs; its handlers are called by :mod:`savevm.save` and
:mod:`savevm.load`.  Subclass :class:`SaveVMHandlers` and override what you
need: every method has a harmless default, so a section only writes what
it does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from savevm.qemufile import QEMUFile


@runtime_checkable
class LiveHandlers(Protocol):
    """The protocol the core relies on (structural: any object with these)."""

    def save_setup(self, f: QEMUFile) -> None: ...
    def save_live_iterate(self, f: QEMUFile) -> bool: ...
    def save_live_complete_precopy(self, f: QEMUFile) -> None: ...
    def save_live_pending(self, threshold: int) -> int: ...
    def load_setup(self) -> None: ...
    def load_state(self, f: QEMUFile, version_id: int) -> None: ...
    def load_cleanup(self) -> None: ...
    def cancel(self) -> None: ...
    def is_active(self) -> bool: ...


class SaveVMHandlers:
    """Base class with QEMU's handler set and do-nothing defaults."""

    def configure(self, config: Any) -> None:
        """The migration's :class:`~savevm.config.MigrationConfig`.

        Called when a migration starts and after every ``set_parameter`` /
        capability change, so sections follow parameters changed while
        running (e.g. ``xbzrle-cache-size``).
        """

    # ---------------------------------------------------------------- source
    def is_active(self) -> bool:
        """False skips this section in setup, iterate, complete, pending and load_setup."""
        return True

    def save_setup(self, f: QEMUFile) -> None:
        """Write the START chunk (runs once, while the program runs)."""

    def save_live_iterate(self, f: QEMUFile) -> bool:
        """Write one PART chunk; return True when nothing is left to send.

        Must return soon (QEMU: 50 ms or when ``f.rate_limit_exceeded()``).
        Returning False ends the current pass over live sections.
        """
        return True

    def save_live_complete_precopy(self, f: QEMUFile) -> None:
        """Write the END chunk: everything left, with the program paused."""

    def save_live_pending(self, threshold: int) -> int:
        """Bytes still to send.  May re-sync dirty state when below ``threshold``."""
        return 0

    def save_cleanup(self) -> None:
        """Free source-side resources after the migration ends, whatever the outcome."""

    def cancel(self) -> None:
        """The migration was cancelled or failed: drop in-flight state."""

    def query_stats(self) -> dict[str, Any]:
        """Keys to merge into query-migrate stats (e.g. ``ram``)."""
        return {}

    # ---------------------------------------------------------------- destination
    def load_setup(self) -> None:
        """Prepare to receive (allocate decode buffers, ...), before the stream is parsed."""

    def load_state(self, f: QEMUFile, version_id: int) -> None:
        """Read one START/PART/END chunk of this section."""

    def load_cleanup(self) -> None:
        """Destination teardown, after success or failure."""

    def load_abort(self) -> None:
        """The incoming migration failed: discard what was loaded if possible."""
