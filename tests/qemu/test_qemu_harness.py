"""End-to-end checks against the real QEMU 7.2 (qemu-system-x86_64), via harness + streamdump.

Tests that need the binary are skipped, with a reason, only when it is not on PATH.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import streamdump as sd  # noqa: E402

Q35 = "pc-q35-7.2"
I440FX = "pc-i440fx-7.2"
MACHINES = [Q35, I440FX]
MB = 1 << 20
PC_RAM_64M = {"pc.ram": 64 * MB}
# Block list QEMU 7.2 sends for "-nodefaults -m 64M" on both machines, in its order.
QEMU_64M_BLOCKS = [
    ("pc.ram", 0x4000000),
    ("/rom@etc/acpi/tables", 0x20000),
    ("pc.bios", 0x40000),
    ("pc.rom", 0x20000),
    ("/rom@etc/table-loader", 0x1000),
    ("/rom@etc/acpi/rsdp", 0x1000),
]


def page(tag: int) -> bytes:
    return bytes([tag]) * 16 + bytes((i * 7 + tag) & 0xFF for i in range(4080))


@pytest.fixture(scope="module")
def qemu() -> str:
    path = harness.find_qemu()
    if path is None:
        pytest.skip("qemu-system-x86_64 not on PATH (Debian: apt-get install qemu-system-x86)")
    return path


@pytest.fixture(scope="module", params=MACHINES)
def qemu_stream(request, qemu, tmp_path_factory) -> tuple[str, bytes, dict]:
    """A paused 64M guest of each machine type, migrated to a file."""
    path = tmp_path_factory.mktemp("qemu-out") / f"{request.param}.mig"
    with harness.QemuProcess(machine=request.param, memory="64M") as vm:
        assert vm.status() == "prelaunch"
        info = vm.migrate_to_file(path, timeout=25)
        assert vm.status() == "postmigrate"
    return request.param, path.read_bytes(), info


# --- no QEMU needed ---------------------------------------------------------------------------
def test_streamdump_reads_its_own_minimal_stream():
    pages = {("pc.ram", 0x1000): page(1), ("pc.ram", 0x2000): bytes(4096)}
    data = sd.minimal_stream(Q35, PC_RAM_64M, pages, with_vmdesc=True)
    d = sd.parse_stream(data, keep_pages=True)
    assert d.machine == Q35
    assert d.ram_blocks == [("pc.ram", 64 * MB)]
    assert d.pages == pages
    assert d.ram_flag_counts == {"MEM_SIZE": 1, "EOS": 2, "PAGE": 1, "ZERO": 1}
    assert d.vmdesc == {"page_size": 4096, "devices": []}


# --- QEMU's own stream -------------------------------------------------------------------------
def test_qemu_stream_parses(qemu_stream):
    machine, data, info = qemu_stream
    d = sd.parse_stream(data)
    assert (d.magic, d.version) == (sd.MAGIC, 3)
    assert d.machine == machine
    assert d.configuration_raw == b"\x07" + len(machine).to_bytes(4, "big") + machine.encode()
    assert d.commands == []
    # ram: START (MEM_SIZE, EOS), PART(s) with every page, END with only EOS
    ram = [s for s in d.sections if s.idstr == "ram"]
    assert [s.type_name for s in ram][0] == "START" and ram[-1].type_name == "END"
    assert {s.section_id for s in ram} == {2}
    assert (ram[0].instance_id, ram[0].version_id) == (0, 4)
    assert d.ram_blocks == QEMU_64M_BLOCKS
    assert d.ram_total == sum(n for _, n in QEMU_64M_BLOCKS) == info["ram"]["total"]
    pages = d.ram_flag_counts["ZERO"] + d.ram_flag_counts["PAGE"]
    assert pages == d.ram_total // 4096
    assert d.ram_flag_counts["ZERO"] == info["ram"]["duplicate"]
    assert d.ram_flag_counts["PAGE"] == info["ram"]["normal"]
    assert d.ram_continue_count == pages - len(QEMU_64M_BLOCKS)
    # FULL sections follow RAM, match the vmdesc one to one, globalstate last
    full = d.full_sections()
    assert all(s.footer for s in d.sections)
    assert [(s.idstr, s.instance_id, s.version_id) for s in full] == [
        (dev["name"], dev["instance_id"], dev["version"]) for dev in d.vmdesc["devices"]
    ]
    assert full[0].idstr == "timer" and full[-1].idstr == "globalstate"
    gs = data[full[-1].data_offset : full[-1].data_offset + 14]
    assert gs == b"\x00\x00\x00\x0aprelaunch\x00"  # be32 strlen+1, NUL-padded to 100
    assert d.vmdesc["page_size"] == 4096
    assert data[d.eof_offset] == 0 and d.vmdesc_offset == d.eof_offset + 1
    assert d.trailing == b""


def test_vmdesc_is_python_json_dumps(qemu_stream):
    import json

    _, data, _ = qemu_stream
    d = sd.parse_stream(data)
    n = int.from_bytes(data[d.vmdesc_offset + 1 : d.vmdesc_offset + 5], "big")
    raw = data[d.vmdesc_offset + 5 : d.vmdesc_offset + 5 + n]
    assert json.dumps(json.loads(raw)).encode() == raw


def test_full_sections_walkable_without_vmdesc(qemu_stream):
    _, data, _ = qemu_stream
    with_desc = sd.parse_stream(data)
    without = sd.parse_stream(data[: with_desc.eof_offset + 1])
    assert without.vmdesc is None
    assert [(s.section_id, s.data_length) for s in without.sections] == [
        (s.section_id, s.data_length) for s in with_desc.sections
    ]


# --- QEMU reads our minimal stream ----------------------------------------------------------
@pytest.mark.parametrize("machine", MACHINES)
def test_qemu_accepts_minimal_stream(qemu, tmp_path, machine):
    pages = {
        ("pc.ram", 0x0): page(0x11),
        ("pc.ram", 0x1000): page(0x22),
        ("pc.ram", 0x2000): bytes(4096),
        ("pc.ram", 0x100000): page(0x33),
        ("pc.ram", 64 * MB - 4096): page(0x44),
    }
    path = tmp_path / "min.mig"
    sd.write_minimal_stream(str(path), machine, PC_RAM_64M, pages)
    r = harness.try_incoming(path, machine, "64M", read=[(off, 4096) for _, off in pages])
    assert r.ok, r
    assert (r.migrate_status, r.runstate) == ("completed", "paused")
    # no vmdesc -> only a warning
    assert r.error_lines() == ["Expected vmdescription section, but got 0"]
    for (_, off), body in pages.items():
        assert r.memory[off] == body, f"pc.ram offset {off:#x} != guest-physical {off:#x}"


def test_minimal_stream_with_empty_vmdesc_is_silent(qemu, tmp_path):
    path = tmp_path / "min.mig"
    sd.write_minimal_stream(str(path), Q35, PC_RAM_64M, {("pc.ram", 0x1000): page(7)},
                            with_vmdesc=True)
    r = harness.try_incoming(path, Q35, "64M", read=[(0x1000, 4096)], defer=False)
    assert r.ok and r.stderr == "", r
    assert r.memory[0x1000] == page(7)


def test_roundtrip_through_qemu(qemu, tmp_path):
    pages = {("pc.ram", 0x1000): page(0x22), ("pc.ram", 0x200000): page(0x33)}
    src = tmp_path / "in.mig"
    out = tmp_path / "out.mig"
    sd.write_minimal_stream(str(src), Q35, PC_RAM_64M, pages)
    with harness.QemuProcess(machine=Q35, memory="64M", incoming="defer") as vm:
        assert vm.status() == "inmigrate"
        vm.migrate_incoming(harness.exec_cat_from(src))
        vm.wait_incoming_done(timeout=20)
        assert vm.status() == "paused"
        vm.migrate_to_file(out, timeout=20)
    d = sd.parse_stream(out.read_bytes(), keep_pages=True)
    assert d.ram_blocks == QEMU_64M_BLOCKS
    for key, body in pages.items():
        assert d.pages[key] == body
    # the destination got no pc.bios from us and does not load its own in incoming mode
    assert all(body == bytes(4096) for (b, _), body in d.pages.items() if b == "pc.bios")


def _one_page_stream(machine=Q35, **kw) -> bytes:
    return sd.minimal_stream(machine, kw.pop("blocks", PC_RAM_64M),
                             {("pc.ram", 0x1000): page(1)}, **kw)


_ERROR_CASES = {  # name -> (stream, line QEMU 7.2 prints on stderr)
    "wrong machine": (_one_page_stream(I440FX),
        "Machine type received is 'pc-i440fx-7.2' and local is 'pc-q35-7.2'"),
    "unknown block": (_one_page_stream(blocks={"foo": 4096}),
        'Unknown ramblock "foo", cannot accept migration'),
    "block length": (_one_page_stream(blocks={"pc.ram": 32 * MB}),
        "Size mismatch: pc.ram: 0x2000000 != 0x4000000: Invalid argument"),
    "no footer": (_one_page_stream(footers=False), "Missing section footer for ram"),
    "ram version": (_one_page_stream(ram_version=5), "savevm: unsupported version 5 for 'ram' v4"),
    "no config": (_one_page_stream()[:8] + _one_page_stream()[23:],
        "Configuration section missing"),
    "bad magic": (b"XXXX" + _one_page_stream()[4:], "Not a migration stream"),
    "file version 2": (_one_page_stream()[:4] + b"\0\0\0\2" + _one_page_stream()[8:],
        "SaveVM v2 format is obsolete and don't work anymore"),
}


@pytest.mark.parametrize("name", list(_ERROR_CASES))
def test_qemu_error_messages(qemu, tmp_path, name):
    data, expected = _ERROR_CASES[name]
    path = tmp_path / "bad.mig"
    path.write_bytes(data)
    r = harness.try_incoming(path, Q35, "64M", timeout=15)
    assert not r.ok
    assert r.migrate_status == "qemu-exited" and r.returncode == 1, r
    assert expected in r.error_lines(), r.stderr
    assert r.error_lines()[-1].startswith("load of migration failed: ")


def test_loader_bytes_land_in_pc_ram(qemu, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(page(0x5A) + page(0x5B))
    out = tmp_path / "out.mig"
    with harness.QemuProcess(machine=Q35, memory="64M",
                             extra_args=harness.loader_args(blob, 0x100000)) as vm:
        assert vm.read_guest_memory(0x100000, 8192) == page(0x5A) + page(0x5B)
        vm.migrate_to_file(out, timeout=20)
    d = sd.parse_stream(out.read_bytes(), keep_pages=True)
    assert d.pages[("pc.ram", 0x100000)] == page(0x5A)
    assert d.pages[("pc.ram", 0x101000)] == page(0x5B)
