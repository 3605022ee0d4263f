"""vmdesc: finding it at the end of a stream, decoding it, and the device sizes it gives."""

from __future__ import annotations

import builtins
import io
import json
import struct
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savevm import vmstate
from savevm.channels.memory import MemoryChannel
from savevm.config import MigrationConfig
from savevm.errors import CorruptStreamError
from savevm.load import StreamLoader
from savevm.qemufile import QEMUFile
from savevm.registry import SectionRegistry
from savevm.save import save_stream
from savevm.vmdesc import (
    MAX_VMDESC,
    MAX_VMDESC_TAIL,
    device_sizes,
    find_vmdesc,
    parse_vmdesc,
    read_vmdesc,
    vmdesc_json,
)
from tests.core.samples import AllTypes, Counter, Inner, Point, footer, header, start_full


def old_heuristic(tail: bytes) -> dict[str, Any] | None:
    """analyze-migration.py's finder: the first ``{`` after the last NUL (what savevm did before)."""
    nul = tail.rfind(b"\x00")
    brace = tail.find(b"{", nul + 1 if nul >= 0 else 0)
    if brace < 5 or tail[brace - 5] != 0x06:
        return None
    length = int.from_bytes(tail[brace - 4 : brace], "big")
    try:
        return json.loads(tail[brace : brace + length])
    except ValueError:
        return None


def trailer(desc: dict[str, Any] | bytes) -> bytes:
    """EOF, marker, be32 length, JSON: how a stream with a vmdesc ends."""
    blob = desc if isinstance(desc, bytes) else vmdesc_json(desc)
    return b"\x00\x06" + struct.pack(">I", len(blob)) + blob


def stream_of(*devices: tuple[str, int, Any], send_vmdesc: bool = True) -> tuple[bytes, dict[str, Any] | None]:
    reg = SectionRegistry(MigrationConfig(send_vmdesc=send_vmdesc))
    for name, inst, dev in devices:
        reg.register_device(name, inst, dev)
    ch = MemoryChannel()
    w = save_stream(QEMUFile(ch, writable=True), reg)
    return ch.getvalue(), w.vmdesc


def device_with_name_giving_low_byte(low: int) -> tuple[bytes, dict[str, Any]]:
    """A stream from our writer whose vmdesc length ends in byte ``low`` (idstr padded to get there)."""
    for pad in range(256):
        data, desc = stream_of(("d" * (1 + pad), 0, Counter(value=1)))
        assert desc is not None
        if len(vmdesc_json(desc)) & 0xFF == low:
            return data, desc
    raise AssertionError("no padding gives that length")


# ---------------------------------------------------------------- finding it


def test_round_trip_with_our_writer(tmp_path: Path) -> None:
    data, desc = stream_of(("counter", 0, Counter(value=5, hi=7)), ("alltypes", 3, AllTypes()))
    assert desc is not None
    blob = vmdesc_json(desc)
    marker = len(data) - len(blob) - 5
    assert data[marker - 1 : marker + 1] == b"\x00\x06"
    assert find_vmdesc(data) == (marker, desc)
    assert find_vmdesc(memoryview(data)) == (marker, desc)
    p = tmp_path / "s.qevm"
    p.write_bytes(data)
    assert read_vmdesc(p) == desc == json.loads(blob)


def test_length_with_low_byte_0x7b_is_found(tmp_path: Path) -> None:
    data, desc = device_with_name_giving_low_byte(0x7B)
    n = len(vmdesc_json(desc))
    assert n & 0xFF == 0x7B and data[-n - 1] == 0x7B == ord("{")
    # the old finder takes the length's low byte for the JSON's opening brace
    assert old_heuristic(data) is None
    assert find_vmdesc(data) == (len(data) - n - 5, desc)
    p = tmp_path / "s.qevm"
    p.write_bytes(data)
    assert read_vmdesc(p) == desc


@pytest.mark.parametrize("length", [0x106, 0x600, 0x606, 0x60006, 0x7B06, 0x0600_7B])
def test_length_bytes_holding_0x06_0x00_0x7b(length: int) -> None:
    # a 0x06 inside the be32 length comes after the real marker: it must not be taken for it
    fill = length - len(b'{"page_size": 4096, "devices": [], "x": ""}')
    desc = {"page_size": 4096, "devices": [], "x": "y" * fill}
    blob = vmdesc_json(desc)
    assert len(blob) == length
    prefix = b"\x06\x00\x06" + bytes(40)
    data = prefix + trailer(blob)
    assert find_vmdesc(data) == (len(prefix) + 1, desc)


def test_no_vmdesc_is_none(tmp_path: Path) -> None:
    data, _ = stream_of(("counter", 0, Counter(value=6)), send_vmdesc=False)
    assert data.endswith(b"\x00")
    assert find_vmdesc(data) is None
    p = tmp_path / "s.qevm"
    p.write_bytes(data)
    assert read_vmdesc(p) is None
    assert find_vmdesc(b"") is None and find_vmdesc(b"\x00\x06") is None
    p.write_bytes(b"")
    assert read_vmdesc(p) is None


