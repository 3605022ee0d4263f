"""SaveVMHandlers: what a live section implements (QEMU's register.h).

A live section (RAM, a device with a lot of state) is iterated while the
program runs; its handlers are called by :mod:`savevm.save`,
:mod:`savevm.load` and :mod:`savevm.migration`.  Subclass
:class:`SaveVMHandlers` and override what you need: every method has a
harmless default, so a section only writes what it does.  The registry
accepts nothing else, so the core calls these methods directly instead of
probing objects for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.qemufile import QEMUFile


def _ignore_period(dirty_bytes: int, transferred_bytes: int) -> None:
    """No migration is listening (a snapshot): dirty-rate periods mean nothing."""


def _ignore_sync(seconds: float, pass_done: bool) -> None:
    """No migration is listening (a snapshot): passes over dirty memory mean nothing."""


@attrs.frozen
class SaveContext:
    """What the migration tells a live section at ``save_setup``.

    QEMU's RAM code calls into the migration's auto-converge logic from its
    bitmap sync (``migration_trigger_throttle``); here the migration hands
    that callback over explicitly, once, instead of the section reaching for
    a global.
    """

    #: Call with (bytes dirtied, bytes sent) at the end of every >= 1 s rate period.
    on_dirty_period: Callable[[int, int], None] = _ignore_period
    #: Identifies the migration in logs (empty for a snapshot).
    migration_id: str = ""
    #: Call after every dirty-state sync with the seconds it took and whether a pass over dirty memory
    #: ended since the last one (the section went through everything that was dirty; a sync in
    #: mid-pass continues the same pass).  The pause starts with one more sync, which the stop rule
    #: budgets; stall detection and the downtime ramp count passes, not loop iterations, because
    #: within a pass what is pending only falls.
    on_sync: Callable[[float, bool], None] = _ignore_sync


class SaveVMHandlers:
    """Base class with QEMU's handler set and do-nothing defaults."""

    def configure(self, config: MigrationConfig) -> None:
        """The migration's :class:`~savevm.config.MigrationConfig`.

        Called when a migration starts and after every ``set_parameter`` /
        capability change, so sections follow parameters changed while
        running (e.g. ``xbzrle-cache-size``).
        """

    # ---------------------------------------------------------------- source
    def is_active(self) -> bool:
        """False skips this section in setup, iterate, complete, pending and load_setup."""
        return True

    def save_setup(self, f: QEMUFile, ctx: SaveContext) -> None:
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

    def save_live_pending_wire(self, threshold: int) -> int:
        """Bytes what is pending is expected to cost *on the wire*; may re-sync when below ``threshold``.

        The stop rule compares this with ``bandwidth x downtime-limit``
        (``x-pending-estimate=wire``): a section whose pages travel as small
        deltas or compressed reports what they will cost, not their size in
        memory.  The default is the raw figure, :meth:`save_live_pending`.
        Called with a threshold of 0 it must not re-sync (the migration then
        only wants the figure for its statistics).
        """
        return self.save_live_pending(threshold)

    def save_live_sent_by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind: (pages, bytes)}`` sent so far in this migration, cumulative.

        Kinds are the section's own words (the RAM section: ``zero``,
        ``normal``, each codec's name, ``transport``); the migration turns the
        differences into its per-iteration records.  Default: nothing to say.
        """
        return {}

    def save_cleanup(self) -> None:
        """Free source-side resources after the migration ends, whatever the outcome."""

    def cancel(self) -> None:
        """The migration was cancelled or failed: drop in-flight state."""

    def query_stats(self) -> dict[str, Any]:
        """Keys to merge into query-migrate stats (e.g. ``ram``), on either side."""
        return {}

    def digests(self) -> dict[str, str]:
        """Digests of this section's state, by name (capability ``verify``), on either side.

        The source calls it with the program paused, after the last chunk;
        the destination after the stream is loaded.  Both sides must compute
        the same function of the state, so a mismatch means the copies
        differ.  A section without state worth checking returns ``{}``.
        """
        return {}

    def load_verify(self) -> None:
        """The source asked for ``verify`` (destination, before any chunk): start hashing what arrives."""

    # ---------------------------------------------------------------- destination
    def load_listening(self, scheme: str) -> None:
        """The destination listens on a ``scheme`` transport and waits for its source.

        Called once, before any stream arrives (QEMU has no such step): the
        time until the source connects is free, so a section may prepare
        what the transport will need, for instance memory a transport that
        writes pages straight into the destination provides.
        """

    def load_setup(self) -> None:
        """Prepare to receive (allocate decode buffers, ...), before the stream is parsed."""

    def load_state(self, f: QEMUFile, version_id: int) -> None:
        """Read one START/PART/END chunk of this section."""

    def load_cleanup(self) -> None:
        """Destination teardown, after success or failure."""

    def load_abort(self) -> None:
        """The incoming migration failed: discard what was loaded if possible."""
