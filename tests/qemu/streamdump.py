"""Independent, throwaway QEMU 7.2 migration-stream reader and writer (stdlib only).

Deliberately separate from the ``savevm`` package so it can serve as a second
opinion in tests.  Reads everything a default x86 precopy stream contains:
header, configuration, START/PART/END/FULL sections with footers, the RAM
section's records, QEMU_VM_COMMAND records, EOF and the VM description.
FULL device sections are skipped using the sizes in the vmdesc JSON (as
analyze-migration.py does), or, without a vmdesc, by scanning for the footer.

Usage: ``python3 streamdump.py FILE [--pages] [--json]``
"""
from __future__ import annotations

import json
import struct
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAGIC = 0x5145564D
VERSION = 3

EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
FOOTER = 0x7E

SECTION_NAMES = {
    SECTION_START: "START",
    SECTION_PART: "PART",
    SECTION_END: "END",
    SECTION_FULL: "FULL",
}

PAGE_SIZE = 4096
PAGE_MASK = ~(PAGE_SIZE - 1)

RAM_FLAG_FULL = 0x01
RAM_FLAG_ZERO = 0x02
RAM_FLAG_MEM_SIZE = 0x04
RAM_FLAG_PAGE = 0x08
RAM_FLAG_EOS = 0x10
RAM_FLAG_CONTINUE = 0x20
RAM_FLAG_XBZRLE = 0x40
RAM_FLAG_HOOK = 0x80
RAM_FLAG_COMPRESS_PAGE = 0x100

RAM_FLAG_NAMES = {
    RAM_FLAG_FULL: "FULL",
    RAM_FLAG_ZERO: "ZERO",
    RAM_FLAG_MEM_SIZE: "MEM_SIZE",
    RAM_FLAG_PAGE: "PAGE",
    RAM_FLAG_EOS: "EOS",
    RAM_FLAG_XBZRLE: "XBZRLE",
    RAM_FLAG_HOOK: "HOOK",
    RAM_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
}


class StreamError(Exception):
    """The stream is malformed (message says where)."""


@dataclass
class Section:
    type: int
    section_id: int
    offset: int  # offset of the type byte
    idstr: str | None = None  # START/FULL only (PART/END: filled from the START)
    instance_id: int | None = None
    version_id: int | None = None
    data_offset: int = 0
    data_length: int = 0
    footer: bool = False

    @property
    def type_name(self) -> str:
        return SECTION_NAMES.get(self.type, hex(self.type))


@dataclass
class StreamDump:
    size: int = 0
    magic: int = 0
    version: int = 0
    machine: str | None = None
    configuration_raw: bytes = b""
    sections: list[Section] = field(default_factory=list)
    ram_total: int | None = None
    ram_blocks: list[tuple[str, int]] = field(default_factory=list)
    ram_flag_counts: Counter = field(default_factory=Counter)
    ram_continue_count: int = 0
    #: page records by kind name: header (8) + body bytes; block names counted apart
    ram_kind_bytes: Counter = field(default_factory=Counter)
    ram_name_count: int = 0
    ram_name_bytes: int = 0
    pages: dict[tuple[str, int], bytes] = field(default_factory=dict)
    commands: list[tuple[int, bytes]] = field(default_factory=list)
    eof_offset: int | None = None
    vmdesc: dict[str, Any] | None = None
    vmdesc_offset: int | None = None
    trailing: bytes = b""

    def section_ids(self, idstr: str) -> set[int]:
        return {s.section_id for s in self.sections if s.idstr == idstr}

    def full_sections(self) -> list[Section]:
        return [s for s in self.sections if s.type == SECTION_FULL]

    def summary(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "magic": hex(self.magic),
            "version": self.version,
            "machine": self.machine,
            "configuration_raw_hex": self.configuration_raw.hex(),
            "sections": [
                {
                    "type": s.type_name,
                    "id": s.section_id,
                    "idstr": s.idstr,
                    "instance": s.instance_id,
                    "version": s.version_id,
                    "offset": s.offset,
                    "data_length": s.data_length,
                }
                for s in self.sections
            ],
            "ram_total": self.ram_total,
            "ram_blocks": self.ram_blocks,
            "ram_blocks_sum": sum(n for _, n in self.ram_blocks),
            "ram_flag_counts": dict(self.ram_flag_counts),
            "ram_continue_count": self.ram_continue_count,
            "commands": [(c, d.hex()) for c, d in self.commands],
            "eof_offset": self.eof_offset,
            "vmdesc_present": self.vmdesc is not None,
            "vmdesc_offset": self.vmdesc_offset,
            "vmdesc_devices": len(self.vmdesc["devices"]) if self.vmdesc else None,
            "trailing_len": len(self.trailing),
        }


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise StreamError(f"truncated at offset {self.pos}: wanted {n} bytes")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def be16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def be32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def be64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def counted(self) -> str:
        n = self.u8()
        return self.take(n).decode("latin-1")

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < len(self.data) else None


