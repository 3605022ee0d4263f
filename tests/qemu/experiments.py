"""Re-runnable experiments against the real QEMU 7.2 whose results are in FINDINGS.md.

Usage: ``python3 tests/qemu/experiments.py [NAME ...]`` (default: all but ``timing``);
set SAVEVM_KEEP=1 to keep the stream files.
Each experiment prints what it ran and what QEMU said.  Stdlib only.
"""
from __future__ import annotations

import os
import shlex
import shutil
import statistics
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
import streamdump as sd  # noqa: E402

Q35 = "pc-q35-7.2"
I440 = "pc-i440fx-7.2"
MB = 1 << 20
PC_RAM_64M = {"pc.ram": 64 * MB}
QEMU_64M_BLOCKS = {  # as QEMU 7.2 sends them for -m 64M, in its order
    "pc.ram": 0x4000000,
    "/rom@etc/acpi/tables": 0x20000,
    "pc.bios": 0x40000,
    "pc.rom": 0x20000,
    "/rom@etc/table-loader": 0x1000,
    "/rom@etc/acpi/rsdp": 0x1000,
}

TMP = tempfile.mkdtemp(prefix="savevm-exp-")


def page(tag: int) -> bytes:
    """A recognisable non-zero page: tag byte, then a counter pattern."""
    return bytes([tag]) * 16 + bytes((i * 7 + tag) & 0xFF for i in range(4080))


def stream_file(name: str, data: bytes) -> str:
    p = os.path.join(TMP, name)
    with open(p, "wb") as fh:
        fh.write(data)
    return p


def run_incoming(name: str, data: bytes, machine: str = Q35, memory: str = "64M",
                 read=(), **kw) -> h.IncomingResult:
    path = stream_file(name + ".mig", data)
    r = h.try_incoming(path, machine, memory, read=read, **kw)
    print(f"--- {name}: ok={r.ok} migrate={r.migrate_status} runstate={r.runstate} rc={r.returncode}")
    for ln in r.error_lines():
        print(f"    stderr: {ln}")
    return r


# --------------------------------------------------------------------------------------------
def exp_dump() -> None:
    """(a) migrate a paused 64M guest to a file and dump it."""
    for m in (Q35, I440):
        path = os.path.join(TMP, f"{m}.mig")
        with h.QemuProcess(machine=m, memory="64M") as vm:
            before = vm.status()
            info = vm.migrate_to_file(path)
            after = vm.status()
        print(f"=== {m}: status before {before}, after {after}; query-migrate ram={info['ram']}")
        sd.main([path])


def exp_machine_alias() -> None:
    """Which name goes into the configuration record for -machine q35 / pc?"""
    for alias in ("q35", "pc"):
        path = os.path.join(TMP, f"alias-{alias}.mig")
        with h.QemuProcess(machine=alias) as vm:
            vm.migrate_to_file(path)
        with open(path, "rb") as fh:
            print(f"-machine {alias} -> configuration machine "
                  f"{sd.parse_stream(fh.read()).machine!r}")


