"""Hooks the RAM plugin offers to transports and page codecs.

Named after the QEMU functions they stand in for (``ram_control_*`` in
``migration/qemu-file.c``).  The RAM plugin calls them through
:class:`savevm_ram.save.RAMHooks`, which asks once per iteration whether a
hook has implementations and skips it when it has none: a pluggy call costs
microseconds and a GiB holds 262,144 pages, so nothing here is per page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from savevm.hookspecs import hookspec

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMBlock
    from savevm_ram.codecs import PageCodec


@hookspec
def ram_control_before_iterate(rs: Any, f: QEMUFile, flags: int) -> None:
    """Before a RAM chunk's pages are sent (source side).

    ``flags`` is ``RAM_CONTROL_SETUP`` (in save_setup), ``RAM_CONTROL_ROUND``
    (each iterate) or ``RAM_CONTROL_FINISH`` (complete).  An RDMA-style
    transport writes a ``RAM_SAVE_FLAG_HOOK`` record here.  ``rs`` is the
    :class:`~savevm_ram.save.RAMHandlers` of this migration.  Returns nothing.
    """


@hookspec
def ram_control_after_iterate(rs: Any, f: QEMUFile, flags: int) -> None:
    """After a RAM chunk's pages were queued, before its EOS (source side).

    Same ``flags`` as :func:`ram_control_before_iterate`.  A transport
    drains its out-of-band writes here.  Returns nothing.
    """


@hookspec(firstresult=True)
def ram_control_save_page(rs: Any, f: QEMUFile, block: RAMBlock, offset: int, size: int) -> int | None:
    """Offer a run of dirty pages ``[offset, offset+size)`` of ``block`` to a transport.

    Source side, per run of contiguous dirty pages (not per page).  Return
    the number of bytes the transport accounted (they count against the rate
    limit), ``RAM_SAVE_CONTROL_DELAYED`` if queued asynchronously, or None
    if the transport does not take them (they go through the normal
    pipeline).  Stops at the first non-None result.

    Called only for migrations a transport has claimed: an implementation
    calls ``rs.claim_pages()`` from ``ram_control_before_iterate`` with
    ``RAM_CONTROL_SETUP`` when the migration is its own (e.g. its channel).
    An installed transport that is not in use therefore costs nothing on
    the hot path, and contiguous-run splitting happens only when needed.
    """


@hookspec(firstresult=True)
def ram_control_load_hook(rs: Any, f: QEMUFile, flags: int, data: Any) -> bool | None:
    """Destination side: ``RAM_CONTROL_BLOCK_REG`` for each block of the
    MEM_SIZE list (``data`` is the :class:`RAMBlock`), ``RAM_CONTROL_HOOK``
    for a ``RAM_SAVE_FLAG_HOOK`` record (``data`` is None; the
    implementation reads its own payload from ``f``).

    Return True if handled.  Stops at the first non-None result.  A HOOK
    record that no implementation handles is a stream error.
    """


@hookspec
def ram_page_codecs(config: MigrationConfig) -> list[PageCodec] | None:
    """Offer page codecs (XBZRLE, zlib, third-party encodings).

    Called on both sides when a RAM section is created and again at the
    start of each migration (``save_setup`` / ``load_setup``), so a codec
    plugin registered after the section still takes part.  Return a list of
    :class:`~savevm_ram.codecs.PageCodec` objects, fresh for this
    migration, or None.  Codecs decide on the source whether they are
    enabled (capability); on the destination every returned codec can
    decode its wire flag.
    """