# --- vmdesc-driven sizes ---------------------------------------------------------------------
def _fields_size(fields: Iterable[dict[str, Any]]) -> int:
    total = 0
    for f in fields:
        total += f["size"] * f.get("array_len", 1)
    return total


def _subsections_size(subs: Iterable[dict[str, Any]]) -> int:
    total = 0
    for s in subs:
        total += 1 + 1 + len(s["vmsd_name"]) + 4
        total += _fields_size(s.get("fields", []))
        total += _subsections_size(s.get("subsections", []))
    return total


def vmdesc_device_size(dev: dict[str, Any]) -> int:
    """Bytes of a FULL section's data according to the vmdesc entry."""
    return _fields_size(dev.get("fields", [])) + _subsections_size(dev.get("subsections", []))


def find_vmdesc(data: bytes, eof_offset: int | None = None) -> tuple[int, dict[str, Any]] | None:
    """Locate and decode the VMDESCRIPTION record (after EOF)."""
    if eof_offset is not None:
        pos = eof_offset + 1
        if pos + 5 <= len(data) and data[pos] == VMDESCRIPTION:
            (n,) = struct.unpack(">I", data[pos + 1 : pos + 5])
            return pos, json.loads(data[pos + 5 : pos + 5 + n])
        return None
    # Like analyze-migration.py: last '{"page_size"' preceded by 0x06 + be32 len.
    idx = data.rfind(b'{"page_size"')
    while idx >= 5:
        if data[idx - 5] == VMDESCRIPTION:
            (n,) = struct.unpack(">I", data[idx - 4 : idx])
            if idx + n <= len(data):
                return idx - 5, json.loads(data[idx : idx + n])
        idx = data.rfind(b'{"page_size"', 0, idx)
    return None


# --- RAM ---------------------------------------------------------------------------------------
def _parse_ram(r: _Reader, dump: StreamDump, keep_pages: bool, state: dict[str, Any]) -> None:
    while True:
        v = r.be64()
        flags = v & (PAGE_SIZE - 1)
        addr = v & PAGE_MASK
        kind = flags & ~RAM_FLAG_CONTINUE
        if flags & RAM_FLAG_CONTINUE:
            dump.ram_continue_count += 1
        name = RAM_FLAG_NAMES.get(kind, hex(kind))
        dump.ram_flag_counts[name] += 1
        if kind == RAM_FLAG_MEM_SIZE:
            dump.ram_total = addr
            seen = 0
            while seen < addr:
                bname = r.counted()
                blen = r.be64()
                dump.ram_blocks.append((bname, blen))
                seen += blen
            if seen != addr:
                raise StreamError(f"MEM_SIZE blocks sum {seen} != total {addr}")
            continue
        if kind == RAM_FLAG_EOS:
            return
        if kind == RAM_FLAG_HOOK:
            continue
        if kind in (RAM_FLAG_ZERO, RAM_FLAG_PAGE, RAM_FLAG_XBZRLE, RAM_FLAG_COMPRESS_PAGE):
            if flags & RAM_FLAG_CONTINUE:
                if state.get("block") is None:
                    raise StreamError(f"CONTINUE without a previous block at {r.pos - 8}")
            else:
                before = r.pos
                state["block"] = r.counted()
                dump.ram_name_count += 1
                dump.ram_name_bytes += r.pos - before
            block = state["block"]
            body_start = r.pos
            if kind == RAM_FLAG_ZERO:
                fill = r.u8()
                if keep_pages:
                    dump.pages[(block, addr)] = bytes([fill]) * PAGE_SIZE
            elif kind == RAM_FLAG_PAGE:
                body = r.take(PAGE_SIZE)
                if keep_pages:
                    dump.pages[(block, addr)] = body
            elif kind == RAM_FLAG_XBZRLE:
                r.u8()
                r.take(r.be16())
            else:
                r.take(r.be32())
            dump.ram_kind_bytes[name] += 8 + r.pos - body_start
            continue
        raise StreamError(f"unknown RAM flags {flags:#x} at offset {r.pos - 8}")