def exp_minimal() -> None:
    """(b) minimal stream: header, config, ram START/END, EOF only."""
    pages = {("pc.ram", 0x0): page(0x11), ("pc.ram", 0x1000): page(0x22),
             ("pc.ram", 0x100000): page(0x33), ("pc.ram", 0x3FFF000): page(0x44),
             ("pc.ram", 0x2000): bytes(4096)}
    read = [(off, 4096) for (_, off) in pages]
    for m in (Q35, I440):
        for defer in (True, False):
            data = sd.minimal_stream(m, PC_RAM_64M, pages)
            r = run_incoming(f"minimal-{m}-defer{defer}", data, m, read=read, defer=defer)
            if r.ok:
                print("    pages at pc.ram offset == GPA:",
                      all(r.memory[off] == body for (_, off), body in pages.items()))
    data = sd.minimal_stream(Q35, PC_RAM_64M, pages, with_vmdesc=True)
    run_incoming("minimal+empty-vmdesc", data)
    data = sd.minimal_stream(Q35, PC_RAM_64M, pages, pages_section=sd.SECTION_PART)
    data = data[:-1] + bytes([sd.SECTION_END]) + struct.pack(">I", 2) + struct.pack(">Q", 0x10) \
        + bytes([0x7E]) + struct.pack(">I", 2) + b"\x00"
    r = run_incoming("pages-in-PART-then-empty-END", data, read=[(0x1000, 4096)])
    print("    page ok:", r.ok and r.memory[0x1000] == page(0x22))
    data = sd.minimal_stream(Q35, PC_RAM_64M, pages, pages_section=sd.SECTION_PART)
    run_incoming("pages-in-PART-no-END", data)
    data = sd.minimal_stream(Q35, PC_RAM_64M, pages, section_id=77)
    run_incoming("section-id-77", data)
    # pages inside the START chunk, right after MEM_SIZE, then EOS; no PART/END
    w = sd.StreamWriter().header().configuration(Q35)
    w.section_header(sd.SECTION_START, 2, "ram", 0, 4).ram_mem_size(PC_RAM_64M)
    w.ram_page("pc.ram", 0x5000, page(0x55)).ram_eos().footer(2).eof()
    r = run_incoming("pages-in-START-only", w.bytes(), read=[(0x5000, 4096)])
    print("    page ok:", r.ok and r.memory[0x5000] == page(0x55))
    # the whole QEMU block list, pages only for pc.ram
    data = sd.minimal_stream(Q35, QEMU_64M_BLOCKS, {("pc.ram", 0x1000): page(0x22)})
    run_incoming("all-6-blocks", data)
    # blocks in a different order
    blocks = dict(reversed(list(QEMU_64M_BLOCKS.items())))
    run_incoming("all-6-blocks-reversed", sd.minimal_stream(Q35, blocks, {}))
    run_incoming("only-pc.bios", sd.minimal_stream(Q35, {"pc.bios": 0x40000}, {}))
    # no blocks at all (MEM_SIZE total 0)
    run_incoming("no-blocks-total-0", sd.minimal_stream(Q35, {}, {}))
    # fill byte != 0 in a ZERO record
    w = sd.StreamWriter().header().configuration(Q35)
    w.section_header(sd.SECTION_START, 2, "ram", 0, 4).ram_mem_size(PC_RAM_64M).ram_eos().footer(2)
    w.section_header(sd.SECTION_END, 2)
    w.raw(struct.pack(">Q", 0x3000 | 0x02) + b"\x06pc.ram" + b"\xab").ram_eos().footer(2).eof()
    r = run_incoming("zero-record-fill-0xab", w.bytes(), read=[(0x3000, 16)])
    print("    memory:", r.memory.get(0x3000, b"").hex())
    # no ram section at all
    run_incoming("no-ram-section", sd.StreamWriter().header().configuration(Q35).eof().bytes())


def exp_memory_map() -> None:
    """Where do pc.ram offsets appear in guest-physical space?"""
    offs = [0x9F000, 0xA0000, 0xC0000, 0xE0000, 0xF0000, 0x100000]
    pages = {("pc.ram", o): page(0x60 + i) for i, o in enumerate(offs)}
    for m in (Q35, I440):
        r = run_incoming(f"map-{m}", sd.minimal_stream(m, PC_RAM_64M, pages), m,
                         read=[(o, 4096) for o in offs])
        for o in offs:
            print(f"    {m} pc.ram+{o:#x} at GPA {o:#x}: {r.memory[o] == pages[('pc.ram', o)]}"
                  f" (first bytes {r.memory[o][:4].hex()})")
    # large guest: q35 splits low RAM at 2 GiB when RAM >= 0xb0000000, i440fx at 3 GiB (>= 0xe0000000)
    for m, mem, size in ((Q35, "3G", 3 << 30), (I440, "4G", 4 << 30)):
        lows = {Q35: 0x80000000, I440: 0xC0000000}[m]  # i440fx: gigabyte_align
        pages = {("pc.ram", lows - 0x1000): page(0x71), ("pc.ram", lows): page(0x72)}
        r = run_incoming(f"map-{m}-{mem}", sd.minimal_stream(m, {"pc.ram": size}, pages), m, mem,
                         read=[(lows - 0x1000, 4096), (0x100000000, 4096)])
        if r.ok:
            print(f"    pc.ram+{lows - 0x1000:#x} at same GPA:",
                  r.memory[lows - 0x1000] == page(0x71))
            print(f"    pc.ram+{lows:#x} at GPA 0x100000000:", r.memory[0x100000000] == page(0x72))


