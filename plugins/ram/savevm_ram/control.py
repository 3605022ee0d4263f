"""The RAM hooks' facade and the collection of page codecs.

Everything the RAM section asks of other plugins goes through
:class:`RAMHooks`: the ``ram_control_*`` hooks (QEMU's
``ram_control_before_iterate`` and friends) and ``ram_page_codecs``.  The
rest of the plugin calls typed methods and never touches ``pm.hook``, so
hook tracing (``SAVEVM_TRACE_HOOKS``) and wrappers see every call.

A pluggy call costs microseconds and a GiB holds 262,144 pages, so
:meth:`RAMHooks.refresh` asks once per iteration which hooks have
implementations, and the per-batch code only tests booleans.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from savevm.errors import PluginError

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.plugins import PluginHost
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMBlock
    from savevm_ram.codecs import PageCodec
    from savevm_ram.state import RAMState


class RAMHooks:
    """Typed calls of the RAM hooks for one RAM section, skipping hooks nobody implements."""

    def __init__(self, plugins: PluginHost | None) -> None:
        self.plugins = plugins
        #: which hooks have implementations (refreshed once per iteration)
        self.has_before = self.has_after = self.has_save_page = self.has_load_hook = False
        self.has_block_memory = False
        self.refresh()

    def refresh(self) -> None:
        """Re-read which hooks are implemented: a plugin may have been registered since."""
        p = self.plugins
        if p is None:
            return
        h = p.pm.hook
        self.has_before = bool(h.ram_control_before_iterate.get_hookimpls())
        self.has_after = bool(h.ram_control_after_iterate.get_hookimpls())
        self.has_save_page = bool(h.ram_control_save_page.get_hookimpls())
        self.has_load_hook = bool(h.ram_control_load_hook.get_hookimpls())
        self.has_block_memory = bool(h.ram_block_memory.get_hookimpls())

    # ------------------------------------------------------------ source
    def before_iterate(self, rs: RAMState, f: QEMUFile, flags: int) -> None:
        """``ram_control_before_iterate``, if anyone implements it."""
        if self.has_before and self.plugins is not None:
            self.plugins.pm.hook.ram_control_before_iterate(rs=rs, f=f, flags=flags)

    def after_iterate(self, rs: RAMState, f: QEMUFile, flags: int) -> None:
        """``ram_control_after_iterate``, if anyone implements it."""
        if self.has_after and self.plugins is not None:
            self.plugins.pm.hook.ram_control_after_iterate(rs=rs, f=f, flags=flags)

    def control_save_page(self, rs: RAMState, f: QEMUFile, block: RAMBlock, offset: int,
                          size: int) -> int | None:
        """``ram_control_save_page`` for one contiguous run (callers check :attr:`has_save_page`)."""
        assert self.plugins is not None
        r: int | None = self.plugins.pm.hook.ram_control_save_page(rs=rs, f=f, block=block, offset=offset,
                                                                   size=size)
        return r

    # ------------------------------------------------------------ destination
    def load_hook(self, rs: RAMState, f: QEMUFile, flags: int, data: RAMBlock | None) -> bool | None:
        """``ram_control_load_hook``; None when nobody implements it."""
        if not self.has_load_hook or self.plugins is None:
            return None
        r: bool | None = self.plugins.pm.hook.ram_control_load_hook(rs=rs, f=f, flags=flags, data=data)
        return r

    def block_memory(self, rs: RAMState, f: QEMUFile, block: RAMBlock) -> Any | None:
        """``ram_block_memory``: a transport's memory for an owned block, or None."""
        if not self.has_block_memory or self.plugins is None:
            return None
        return self.plugins.pm.hook.ram_block_memory(rs=rs, f=f, block=block)

    def incoming_memory(self, rs: RAMState, scheme: str, block: RAMBlock) -> Any | None:
        """``ram_incoming_memory``: a transport's memory for an owned block before any stream, or None."""
        if self.plugins is None or not self.plugins.pm.hook.ram_incoming_memory.get_hookimpls():
            return None
        return self.plugins.pm.hook.ram_incoming_memory(rs=rs, scheme=scheme, block=block)

    # ------------------------------------------------------------ codecs
    def page_codecs(self, config: MigrationConfig) -> list[PageCodec]:
        """Fresh codecs for one migration from ``ram_page_codecs``, in priority order.

        Two codecs with one wire flag or one name would make the stream
        ambiguous, so that is refused here rather than discovered by a
        destination misreading pages.
        """
        if self.plugins is None:
            return []
        caller = self.plugins.pm.hook.ram_page_codecs
        if not caller.get_hookimpls():
            return []
        out: list[PageCodec] = []
        for lst in caller(config=config):
            if lst:
                out.extend(lst)
        flags = [c.wire_flag for c in out if c.wire_flag]
        names = [c.name for c in out]
        if len(set(flags)) != len(flags) or len(set(names)) != len(names):
            raise PluginError(
                f"two page codecs claim the same wire flag or name: {[(c.name, c.wire_flag) for c in out]}")
        return sorted(out, key=lambda c: c.priority)