# --- top level ---------------------------------------------------------------------------------
def parse_stream(data: bytes, keep_pages: bool = False) -> StreamDump:
    dump = StreamDump(size=len(data))
    r = _Reader(data)
    dump.magic = r.be32()
    if dump.magic != MAGIC:
        raise StreamError(f"bad magic {dump.magic:#x}")
    dump.version = r.be32()
    if dump.version != VERSION:
        raise StreamError(f"unsupported version {dump.version}")
    pre = find_vmdesc(data)
    vm_devices = list(pre[1]["devices"]) if pre else None
    by_id: dict[int, Section] = {}
    ram_state: dict[str, Any] = {}
    while True:
        off = r.pos
        t = r.u8()
        if t == CONFIGURATION:
            n = r.be32()
            dump.machine = r.take(n).decode("latin-1")
            # configuration subsections (0x05 "configuration/...") are kept raw
            start = r.pos
            while r.peek() == SUBSECTION and data[r.pos + 2 : r.pos + 2 + 14] == b"configuration/":
                r.u8()
                sub = r.counted()
                r.be32()
                if sub == "configuration/target-page-bits":
                    r.be32()
                elif sub == "configuration/capabilities":
                    for _ in range(r.be32()):
                        r.counted()
                elif sub == "configuration/uuid":
                    r.take(16)
                else:
                    raise StreamError(f"unknown configuration subsection {sub!r}")
            dump.configuration_raw = data[off : r.pos]
            del start
            continue
        if t == COMMAND:
            cmd = r.be16()
            dump.commands.append((cmd, r.take(r.be16())))
            continue
        if t == EOF:
            dump.eof_offset = off
            break
        if t not in SECTION_NAMES:
            raise StreamError(f"unknown section type {t:#x} at offset {off}")
        sid = r.be32()
        sec = Section(type=t, section_id=sid, offset=off)
        if t in (SECTION_START, SECTION_FULL):
            sec.idstr = r.counted()
            sec.instance_id = r.be32()
            sec.version_id = r.be32()
            by_id[sid] = sec
        else:
            if sid not in by_id:
                raise StreamError(f"{sec.type_name} for unknown section id {sid} at {off}")
            sec.idstr = by_id[sid].idstr
            sec.instance_id = by_id[sid].instance_id
            sec.version_id = by_id[sid].version_id
        sec.data_offset = r.pos
        if sec.idstr == "ram":
            _parse_ram(r, dump, keep_pages, ram_state)
        elif t == SECTION_FULL and vm_devices:
            dev = vm_devices.pop(0)
            if (dev["name"], dev["instance_id"]) != (sec.idstr, sec.instance_id):
                raise StreamError(f"vmdesc order mismatch: {dev['name']} vs {sec.idstr}")
            r.take(vmdesc_device_size(dev))
        else:
            # No description: scan for footer 0x7e + be32(sid) followed by a plausible byte.
            pat = bytes([FOOTER]) + struct.pack(">I", sid)
            p = r.pos
            while True:
                p = data.find(pat, p)
                if p < 0:
                    raise StreamError(f"no footer for section {sid} ({sec.idstr})")
                nxt = data[p + 5] if p + 5 < len(data) else None
                if nxt in (EOF, SECTION_PART, SECTION_END, SECTION_FULL, COMMAND):
                    break
                p += 1
            r.pos = p
        sec.data_length = r.pos - sec.data_offset
        if r.peek() == FOOTER:
            r.u8()
            fid = r.be32()
            if fid != sid:
                raise StreamError(f"footer id {fid} != section id {sid} at {r.pos - 5}")
            sec.footer = True
        else:
            raise StreamError(f"missing footer for section {sid} ({sec.idstr}) at {r.pos}")
        dump.sections.append(sec)
    vd = find_vmdesc(data, dump.eof_offset)
    if vd is not None:
        dump.vmdesc_offset, dump.vmdesc = vd
        (n,) = struct.unpack(">I", data[vd[0] + 1 : vd[0] + 5])
        dump.trailing = data[vd[0] + 5 + n :]
    else:
        dump.trailing = data[dump.eof_offset + 1 :]
    return dump