def exp_errors() -> None:
    """(b) error messages for malformed streams."""
    good = sd.minimal_stream(Q35, PC_RAM_64M, {("pc.ram", 0x1000): page(0x22)})
    run_incoming("wrong-machine", sd.minimal_stream(I440, PC_RAM_64M, {}))
    run_incoming("machine-alias-q35", sd.minimal_stream("q35", PC_RAM_64M, {}))
    run_incoming("machine-prefix-pc-q35", sd.minimal_stream("pc-q35", PC_RAM_64M, {}))
    run_incoming("unknown-ramblock", sd.minimal_stream(Q35, {"foo": 0x1000}, {}))
    run_incoming("pc.ram-wrong-length", sd.minimal_stream(Q35, {"pc.ram": 32 * MB}, {}))
    run_incoming("total-is-qemu-total-but-only-pc.ram-listed",
                 sd.minimal_stream(Q35, PC_RAM_64M, {}, total=sum(QEMU_64M_BLOCKS.values())))
    run_incoming("total-smaller-than-listed",
                 sd.minimal_stream(Q35, {"pc.ram": 64 * MB, "pc.bios": 0x40000}, {},
                                   total=64 * MB))
    run_incoming("no-footers", sd.minimal_stream(Q35, PC_RAM_64M, {}, footers=False))
    bad_footer = good.replace(b"\x7e\x00\x00\x00\x02", b"\x7e\x00\x00\x00\x03", 1)
    run_incoming("footer-wrong-id", bad_footer)
    run_incoming("ram-version-5", sd.minimal_stream(Q35, PC_RAM_64M, {}, ram_version=5))
    run_incoming("ram-version-3", sd.minimal_stream(Q35, PC_RAM_64M, {}, ram_version=3))
    run_incoming("file-version-2", good[:4] + struct.pack(">I", 2) + good[8:])
    run_incoming("file-version-4", good[:4] + struct.pack(">I", 4) + good[8:])
    run_incoming("bad-magic", b"XXXX" + good[4:])
    run_incoming("no-configuration", good[:8] + good[8 + 1 + 4 + len(Q35):])
    run_incoming("no-EOF", sd.minimal_stream(Q35, PC_RAM_64M, {}, with_eof=False))
    run_incoming("truncated-mid-page", good[: len(good) - 3000])
    run_incoming("empty-file", b"", timeout=5)
    run_incoming("header-only", good[:8], timeout=5)
    off = sd.minimal_stream(Q35, PC_RAM_64M, {("pc.ram", 64 * MB): page(1)})
    run_incoming("offset-beyond-block", off)
    # CONTINUE on the first page record
    w = sd.StreamWriter().header().configuration(Q35)
    w.section_header(sd.SECTION_START, 2, "ram", 0, 4).ram_mem_size(PC_RAM_64M).ram_eos().footer(2)
    w.section_header(sd.SECTION_END, 2).raw(struct.pack(">Q", 0x1000 | 0x08 | 0x20) + page(1))
    w.ram_eos().footer(2).eof()
    run_incoming("continue-first", w.bytes())
    for flag, name in ((0x01, "FULL"), (0x40, "XBZRLE"), (0x80, "HOOK"), (0x100, "COMPRESS_PAGE"),
                       (0x200, "0x200"), (0x0A, "ZERO|PAGE")):
        w = sd.StreamWriter().header().configuration(Q35)
        w.section_header(sd.SECTION_START, 2, "ram", 0, 4).ram_mem_size(PC_RAM_64M).ram_eos()
        w.footer(2).section_header(sd.SECTION_END, 2)
        w.raw(struct.pack(">Q", 0x1000 | flag) + b"\x06pc.ram" + page(1)).ram_eos().footer(2).eof()
        run_incoming(f"ram-flag-{name}", w.bytes())
    # PART for a section id never STARTed
    w = sd.StreamWriter().header().configuration(Q35)
    w.section_header(sd.SECTION_PART, 9).ram_eos().footer(9).eof()
    run_incoming("part-unknown-id", w.bytes())
    # unknown FULL device
    w = sd.StreamWriter().header().configuration(Q35)
    w.section_header(sd.SECTION_FULL, 50, "nosuchdev", 0, 1).footer(50).eof()
    run_incoming("unknown-device", w.bytes())
    w = sd.StreamWriter().header().configuration(Q35).raw(b"\x09").eof()
    run_incoming("unknown-section-type-9", w.bytes())
    w = sd.StreamWriter().header().configuration(Q35).raw(b"\x05").eof()
    run_incoming("subsection-at-top-level", w.bytes())
    # COMMAND records
    w = sd.StreamWriter().header().configuration(Q35).raw(b"\x08\x00\x00\x00\x00").eof()
    run_incoming("command-invalid", w.bytes())
    w = sd.StreamWriter().header().configuration(Q35).raw(b"\x08\x00\x02\x00\x04\x00\x00\x00\x01")
    run_incoming("command-ping-no-return-path", w.eof().bytes())
    w = sd.StreamWriter().header().configuration(Q35).raw(b"\x08\x00\x02\x00\x03abc").eof()
    run_incoming("command-ping-bad-len", w.bytes())
    # garbage after EOF instead of vmdesc
    run_incoming("junk-after-EOF", good + b"\x42junk")