def test_truncated_vmdesc_is_none(tmp_path: Path) -> None:
    """Decided: a vmdesc cut short is 'no vmdesc'; the loader reports the truncation at its offset."""
    data, _ = stream_of(("counter", 0, Counter(value=6)))
    for cut in (1, 2, 10, len(data) - data.rindex(b"\x06") - 1):
        assert find_vmdesc(data[:-cut]) is None, cut
    p = tmp_path / "s.qevm"
    p.write_bytes(data[:-1])
    assert read_vmdesc(p) is None


def test_bytes_after_the_vmdesc_mean_none() -> None:
    data, _ = stream_of(("counter", 0, Counter()))
    assert find_vmdesc(data + b"x") is None
    assert find_vmdesc(data + b"\x00") is None


def test_eof_byte_required_before_marker() -> None:
    blob = vmdesc_json({"page_size": 4096, "devices": []})
    assert find_vmdesc(b"\x01\x06" + struct.pack(">I", len(blob)) + blob) is None
    assert find_vmdesc(b"\x06" + struct.pack(">I", len(blob)) + blob) is None, "nothing precedes the marker"


@settings(max_examples=300, deadline=None)
@given(prefix=st.binary(max_size=300) | st.lists(st.sampled_from([b"\x00", b"\x06", b"{", b"\x7b\x00\x06"]),
                                                  max_size=60).map(b"".join),
       desc=st.fixed_dictionaries({"page_size": st.just(4096)}, optional={
           "devices": st.lists(st.fixed_dictionaries({"name": st.text(max_size=40), "instance_id": st.integers(0, 9)}),
                               max_size=4),
           "pad": st.text(max_size=700)}))
def test_found_after_any_prefix(prefix: bytes, desc: dict[str, Any]) -> None:
    data = prefix + trailer(desc)
    assert find_vmdesc(data) == (len(prefix) + 1, desc)


# ---------------------------------------------------------------- reading files lazily


def test_huge_file_is_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, desc = stream_of(("counter", 0, Counter(value=2)))
    p = tmp_path / "big.qevm"
    with open(p, "wb") as fh:
        fh.truncate(1 << 30)  # a sparse GiB of "stream" before it
        fh.seek(1 << 30)
        fh.write(data)
    read = [0]

    class Counting(io.FileIO):
        def read(self, n: int = -1) -> bytes:  # type: ignore[override]
            out = super().read(n)
            read[0] += len(out)
            return out

    monkeypatch.setattr("savevm.vmdesc.open", lambda path, mode: Counting(path, "r"), raising=False)
    assert read_vmdesc(p) == desc
    assert read[0] <= 64 << 10


def test_long_vmdesc_needs_more_reads(tmp_path: Path) -> None:
    desc = {"page_size": 4096, "devices": [], "pad": "z" * (300 << 10)}  # longer than the first read
    p = tmp_path / "s.qevm"
    p.write_bytes(b"QEVM" + bytes(1000) + trailer(desc))
    assert read_vmdesc(p) == desc


def test_tail_bound_stops_the_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a file with no 0x06 at all: the search reads at most MAX_VMDESC_TAIL bytes of it
    monkeypatch.setattr("savevm.vmdesc.MAX_VMDESC", 1 << 20)
    monkeypatch.setattr("savevm.vmdesc.MAX_VMDESC_TAIL", (1 << 20) + 6)
    p = tmp_path / "s.qevm"
    p.write_bytes(b"\x11" * (3 << 20))
    real_open = builtins.open
    read = [0]

    def counting_open(path: Any, mode: str) -> Any:
        fh = real_open(path, mode)
        orig = fh.read

        def counted(n: int = -1) -> bytes:
            out: bytes = orig(n)
            read[0] += len(out)
            return out

        fh.read = counted
        return fh

    monkeypatch.setattr("savevm.vmdesc.open", counting_open, raising=False)
    assert read_vmdesc(p) is None
    assert read[0] == (1 << 20) + 6
    # a view is searched only as far back as the bound, and offsets stay offsets into it
    small = {"page_size": 4096, "devices": []}
    big = b"\x11" * (2 << 20) + trailer(small)
    assert find_vmdesc(memoryview(big)) == (len(big) - len(vmdesc_json(small)) - 5, small)
    # a vmdesc just over the bound is not looked for
    blob = vmdesc_json({"pad": "q" * (1 << 20)})
    assert find_vmdesc(trailer(blob)) is None


# ---------------------------------------------------------------- decoding


