"""Every way a RAM stream can be wrong: the right error class, at the right offset,
and nothing written outside the record's block (docs/wire-format.md, RAM section)."""

from __future__ import annotations

import pytest
import ram_strategies as rs

import savevm
from savevm_ram import RAMBlock, RAMList

P = rs.PAGE
BLOCKS = [("a", 3 * P), ("b", 2 * P)]


def dest(fill: int = 0x33) -> RAMList:
    """a: 3 pages used of a 5-page buffer, b: 2 used of 4: a write past used_length would show."""
    return RAMList([RAMBlock("a", bytearray([fill]) * (5 * P), used_length=3 * P, max_length=3 * P),
                    RAMBlock("b", bytearray([fill]) * (4 * P), used_length=2 * P, max_length=2 * P)])


def snapshot_of(ram: RAMList) -> dict[str, bytes]:
    return {b.idstr: bytes(b.buffer) for b in ram}


def builder_with_setup(blocks: list[tuple[str, int]] = BLOCKS) -> rs.StreamBuilder:
    sb = rs.StreamBuilder()
    sb.start()
    sb.add(rs.setup_payload(blocks))
    sb.footer()
    return sb


def load_err(data: bytes, ram: RAMList | None = None, plugins: savevm.PluginHost | None = None
             ) -> savevm.StreamError:
    ram = ram if ram is not None else dest()
    with pytest.raises(savevm.StreamError) as ei:
        rs.load_bytes(data, ram, plugins)
    return ei.value


def with_page_chunk(records: bytes, ram_after: bool = True) -> tuple[bytes, int]:
    """A stream whose first PART holds ``records`` (+ EOS); returns (stream, offset of records)."""
    sb = builder_with_setup()
    sb.part()
    off = sb.add(records)
    sb.add(rs.be64(rs.EOS))
    sb.footer()
    return sb.eof(), off


# ----------------------------------------------------------------- block names
def test_unknown_block_in_page_record() -> None:
    stream, off = with_page_chunk(rs.page_hdr(0, rs.PAGEF, "nope") + bytes(P))
    err = load_err(stream)
    assert type(err) is savevm.UnknownSectionError
    assert "nope" in str(err)
    assert err.offset == off + 8  # the block name of the bad record


def test_unknown_block_after_known_ones() -> None:
    good = rs.page_hdr(0, rs.ZERO, "a") + b"\x33" + rs.page_hdr(P, rs.ZERO | rs.CONT) + b"\x33"
    stream, off = with_page_chunk(good + rs.page_hdr(0, rs.ZERO, "c") + b"\x00")
    err = load_err(stream)
    assert type(err) is savevm.UnknownSectionError
    assert err.offset == off + len(good) + 8


def test_unknown_block_in_mem_size() -> None:
    sb = rs.StreamBuilder()
    sb.start()
    payload = rs.setup_payload([("a", 3 * P), ("zz", P), ("b", 2 * P)])
    off = sb.add(payload)
    sb.footer()
    err = load_err(sb.eof())
    assert type(err) is savevm.UnknownSectionError
    assert "zz" in str(err)
    assert err.offset == off + 8 + 2 + 8  # the entry after a's (name, length)


def test_continue_without_previous_block() -> None:
    stream, off = with_page_chunk(rs.page_hdr(P, rs.PAGEF | rs.CONT) + bytes(P))
    err = load_err(stream)
    assert type(err) is savevm.CorruptStreamError
    assert err.offset == off


# ----------------------------------------------------------------- page out of range
def _same_content_records(n: int, kind: int) -> bytes:
    """n records of block a that rewrite what dest() already holds (0x33 bytes)."""
    out = b""
    for i in range(n):
        flags = kind | (rs.CONT if i else 0)
        out += rs.page_hdr(i * P, flags, None if i else "a")
        out += b"\x33" if kind == rs.ZERO else b"\x33" * P
    return out


@pytest.mark.parametrize("kind", [rs.PAGEF, rs.ZERO])
@pytest.mark.parametrize("addr", [3 * P, 4 * P, 1 << 40, 0xFFFFFFFFFFFFF000])
@pytest.mark.parametrize("lead", [0, 1, 3])  # valid records before it (fast path when > 0)
def test_page_offset_past_used_length(kind: int, addr: int, lead: int) -> None:
    ram = dest()
    before = snapshot_of(ram)
    good = _same_content_records(lead, kind)
    if lead:
        bad = rs.page_hdr(addr, kind | rs.CONT)
    else:
        bad = rs.page_hdr(addr, kind, "a")
    bad += b"\x77" if kind == rs.ZERO else b"\x77" * P
    stream, off = with_page_chunk(good + bad)
    err = load_err(stream, ram)
    assert type(err) is savevm.PageRangeError
    assert err.offset == off + len(good)
    assert snapshot_of(ram) == before  # every block, including bytes past used_length


