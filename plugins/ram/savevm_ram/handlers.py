"""``RAMHandlers``: the ``ram`` live section (instance 0, version 4) as the core sees it.

A thin :class:`~savevm.handlers.SaveVMHandlers` composing the pieces QEMU
keeps in ram.c: the source side (:class:`~savevm_ram.save.RAMSaver`, with
the dirty bitmap, page search and page pipeline), the destination side
(:class:`~savevm_ram.load.RAMLoader`) and the hook facade
(:class:`~savevm_ram.control.RAMHooks`).  It is also the
:class:`~savevm_ram.state.RAMState` that codecs and transports receive, on
both sides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from savevm.handlers import SaveContext, SaveVMHandlers
from savevm.logging import get_logger
from savevm_ram.control import RAMHooks
from savevm_ram.fingerprint import block_fingerprints, digest
from savevm_ram.load import RAMLoader
from savevm_ram.save import RAMSaver
from savevm_ram.stats import RAMCounters

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.plugins import PluginHost
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMList
    from savevm_ram.codecs import PageCodec


log = get_logger("savevm.ram")


class RAMHandlers(SaveVMHandlers):
    """The ``ram`` section of one registry, either side of a migration."""

    def __init__(self, ram: RAMList, *, config: MigrationConfig, plugins: PluginHost | None) -> None:
        self.ram = ram
        self._config = config
        self.hooks = RAMHooks(plugins)
        self._counters = RAMCounters(total=ram.total_bytes)
        self._transport_state: dict[str, Any] = {}
        #: the source side of the current migration (from save_setup to save_cleanup)
        self.saver: RAMSaver | None = None
        #: the destination side of the current migration (from load_setup to load_cleanup)
        self.loader: RAMLoader | None = None
        #: which side this section last played ("source", "destination", or None)
        self.side: str | None = None

    # ================================================================ RAMState
    @property
    def config(self) -> MigrationConfig:
        """The migration's config, as last given to :meth:`configure`."""
        return self._config

    @property
    def counters(self) -> RAMCounters:
        """The ``ram`` statistics of the current (or last) migration."""
        return self._counters

    @property
    def transport_state(self) -> dict[str, Any]:
        """Scratch space of transports for the current migration."""
        return self._transport_state

    @property
    def bulk_stage(self) -> bool:
        """True until the source's page search wraps once."""
        return self.saver.search.bulk_stage if self.saver is not None else True

    @property
    def sync_count(self) -> int:
        """Dirty-bitmap syncs of the current migration (0 on the destination)."""
        return self.saver.bitmap.sync_count if self.saver is not None else 0

    @property
    def last_stage(self) -> bool:
        """True while the paused program's last pages are sent."""
        return self.saver is not None and self.saver.last_stage

    def claim_pages(self) -> None:
        """A transport takes this migration's pages (see :class:`~savevm_ram.state.RAMState`)."""
        if self.saver is not None:
            self.saver.pipeline.pages_claimed = True

    # ================================================================ both sides
    def configure(self, config: MigrationConfig) -> None:
        """Parameters changed: codecs apply theirs (e.g. a new xbzrle-cache-size) at the next iteration."""
        self._config = config
        if self.saver is not None:
            for c in self.saver.codecs:
                c.configure(self, config)

    def query_stats(self) -> dict[str, Any]:
        """``ram`` (and each active codec's key) for query-migrate; the destination reports what it loaded."""
        if self.side == "destination":
            return {"ram": {"loaded-pages": self._counters.loaded_pages, "total": self._counters.total}}
        remaining = self.saver.bitmap.remaining_bytes if self.saver is not None else 0
        out: dict[str, Any] = {"ram": self._counters.as_qmp(remaining)}
        if self.saver is not None:
            # savevm's own: what those remaining bytes are expected to cost on the wire, and the prices
            out["ram"]["pending-wire-bytes"] = self.saver.pending_wire(0)
            out["ram"]["wire-cost"] = self.saver.estimator.per_page()
        for c in self.saver.codecs if self.saver is not None else ():
            out.update(c.query_stats())
        return out

    def digests(self) -> dict[str, str]:
        """``verify``: a digest per block: of memory now (source, paused), of what arrived (destination)."""
        if self.side == "destination" and self.loader is not None:
            return self.loader.digests()
        return {f"ram/{b.idstr}": digest(block_fingerprints(b.host, b.pages)) for b in self.ram}

    def load_verify(self) -> None:
        """The source asked for verify: fingerprint pages as they arrive."""
        if self.loader is not None:
            self.loader.start_verify()

    def _close_transport_state(self) -> None:
        for st in self._transport_state.values():
            close = getattr(st, "close", None)
            if close is not None:
                close()
        self._transport_state.clear()

    # ================================================================ source
    def save_setup(self, f: QEMUFile, ctx: SaveContext) -> None:
        """MEM_SIZE + block list + EOS (ram_save_setup), with fresh codecs from the plugins registered now."""
        self.side = "source"
        self._counters = RAMCounters(total=self.ram.total_bytes)
        self._transport_state.clear()
        codecs = [c for c in self.hooks.page_codecs(self._config) if c.enabled(self._config)]
        self.saver = RAMSaver(self, self.ram, self._counters, self.hooks, codecs,
                              on_dirty_period=ctx.on_dirty_period, on_sync=ctx.on_sync)
        self.saver.setup(f)

    def save_live_iterate(self, f: QEMUFile) -> bool:
        """One PART chunk (ram_save_iterate)."""
        assert self.saver is not None, "save_setup first"
        return self.saver.iterate(f)

    def save_live_complete_precopy(self, f: QEMUFile) -> None:
        """The END chunk (ram_save_complete)."""
        assert self.saver is not None, "save_setup first"
        self.saver.complete(f)

    def save_live_pending(self, threshold: int) -> int:
        """Dirty bytes (ram_save_pending)."""
        return self.saver.pending(threshold) if self.saver is not None else 0

    def save_live_pending_wire(self, threshold: int) -> int:
        """What the dirty pages are expected to cost on the wire (see :mod:`savevm_ram.estimate`)."""
        return self.saver.pending_wire(threshold) if self.saver is not None else 0

    def save_live_sent_by_kind(self) -> dict[str, tuple[int, int]]:
        """Pages and bytes sent by kind: ``zero``, ``normal``, each codec's name, ``transport``."""
        return self.saver.pipeline.tally.snapshot() if self.saver is not None else {}

    def save_cleanup(self) -> None:
        """Stop dirty logging, release codecs and transport state."""
        if self.saver is not None:
            self.saver.cleanup()
        self._close_transport_state()

    def cancel(self) -> None:
        """Stop dirty logging at once; save_cleanup follows."""
        if self.saver is not None:
            self.saver.bitmap.stop()

    # ================================================================ destination
    def load_listening(self, scheme: str) -> None:
        """Owned blocks may move onto a transport's memory now, while the destination waits."""
        moved = []
        for block in self.ram:
            if not block.owned:
                continue
            memory = self.hooks.incoming_memory(self, scheme, block)
            if memory is not None:
                block.replace_memory(memory)
                moved.append(block.idstr)
        if moved:
            # the prefault of the memory they left would only fault in memory nobody uses
            self.ram.stop_waiting()
            log.info("ram_incoming_memory", scheme=scheme, blocks=moved)

    def load_setup(self) -> None:
        """Fresh decoders from the plugins registered now (ram_load_setup)."""
        self.side = "destination"
        # mem-prealloc without MADV_POPULATE_WRITE touches pages: it must end before pages arrive
        # (prefault-while-waiting runs on until the first zero page: see RAMLoader)
        self.ram.wait_prealloc(only_exclusive=True)
        self._counters = RAMCounters(total=self.ram.total_bytes)
        self._transport_state.clear()
        self.loader = RAMLoader(self, self.ram, self._counters, self.hooks,
                                self.hooks.page_codecs(self._config))

    def load_state(self, f: QEMUFile, version_id: int) -> None:
        """One RAM chunk (ram_load)."""
        assert self.loader is not None, "load_setup first"
        self.loader.load(f, version_id)

    def load_cleanup(self) -> None:
        """Release transport state and decoders; the loaded counters (and verify's fingerprints) stay."""
        self._close_transport_state()
        if self.loader is not None:
            for c in self.loader.codecs:
                c.load_cleanup(self)

    def codecs(self) -> list[PageCodec]:
        """The codecs in use on whichever side is active (for tests and tools)."""
        if self.saver is not None:
            return list(self.saver.codecs)
        if self.loader is not None:
            return list(self.loader.codecs)
        return []
