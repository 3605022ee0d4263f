"""A destination program for a real QEMU's RAM: ``--guest savevm.cli.qemu_guest:QemuGuest``.

Its RAMList creates blocks as the stream announces them, so any QEMU
machine's RAM (``pc.ram``, the ROM blocks, ...) is received without
knowing its layout; pair it with ``--vmdesc`` so the machine's device
sections are skipped.  ``dump_dir=DIR`` writes each block to a file named
after it once loaded, as ``savevm analyze --extract-ram`` does (same rules:
folders for idstrs with ``/``, nothing outside DIR, nothing overwritten).
"""

from __future__ import annotations

import hashlib
from typing import Any

from savevm.errors import PluginError


def _ram_plugin() -> Any:
    """The RAM plugin, or a clear error naming what to install (this module ships with the core)."""
    try:
        import savevm_ram
    except ImportError as exc:
        raise PluginError("QemuGuest receives RAM and needs the RAM plugin: install savevm-ram "
                          "(pip install -e plugins/ram)") from exc
    return savevm_ram


class QemuGuest:
    """RAM-only receiver for QEMU streams (nothing to pause; nothing runs)."""

    #: take only RAM: a QEMU's CPU, timer and chipset sections are skipped, sized by its vmdesc
    skip_unknown_devices = True

    def __init__(self, dump_dir: str | None = None, max_ram: str = "auto") -> None:
        from savevm.config import parse_size

        savevm_ram = _ram_plugin()
        # "auto": three quarters of this machine's memory (a stream cannot make us allocate more)
        limit = None if max_ram == "auto" else parse_size(max_ram, "max_ram")
        self.ram = savevm_ram.RAMList(auto_create=True, max_auto_bytes=limit)
        self.dump_dir = dump_dir

    def register(self, registry: Any) -> None:
        _ram_plugin().register_ram(registry, self.ram)

    def pause(self) -> None:
        """Nothing runs on this side."""

    def resume(self) -> None:
        """Loaded: write the blocks out if asked to."""
        if not self.dump_dir:
            return
        from savevm.cli.blockfiles import BlockDir, block_path_parts

        for b in self.ram:  # names come from the stream: all checked before anything is written
            block_path_parts(b.idstr)
        with BlockDir(self.dump_dir) as d:
            for b in self.ram:
                d.write_block(b.idstr, b.host[: b.used_length])

    def set_throttle(self, percent: int) -> None:
        """Nothing to throttle."""

    def report(self) -> dict[str, Any]:
        """Blocks received, with sizes and sha256."""
        return {"blocks": {b.idstr: {"used_length": b.used_length,
                                     "sha256": hashlib.sha256(b.mv[: b.used_length]).hexdigest()}
                           for b in self.ram}}
