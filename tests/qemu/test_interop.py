"""savevm and a real QEMU 7.2 reading each other's migration streams.

* QEMU -> savevm: a paused q35 guest with known bytes put in its RAM by
  ``-device loader`` is migrated to a file; savevm loads it (device sections it
  does not model are skipped through the vmdesc) and must hold exactly those
  bytes, agreeing page for page with the independent parser ``streamdump``.
* savevm -> QEMU: a stream written by savevm's StreamWriter, with pages
  re-dirtied between iterations (so that later PART and END chunks overwrite
  earlier pages), is loaded by QEMU; guest memory read back with pmemsave must
  equal savevm's RAM.
* savevm -> QEMU -> savevm: QEMU loads our stream and migrates out again; savevm
  reads QEMU's stream back.
* A savevm device section QEMU does not know makes QEMU refuse the stream.

Skipped (with the reason) only when ``qemu-system-x86_64`` is not on PATH.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import attrs
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import streamdump as sd  # noqa: E402

import savevm  # noqa: E402
import savevm_ram  # noqa: E402
from savevm import vmstate  # noqa: E402
from savevm.channels import FdChannel  # noqa: E402
from savevm.save import StreamWriter  # noqa: E402
from savevm.vmdesc import read_vmdesc  # noqa: E402

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(harness.find_qemu() is None,
                       reason="qemu-system-x86_64 not on PATH (Debian: apt-get install qemu-system-x86)"),
]

Q35 = "pc-q35-7.2"
PAGE = 4096
MB = 1 << 20
RAM_SIZE = 64 * MB
#: RAM blocks of "-nodefaults -machine pc-q35-7.2 -m 64M", in QEMU's stream order (FINDINGS.md a).
QEMU_64M_BLOCKS = [
    ("pc.ram", 0x4000000),
    ("/rom@etc/acpi/tables", 0x20000),
    ("pc.bios", 0x40000),
    ("pc.rom", 0x20000),
    ("/rom@etc/table-loader", 0x1000),
    ("/rom@etc/acpi/rsdp", 0x1000),
]
#: pc.ram offsets 0xa0000-0xfffff are not pc.ram when read by guest-physical address.
HOLE = (0xA0000, 0x100000)


# ----------------------------------------------------------------------------- helpers
def qemu_registry(blocks: list[tuple[str, int]] = QEMU_64M_BLOCKS, buffers: dict[str, bytearray] | None = None,
                  ) -> tuple[savevm.SectionRegistry, savevm_ram.RAMList, savevm_ram.RAMHandlers]:
    """A registry holding only "ram", over blocks named and sized like QEMU's."""
    buffers = buffers or {}
    reg = savevm.SectionRegistry(savevm.MigrationConfig(machine=Q35))
    ram = savevm_ram.RAMList([savevm_ram.RAMBlock(name, buffers.get(name, bytearray(size)))
                              for name, size in blocks])
    handlers = savevm_ram.register_ram(reg, ram)
    return reg, ram, handlers


def load_file(path: Path, reg: savevm.SectionRegistry) -> savevm.LoadResult:
    fd = os.open(path, os.O_RDONLY)
    f = savevm.QEMUFile(FdChannel(fd, f"file:{path}"))
    try:
        return savevm.load_stream(f, reg, vmdesc=read_vmdesc(str(path)))
    finally:
        f.close()


def write_file(path: Path) -> savevm.QEMUFile:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    return savevm.QEMUFile(FdChannel(fd, f"file:{path}"), writable=True, rate_limit=0)


def rand_pages(rng: np.random.Generator, n: int = 1) -> bytes:
    return rng.integers(0, 256, n * PAGE, dtype=np.uint8).tobytes()


def guest_ranges(size: int = RAM_SIZE) -> list[tuple[int, int]]:
    """(gpa, length) ranges where guest-physical address == pc.ram offset."""
    return [(0, HOLE[0]), (HOLE[1], size - HOLE[1])]


