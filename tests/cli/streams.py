"""Stream files for the analyze/rewrite tests: written by savevm, or by hand with the independent writer."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

import savevm
import savevm_ram
from savevm.channels import FdChannel
from savevm.qemufile import QEMUFile
from savevm.save import StreamWriter
from savevm_ram.demo import DemoDevice

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qemu"))
import streamdump as sd  # noqa: E402

PAGE = 4096


def plain(path: Path) -> dict[str, np.ndarray]:
    """A snapshot: pc.ram (random, its first 16 pages zero), an all-zero vga, a device with a subsection."""
    mem = np.frombuffer(np.random.default_rng(9).bytes(64 * PAGE), dtype=np.uint8).copy()
    mem[: 16 * PAGE] = 0
    vga = np.zeros(8 * PAGE, dtype=np.uint8)
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", mem),
                                                     savevm_ram.RAMBlock("vga", vga)]))
    reg.register_device("demo-device", 0, DemoDevice(counter=5, seed=0xABCDEF, regs=[1, 2, 3, 4, 5, 6, 7, 8],
                                                     writes=3))
    savevm.snapshot(path, reg)
    return {"pc.ram": mem, "vga": vga}


def with_codecs(path: Path) -> dict[str, np.ndarray]:
    """XBZRLE and compressed pages (and zero, normal, block names), then a device.

    Compression runs in the bulk stage, XBZRLE in the rounds after it, so
    every kind of QEMU record is in the stream and later records overwrite
    earlier pages.
    """
    pages = 24
    cfg = savevm.MigrationConfig().set_capability("xbzrle").set_capability("compress")
    rng = np.random.default_rng(11)
    a = np.frombuffer(rng.bytes(pages * PAGE), dtype=np.uint8).copy()
    a[: 4 * PAGE] = 0
    a[8 * PAGE : 12 * PAGE] = np.frombuffer((b"text " * 1000)[:PAGE] * 4, dtype=np.uint8)
    b = np.zeros(4 * PAGE, dtype=np.uint8)
    b[PAGE : 2 * PAGE] = 0x5A
    reg = savevm.PluginHost(cfg).new_registry()
    h = savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("a", a), savevm_ram.RAMBlock("b", b)]))
    reg.register_device("demo-device", 0, DemoDevice(counter=3, writes=2))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    f = QEMUFile(FdChannel(fd, f"file:{path}"), writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    while not w.iterate():
        pass
    for r in range(2):  # rounds after the bulk stage: XBZRLE pages on the second
        for p in range(12, pages):
            blk = h.ram.find("a")
            assert blk is not None
            blk.write(p * PAGE + 100 * r, bytes([r + 1] * 3))
        w.pending(1 << 62)
        while not w.iterate():
            pass
    w.complete_precopy()
    w.cleanup()
    f.close()
    return {"a": a, "b": b}


def hand_made(path: Path, blocks: dict[str, int], pages: dict[tuple[str, int], bytes], *,
              devices: bytes = b"", vmdesc: dict[str, Any] | None = None, machine: str = "pc-q35-7.2",
              **kw: Any) -> bytes:
    """A stream written by the independent writer (streamdump), e.g. one a savevm writer would refuse."""
    w = sd.StreamWriter().header().configuration(machine)
    w.section_header(sd.SECTION_START, 2, "ram", 0, 4).ram_mem_size(blocks, kw.get("total")).ram_eos().footer(2)
    w.section_header(sd.SECTION_END, 2)
    for (block, off), body in sorted(pages.items()):
        w.ram_page(block, off, body)
    w.ram_eos().footer(2)
    w.raw(devices).eof()
    if vmdesc is not None:
        w.vmdesc(vmdesc)
    data = w.bytes()
    path.write_bytes(data)
    return data


def full_section(section_id: int, idstr: str, instance: int, version: int, body: bytes) -> bytes:
    """A FULL section record around ``body``, with its footer."""
    w = sd.StreamWriter().section_header(sd.SECTION_FULL, section_id, idstr, instance, version)
    return w.raw(body).footer(section_id).bytes()
