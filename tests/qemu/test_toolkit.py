"""``savevm analyze`` and ``savevm rewrite`` against real QEMU 7.2 streams and a real QEMU destination.

* Every QEMU stream (q35, i440fx, q35 with compressed pages) is analysed and
  compared with the independent parser ``streamdump``: sections, offsets and
  sizes, blocks, records and bytes by kind; its device sections are decoded
  field by field through its vmdesc, each exactly as long as the section.
* ``--extract-ram`` writes what a QEMU destination loads: the same stream is
  loaded into a fresh QEMU and its memory read back with pmemsave.  An
  XBZRLE stream (written by savevm, which QEMU loads) is checked the same way.
* ``savevm rewrite`` output is loaded by a fresh QEMU, whose memory then
  holds the new content.

Skipped (with the reason) only when ``qemu-system-x86_64`` is not on PATH.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import streamdump as sd  # noqa: E402

import savevm  # noqa: E402
import savevm_ram  # noqa: E402
from savevm.channels import FdChannel  # noqa: E402
from savevm.cli import main  # noqa: E402
from savevm.qemufile import QEMUFile  # noqa: E402
from savevm.save import StreamWriter  # noqa: E402

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(harness.find_qemu() is None,
                       reason="qemu-system-x86_64 not on PATH (Debian: apt-get install qemu-system-x86)"),
]

PAGE = 4096
MB = 1 << 20
RAM = 64 * MB
#: guest-physical ranges where pc.ram offset == address (below the 640K-1M hole, and above it)
PC_RAM_RANGES = [(0, 0xA0000), (0x100000, RAM - 0x100000)]
#: pc.bios (256 KiB) sits just below 4 GiB
BIOS = (0x1_0000_0000 - 0x40000, 0x40000)
KIND_NAMES = {"zero": "ZERO", "normal": "PAGE", "xbzrle": "XBZRLE", "compressed": "COMPRESS_PAGE"}


def _payload(seed: int, pages: int) -> bytes:
    rng = np.random.default_rng(seed)
    text = (b"savevm analyze reads what QEMU wrote. " * 120)[:PAGE]
    return b"".join(rng.bytes(PAGE) if i % 2 else text for i in range(pages))


@pytest.fixture(scope="module")
def qemu_streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qemu-streams")
    blob = d / "payload.bin"
    blob.write_bytes(_payload(3, 16))
    loader = harness.loader_args(blob, 0x7000) + harness.loader_args(blob, 0x300000)
    out: dict[str, Path] = {}
    for name, machine, caps in (("q35", "pc-q35-7.2", {}), ("i440fx", "pc-i440fx-7.2", {}),
                                ("compress", "pc-q35-7.2", {"compress": True})):
        path = d / f"{name}.mig"
        with harness.QemuProcess(machine=machine, memory="64M", extra_args=loader) as vm:
            vm.set_parameters(max_bandwidth=0)
            if caps:
                vm.set_capabilities(**caps)
            vm.migrate_to_file(path, timeout=60)
        out[name] = path
    return out


def _analyze(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc = main(["analyze", *argv, "--json"])
    rep: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert rc == 0, rep.get("error")
    return rep


def _load_in_qemu(path: Path, machine: str = "pc-q35-7.2", compress: bool = False) -> tuple[dict[int, bytes], str]:
    """A fresh QEMU loads ``path`` (``exec:cat``); its pc.ram and pc.bios, read back, and its stderr."""
    with harness.QemuProcess(machine=machine, memory="64M", incoming="defer") as vm:
        if compress:
            vm.set_capabilities(compress=True)  # a 7.2 destination refuses compressed pages otherwise
        vm.migrate_incoming(harness.exec_cat_from(path))
        vm.wait_incoming_done(60)
        mem = {a: vm.read_guest_memory(a, n) for a, n in [*PC_RAM_RANGES, BIOS]}
        return mem, vm.stderr()


def _assert_memory(mem: dict[int, bytes], pc_ram: bytes, pc_bios: bytes) -> None:
    for addr, n in PC_RAM_RANGES:
        got = np.frombuffer(mem[addr], np.uint8)
        want = np.frombuffer(pc_ram[addr : addr + n], np.uint8)
        bad = np.flatnonzero(got != want)
        assert not len(bad), f"pc.ram differs at {len(bad)} bytes, first at 0x{addr + int(bad[0]):x}"
    assert mem[BIOS[0]] == pc_bios


# ----------------------------------------------------------------------------- analyze vs streamdump
@pytest.mark.parametrize("name", ["q35", "i440fx", "compress"])
def test_analyze_agrees_with_streamdump(name: str, qemu_streams: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = qemu_streams[name]
    data = path.read_bytes()
    dump = sd.parse_stream(data)
    rep = _analyze(capsys, str(path))
    assert rep["machine"] == dump.machine and rep["bytes"] == len(data)
    assert [(s["type"], s["section_id"], s["idstr"], s["instance_id"], s["version_id"], s["offset"],
             s["size"]) for s in rep["sections"]] == [
        (s.type_name, s.section_id, s.idstr, s.instance_id, s.version_id, s.offset,
         s.data_offset - s.offset + s.data_length + 5) for s in dump.sections]
    assert [(b["idstr"], b["used_length"]) for b in rep["ram"]["blocks"]] == dump.ram_blocks
    for kind, flag in KIND_NAMES.items():
        assert rep["ram"]["records"][kind] == {"count": dump.ram_flag_counts[flag],
                                               "bytes": dump.ram_kind_bytes[flag]}, kind
    assert rep["ram"]["block_names"] == {"count": dump.ram_name_count, "bytes": dump.ram_name_bytes}
    assert rep["vmdesc_offset"] == dump.vmdesc_offset
    if name == "compress":
        assert dump.ram_flag_counts["COMPRESS_PAGE"] > 0


@pytest.mark.parametrize("name", ["q35", "i440fx"])
def test_dump_devices_decodes_every_qemu_device(name: str, qemu_streams: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = qemu_streams[name]
    dump = sd.parse_stream(path.read_bytes())
    assert main(["analyze", str(path), "--dump-devices"]) == 0
    devices = json.loads(capsys.readouterr().out)
    full = dump.full_sections()
    assert [(d["name"], d["instance_id"], d["section_id"]) for d in devices] == [
        (s.idstr, s.instance_id, s.section_id) for s in full]
    for d, s in zip(devices, full):
        assert (d["offset"], d["size"]) == (s.data_offset, s.data_length), d["name"]

    def field(dev: dict[str, Any], *path: str) -> Any:
        value: Any = dev
        for p in path:
            value = next(f["value"] for f in value["fields"] if f["name"] == p)
        return value

    by_name = {d["name"]: d for d in devices}
    cpu = by_name["cpu"]
    assert field(cpu, "env.eip") == 0xFFF0 and len(field(cpu, "env.regs")) == 16  # the reset vector
    # "int32 le" is a big-endian "less or equal" int: a PCI device's config version is 2
    pci = next(d for d in devices if "/" in d["name"] and d["name"].startswith("0000:00:00.0"))
    assert field(pci, pci["fields"][0]["name"], "version_id") == 2
    runstate = bytes.fromhex(field(by_name["globalstate"], "runstate")).rstrip(b"\0")
    assert runstate == b"prelaunch" and field(by_name["globalstate"], "size") == len(runstate) + 1


# ----------------------------------------------------------------------------- extract == QEMU's memory
@pytest.mark.parametrize("name", ["q35", "compress"])
def test_extract_ram_equals_what_qemu_loads(name: str, qemu_streams: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = qemu_streams[name]
    out = tmp_path / "blocks"
    rep = _analyze(capsys, str(path), "--extract-ram", str(out))
    assert sorted(str(Path(x["path"]).relative_to(out)) for x in rep["extracted"]["files"]) == sorted(
        b["idstr"].lstrip("/") for b in rep["ram"]["blocks"])
    pc_ram, pc_bios = (out / "pc.ram").read_bytes(), (out / "pc.bios").read_bytes()
    payload = _payload(3, 16)
    assert pc_ram[0x7000 : 0x7000 + len(payload)] == payload == pc_ram[0x300000 : 0x300000 + len(payload)]
    mem, _ = _load_in_qemu(path, compress=name == "compress")
    _assert_memory(mem, pc_ram, pc_bios)


def test_extract_xbzrle_stream_equals_what_qemu_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """XBZRLE pages (savevm writes them byte-exact; QEMU decodes them onto the pages it holds)."""
    rng = np.random.default_rng(21)
    mem = np.zeros(RAM, dtype=np.uint8)
    hot = [0x200000 + i * PAGE for i in range(64)]
    for a in hot:
        mem[a : a + PAGE] = np.frombuffer(rng.bytes(PAGE), dtype=np.uint8)
    cfg = savevm.MigrationConfig(machine="pc-q35-7.2").set_capability("xbzrle")
    reg = savevm.PluginHost(cfg).new_registry()
    h = savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", mem)]))
    path = tmp_path / "xbzrle.mig"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    f = QEMUFile(FdChannel(fd, f"file:{path}"), writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    while not w.iterate():
        pass
    block = h.ram.find("pc.ram")
    assert block is not None
    for r in range(3):  # small changes after the bulk stage: XBZRLE from the second round on
        for a in hot:
            block.write(a + 64 * r, bytes([r + 1]) * 8)
        w.pending(1 << 62)
        while not w.iterate():
            pass
    w.complete_precopy()
    w.cleanup()
    f.close()
    out = tmp_path / "blocks"
    rep = _analyze(capsys, str(path), "--extract-ram", str(out))
    assert rep["ram"]["records"]["xbzrle"]["count"] >= len(hot)
    pc_ram = (out / "pc.ram").read_bytes()
    assert pc_ram == mem.tobytes()
    got, _ = _load_in_qemu(path)
    for addr, n in PC_RAM_RANGES:
        assert got[addr] == pc_ram[addr : addr + n]


# ----------------------------------------------------------------------------- rewrite, loaded by QEMU
@pytest.mark.parametrize("ram_only", [False, True])
def test_rewrite_is_loaded_by_qemu(ram_only: bool, qemu_streams: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    ref = qemu_streams["compress"]  # compressed pages in REF; OUT is plain pages, loadable without the capability
    new = np.frombuffer(np.random.default_rng(77).bytes(RAM), dtype=np.uint8).copy()
    new[0x400000 : 0x800000] = 0
    src = tmp_path / "pc.ram"
    src.write_bytes(new.tobytes())
    out = tmp_path / "out.mig"
    argv = ["rewrite", str(ref), str(out), "--ram", f"pc.ram={src}", *(["--ram-only"] if ram_only else [])]
    assert main(argv) == 0
    capsys.readouterr()
    dump = sd.parse_stream(out.read_bytes())
    assert dump.ram_blocks == sd.parse_stream(ref.read_bytes()).ram_blocks
    assert len(dump.full_sections()) == (0 if ram_only else 29)
    ref_blocks = tmp_path / "ref-blocks"
    _analyze(capsys, str(ref), "--extract-ram", str(ref_blocks))
    mem, stderr = _load_in_qemu(out)
    assert stderr.strip() == "", stderr  # a vmdesc that matches the devices sent: QEMU is silent
    _assert_memory(mem, new.tobytes(), (ref_blocks / "pc.bios").read_bytes())
