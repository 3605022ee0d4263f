"""``savevm analyze``: what is in a stream file (ours or a real QEMU's).

Like QEMU's analyze-migration.py it reads the vmdesc from the end of the
file first, so device sections it has no description for are walked by
size; unlike it, it loads the RAM section with the real loader, so every
check of a live migration applies.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import attrs
import numpy as np

from savevm.channels.fd import FdChannel
from savevm.config import MigrationConfig
from savevm.errors import CorruptStreamError, MigrationError
from savevm.format import QEMU_VM_FILE_MAGIC, SectionType
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile
from savevm.vmdesc import read_vmdesc


def _peek_header(path: str) -> tuple[str, list[tuple[str, int]]]:
    """Machine name and the RAM block list, read straight from the file's start."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    if len(head) < 9 or struct.unpack(">I", head[:4])[0] != QEMU_VM_FILE_MAGIC:
        raise CorruptStreamError("not a migration stream (no QEVM magic)", 0)
    pos = 8
    machine = ""
    if head[pos] == SectionType.CONFIGURATION:
        n = struct.unpack(">I", head[pos + 1 : pos + 5])[0]
        machine = head[pos + 5 : pos + 5 + min(n, 256)].decode(errors="replace")
        pos += 5 + n
        while pos < len(head) and head[pos] == SectionType.SUBSECTION:
            ln = head[pos + 1]
            name = head[pos + 2 : pos + 2 + ln]
            pos += 2 + ln + 4
            if name == b"configuration/target-page-bits":
                pos += 4
            elif name == b"configuration/uuid":
                pos += 16
            elif name == b"configuration/capabilities":
                count = struct.unpack(">I", head[pos : pos + 4])[0]
                pos += 4
                for _ in range(count):
                    pos += 1 + head[pos]
    blocks: list[tuple[str, int]] = []
    if pos < len(head) and head[pos] == SectionType.SECTION_START:
        ln = head[pos + 5]
        idstr = head[pos + 6 : pos + 6 + ln]
        p = pos + 6 + ln + 8
        if idstr == b"ram":
            total = struct.unpack(">Q", head[p : p + 8])[0] & ~0xFFF
            p += 8
            while total > 0 and p < len(head):
                n = head[p]
                block_name = head[p + 1 : p + 1 + n].decode(errors="replace")
                length = struct.unpack(">Q", head[p + 1 + n : p + 9 + n])[0]
                p += 9 + n
                blocks.append((block_name, length))
                total -= length
    return machine, blocks


def analyze_file(path: str, machine: str | None = None) -> dict[str, Any]:
    """Load ``path`` into scratch memory and report what it held."""
    import savevm_ram

    stream_machine, blocks = _peek_header(path)
    cfg = attrs.evolve(MigrationConfig(), machine=machine or stream_machine or "savevm")
    reg = PluginHost(cfg).new_registry()
    ram = savevm_ram.RAMList([savevm_ram.RAMBlock(n, np.zeros(max(ln, 4096), dtype=np.uint8), used_length=ln)
                              for n, ln in blocks])
    handlers = savevm_ram.register_ram(reg, ram) if blocks else None
    vmdesc = read_vmdesc(path)
    fd = os.open(path, os.O_RDONLY)
    f = QEMUFile(FdChannel(fd, f"file:{path}"))
    report: dict[str, Any] = {"file": path, "machine": stream_machine, "bytes": os.path.getsize(path),
                              "status": "ok", "sections": [], "vmdesc": vmdesc is not None}
    try:
        from savevm.load import StreamLoader

        loader = StreamLoader(f, reg, cfg, vmdesc=vmdesc)
        res = loader.load()
        report["sections"] = [{"idstr": i, "instance_id": n, "version_id": v, "how": "loaded"}
                              for i, n, v in res.sections]
        report["sections"] += [{"idstr": i, "instance_id": n, "version_id": v, "how": "skipped (vmdesc)"}
                               for i, n, v in res.skipped]
    except MigrationError as exc:
        report["status"] = "error"
        report["error"] = str(exc)
        report["offset"] = getattr(exc, "offset", None)
    finally:
        f.channel.close()
    c = handlers.counters if handlers is not None else None
    report["ram"] = {
        # in stream order (a RAMList keeps QEMU's largest-first order instead)
        "blocks": [{"idstr": b.idstr, "used_length": b.used_length,
                    "pages": int(np.count_nonzero(b.host[: b.used_length].reshape(-1, 4096).any(axis=1)))}
                   for b in (ram.find(name) for name, _ in blocks) if b is not None],
        "zero": c.duplicate if c else 0,
        "normal": c.normal if c else 0,
        "encoded": c.encoded if c else 0,
    }
    return report