def test_non_object_json_is_refused_with_offset() -> None:
    prefix = b"QEVM" + bytes(20)
    data = prefix + trailer(b"[1, 2, 3]")
    with pytest.raises(CorruptStreamError, match="list, expected an object") as ei:
        find_vmdesc(data)
    assert ei.value.offset == len(prefix) + 6


def test_invalid_json_is_refused_with_offset(tmp_path: Path) -> None:
    prefix = b"QEVM" + bytes(20)
    data = prefix + trailer(b"{not json")
    with pytest.raises(CorruptStreamError, match="not valid JSON") as ei:
        find_vmdesc(data)
    assert ei.value.offset == len(prefix) + 6
    p = tmp_path / "s.qevm"
    p.write_bytes(bytes(1 << 20) + data)
    with pytest.raises(CorruptStreamError) as ei:
        read_vmdesc(p)
    assert ei.value.offset == (1 << 20) + len(prefix) + 6, "file offsets, not tail offsets"


def test_deep_nesting_is_refused_not_a_crash() -> None:
    with pytest.raises(CorruptStreamError, match="nested|JSON"):
        parse_vmdesc(b"[" * 200_000 + b"]" * 200_000, 7)


def test_parse_bounds_the_size() -> None:
    with pytest.raises(CorruptStreamError, match="exceeds"):
        parse_vmdesc(memoryview(bytearray(MAX_VMDESC + 1)), 0)
    assert MAX_VMDESC_TAIL == MAX_VMDESC + 6


# ---------------------------------------------------------------- device sizes


@vmstate.vmsd("holder", subsections=[vmstate.Subsection("holder/more", needed=lambda d: d.more != 0)])
@attrs.define
class Holder:
    """Nested structs, arrays of structs with subsections, and a subsection of its own."""

    n: int = vmstate.field(vmstate.uint8, default=2)
    pts: list = vmstate.field(vmstate.varray(vmstate.struct_(Point), "n"), factory=lambda: [Point(), Point()])
    ins: list = vmstate.field(vmstate.array(vmstate.struct_(Inner), 3),
                              factory=lambda: [Inner(extra=1), Inner(), Inner(extra=3)])
    more: int = vmstate.field(vmstate.uint64, default=0, subsection="holder/more")


DEVICES = [
    ("counter", 0, Counter(value=5, hi=7)),
    ("counter", 1, Counter(value=5, hi=0)),
    ("alltypes", 0, AllTypes(vlen=3, vblob=b"abc", n=2, varr=[1, 2], inners=[Inner(extra=1), Inner()], sub_val=9)),
    ("alltypes", 1, AllTypes()),
    ("holder", 0, Holder(more=1)),
    ("holder", 1, Holder(n=0, pts=[])),
]


def payload(dev: Any) -> bytes:
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    vmstate.save_state(f, dev)
    f.flush()
    return ch.getvalue()


def test_device_sizes_match_what_our_writer_wrote() -> None:
    data, desc = stream_of(*DEVICES)
    assert desc is not None
    sizes = device_sizes(desc)
    assert sizes == {(name, inst): len(payload(dev)) for name, inst, dev in DEVICES}
    # and they are the FULL sections' payloads in place: header, payload, footer, back to back
    pos = len(header())
    for sid, (name, inst, dev) in enumerate(DEVICES, start=1):
        head = start_full(4, sid, name, inst, vmstate.vmsd_of(type(dev)).version_id)
        assert data[pos : pos + len(head)] == head
        pos += len(head)
        assert data[pos : pos + sizes[(name, inst)]] == payload(dev)
        pos += sizes[(name, inst)]
        assert data[pos : pos + 5] == footer(sid)
        pos += 5
    assert data[pos] == 0x00 and find_vmdesc(data) == (pos + 1, desc)


def test_loader_skips_every_device_by_its_described_size() -> None:
    data, desc = stream_of(*DEVICES)
    assert desc is not None
    res = StreamLoader(QEMUFile(MemoryChannel(data)), SectionRegistry(), vmdesc=desc).load()
    assert [(n, i) for n, i, _ in res.skipped] == [(n, i) for n, i, _ in DEVICES]
    assert res.bytes_read == len(data)


@pytest.mark.parametrize("bad", [
    {"devices": {"name": "x"}},
    {"devices": [{"instance_id": 0}]},
    {"devices": [{"name": "x", "instance_id": -1}]},
    {"devices": [{"name": "x", "instance_id": 0, "fields": [{"size": "4"}]}]},
    {"devices": [{"name": "x", "instance_id": 0, "fields": [{"size": 4, "array_len": True}]}]},
    {"devices": [{"name": "x", "instance_id": 0, "fields": ["f"]}]},
    {"devices": [{"name": "x", "instance_id": 0, "subsections": [3]}]},
])
def test_malformed_vmdesc_sizes_are_stream_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(CorruptStreamError, match="vmdesc"):
        device_sizes(bad)
