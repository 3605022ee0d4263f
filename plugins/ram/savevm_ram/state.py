"""``RAMState``: the part of one migration's RAM section that plugins may touch.

QEMU hands its RDMA code and page encoders the whole ``RAMState``; we hand
them this narrow, documented contract instead, so the RAM plugin can change
its insides without breaking codecs and transports, and so a plugin author
can see at a glance what there is to use.  :class:`savevm_ram.RAMHandlers`
implements it on both sides of a migration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm_ram.block import RAMList
    from savevm_ram.stats import RAMCounters


@runtime_checkable
class RAMState(Protocol):
    """One migration's RAM section, as codecs and transports see it.

    Source and destination both pass an object like this as ``rs`` to every
    RAM hook and :class:`~savevm_ram.codecs.PageCodec` method.
    """

    @property
    def config(self) -> MigrationConfig:
        """The migration's current config (changes while running; read it when needed)."""
        ...

    @property
    def ram(self) -> RAMList:
        """The blocks being migrated, in stream order."""
        ...

    @property
    def counters(self) -> RAMCounters:
        """The ``ram`` statistics; a transport adds to ``loaded_pages`` on the destination."""
        ...

    @property
    def bulk_stage(self) -> bool:
        """True until the page search first wraps (QEMU: XBZRLE not yet enabled)."""
        ...

    @property
    def sync_count(self) -> int:
        """Dirty-bitmap syncs so far (``dirty-sync-count``; the XBZRLE cache's age)."""
        ...

    @property
    def last_stage(self) -> bool:
        """True while the program is paused and the last pages are sent."""
        ...

    @property
    def transport_state(self) -> dict[str, Any]:
        """Per-migration scratch space for transports, keyed by a name of their choosing.

        Values with a ``close()`` method are closed when the migration ends
        on either side, whatever the outcome.
        """
        ...

    def claim_pages(self) -> None:
        """A transport takes this migration's pages through ``ram_control_save_page``.

        Call it from ``ram_control_before_iterate`` with ``RAM_CONTROL_SETUP``
        when the migration is yours (e.g. it runs over your channel); only
        then is ``ram_control_save_page`` called, so an installed transport
        that is not in use costs nothing on the hot path.
        """
        ...