def test_last_page_of_block_is_accepted() -> None:
    ram = dest()
    stream, _ = with_page_chunk(rs.page_hdr(2 * P, rs.ZERO, "a") + b"\x01"
                                + rs.page_hdr(P, rs.ZERO, "b") + b"\x02")
    rs.load_bytes(stream, ram)
    assert bytes(ram.find("a").buffer[2 * P : 3 * P]) == b"\x01" * P
    assert bytes(ram.find("a").buffer[3 * P :]) == b"\x33" * (2 * P)
    assert bytes(ram.find("b").buffer[P : 2 * P]) == b"\x02" * P


def test_out_of_range_in_second_block_leaves_first_untouched_after_it() -> None:
    """A bad CONTINUE record of block b in a later PART: b is not written at all."""
    ram = dest()
    before = snapshot_of(ram)
    sb = builder_with_setup()
    sb.part()
    sb.add(rs.page_hdr(0, rs.ZERO, "b") + b"\x33" + rs.be64(rs.EOS))
    sb.footer()
    sb.part()
    off = sb.add(rs.page_hdr(2 * P, rs.PAGEF | rs.CONT) + b"\x99" * P)
    sb.add(rs.be64(rs.EOS))
    sb.footer()
    err = load_err(sb.eof(), ram)
    assert type(err) is savevm.PageRangeError and err.offset == off
    assert snapshot_of(ram) == before


# ----------------------------------------------------------------- flags
@pytest.mark.parametrize("flags", [0x01, 0x0A, 0x200, 0x03, 0x0C, 0x12, 0x81, 0x402, 0x800, 0x1000 - 0x20, 0x00])
@pytest.mark.parametrize("after_block", [False, True])
def test_unknown_flag_combination(flags: int, after_block: bool) -> None:
    good = rs.page_hdr(0, rs.ZERO, "a") + b"\x33" if after_block else b""
    stream, off = with_page_chunk(good + rs.be64(P | flags) + b"\x00" * 16)
    err = load_err(stream)
    assert type(err) is savevm.CorruptStreamError
    assert f"{flags:x}" in str(err)
    assert err.offset == off + len(good)


@pytest.mark.parametrize("kind", [rs.XBZRLE, rs.COMPRESS])
@pytest.mark.parametrize("cont", [False, True])
def test_encoded_page_without_codec(kind: int, cont: bool) -> None:
    ram = dest()
    before = snapshot_of(ram)
    good = rs.page_hdr(0, rs.ZERO, "a") + b"\x33" if cont else b""
    bad = rs.page_hdr(P, kind | rs.CONT) if cont else rs.page_hdr(P, kind, "a")
    body = b"\x01\x00\x02\x01\x00" if kind == rs.XBZRLE else b"\x00\x00\x00\x02xx"
    stream, off = with_page_chunk(good + bad + body)
    err = load_err(stream, ram)
    assert type(err) is savevm.CorruptStreamError
    assert "decoder" in str(err)
    assert err.offset == off + len(good)
    assert snapshot_of(ram) == before


@pytest.mark.parametrize("version", [3, 5, 0, 0xFFFFFFFF])
def test_ram_section_version(version: int) -> None:
    sb = rs.StreamBuilder()
    sb.start(version=version)
    version_off = sb.pos - 4
    sb.add(rs.setup_payload(BLOCKS))
    sb.footer()
    err = load_err(sb.eof())
    assert type(err) is savevm.VersionMismatchError
    assert err.offset == version_off


def test_hook_record_without_transport() -> None:
    stream, off = with_page_chunk(rs.be64(rs.HOOK))
    err = load_err(stream)
    assert type(err) is savevm.CorruptStreamError
    assert "HOOK" in str(err)
    assert err.offset == off


# ----------------------------------------------------------------- truncation
@pytest.mark.parametrize("case", ["named_page", "cont_page", "zero_fill", "header", "eos", "name"])
def test_truncated_stream(case: str) -> None:
    good = rs.page_hdr(0, rs.ZERO, "a") + b"\x33"
    if case == "named_page":
        rec, body_at = rs.page_hdr(P, rs.PAGEF, "a") + b"\x44" * 1000, 8 + 2
    elif case == "cont_page":
        rec, body_at = rs.page_hdr(P, rs.PAGEF | rs.CONT) + b"\x44" * 4095, 8
    elif case == "zero_fill":
        rec, body_at = rs.page_hdr(P, rs.ZERO | rs.CONT), 8
    elif case == "header":
        rec, body_at = rs.page_hdr(P, rs.PAGEF | rs.CONT)[:5], 0
    elif case == "eos":
        rec, body_at = b"", 0
    else:
        rec, body_at = rs.be64(P | rs.PAGEF) + b"\x05ab", 9  # the name's bytes after its length
    sb = builder_with_setup()
    sb.part()
    off = sb.add(good + rec)
    stream = bytes(sb.buf)
    err = load_err(stream)
    assert type(err) is savevm.TruncatedStreamError
    assert err.offset == off + len(good) + body_at
    assert err.offset <= len(stream)


