"""Hooks the RAM plugin offers to transports and page codecs.

Named after the QEMU functions they stand in for (``ram_control_*`` in
``migration/qemu-file.c``).  The RAM plugin calls them only through its
facade, :class:`savevm_ram.control.RAMHooks`, which asks once per
iteration whether a hook has implementations and skips it when it has none:
a pluggy call costs microseconds and a GiB holds 262,144 pages, so nothing
here is called per page.

Every hook receives ``rs``, the :class:`~savevm_ram.state.RAMState` of one
migration: the narrow, documented part of the RAM section a plugin may use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from savevm.hookspecs import hookspec

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMBlock
    from savevm_ram.codecs import PageCodec
    from savevm_ram.state import RAMState


# ---------------------------------------------------------------------------
# source side: around every RAM chunk
# ---------------------------------------------------------------------------


@hookspec
def ram_control_before_iterate(rs: RAMState, f: QEMUFile, flags: int) -> None:
    """Before a RAM chunk's pages are sent (QEMU's ``ram_control_before_iterate``).

    Called on the source from ``save_setup`` (``RAM_CONTROL_SETUP``), each
    ``save_live_iterate`` (``RAM_CONTROL_ROUND``) and
    ``save_live_complete_precopy`` (``RAM_CONTROL_FINISH``), after the chunk's
    header and before its pages.  An RDMA-style transport writes a
    ``RAM_SAVE_FLAG_HOOK`` record here, and at SETUP calls
    ``rs.claim_pages()`` if the migration is its own.

    :param rs: the RAM section of this migration.
    :param f: the migration stream (writable).
    :param flags: one of ``savevm_ram.wire.RAMControl`` SETUP, ROUND, FINISH.
    :return: nothing.
    """


@hookspec
def ram_control_after_iterate(rs: RAMState, f: QEMUFile, flags: int) -> None:
    """After a RAM chunk's pages were queued, before its EOS (``ram_control_after_iterate``).

    Called on the source with the same ``flags`` as
    :func:`ram_control_before_iterate`.  A transport drains its out-of-band
    writes here and reports them in the stream.

    :param rs: the RAM section of this migration.
    :param f: the migration stream (writable).
    :param flags: one of ``savevm_ram.wire.RAMControl`` SETUP, ROUND, FINISH.
    :return: nothing.
    """


@hookspec(firstresult=True)
def ram_control_save_page(rs: RAMState, f: QEMUFile, block: RAMBlock, offset: int, size: int) -> int | None:
    """Offer a run of dirty pages ``[offset, offset + size)`` of ``block`` to a transport.

    Called on the source once per contiguous run of dirty pages (never per
    page), and only in migrations a transport has claimed with
    ``rs.claim_pages()``: an installed transport that is not in use costs
    nothing.  Stops at the first non-None result.

    :param rs: the RAM section of this migration.
    :param f: the migration stream (writable).
    :param block: the block the pages belong to.
    :param offset: byte offset of the run in the block (page aligned).
    :param size: length of the run in bytes (whole pages).
    :return: the bytes the transport accounted (they count against the rate
        limit), ``RAM_SAVE_CONTROL_DELAYED`` if queued asynchronously, or
        None (or ``RAM_SAVE_CONTROL_NOT_SUPP``) to send the pages normally.
    """


# ---------------------------------------------------------------------------
# destination side
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def ram_control_load_hook(rs: RAMState, f: QEMUFile, flags: int, data: RAMBlock | None) -> bool | None:
    """Destination side of a transport (QEMU's ``ram_control_load_hook``).

    Called with ``RAM_CONTROL_BLOCK_REG`` for each block of the MEM_SIZE list
    as it is loaded, and with ``RAM_CONTROL_HOOK`` for each
    ``RAM_SAVE_FLAG_HOOK`` record, whose payload the implementation reads
    from ``f`` itself.  Stops at the first non-None result; a HOOK record
    that no implementation handles is a stream error.

    :param rs: the RAM section of this migration.
    :param f: the migration stream (readable).
    :param flags: ``savevm_ram.wire.RAMControl.BLOCK_REG`` or ``.HOOK``.
    :param data: the block being registered (BLOCK_REG), else None.
    :return: True if handled, None if not yours.
    """


@hookspec(firstresult=True)
def ram_block_memory(rs: RAMState, f: QEMUFile, block: RAMBlock) -> Any | None:
    """Offer memory for a block the RAM plugin owns, before the stream writes into it.

    Called on the destination while the MEM_SIZE block list is loaded, once
    per block that :meth:`RAMBlock.allocate <savevm_ram.block.RAMBlock.allocate>`
    made (``block.owned``: the demo program's blocks, ``RAMList(auto_create=True)``
    blocks), just before ``ram_control_load_hook(BLOCK_REG)`` for that block.
    A transport that writes pages straight into registered memory returns
    that memory here, and the block moves onto it
    (:meth:`~savevm_ram.block.RAMBlock.replace_memory`, which keeps the bytes),
    so remote writes land in the block itself with no staging copy.  Blocks
    over a program's own buffer are never offered: the program holds that
    buffer.  Stops at the first non-None result.

    :param rs: the RAM section of this migration.
    :param f: the migration stream (readable); a transport answers only for its own channel.
    :param block: the owned block, with its ``max_length`` and ``used_length`` from the stream.
    :return: a writable buffer of at least ``block.max_length`` bytes that stays valid
        for the block's lifetime, or None to leave the block's memory alone.
    """


# ---------------------------------------------------------------------------
# page encodings
# ---------------------------------------------------------------------------


@hookspec
def ram_page_codecs(config: MigrationConfig) -> list[PageCodec] | None:
    """Offer page codecs (XBZRLE, zlib, third-party encodings).

    Called on both sides at the start of each migration (``save_setup`` /
    ``load_setup``), so a codec plugin registered after the section was
    created still takes part.  On the source a codec is used only if its
    ``enabled(config)`` says so (usually a capability); on the destination
    every returned codec can decode its pages.

    :param config: the migration's config.
    :return: a list of :class:`~savevm_ram.codecs.PageCodec` objects, fresh
        for this migration (they hold per-migration state), or None.
    """


@hookspec(firstresult=True)
def ram_incoming_memory(rs: RAMState, scheme: str, block: RAMBlock) -> Any | None:
    """Offer memory for an owned block while the destination waits for its source.

    Called on the destination once per block :meth:`RAMBlock.allocate
    <savevm_ram.block.RAMBlock.allocate>` made, when ``savevm incoming``
    (:class:`savevm.migration.Incoming`) starts listening and before any stream: the
    early form of :func:`ram_block_memory`, for a transport that knows from
    its scheme alone that it will write pages into memory it provides.  The
    block moves onto the memory at once, so the transport can allocate and
    fault it in during time that is otherwise idle.  When the stream's block
    list arrives, :func:`ram_block_memory` is still called for the block: a
    transport returns the same memory again (the move is then free).

    :param rs: the RAM section that will load the stream.
    :param scheme: the listener's URI scheme (``rdma``, ``tcp``, ...).
    :param block: the owned block, with the ``max_length`` the program gave it.
    :return: a writable buffer of at least ``block.max_length`` bytes that stays valid
        for the block's lifetime, or None to leave the block's memory alone.
    """
