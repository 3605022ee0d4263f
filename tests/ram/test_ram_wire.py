"""Byte-level framing of the RAM section against hand-built bytes (docs/wire-format.md, RAM section)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import ram_strategies as rs

from savevm.channels.memory import MemoryChannel
from savevm.qemufile import QEMUFile
from savevm.save import StreamWriter
from savevm_ram import RAMBlock, RAMList
from savevm_ram.wire import Flag

P = rs.PAGE
PAT_A0 = bytes(range(256)) * 16
PAT_A2 = bytes([0xA2]) * (P - 1) + b"\x01"
PAT_B1 = b"\x00" * (P - 1) + b"\x7f"  # only the last byte set: still not a zero page


def tiny_ram() -> RAMList:
    """a: 3 pages (data, zero, data); b: 2 pages (zero, data). b is added first."""
    b = RAMBlock("b", bytearray(2 * P))
    a = RAMBlock("a", np.zeros(3 * P, dtype=np.uint8))
    a.host[0:P] = np.frombuffer(PAT_A0, np.uint8)
    a.host[2 * P : 3 * P] = np.frombuffer(PAT_A2, np.uint8)
    b.host[P : 2 * P] = np.frombuffer(PAT_B1, np.uint8)
    return RAMList([b, a])


def head(machine: bytes = b"savevm") -> bytes:
    return struct.pack(">II", 0x5145564D, 3) + struct.pack(">BI", 7, len(machine)) + machine


def sec(kind: int, sid: int = 1) -> bytes:
    if kind == 1:
        return struct.pack(">BI", 1, sid) + b"\x03ram" + struct.pack(">II", 0, 4)
    return struct.pack(">BI", kind, sid)


def foot(sid: int = 1) -> bytes:
    return struct.pack(">BI", 0x7E, sid)


def vmdesc() -> bytes:
    blob = json.dumps({"page_size": 4096, "devices": []}, separators=(", ", ": ")).encode()
    return b"\x06" + struct.pack(">I", len(blob)) + blob


EXPECTED_START = (
    struct.pack(">Q", 5 * P | 0x04)
    + b"\x01a" + struct.pack(">Q", 3 * P)
    + b"\x01b" + struct.pack(">Q", 2 * P)
    + struct.pack(">Q", 0x10)
)

EXPECTED_BULK = (
    struct.pack(">Q", 0 * P | 0x08) + b"\x01a" + PAT_A0          # first page of a: name, no CONTINUE
    + struct.pack(">Q", 1 * P | 0x02 | 0x20) + b"\x00"            # zero page, CONTINUE
    + struct.pack(">Q", 2 * P | 0x08 | 0x20) + PAT_A2            # normal page, CONTINUE
    + struct.pack(">Q", 0 * P | 0x02) + b"\x01b" + b"\x00"       # new block: name again
    + struct.pack(">Q", 1 * P | 0x08 | 0x20) + PAT_B1
    + struct.pack(">Q", 0x10)
)


def test_flag_values_match_qemu() -> None:
    qemu = [f for f in Flag if not f.name.startswith("SAVEVM_")]
    assert [int(f) for f in qemu] == [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100]
    # savevm's own extension flags sit in bits QEMU 7.2 leaves unused (0x200 is 8.1's MULTIFD_FLUSH)
    assert {int(Flag.SAVEVM_CODECS), int(Flag.SAVEVM_ENCODED)} == {0x400, 0x800}


def test_start_payload_bytes() -> None:
    ram = tiny_ram()
    assert [b.idstr for b in ram] == ["a", "b"]  # largest max_length first
    reg, _ = rs.make_registry(ram)
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    f.flush()
    assert ch.getvalue() == head() + sec(1) + EXPECTED_START + foot()
    w.cleanup()


def test_whole_snapshot_bytes() -> None:
    reg, _ = rs.make_registry(tiny_ram())
    got = rs.save_bytes(reg)
    expected = (head() + sec(1) + EXPECTED_START + foot()
                + sec(2) + EXPECTED_BULK + foot()
                + sec(3) + struct.pack(">Q", 0x10) + foot()
                + b"\x00" + vmdesc())
    assert got == expected


def test_last_sent_block_persists_across_parts() -> None:
    ram = tiny_ram()
    a, b = ram.find("a"), ram.find("b")
    reg, h = rs.make_registry(ram)
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    assert w.iterate() is True  # whole bulk stage in one PART, last block sent: b
    b.mark_dirty(0, 1)          # b@0 (zero): same block as the last PART's last page
    assert w.pending(1 << 40) == P  # below threshold: syncs
    assert w.iterate() is True
    a.write(2 * P + 5, b"\xee")  # a@2: block changes, name again
    w.pending(1 << 40)
    assert w.iterate() is True
    a.mark_dirty(0, P)           # a@0: same block as the previous PART -> CONTINUE
    w.pending(1 << 40)
    assert w.iterate() is True
    w.complete_precopy()
    w.cleanup()
    a2 = PAT_A2[:5] + b"\xee" + PAT_A2[6:]
    expected = (head() + sec(1) + EXPECTED_START + foot()
                + sec(2) + EXPECTED_BULK + foot()
                + sec(2) + struct.pack(">QB", 0 * P | 0x02 | 0x20, 0) + struct.pack(">Q", 0x10) + foot()
                + sec(2) + struct.pack(">Q", 2 * P | 0x08) + b"\x01a" + a2 + struct.pack(">Q", 0x10) + foot()
                + sec(2) + struct.pack(">Q", 0 * P | 0x08 | 0x20) + PAT_A0 + struct.pack(">Q", 0x10) + foot()
                + sec(3) + struct.pack(">Q", 0x10) + foot()
                + b"\x00" + vmdesc())
    assert ch.getvalue() == expected


def test_name_resent_after_hotplug() -> None:
    """ram_state_reset on a RAMList version change: the next page carries its name."""
    ram = tiny_ram()
    reg, h = rs.make_registry(ram)
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    assert w.iterate() is True
    ram.find("b").mark_dirty(P, 1)
    w.pending(1 << 40)
    ram.add(RAMBlock("z", bytearray(P)))  # hotplug: version bumps
    w.iterate()
    w.complete_precopy()
    w.cleanup()
    chunks = rs.parse_stream(ch.getvalue())
    pages = chunks[2].pages
    assert [(p.block, p.page, p.cont) for p in pages][0] == ("b", 1, False)


# ----------------------------------------------------------------- loading hand-built bytes
def test_loader_applies_hand_built_stream() -> None:
    rng = np.random.default_rng(7)
    a = RAMBlock("a", bytearray(rng.integers(0, 256, 3 * P, dtype=np.uint8).tobytes()))
    b = RAMBlock("b", bytearray(rng.integers(0, 256, 2 * P, dtype=np.uint8).tobytes()))
    b_before = bytes(b.buffer)
    data1 = bytes(rng.integers(0, 256, P, dtype=np.uint8))
    data2 = bytes(rng.integers(0, 256, P, dtype=np.uint8))
    chunk1 = (rs.page_hdr(2 * P, 0x08, "a") + data1
              + rs.page_hdr(0, 0x02 | 0x20) + b"\x00"          # memset 0
              + rs.page_hdr(1 * P, 0x02, "b") + b"\x5a"         # ZERO with a nonzero fill byte
              + rs.be64(0x10))
    chunk2 = (rs.page_hdr(1 * P, 0x08 | 0x20) + data2          # CONTINUE across PARTs: block b
              + rs.page_hdr(1 * P, 0x02, "a") + b"\xff"
              + rs.be64(0x10))
    stream = rs.ram_stream([("a", 3 * P), ("b", 2 * P)], chunk1, chunk2)
    ram = RAMList([a, b])
    res = rs.load_bytes(stream, ram)
    assert res.bytes_read == len(stream)
    assert bytes(a.buffer[0:P]) == bytes(P)
    assert bytes(a.buffer[P : 2 * P]) == b"\xff" * P
    assert bytes(a.buffer[2 * P : 3 * P]) == data1
    assert bytes(b.buffer[0:P]) == b_before[0:P]  # untouched
    assert bytes(b.buffer[P : 2 * P]) == data2     # 0x5a fill overwritten by the later PAGE


@pytest.mark.parametrize("fill", [0x00, 0x01, 0x5A, 0xFF])
def test_zero_record_memsets_fill_byte(fill: int) -> None:
    a = RAMBlock("a", bytearray(b"\x33" * (2 * P)))
    stream = rs.ram_stream([("a", 2 * P)], rs.page_hdr(P, 0x02, "a") + bytes([fill]) + rs.be64(0x10))
    rs.load_bytes(stream, RAMList([a]))
    assert bytes(a.buffer[P:]) == bytes([fill]) * P
    assert bytes(a.buffer[:P]) == b"\x33" * P


def _drain(w: StreamWriter) -> None:
    for _ in range(100):
        if w.iterate():
            return
    raise AssertionError("iterate never finished")


@pytest.mark.parametrize("when", ["before_iterate", "before_complete"])
def test_hot_added_block_is_migrated_and_counted_once(when: str) -> None:
    ram = tiny_ram()
    reg, h = rs.make_registry(ram)
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    _drain(w)
    z = RAMBlock("z", bytearray(b"\x5a" * (2 * P)))
    ram.add(z)
    if when == "before_iterate":
        w.pending(1 << 40)  # sync sees the new block: 2 pages dirty, not 4
        assert h.saver.bitmap.dirty_pages == 2
        _drain(w)
        assert h.saver.bitmap.dirty_pages == 0
        assert w.pending(1 << 40) == 0
    w.complete_precopy()
    w.cleanup()
    assert h.saver.bitmap.dirty_pages == 0
    dst = RAMList([RAMBlock("a", bytearray(3 * P)), RAMBlock("b", bytearray(2 * P)),
                   RAMBlock("z", bytearray(2 * P))])
    rs.load_bytes(ch.getvalue(), dst)
    for blk in ram:
        assert bytes(dst.find(blk.idstr).host) == bytes(blk.host), blk.idstr


def test_removed_block_dirty_pages_are_forgotten() -> None:
    ram = tiny_ram()
    reg, h = rs.make_registry(ram)
    f = QEMUFile(MemoryChannel(), writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    assert h.saver.bitmap.dirty_pages == 5
    ram.remove("b")
    _drain(w)
    assert h.saver.bitmap.dirty_pages == 0
    assert w.pending(1 << 40) == 0
    w.complete_precopy()
    w.cleanup()