# --- writer -----------------------------------------------------------------------------------
class StreamWriter:
    """Build a QEMU 7.2 precopy stream piece by piece."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.last_block: str | None = None

    def raw(self, b: bytes) -> StreamWriter:
        self.buf += b
        return self

    def header(self, magic: int = MAGIC, version: int = VERSION) -> StreamWriter:
        return self.raw(struct.pack(">II", magic, version))

    def configuration(self, machine: str) -> StreamWriter:
        m = machine.encode()
        return self.raw(bytes([CONFIGURATION]) + struct.pack(">I", len(m)) + m)

    def section_header(
        self, t: int, sid: int, idstr: str = "", instance: int = 0, version: int = 0
    ) -> StreamWriter:
        self.raw(bytes([t]) + struct.pack(">I", sid))
        if t in (SECTION_START, SECTION_FULL):
            b = idstr.encode()
            self.raw(bytes([len(b)]) + b + struct.pack(">II", instance, version))
        return self

    def footer(self, sid: int) -> StreamWriter:
        return self.raw(bytes([FOOTER]) + struct.pack(">I", sid))

    def ram_mem_size(self, blocks: dict[str, int], total: int | None = None) -> StreamWriter:
        total = sum(blocks.values()) if total is None else total
        self.raw(struct.pack(">Q", total | RAM_FLAG_MEM_SIZE))
        for name, length in blocks.items():
            b = name.encode()
            self.raw(bytes([len(b)]) + b + struct.pack(">Q", length))
        return self

    def ram_eos(self) -> StreamWriter:
        return self.raw(struct.pack(">Q", RAM_FLAG_EOS))

    def ram_page(self, block: str, offset: int, body: bytes) -> StreamWriter:
        if len(body) != PAGE_SIZE or offset % PAGE_SIZE:
            raise ValueError("pages are 4096 bytes at 4096-aligned offsets")
        zero = body.count(0) == PAGE_SIZE
        flags = RAM_FLAG_ZERO if zero else RAM_FLAG_PAGE
        if block == self.last_block:
            self.raw(struct.pack(">Q", offset | flags | RAM_FLAG_CONTINUE))
        else:
            b = block.encode()
            self.raw(struct.pack(">Q", offset | flags) + bytes([len(b)]) + b)
            self.last_block = block
        return self.raw(b"\x00" if zero else body)

    def eof(self) -> StreamWriter:
        return self.raw(bytes([EOF]))

    def vmdesc(self, desc: dict[str, Any] | None = None) -> StreamWriter:
        desc = {"page_size": PAGE_SIZE, "devices": []} if desc is None else desc
        j = json.dumps(desc).encode()
        return self.raw(bytes([VMDESCRIPTION]) + struct.pack(">I", len(j)) + j)

    def bytes(self) -> bytes:
        return bytes(self.buf)


def minimal_stream(
    machine: str,
    blocks: dict[str, int],
    pages: dict[tuple[str, int], bytes],
    *,
    section_id: int = 2,
    ram_version: int = 4,
    pages_section: int = SECTION_END,
    total: int | None = None,
    footers: bool = True,
    with_eof: bool = True,
    with_vmdesc: bool = False,
    extra_full_sections: bytes = b"",
) -> bytes:
    """Header, configuration, ram START (MEM_SIZE+EOS), ram PART/END (pages+EOS), EOF."""
    w = StreamWriter().header().configuration(machine)
    w.section_header(SECTION_START, section_id, "ram", 0, ram_version)
    w.ram_mem_size(blocks, total).ram_eos()
    if footers:
        w.footer(section_id)
    w.section_header(pages_section, section_id)
    for (block, off), body in sorted(pages.items()):
        w.ram_page(block, off, body)
    w.ram_eos()
    if footers:
        w.footer(section_id)
    w.raw(extra_full_sections)
    if with_eof:
        w.eof()
    if with_vmdesc:
        w.vmdesc()
    return w.bytes()


def write_minimal_stream(
    path: str,
    machine: str,
    blocks: dict[str, int],
    pages: dict[tuple[str, int], bytes],
    **options: Any,
) -> int:
    """Write :func:`minimal_stream` to *path*; return its length."""
    data = minimal_stream(machine, blocks, pages, **options)
    with open(path, "wb") as fh:
        fh.write(data)
    return len(data)


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--pages", action="store_true", help="list non-zero pages")
    args = ap.parse_args(argv)
    with open(args.file, "rb") as fh:
        data = fh.read()
    dump = parse_stream(data, keep_pages=args.pages)
    s = dump.summary()
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"size {s['size']}  magic {s['magic']}  version {s['version']}  machine {s['machine']!r}")
    print(f"configuration record: {s['configuration_raw_hex']}")
    for sec in s["sections"]:
        print(
            f"  @{sec['offset']:<8} {sec['type']:5} id={sec['id']:<3} {sec['idstr']!s:45} "
            f"inst={sec['instance']} ver={sec['version']} len={sec['data_length']}"
        )
    print(f"ram total {s['ram_total']} (sum {s['ram_blocks_sum']})")
    for name, n in dump.ram_blocks:
        print(f"  block {name!r} {n:#x}")
    print(f"ram flags {s['ram_flag_counts']} continue={s['ram_continue_count']}")
    print(f"commands {s['commands']}")
    print(f"EOF at {s['eof_offset']}, vmdesc {s['vmdesc_present']} at {s['vmdesc_offset']}, "
          f"{s['vmdesc_devices']} devices, trailing {s['trailing_len']} bytes")
    if dump.eof_offset is not None:
        e = dump.eof_offset
        print(f"bytes around EOF: {data[max(0, e - 8):e + 8].hex(' ')}")
    if args.pages:
        for (b, off), body in sorted(dump.pages.items()):
            if body.count(0) != len(body):
                print(f"  page {b} {off:#x} {body[:16].hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