@pytest.mark.parametrize("cut", [1, 100, 4000])
def test_truncated_stream_over_a_pipe(cut: int) -> None:
    """Same through a channel that delivers a few bytes at a time (partial stage fills)."""
    good = rs.page_hdr(0, rs.PAGEF, "a") + b"\x33" * P + rs.page_hdr(P, rs.PAGEF | rs.CONT) + b"\x33" * P
    sb = builder_with_setup()
    sb.part()
    off = sb.add(good + rs.page_hdr(2 * P, rs.PAGEF | rs.CONT) + b"\x44" * cut)
    stream = bytes(sb.buf)
    ch = rs.ChunkedChannel(stream, [7, 4100, 13, 1])
    with pytest.raises(savevm.TruncatedStreamError) as ei:
        rs.load_bytes(b"", dest(), channel=ch)
    assert ei.value.offset == off + len(good) + 8


# ----------------------------------------------------------------- MEM_SIZE lengths
def test_length_mismatch_not_resizable() -> None:
    sb = rs.StreamBuilder()
    sb.start()
    off = sb.add(rs.setup_payload([("a", 3 * P), ("b", 3 * P)]))
    sb.footer()
    ram = dest()
    err = load_err(sb.eof(), ram)
    assert isinstance(err, savevm.CorruptStreamError)
    assert "not resizable" in str(err)
    assert err.offset == off + 8 + 2 + 8
    assert ram.find("b").used_length == 2 * P


def test_length_mismatch_resizable_block_is_resized() -> None:
    calls: list[tuple[str, int]] = []
    b = RAMBlock("b", bytearray(b"\x33" * (4 * P)), used_length=2 * P, max_length=4 * P, resizable=True,
                 on_resize=lambda blk, n: calls.append((blk.idstr, n)))
    ram = RAMList([RAMBlock("a", bytearray(3 * P)), b])
    sb = rs.StreamBuilder()
    sb.start()
    sb.add(rs.setup_payload([("a", 3 * P), ("b", 4 * P)]))
    sb.footer()
    sb.part()
    sb.add(rs.page_hdr(3 * P, rs.ZERO, "b") + b"\x09" + rs.be64(rs.EOS))  # past the old used_length
    sb.footer()
    rs.load_bytes(sb.eof(), ram)
    assert calls == [("b", 4 * P)]
    assert b.used_length == 4 * P
    assert bytes(b.buffer[3 * P :]) == b"\x09" * P


def test_resizable_block_can_shrink() -> None:
    calls: list[int] = []
    b = RAMBlock("b", bytearray(4 * P), resizable=True, on_resize=lambda blk, n: calls.append(n))
    sb = rs.StreamBuilder()
    sb.start()
    sb.add(rs.setup_payload([("b", P)]))
    sb.footer()
    rs.load_bytes(sb.eof(), RAMList([b]))
    assert calls == [P] and b.used_length == P


@pytest.mark.parametrize("length", [5 * P, 64 * P])
def test_length_beyond_max_length_refused(length: int) -> None:
    calls: list[int] = []
    b = RAMBlock("b", bytearray(4 * P), used_length=2 * P, max_length=4 * P, resizable=True,
                 on_resize=lambda blk, n: calls.append(n))
    sb = rs.StreamBuilder()
    sb.start()
    off = sb.add(rs.setup_payload([("b", length)]))
    sb.footer()
    err = load_err(sb.eof(), RAMList([b]))
    assert isinstance(err, savevm.CorruptStreamError)
    assert err.offset == off + 8
    assert calls == [] and b.used_length == 2 * P


@pytest.mark.parametrize("length,total", [(P + 1, 2 * P), (3 * P, 2 * P)])
def test_length_not_aligned_or_over_total(length: int, total: int) -> None:
    sb = rs.StreamBuilder()
    sb.start()
    off = sb.add(rs.be64(total | rs.MEM_SIZE) + rs.counted("a") + rs.be64(length) + rs.be64(rs.EOS))
    sb.footer()
    err = load_err(sb.eof())
    assert type(err) is savevm.CorruptStreamError
    assert err.offset == off + 8
