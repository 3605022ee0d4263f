"""vmdesc.decode_device: device state decoded field by field through a stream's own vmdesc."""

from __future__ import annotations

import json
import struct
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from savevm import vmstate
from savevm.channels.memory import MemoryChannel
from savevm.errors import CorruptStreamError, StreamError, TruncatedStreamError
from savevm.qemufile import QEMUFile
from savevm.vmdesc import MAX_DECODE_DEPTH, DecodeBudget, decode_device
from tests.core.samples import AllTypes, Inner, Point


def _reader(data: bytes) -> QEMUFile:
    return QEMUFile(MemoryChannel(data))


def _saved(obj: Any) -> tuple[bytes, dict[str, Any]]:
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    desc = vmstate.save_state(f, obj)
    f.flush()
    return ch.getvalue(), {"name": "dev", "instance_id": 0, **desc}


def _values(fields: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fd in fields:
        if "index" in fd:  # one entry per element: gather them
            out.setdefault(fd["name"], []).append(fd["value"])
        else:
            out[fd["name"]] = fd["value"]
    return out


def _plain(v: Any) -> Any:
    """A decoded value in the terms of the device object: nested structs as dicts of values."""
    if isinstance(v, dict) and "fields" in v:
        out = _values([{**fd, "value": _plain(fd["value"])} for fd in v["fields"]])
        for sub in v.get("subsections", []):
            out.update(_values(sub["fields"]))
        return out
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _expected(obj: Any) -> dict[str, Any]:
    """The device's values as the stream carries them: subsections only when they were needed."""
    out: dict[str, Any] = {}
    d = vmstate.vmsd_of(type(obj))
    sent = {name for s, fields in d.subsections if s.needed(obj) for name, _ in fields}
    sent |= {name for name, _ in d.fields}
    for a in attrs.fields(type(obj)):
        if a.name not in sent:
            continue
        v = getattr(obj, a.name)
        if attrs.has(type(v)):
            v = _expected(v)
        elif isinstance(v, list) and v and attrs.has(type(v[0])):
            v = [_expected(x) for x in v]
        elif isinstance(v, bytes):
            v = v.hex()
        out[a.name] = v
    return out


i8, i16, i32, i64 = (st.integers(-(1 << (b - 1)), (1 << (b - 1)) - 1) for b in (8, 16, 32, 64))
u8, u16, u32, u64 = (st.integers(0, (1 << b) - 1) for b in (8, 16, 32, 64))


@st.composite
def alltypes(draw: st.DrawFn) -> AllTypes:
    n = draw(st.integers(0, 32))
    vblob = draw(st.binary(max_size=64))
    return AllTypes(
        i8=draw(i8), i16=draw(i16), i32=draw(i32), i64=draw(i64), u8=draw(u8), u16=draw(u16), u32=draw(u32),
        u64=draw(u64), flag=draw(st.booleans()), blob=draw(st.binary(min_size=8, max_size=8)),
        vlen=len(vblob), vblob=vblob, arr=draw(st.lists(u16, min_size=4, max_size=4)), n=n,
        varr=draw(st.lists(i32, min_size=n, max_size=n)),
        inner=Inner(a=draw(u32), extra=draw(u16)),
        points=[Point(x=draw(i16), y=draw(i16)) for _ in range(3)],
        inners=[Inner(a=draw(u32), extra=draw(u16)) for _ in range(2)],
        le=draw(st.integers(-(1 << 31), AllTypes.LE_LIMIT)), sub_val=draw(u32))


@given(alltypes())
@settings(max_examples=150, deadline=None)
def test_every_savevm_type_decodes_to_its_value(dev: AllTypes) -> None:
    data, desc = _saved(dev)
    f = _reader(data)
    out = decode_device(f, desc)
    assert f.pos == len(data) == out["size"] and out["offset"] == 0
    got = _plain(out)
    want = _expected(dev)
    del want["pad"]
    assert got.pop("pad") == "000000"  # unused bytes are shown as the hex they are
    if dev.n == 1:  # a one-element array is described as a plain field, as QEMU does
        got["varr"] = [got["varr"]]
    if dev.n == 0:  # no element, no description
        got["varr"] = []
    assert got == want


def test_signedness_endianness_and_qemu_types() -> None:
    """Types savevm never writes but QEMU does, byte layouts spelt out by hand."""
    fields = [
        ({"name": "le", "type": "int32 le", "size": 4}, struct.pack(">i", 2), 2),  # "less or equal": big-endian
        ({"name": "neg", "type": "int32 le", "size": 4}, struct.pack(">i", -7), -7),
        ({"name": "u8eq", "type": "uint8 equal", "size": 1}, b"\xff", 255),  # unsigned, not -1
        ({"name": "u16eq", "type": "uint16 equal", "size": 2}, b"\xff\xfe", 0xFFFE),
        ({"name": "t", "type": "timer", "size": 8}, struct.pack(">q", -1), -1),
        ({"name": "d", "type": "CPU_Double_U", "size": 8}, struct.pack(">d", 1.5), 1.5),
        ({"name": "nan", "type": "float64", "size": 8}, struct.pack(">d", float("nan")), "nan"),
        ({"name": "ptr", "type": "uint64", "size": 1}, b"0", None),  # the null pointer marker
        ({"name": "b", "type": "bool", "size": 1}, b"\x01", True),
        ({"name": "odd", "type": "bool", "size": 1}, b"\x02", 2),
        ({"name": "cfg", "type": "pci config", "size": 4}, b"\x86\x80\xc0\x29", "8680c029"),
        ({"name": "short", "type": "uint32", "size": 2}, b"\x12\x34", "1234"),  # size the type cannot have
    ]
    dev = {"name": "qemu-dev", "instance_id": 3, "vmsd_name": "qemu-dev", "version": 1,
           "fields": [fd for fd, _, _ in fields]}
    data = b"".join(raw for _, raw, _ in fields)
    out = decode_device(_reader(data), dev)
    assert [fd["value"] for fd in out["fields"]] == [v for _, _, v in fields]
    by_name = {fd["name"]: fd for fd in out["fields"]}
    assert by_name["cfg"]["format"] == "hex" and by_name["short"]["format"] == "hex"
    assert by_name["ptr"]["null_pointer"] is True
    assert out["name"] == "qemu-dev" and out["instance_id"] == 3 and out["size"] == len(data)
    assert json.loads(json.dumps(out, allow_nan=False)) == out  # strict JSON: no NaN


def test_tmp_and_index_entries_as_qemu_writes_them() -> None:
    """``tmp`` nests its description in the field itself; non-compressible arrays use ``index``."""
    tmp = {"name": "tmp", "type": "tmp", "size": 10, "vmsd_name": "fpreg_tmp", "version": 0,
           "fields": [{"name": "mant", "type": "uint64", "size": 8}, {"name": "exp", "type": "uint16", "size": 2}]}
    regs = [{"name": "r", "index": i, "type": "struct", "size": 3,
             "struct": {"vmsd_name": "r", "version": 1, "fields": [{"name": "v", "type": "uint8", "size": 1}],
                        "subsections": [{"vmsd_name": "r/x", "version": 2, "fields": []}]}} for i in range(2)]
    dev = {"name": "cpu", "instance_id": 0, "fields": [tmp, *regs]}
    sub = b"\x05\x03r/x" + struct.pack(">I", 2)  # 9 bytes: too many for the described size of 3
    data = struct.pack(">QH", 0x8000000000000000, 0x3FFF) + b"\x07" + sub
    with pytest.raises(CorruptStreamError, match=r"cpu\.r\[0\] is 3 bytes, but .* take 10") as e:
        decode_device(_reader(data + b"\x08" + sub), dev)
    assert e.value.offset == 10
    for r in regs:
        r["size"] = 10
    out = decode_device(_reader(data + b"\x08" + sub), dev)
    assert out["fields"][0]["value"]["fields"][0]["value"] == 0x8000000000000000
    assert [fd["index"] for fd in out["fields"][1:]] == [0, 1]
    assert [fd["value"]["fields"][0]["value"] for fd in out["fields"][1:]] == [7, 8]
    assert out["fields"][2]["value"]["subsections"][0] == {"vmsd_name": "r/x", "version": 2, "offset": 21,
                                                           "fields": []}


def test_subsection_header_must_match_the_vmdesc() -> None:
    dev = {"name": "d", "fields": [{"name": "a", "type": "uint8", "size": 1}],
           "subsections": [{"vmsd_name": "d/s", "version": 1, "fields": [{"name": "b", "type": "uint8", "size": 1}]}]}
    good = b"\x01\x05\x03d/s\x00\x00\x00\x01\x02"
    assert _values(decode_device(_reader(good), dev)["subsections"][0]["fields"]) == {"b": 2}
    for bad, what in ((b"\x01\x06", "found 0x06"), (b"\x01\x05\x03d/t\x00\x00\x00\x01\x02", "'d/t'"),
                      (b"\x01\x05\x03d/s\x00\x00\x00\x02\x02", "version 2")):
        with pytest.raises(CorruptStreamError, match=what) as e:
            decode_device(_reader(bad), dev)
        assert e.value.offset == 1


def test_old_style_device_size_must_add_up() -> None:
    dev = {"name": "old", "instance_id": 0, "size": 5, "fields": [{"name": "data", "size": 4, "type": "buffer"}]}
    with pytest.raises(CorruptStreamError, match="5 bytes but its fields take 4") as e:
        decode_device(_reader(b"abcd"), dev)
    assert e.value.offset == 0
    dev["size"] = 4
    assert decode_device(_reader(b"abcd"), dev)["fields"][0]["value"] == b"abcd".hex()


def test_truncated_data_is_a_truncation_with_offset() -> None:
    dev = {"name": "d", "fields": [{"name": "a", "type": "uint32", "size": 4},
                                   {"name": "b", "type": "buffer", "size": 0xFFFFFFFF}]}
    with pytest.raises(TruncatedStreamError) as e:
        decode_device(_reader(b"\x00\x00\x00\x01" + bytes(100)), dev)
    assert e.value.offset is not None and e.value.offset >= 4


def test_hostile_descriptions_are_bounded() -> None:
    # a billion zero-size elements cost no stream bytes: the value budget stops them
    dev = {"name": "d", "fields": [{"name": "a", "type": "uint8", "size": 0, "array_len": 10**9}]}
    with pytest.raises(CorruptStreamError, match="values left"):
        decode_device(_reader(b""), dev)
    budget = DecodeBudget(values=5)
    dev = {"name": "d", "fields": [{"name": "a", "type": "uint8", "size": 1, "array_len": 3}] * 2}
    with pytest.raises(CorruptStreamError, match="more than the 2 values left"):
        decode_device(_reader(bytes(6)), dev, budget)
    # nesting beyond the bound
    inner: dict[str, Any] = {"vmsd_name": "x", "fields": []}
    for _ in range(MAX_DECODE_DEPTH + 2):
        inner = {"vmsd_name": "x", "fields": [{"name": "s", "type": "struct", "size": 0, "struct": inner}]}
    with pytest.raises(CorruptStreamError, match="nested more than"):
        decode_device(_reader(b""), {"name": "deep", **inner})
    # hex kept is bounded per blob and in all; the bytes are still read and checked
    budget = DecodeBudget(hex_per_blob=4, hex_bytes=6)
    dev = {"name": "d", "fields": [{"name": f"b{i}", "type": "buffer", "size": 5} for i in range(3)]}
    f = _reader(bytes(range(15)))
    out = decode_device(f, dev, budget)
    assert [(fd["value"], fd.get("truncated", False)) for fd in out["fields"]] == [
        ("00010203", True), ("0506", True), ("", True)]
    assert f.pos == 15 and out["size"] == 15


@pytest.mark.parametrize("bad", [
    {"name": "d", "fields": "x"},
    {"name": "d", "fields": [3]},
    {"name": "d", "fields": [{"name": "a", "type": 5, "size": 1}]},
    {"name": "d", "fields": [{"name": "a", "type": "uint8", "size": -1}]},
    {"name": "d", "fields": [{"name": "a", "type": "uint8", "size": True}]},
    {"name": "d", "fields": [{"name": "a", "type": "uint8", "size": 1, "array_len": "2"}]},
    {"name": "d", "fields": [{"name": "a", "type": "struct", "size": 1}]},
    {"name": "d", "fields": [], "subsections": [7]},
    {"name": "d", "fields": [], "subsections": {}},
])
def test_malformed_descriptions_are_stream_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(CorruptStreamError, match="vmdesc"):
        decode_device(_reader(bytes(16)), bad)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "type", "size", "array_len", "index", "struct", "fields", "subsections",
                         "vmsd_name", "version"]), inner, max_size=6),
    max_leaves=30)
_types = st.sampled_from(["uint8", "int32", "int32 le", "uint64", "bool", "buffer", "struct", "tmp", "timer",
                          "CPU_Double_U", "whatever"])
_field = st.fixed_dictionaries({"name": st.text(max_size=4), "type": _types, "size": st.integers(0, 12)},
                                optional={"array_len": st.integers(0, 5), "index": st.integers(0, 3),
                                          "struct": _json, "fields": _json})


@given(st.fixed_dictionaries({"name": st.just("d"), "fields": st.lists(_field | _json, max_size=6)},
                             optional={"subsections": _json, "size": _json}),
       st.binary(max_size=200))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_description_over_any_bytes_decodes_or_raises_a_stream_error(dev: dict[str, Any], data: bytes) -> None:
    f = _reader(data)
    try:
        out = decode_device(f, dev)
    except StreamError as exc:
        assert exc.offset is not None and 0 <= exc.offset <= len(data)
        return
    assert out["size"] == f.pos <= len(data)
    json.dumps(out, allow_nan=False)