def exp_globalstate() -> None:
    """(b/d) is globalstate needed; what is the run state after the load?"""
    pages = {("pc.ram", 0x1000): page(0x22)}

    def gs(state: str) -> bytes:
        w = sd.StreamWriter().section_header(sd.SECTION_FULL, 39, "globalstate", 0, 1)
        s = state.encode()
        w.raw(struct.pack(">I", len(s) + 1) + s.ljust(100, b"\x00")).footer(39)
        return w.bytes()

    for name, extra in (("none", b""), ("running", gs("running")), ("paused", gs("paused"))):
        for stopped in (True, False):
            data = sd.minimal_stream(Q35, PC_RAM_64M, pages, extra_full_sections=extra,
                                     with_vmdesc=True)
            run_incoming(f"globalstate-{name}-S{stopped}", data, stopped=stopped)
    # -incoming exec with -S: status during/after
    with h.QemuProcess(machine=Q35, incoming="defer") as vm:
        print("    -incoming defer, before migrate-incoming: status", vm.status())


def exp_roundtrip() -> None:
    """(c) QEMU loads our minimal stream, then migrates out; pages are in its stream."""
    pages = {("pc.ram", 0x1000): page(0x22), ("pc.ram", 0x200000): page(0x33)}
    src = stream_file("rt-in.mig", sd.minimal_stream(Q35, PC_RAM_64M, pages))
    out = os.path.join(TMP, "rt-out.mig")
    with h.QemuProcess(machine=Q35, incoming="defer") as vm:
        vm.migrate_incoming(h.exec_cat_from(src))
        vm.wait_incoming_done()
        print("    after load:", vm.status())
        info = vm.migrate_to_file(out)
        print("    after migrate out:", vm.status(), info["status"])
    with open(out, "rb") as fh:
        d = sd.parse_stream(fh.read(), keep_pages=True)
    for k, body in pages.items():
        print(f"    {k} in second stream: {d.pages.get(k) == body}")
    print("    second stream ram flags:", dict(d.ram_flag_counts), "sections:",
          len(d.sections), "vmdesc:", d.vmdesc is not None)
    # and a second load of QEMU's own file
    r = run_incoming("reload-qemu-output", open(out, "rb").read(), read=[(0x1000, 4096)])
    print("    page after reload:", r.ok and r.memory[0x1000] == page(0x22))


