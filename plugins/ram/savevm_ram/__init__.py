"""savevm RAM plugin: the ``ram`` live section, byte-compatible with QEMU 7.2.

    ram = savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", bytearray(64 << 20))])
    handlers = savevm_ram.register_ram(registry, ram)

Modules, one responsibility each: ``block`` (RAMBlock, RAMList), ``memory``
(fresh memory: huge-page allocation, mem-prealloc), ``dirty``
(dirty logging and the migration bitmap), ``search`` (the page search),
``pipeline`` (a batch of pages to records), ``save`` / ``load`` (the two
sides), ``control`` (the hook facade and codec collection), ``handlers``
(the section the core sees), ``state`` (the contract plugins see),
``codecs`` / ``compress`` (page encoders), ``wire`` (the vocabulary),
``hookspecs`` (the hooks offered to other plugins).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from savevm_ram.block import RAMBlock, RAMList
from savevm_ram.codecs import SKIP, NormalFrom, PageCodec, PageResult
from savevm_ram.dirty import DirtyBitmap
from savevm_ram.handlers import RAMHandlers
from savevm_ram.state import RAMState
from savevm_ram.stats import RAMCounters
from savevm_ram.wire import RAM_IDSTR, RAM_SECTION_VERSION, Flag, RAMControl

if TYPE_CHECKING:
    from savevm.registry import SectionRegistry


def register_ram(registry: SectionRegistry, ram: RAMList, *, instance_id: int = 0) -> RAMHandlers:
    """Register the ``ram`` live section (QEMU's ram_mig_init) over ``ram``.

    Uses the registry's plugin host for hooks and codecs; one is built from
    the registry's config if it has none.  With ``mem-prealloc`` in the
    registry's config the blocks start faulting in at once (:meth:`RAMList.prealloc`).
    """
    from savevm.plugins import PluginHost
    from savevm_ram import hookspecs

    plugins = registry.plugins
    if plugins is None:
        plugins = registry.plugins = PluginHost(registry.config)
    if not plugins.has_hookspecs(hookspecs):
        plugins.add_hookspecs(hookspecs)
    if registry.config.mem_prealloc and not ram.mem_prealloc:
        ram.prealloc()  # -mem-prealloc: fault the memory in now, while the destination waits
    elif registry.config.prefault_while_waiting:
        ram.prefault_while_waiting()  # the same, until the first zero page, and zero pages give it back
    handlers = RAMHandlers(ram, config=registry.config, plugins=plugins)
    registry.register_live(RAM_IDSTR, instance_id, RAM_SECTION_VERSION, handlers)
    return handlers


__all__ = [
    "SKIP", "DirtyBitmap", "Flag", "NormalFrom", "PageCodec", "PageResult", "RAMBlock", "RAMControl",
    "RAMCounters", "RAMHandlers", "RAMList", "RAMState", "RAM_IDSTR", "RAM_SECTION_VERSION", "register_ram",
]