def assert_guest_equals(memory: dict[int, bytes], expected: bytes | bytearray) -> None:
    for gpa, data in memory.items():
        want = bytes(expected[gpa : gpa + len(data)])
        if data != want:
            a = np.frombuffer(data, np.uint8)
            b = np.frombuffer(want, np.uint8)
            bad = np.flatnonzero(a != b)
            pages = sorted({(gpa + int(i)) // PAGE * PAGE for i in bad[:4096]})
            raise AssertionError(f"guest memory differs from savevm's pc.ram at {len(bad)} bytes, "
                                 f"pages {[hex(p) for p in pages[:10]]}")


def qemu_section_payloads(data: bytes, dump: sd.StreamDump, kind: int) -> list[bytes]:
    return [data[s.data_offset : s.data_offset + s.data_length] for s in dump.sections
            if s.type == kind and s.idstr == "ram"]


# ----------------------------------------------------------------------------- 1. QEMU -> savevm
def test_qemu_stream_loads_into_savevm(tmp_path: Path) -> None:
    rng = np.random.default_rng(2024)
    low = bytearray(rand_pages(rng, 3) + bytes(PAGE) + rand_pages(rng, 1)[:100])  # a zero page inside
    high = bytearray(rand_pages(rng, 8))
    low_addr, high_addr = 0x7000, 0x200000
    (tmp_path / "low.bin").write_bytes(low)
    (tmp_path / "high.bin").write_bytes(high)
    out = tmp_path / "qemu.mig"
    with harness.QemuProcess(machine=Q35, memory="64M",
                             extra_args=harness.loader_args(tmp_path / "low.bin", low_addr)
                             + harness.loader_args(tmp_path / "high.bin", high_addr)) as vm:
        vm.set_parameters(max_bandwidth=0)
        info = vm.migrate_to_file(out, timeout=30)
        assert vm.status() == "postmigrate"
    data = out.read_bytes()
    dump = sd.parse_stream(data, keep_pages=True)
    assert dump.ram_blocks == QEMU_64M_BLOCKS

    reg, ram, handlers = qemu_registry()
    res = load_file(out, reg)
    assert res.machine == Q35
    assert ("ram", 0, 4) in res.sections
    assert res.skipped and all(name != "ram" for name, _, _ in res.skipped)
    assert len(res.skipped) == len(dump.full_sections())
    assert res.bytes_read == len(data)

    # the known bytes, and zero everywhere else in pc.ram
    expected = np.zeros(RAM_SIZE, np.uint8)
    expected[low_addr : low_addr + len(low)] = np.frombuffer(low, np.uint8)
    expected[high_addr : high_addr + len(high)] = np.frombuffer(high, np.uint8)
    pc_ram = ram.find("pc.ram")
    assert pc_ram is not None
    assert bytes(pc_ram.mv[low_addr : low_addr + len(low)]) == bytes(low)
    assert bytes(pc_ram.mv[high_addr : high_addr + len(high)]) == bytes(high)
    assert np.array_equal(pc_ram.host[:RAM_SIZE], expected)

    # every page record agrees with the independent parser, in every block
    for (name, addr), body in dump.pages.items():
        blk = ram.find(name)
        assert blk is not None, name
        assert bytes(blk.mv[addr : addr + PAGE]) == body, (name, hex(addr))

    # counters: every page of every block loaded once; PAGE records == non-zero pages
    counts = dump.ram_flag_counts
    total_pages = sum(size for _, size in QEMU_64M_BLOCKS) // PAGE
    assert handlers.counters.loaded_pages == counts["ZERO"] + counts["PAGE"] == total_pages
    assert handlers.counters.total == dump.ram_total == sum(size for _, size in QEMU_64M_BLOCKS)
    nonzero = sum(int(np.count_nonzero(b.host[: b.used_length].reshape(-1, PAGE).any(axis=1))) for b in ram)
    assert nonzero == counts["PAGE"]
    pc_ram_nonzero = int(np.count_nonzero(expected.reshape(-1, PAGE).any(axis=1)))
    assert pc_ram_nonzero == 3 + 1 + 8  # low: 3 random, 1 zero, 1 partial; high: 8
    assert sum(1 for (name, _), body in dump.pages.items() if name == "pc.ram" and any(body)) == pc_ram_nonzero
    assert info["ram"]["normal"] == counts["PAGE"] and info["ram"]["duplicate"] == counts["ZERO"]


# ----------------------------------------------------------------------------- 2. savevm -> QEMU
class _Source:
    """pc.ram with random and zero pages, and the offsets the test dirties."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        self.buf = bytearray(RAM_SIZE)
        self.random_offsets = [0x0, 0x1000, 0x5000, 0x9F000, 0x100000, 0x1234000, 0x2000000, RAM_SIZE - PAGE]
        for off in self.random_offsets:
            self.buf[off : off + PAGE] = rand_pages(self.rng)
        self.run = (0x800000, 64)  # 64 contiguous random pages
        self.buf[0x800000 : 0x800000 + 64 * PAGE] = rand_pages(self.rng, 64)
        self.zero_offsets = [0x2000, 0x101000, 0x3000000]


def _write_live_stream(path: Path, src: _Source) -> dict[str, object]:
    """Header, setup, rate-limited iterations with re-dirtied pages, complete."""
    reg, ram, handlers = qemu_registry([("pc.ram", RAM_SIZE)], {"pc.ram": src.buf})
    block = ram.find("pc.ram")
    assert block is not None
    f = write_file(path)
    f.set_rate_limit(1 * MB)  # 100 KiB per 100 ms window: the bulk stage takes several PARTs
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    bulk_parts = 0
    mid_bulk = src.random_offsets[-1]  # the last page: dirtied before the bulk stage reaches it
    mid_page = rand_pages(src.rng)
    for i in range(500):
        f.reset_rate_limit()  # a new window without sleeping it out
        done = w.iterate()
        bulk_parts += 1
        if i == 0:
            block.write(mid_bulk, mid_page)
        if done:
            break
    assert done and bulk_parts >= 3
    # after the bulk stage: a random page rewritten, a random page zeroed, a zero page filled
    later = {src.random_offsets[1]: rand_pages(src.rng), src.random_offsets[2]: bytes(PAGE),
             src.zero_offsets[0]: rand_pages(src.rng)}
    for off, body in later.items():
        block.write(off, body)
    assert w.pending(1) == len(later) * PAGE + PAGE  # sync: the three above and mid_bulk
    f.reset_rate_limit()
    assert w.iterate()
    assert w.pending(1) == 0
    # dirtied after the last iteration: goes in the END chunk
    final_off = src.random_offsets[4]
    final_page = rand_pages(src.rng)
    block.write(final_off, final_page)
    f.set_rate_limit(0)
    w.complete_precopy()
    w.cleanup()
    f.close()
    return {"later": later, "final": (final_off, final_page), "mid": (mid_bulk, mid_page),
            "parts": bulk_parts + 1, "handlers": handlers}


def test_savevm_stream_loads_into_qemu(tmp_path: Path) -> None:
    src = _Source()
    path = tmp_path / "savevm.mig"
    info = _write_live_stream(path, src)
    data = path.read_bytes()

    # the stream as QEMU will see it: later pages really are in later chunks
    dump = sd.parse_stream(data)
    kinds = [s.type for s in dump.sections if s.idstr == "ram"]
    assert kinds[0] == sd.SECTION_START and kinds[-1] == sd.SECTION_END
    parts = qemu_section_payloads(data, dump, sd.SECTION_PART)
    assert len(parts) == info["parts"] >= 4
    later: dict[int, bytes] = info["later"]  # type: ignore[assignment]
    rewritten_off = src.random_offsets[1]
    assert later[rewritten_off] in parts[-1] and not any(later[rewritten_off] in p for p in parts[:-1])
    final_off, final_page = info["final"]  # type: ignore[misc]
    (end,) = qemu_section_payloads(data, dump, sd.SECTION_END)
    assert final_page in end
    assert dump.machine == Q35 and dump.ram_blocks == [("pc.ram", RAM_SIZE)]

    # QEMU loads it; all of pc.ram outside the 640K-1M hole equals our RAM
    res = harness.try_incoming(path, machine=Q35, memory="64M", read=guest_ranges(), timeout=30)
    assert res.ok, res
    assert res.migrate_status == "completed" and res.runstate == "paused"
    assert res.stderr.strip() == "", res.stderr  # our vmdesc makes QEMU silent
    assert_guest_equals(res.memory, src.buf)
    # the individual pages the test cares about
    mem = res.memory[HOLE[1]]
    lowmem = res.memory[0]

    def guest(off: int) -> bytes:
        return lowmem[off : off + PAGE] if off < HOLE[0] else mem[off - HOLE[1] : off - HOLE[1] + PAGE]

    for off, body in later.items():
        assert guest(off) == body, hex(off)
    assert guest(src.random_offsets[2]) == bytes(PAGE)  # random page zeroed in a later PART
    assert guest(final_off) == final_page
    mid_off, mid_page = info["mid"]  # type: ignore[misc]
    assert guest(mid_off) == mid_page
    for off in src.zero_offsets[1:]:
        assert guest(off) == bytes(PAGE)
    for off in src.random_offsets:
        assert guest(off) == bytes(src.buf[off : off + PAGE]) and any(guest(off)) == (off != src.random_offsets[2])


@pytest.mark.parametrize("backend", ["isal", "zlib-ng"])
def test_savevm_compressed_pages_load_into_qemu(tmp_path: Path, backend: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """COMPRESS_PAGE records from either deflate savevm runs inflate in QEMU 7.2 to the same memory."""
    from savevm_ram import compress
    from savevm_ram.demo import english_like_text

    if backend == "isal":
        pytest.importorskip("isal", reason="the RAM plugin's isal extra is not installed")
    else:
        monkeypatch.setattr(compress, "_isal_compress", lambda: None)
    assert compress.page_compressor(1)[0].startswith(backend)
    buf = bytearray(RAM_SIZE)
    text = english_like_text(5, 8 * MB).tobytes()
    buf[0x100000 : 0x100000 + len(text)] = text  # compressible pages (and some low memory below the hole)
    buf[0x10000 : 0x10000 + 0x8000] = text[: 0x8000]
    reg = savevm.SectionRegistry(savevm.MigrationConfig(machine=Q35).set_capability("compress"))
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", buf)]))
    path = tmp_path / "compressed.mig"
    f = write_file(path)
    savevm.save_stream(f, reg)
    f.close()
    dump = sd.parse_stream(path.read_bytes())
    assert dump.ram_flag_counts.get("COMPRESS_PAGE", 0) >= 2048, dump.ram_flag_counts
    with harness.QemuProcess(machine=Q35, memory="64M", incoming="defer") as vm:
        vm.set_capabilities(compress=True)  # a 7.2 destination refuses compressed pages otherwise
        vm.migrate_incoming(harness.exec_cat_from(path))
        info = vm.wait_incoming_done(60)
        assert info.get("status") == "completed", info
        memory = {a: vm.read_guest_memory(a, n) for a, n in guest_ranges()}
    assert_guest_equals(memory, buf)


# ----------------------------------------------------------------------------- 3. round trip
def test_round_trip_savevm_qemu_savevm(tmp_path: Path) -> None:
    src = _Source(seed=11)
    original = bytes(src.buf)
    first = tmp_path / "savevm.mig"
    reg, _, sent = qemu_registry([("pc.ram", RAM_SIZE)], {"pc.ram": src.buf})
    f = write_file(first)
    savevm.save_stream(f, reg)
    f.close()
    assert sent.counters.normal == len(src.random_offsets) + src.run[1]

    second = tmp_path / "qemu.mig"
    with harness.QemuProcess(machine=Q35, memory="64M", incoming="defer") as vm:
        vm.migrate_incoming(harness.exec_cat_from(first))
        vm.wait_incoming_done(30)
        assert vm.status() == "paused"
        vm.set_parameters(max_bandwidth=0)
        vm.migrate_to_file(second, timeout=30)
        assert vm.status() == "postmigrate"
    dump = sd.parse_stream(second.read_bytes())
    assert dump.ram_blocks == QEMU_64M_BLOCKS

    reg2, ram2, handlers2 = qemu_registry()
    res = load_file(second, reg2)
    assert res.machine == Q35 and ("ram", 0, 4) in res.sections
    back = ram2.find("pc.ram")
    assert back is not None
    assert bytes(back.mv) == original
    assert handlers2.counters.loaded_pages == dump.ram_flag_counts["ZERO"] + dump.ram_flag_counts["PAGE"]


# ----------------------------------------------------------------------------- section ids
def test_default_section_ids_accepted_by_qemu(tmp_path: Path) -> None:
    src = _Source(seed=3)
    path = tmp_path / "ids.mig"
    # regression: ids used to start at 0, which QEMU routes to its first handler ("timer")
    reg, _, _ = qemu_registry([("pc.ram", RAM_SIZE)], {"pc.ram": src.buf})
    assert reg.find("ram", 0).section_id != 0
    f = write_file(path)
    savevm.save_stream(f, reg)
    f.close()
    dump = sd.parse_stream(path.read_bytes())
    assert {s.type for s in dump.sections} >= {sd.SECTION_START, sd.SECTION_PART, sd.SECTION_END}
    res = harness.try_incoming(path, machine=Q35, memory="64M", read=guest_ranges(), timeout=30)
    assert res.ok, res.stderr
    assert_guest_equals(res.memory, src.buf)


# ----------------------------------------------------------------------------- 4. refusal
@vmstate.vmsd("savevm-interop-dev", version_id=1)
@attrs.define
class InteropDevice:
    counter: int = vmstate.field(vmstate.uint32, default=0x11223344)
    flags: int = vmstate.field(vmstate.uint8, default=5)


def test_qemu_refuses_unknown_device_section(tmp_path: Path) -> None:
    path = tmp_path / "dev.mig"
    reg, _, _ = qemu_registry([("pc.ram", RAM_SIZE)])
    reg.register_device("savevm-interop-dev", 0, InteropDevice())
    f = write_file(path)
    savevm.save_stream(f, reg)
    f.close()
    dump = sd.parse_stream(path.read_bytes())
    assert [s.idstr for s in dump.full_sections()] == ["savevm-interop-dev"]

    res = harness.try_incoming(path, machine=Q35, memory="64M", timeout=30)
    assert not res.ok
    assert res.returncode == 1, res
    lines = res.error_lines()
    assert any(ln.startswith("Unknown savevm section or instance 'savevm-interop-dev' 0") for ln in lines), lines
    assert lines[-1].startswith("load of migration failed: Invalid argument"), lines


# ----------------------------------------------------------------------------- savevm analyze
def test_savevm_analyze_reads_qemu_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from savevm.cli import main

    path = tmp_path / "q.mig"
    with harness.QemuProcess(machine=Q35, memory="64M") as vm:
        vm.migrate_to_file(path, timeout=30)
    dump = sd.parse_stream(path.read_bytes())
    assert main(["analyze", str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["status"] == "ok" and rep["machine"] == Q35
    assert rep["ram"]["zero"] == dump.ram_flag_counts["ZERO"]
    assert rep["ram"]["normal"] == dump.ram_flag_counts["PAGE"]
    assert [(b["idstr"], b["used_length"]) for b in rep["ram"]["blocks"]] == dump.ram_blocks
    skipped = [s["idstr"] for s in rep["sections"] if s["how"].startswith("skipped")]
    assert skipped == [s.idstr for s in dump.full_sections()]


# ----------------------------------------------------------------------------- live, over tcp
def test_live_migration_from_savevm_into_qemu_over_tcp() -> None:
    """savevm's Migration (the live engine, not a file) into a QEMU listening on tcp.

    QEMU has no savevm return path: it closes the socket once loaded, and the
    source counts that as done.  A workload thread keeps rewriting pages
    while the migration iterates, so later PARTs carry them.
    """
    import socket
    import threading

    from savevm.migration import Migration

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    src = _Source(seed=21)
    reg, ram, handlers = qemu_registry([("pc.ram", RAM_SIZE)], {"pc.ram": src.buf})
    block = ram.find("pc.ram")
    assert block is not None
    stop = threading.Event()
    paused = threading.Event()

    class Writer:
        def pause(self) -> None:
            paused.set()

        def resume(self) -> None:
            paused.clear()

        def set_throttle(self, percent: int) -> None:
            pass

    def work() -> None:
        rng = np.random.default_rng(5)
        while not stop.is_set() and not paused.is_set():
            off = int(rng.integers(0x200000 // PAGE, RAM_SIZE // PAGE)) * PAGE
            block.write(off, rng.bytes(64))
            time.sleep(0.01)  # ~400 KB/s of dirtied pages: converges at 2 MB/s

    with harness.QemuProcess(machine=Q35, memory="64M", incoming=f"tcp:127.0.0.1:{port}") as vm:
        t = threading.Thread(target=work)
        t.start()
        cfg = reg.config.set_parameter("max-bandwidth", "2M")
        mig = Migration(reg, f"tcp:127.0.0.1:{port}", guest=Writer(), config=cfg)
        mig.start()
        try:
            st = mig.wait(60)
        finally:
            if mig.is_running():
                mig.cancel()
            stop.set()
            t.join()
        assert st.status == "completed" and st.iterations and st.iterations > 1
        vm.wait_incoming_done(30)
        assert vm.status() == "paused"
        memory = {gpa: vm.read_guest_memory(gpa, size) for gpa, size in guest_ranges()}
    assert_guest_equals(memory, src.buf)


def test_live_migration_from_qemu_into_savevm_over_tcp(tmp_path: Path) -> None:
    """A real QEMU migrates live (tcp) into savevm's Incoming.

    QEMU's device sections are skipped by size, using the vmdesc of an
    earlier file migration of the same machine (``savevm incoming --vmdesc``).
    """
    from savevm.migration import Incoming

    ref = tmp_path / "ref.mig"
    payload = np.frombuffer(np.random.default_rng(8).bytes(16 * PAGE), dtype=np.uint8).tobytes()
    blob = tmp_path / "payload.bin"
    blob.write_bytes(payload)
    loader = harness.loader_args(str(blob), 0x300000)
    with harness.QemuProcess(machine=Q35, memory="64M", extra_args=loader) as vm:
        vm.migrate_to_file(ref, timeout=30)
    reg, ram, handlers = qemu_registry()
    inc = Incoming(reg, "tcp:127.0.0.1:0")
    inc.vmdesc = read_vmdesc(str(ref))
    uri = inc.listen()
    inc.start()
    with harness.QemuProcess(machine=Q35, memory="64M", extra_args=loader) as vm:
        vm.set_parameters(max_bandwidth=0)
        vm.migrate(uri, timeout=30)
    st = inc.wait(30)
    assert st.status == "completed", inc.error
    pc = ram.find("pc.ram")
    assert pc is not None and bytes(pc.mv[0x300000 : 0x300000 + 16 * PAGE]) == payload
    assert handlers.counters.loaded_pages >= 64 << 20 >> 12


def test_cli_incoming_from_live_qemu_with_auto_created_blocks(tmp_path: Path) -> None:
    """`savevm incoming --vmdesc REF --guest savevm.cli.qemu_guest:QemuGuest` takes a live QEMU."""
    import subprocess
    import sys

    ref = tmp_path / "ref.mig"
    payload = np.frombuffer(np.random.default_rng(12).bytes(8 * PAGE), dtype=np.uint8).tobytes()
    blob = tmp_path / "payload.bin"
    blob.write_bytes(payload)
    loader = harness.loader_args(str(blob), 0x400000)
    with harness.QemuProcess(machine=Q35, memory="64M", extra_args=loader) as vm:
        vm.migrate_to_file(ref, timeout=30)
    dump_dir = tmp_path / "blocks"
    proc = subprocess.Popen(
        [sys.executable, "-m", "savevm.cli", "incoming", "tcp:127.0.0.1:0", "--print-uri", "--json",
         "--machine", Q35, "--vmdesc", str(ref), "--timeout", "60",
         "--guest", "savevm.cli.qemu_guest:QemuGuest", "--guest-arg", f"dump_dir={dump_dir}"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        with harness.QemuProcess(machine=Q35, memory="64M", extra_args=loader) as vm:
            vm.set_parameters(max_bandwidth=0)
            vm.migrate(uri, timeout=30)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    rep = json.loads(out.strip().splitlines()[-1])
    blocks = rep["guest"]["blocks"]
    assert {name: b["used_length"] for name, b in blocks.items()} == dict(QEMU_64M_BLOCKS)
    pc_ram = (dump_dir / "pc.ram").read_bytes()
    assert len(pc_ram) == 64 << 20 and pc_ram[0x400000 : 0x400000 + 8 * PAGE] == payload
    assert (dump_dir / "rom@etc" / "acpi" / "rsdp").exists()