def exp_loader() -> None:
    """-device loader: where do the bytes land, do they migrate?"""
    blob = stream_file("blob.bin", page(0x5A) + page(0x5B))
    out = os.path.join(TMP, "loader-out.mig")
    for addr in (0x100000, 0x7000):
        with h.QemuProcess(machine=Q35, extra_args=h.loader_args(blob, addr)) as vm:
            mem = vm.read_guest_memory(addr, 8192)
            print(f"    loader @ {addr:#x}: pmemsave matches: {mem == page(0x5A) + page(0x5B)}")
            vm.migrate_to_file(out)
        with open(out, "rb") as fh:
            d = sd.parse_stream(fh.read(), keep_pages=True)
        print(f"    in stream as pc.ram {addr:#x}: {d.pages.get(('pc.ram', addr)) == page(0x5A)}, "
              f"{addr + 0x1000:#x}: {d.pages.get(('pc.ram', addr + 0x1000)) == page(0x5B)}")
    # loader + incoming: does the incoming stream overwrite / keep loader bytes?
    src = stream_file("ld-in.mig", sd.minimal_stream(Q35, PC_RAM_64M, {("pc.ram", 0x100000): page(1)}))
    with h.QemuProcess(machine=Q35, incoming="defer",
                       extra_args=h.loader_args(blob, 0x100000)) as vm:
        print("    loader+incoming before load:",
              vm.read_guest_memory(0x100000, 4096) == page(0x5A))
        vm.migrate_incoming(h.exec_cat_from(src))
        vm.wait_incoming_done()
        print("    after load: page 0x100000 from stream:",
              vm.read_guest_memory(0x100000, 4096) == page(1),
              "page 0x101000 (not in stream) still loader's:",
              vm.read_guest_memory(0x101000, 4096) == page(0x5B))
    # data= form: 4 bytes
    with h.QemuProcess(machine=Q35, extra_args=["-device", "loader,addr=0x8000,data=0x11223344,"
                                                 "data-len=4"]) as vm:
        print("    loader data=0x11223344 data-len=4 at 0x8000:",
              vm.read_guest_memory(0x8000, 4).hex())


def exp_timing() -> None:
    """(e) 1 GiB of zero pages to /dev/null, max-bandwidth 0, median of 3."""
    for m in (Q35,):
        times, totals = [], []
        for _ in range(3):
            with h.QemuProcess(machine=m, memory="1G") as vm:
                vm.set_parameters(max_bandwidth=0)
                t0 = time.monotonic()
                info = vm.migrate("exec:cat > /dev/null", timeout=120)
                times.append(time.monotonic() - t0)
                totals.append(info)
        print(f"    {m} -m 1G: wall {[f'{t:.3f}' for t in times]} median "
              f"{statistics.median(times):.3f}s; total-time ms "
              f"{[i['total-time'] for i in totals]}; ram {totals[0]['ram']}")
        with h.QemuProcess(machine=m, memory="1G") as vm:
            t0 = time.monotonic()
            info = vm.migrate("exec:cat > /dev/null", timeout=120)
            print(f"    default max-bandwidth (128 MiB/s): wall {time.monotonic() - t0:.3f}s "
                  f"total-time {info['total-time']} ms")


EXPERIMENTS = {
    "dump": exp_dump, "alias": exp_machine_alias, "minimal": exp_minimal,
    "map": exp_memory_map, "errors": exp_errors, "globalstate": exp_globalstate,
    "roundtrip": exp_roundtrip, "loader": exp_loader, "timing": exp_timing,
}


def main(argv: list[str]) -> int:
    if h.find_qemu() is None:
        print("qemu-system-x86_64 not found")
        return 1
    print(h.qemu_version())
    names = argv or [n for n in EXPERIMENTS if n != "timing"]
    for n in names:
        print(f"\n##### {n}: {EXPERIMENTS[n].__doc__}")
        EXPERIMENTS[n]()
    if os.environ.get("SAVEVM_KEEP"):
        print(f"\n(files kept in {shlex.quote(TMP)})")
    else:
        shutil.rmtree(TMP, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
