"""``savevm analyze``: what is in a stream file (ours or a real QEMU's).

Like QEMU's analyze-migration.py it reads the vmdesc from the end of the
file first, so device sections it has no description for are walked by
size.  Unlike it, everything else goes through the real loader
(:class:`~savevm.load.StreamLoader`), so every check of a live migration
applies and a stream the loader would refuse is reported at the offset the
loader names.  Only two things are relaxed, because a file on disk has no
destination to match: the machine is whatever the configuration record
names (unless ``--machine`` asks for one), and the RAM blocks are created
as the RAM section's own block list announces them.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import numpy as np

from savevm.channels.fd import FdChannel
from savevm.config import MigrationConfig
from savevm.errors import ChannelError, MigrationError, PluginError
from savevm.handlers import SaveVMHandlers
from savevm.load import StreamLoader
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile
from savevm.vmdesc import read_vmdesc

#: RAM the stream may make us create, in all (zeroed, lazily committed memory).
MAX_ANALYZE_RAM = 64 << 30
#: The RAM section's idstr and version (QEMU's ram_mig_init), for when the plugin is missing.
_RAM_IDSTR = "ram"
_RAM_VERSION = 4
_RAM_PLUGIN_NEEDED = "the RAM plugin (savevm-ram) is needed to analyze RAM sections: pip install -e plugins/ram"


class _NoRamPlugin(SaveVMHandlers):
    """Stands in for the RAM section when savevm_ram is not installed.

    Registering it lets the loader parse everything else; only a stream that
    really has a RAM section meets it, and then the user is told what to
    install instead of reading "unknown section 'ram'".
    """

    def load_state(self, f: QEMUFile, version_id: int) -> None:
        raise PluginError(_RAM_PLUGIN_NEEDED)


def _ram_plugin() -> Any:
    """The savevm_ram module, or None: a stream without RAM is analyzed without it."""
    try:
        import savevm_ram
    except ImportError:
        return None
    return savevm_ram


def _stream_ordered_ram_list(savevm_ram: Any) -> Any:
    """A RAMList that creates blocks as announced and remembers the order they came in.

    A RAMList keeps QEMU's largest-first order; the report lists blocks as
    the stream does, which is what someone comparing with a hex dump sees.
    """

    class StreamOrderedRAMList(savevm_ram.RAMList):
        def __init__(self) -> None:
            super().__init__(auto_create=True, max_auto_bytes=MAX_ANALYZE_RAM)
            self.stream_order: list[str] = []

        def create(self, idstr: str, length: int) -> Any:
            block = super().create(idstr, length)
            self.stream_order.append(idstr)
            return block

    return StreamOrderedRAMList()


def analyze_file(path: str, machine: str | None = None) -> dict[str, Any]:
    """Load ``path`` into scratch memory and report what it held.

    ``machine``: the machine name the stream must carry (default: accept the
    stream's own).  Stream errors end up in the report (``status``,
    ``error``, ``offset``); a missing RAM plugin, when the stream needs it,
    raises :class:`~savevm.errors.PluginError`.
    """
    savevm_ram = _ram_plugin()
    cfg = MigrationConfig() if machine is None else attrs.evolve(MigrationConfig(), machine=machine)
    reg = PluginHost(cfg).new_registry()
    ram: Any = None
    handlers: Any = None
    if savevm_ram is not None:
        ram = _stream_ordered_ram_list(savevm_ram)
        handlers = savevm_ram.register_ram(reg, ram)
    else:
        reg.register_live(_RAM_IDSTR, 0, _RAM_VERSION, _NoRamPlugin())
    try:
        size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ChannelError(f"cannot open {path!r}: {exc}") from exc
    f = QEMUFile(FdChannel(fd, f"file:{path}"))
    report: dict[str, Any] = {"file": path, "machine": "", "bytes": size, "status": "ok", "sections": [],
                              "vmdesc": False}
    loader: StreamLoader | None = None
    try:
        vmdesc = read_vmdesc(path)
        report["vmdesc"] = vmdesc is not None
        loader = StreamLoader(f, reg, cfg, vmdesc=vmdesc, any_machine=machine is None)
        res = loader.load()
        report["sections"] = [{"idstr": i, "instance_id": n, "version_id": v, "how": "loaded"}
                              for i, n, v in res.sections]
        report["sections"] += [{"idstr": i, "instance_id": n, "version_id": v, "how": "skipped (vmdesc)"}
                               for i, n, v in res.skipped]
    except PluginError:
        raise
    except MigrationError as exc:
        report["status"] = "error"
        report["error"] = str(exc)
        report["offset"] = getattr(exc, "offset", None)
    except MemoryError:
        report["status"] = "error"
        report["error"] = "not enough memory for the RAM blocks the stream announces"
        report["offset"] = None
    finally:
        f.channel.close()
        if loader is not None and loader.result.machine is not None:
            report["machine"] = loader.result.machine
    c = handlers.counters if handlers is not None else None
    blocks = [ram.find(name) for name in ram.stream_order] if ram is not None else []
    report["ram"] = {
        "blocks": [{"idstr": b.idstr, "used_length": b.used_length,
                    "pages": int(np.count_nonzero(b.host[: b.used_length].reshape(-1, 4096).any(axis=1)))}
                   for b in blocks if b is not None],
        "zero": c.duplicate if c else 0,
        "normal": c.normal if c else 0,
        "encoded": c.encoded if c else 0,
    }
    return report
