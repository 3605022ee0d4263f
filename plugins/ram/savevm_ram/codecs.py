"""PageCodec: how encoder plugins plug into the page pipeline.

The RAM plugin hands a codec *batches* of non-zero dirty pages (up to
``MAX_BATCH_PAGES`` = 1024 pages of one block, not necessarily contiguous)
and gets one result per page:

* ``None`` — not mine: the next codec, or a normal page;
* :data:`SKIP` — send nothing (XBZRLE: page unchanged since it was cached);
* ``bytes`` — the encoded body, sent after a page header carrying the
  codec's ``wire_flag``.  The body must carry its own length (XBZRLE: a
  be16, compression: a be32): the destination's :meth:`PageCodec.load_page`
  reads it back from the stream with nothing else to tell where it ends;
* :class:`NormalFrom` — send a normal page, but from this buffer (XBZRLE
  sends the cached copy, so sender and cache agree byte for byte).

On the destination the codec reads its own body from the stream in
:meth:`PageCodec.load_page`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
import numpy as np

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMBlock
    from savevm_ram.state import RAMState


class _Skip:
    def __repr__(self) -> str:
        return "SKIP"


#: The page is unchanged: send nothing.
SKIP: Final = _Skip()


@attrs.frozen
class NormalFrom:
    """Send a normal page whose bytes are ``data`` (a 4096-byte buffer)."""

    data: bytes | bytearray | memoryview


#: What a codec answers for one page (see the module docstring).
PageResult = bytes | bytearray | _Skip | NormalFrom | None


class PageCodec:
    """Base class for page codecs; override what you need."""

    #: short name, used in config and stats
    name: str = "codec"
    #: RAM_SAVE_FLAG_* this codec's pages carry (XBZRLE 0x40, COMPRESS_PAGE 0x100).  Leave 0
    #: for a third-party codec: setup then announces it by ``name`` under the savevm
    #: extension flag 0x400 and its pages travel as 0x800 + a one-byte codec id, so a
    #: destination without the plugin refuses the stream at setup instead of misreading pages.
    wire_flag: int = 0
    #: lower runs first
    priority: int = 100
    #: the migration capability that turns this codec on at the source (a third-party codec's
    #: plugin declares it through the core hook ``savevm_migration_capabilities``); None: never
    capability: str | None = None
    #: the pipeline may keep one batch encoding (:meth:`submit_pages`) while it writes the
    #: previous one.  Only for a codec whose answers do not depend on what it answered before
    #: (compression yes, XBZRLE's cache no), and only when it is the only codec of the pass.
    overlaps: bool = False

    # ------------------------------------------------------------ source
    def enabled(self, config: MigrationConfig) -> bool:
        """Should the source use this codec at all?  By default: is its :attr:`capability` on."""
        return self.capability is not None and self.capability in config.capabilities

    def save_setup(self, rs: RAMState) -> None:
        """Migration start (source)."""

    def configure(self, rs: RAMState, config: MigrationConfig) -> None:
        """Parameters changed while running (e.g. ``xbzrle-cache-size``): apply at the next iteration."""

    def iteration_start(self, rs: RAMState) -> None:
        """A new iteration (PART chunk) begins; apply parameter changes here."""

    def active(self, rs: RAMState) -> bool:
        """Use the codec for the current pass?  (XBZRLE: only after the bulk stage.)"""
        return True

    def encode_pages(self, rs: RAMState, block: RAMBlock, pages: np.ndarray, data: np.ndarray,
                     last_stage: bool) -> list[PageResult]:
        """Encode a batch: ``pages`` are page numbers in ``block``, ``data`` their (n, 4096) contents.

        ``data`` is the pipeline's own copy of the pages, taken once for all
        codecs of the batch: a codec may keep it, cache it or send from it
        (:class:`NormalFrom`) without copying again, and the program writing
        the pages meanwhile changes nothing in it.
        """
        return [None] * len(pages)

    def submit_pages(self, rs: RAMState, block: RAMBlock, pages: np.ndarray, data: np.ndarray,
                     last_stage: bool) -> Callable[[], list[PageResult]]:
        """Start encoding a batch; the returned callable waits for and returns :meth:`encode_pages`'s answer.

        The pipeline calls this instead of :meth:`encode_pages` for a codec
        that :attr:`overlaps`, and writes the previous batch while this one
        is encoded (QEMU's compression threads work the same way: the
        migration thread hands pages over and collects what is done).  It
        calls the returned callable exactly once, from the saving thread,
        before the end of the iteration.  The default encodes at once.
        """
        res = self.encode_pages(rs, block, pages, data, last_stage)
        return lambda: res

    def zero_pages(self, rs: RAMState, block: RAMBlock, pages: np.ndarray, last_stage: bool) -> None:
        """These pages were just sent as zero pages."""

    def save_cleanup(self, rs: RAMState) -> None:
        """Migration end (source)."""

    def query_stats(self) -> dict[str, Any]:
        """Extra top-level query-migrate keys (e.g. ``xbzrle-cache``); every key reaches ``query-migrate``.

        Use one key named after the codec holding a dict, as QEMU's
        ``xbzrle-cache`` and ``compression`` do.
        """
        return {}

    def on_sync(self, rs: RAMState) -> None:
        """A dirty bitmap sync happened (sync count changed)."""

    def on_period(self, rs: RAMState, pages_sent_delta: int) -> None:
        """A >= 1 s statistics period ended (update per-period rates)."""

    # ------------------------------------------------------------ destination
    def load_setup(self, rs: RAMState) -> None:
        """Destination start."""

    def load_cleanup(self, rs: RAMState) -> None:
        """Destination end, whatever the outcome: release what :meth:`load_setup` started."""

    def load_page(self, f: QEMUFile, block: RAMBlock, page: int, dest: np.ndarray, offset: int) -> None:
        """Read this codec's body from ``f`` and apply it to ``dest`` (the 4096-byte page).

        ``offset`` is the stream offset of the record, for error messages.
        """
        from savevm.errors import CorruptStreamError

        raise CorruptStreamError(f"page codec {self.name!r} has no decoder", offset)
