"""Memory a stream can make the destination use is checked before it is allocated."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import savevm
import savevm_ram
from savevm.channels import MemoryChannel
from savevm.config import MigrationConfig
from savevm.migration import Incoming
from savevm.plugins import PluginHost

HEADER = struct.pack(">II", 0x5145564D, 3) + b"\x07" + struct.pack(">I", 6) + b"savevm"


def _ram_stream(blocks: list[tuple[str, int]]) -> bytes:
    """START of a ram section announcing these blocks (no pages), then EOF."""
    total = sum(n for _, n in blocks)
    body = struct.pack(">Q", total | 0x04)
    for name, n in blocks:
        body += bytes([len(name)]) + name.encode() + struct.pack(">Q", n)
    body += struct.pack(">Q", 0x10)
    sec = b"\x01" + struct.pack(">I", 1) + b"\x03ram" + struct.pack(">II", 0, 4) + body + b"\x7e" + struct.pack(">I", 1)
    return HEADER + sec


def test_announced_ram_beyond_the_machine_is_refused_before_allocation() -> None:
    from savevm.cli.qemu_guest import QemuGuest

    guest = QemuGuest()
    reg = PluginHost(MigrationConfig()).new_registry()
    guest.register(reg)
    inc = Incoming(reg, channel=MemoryChannel(_ram_stream([("pc.ram", 1 << 60)])), guest=guest)
    inc.start()
    st = inc.wait(10)
    assert st.status == "failed"
    assert "max_auto_bytes" in (st.error_desc or "") or "exceeds" in (st.error_desc or ""), st.error_desc
    assert len(guest.ram) == 0


def test_a_huge_vmdesc_costs_no_memory_when_not_needed(tmp_path: Path) -> None:
    """64 MiB of nested empty lists after EOF: skipped, never decoded (it grew a destination to 1.7 GB)."""
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", bytearray(4096))]))
    ch = MemoryChannel()
    cfg = MigrationConfig.from_dict({"send-vmdesc": False})
    savevm.save_stream(savevm.QEMUFile(ch, writable=True), reg, cfg)
    junk = b"[" + b"[]," * ((64 << 20) // 3 - 1) + b"[]]"  # a list of 22 million empty lists
    data = ch.getvalue() + b"\x06" + struct.pack(">I", len(junk)) + junk
    path = tmp_path / "s.qevm"
    path.write_bytes(data)
    code = textwrap.dedent(f"""
        import resource, savevm, savevm_ram
        from savevm.migration import Incoming
        from savevm.plugins import PluginHost
        reg = PluginHost().new_registry()
        savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", bytearray(4096))]))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        inc = Incoming(reg, "file:{path}")
        inc.start()
        st = inc.wait(60)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(st.status, grew)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    status, grew_kb = r.stdout.split()
    assert status == "completed"
    assert int(grew_kb) < 32 * 1024, f"RSS grew by {int(grew_kb) // 1024} MiB"
