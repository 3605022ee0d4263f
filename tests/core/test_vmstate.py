"""vmstate: every field type on the wire, versions, subsections, bounds, vmdesc."""

from __future__ import annotations

import struct
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savevm import vmstate
from savevm.channels.memory import MemoryChannel
from savevm.errors import (
    ConfigurationMismatchError,
    CorruptStreamError,
    MigrationError,
    RegistrationError,
    TruncatedStreamError,
    UnknownSectionError,
    VersionMismatchError,
)
from savevm.qemufile import QEMUFile
from tests.core.samples import ALLTYPES_IGNORED, AllTypes, Counter, Inner, Point, counter_bytes
from tests.core.strategies import SCALARS, all_types_devices, scalar_values


def save(obj: Any) -> tuple[bytes, dict[str, Any]]:
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    desc = vmstate.save_state(f, obj)
    f.flush()
    assert f.pos == len(ch.getvalue())
    return ch.getvalue(), desc


def load(data: bytes, dst: Any, version: int | None = None) -> tuple[Any, QEMUFile]:
    f = QEMUFile(MemoryChannel(data))
    v = vmstate.vmsd_of(type(dst)).version_id if version is None else version
    return vmstate.load_state(f, dst, v), f


def vmstate_values(obj: Any) -> dict[str, Any]:
    return {a.name: getattr(obj, a.name) for a in attrs.fields(type(obj)) if "vmstate" in a.metadata}


# ---------------------------------------------------------------- scalars


@pytest.mark.parametrize("info,value,wire", [
    (vmstate.int8, -1, "ff"), (vmstate.int8, 127, "7f"),
    (vmstate.uint8, 200, "c8"),
    (vmstate.int16, -2, "fffe"), (vmstate.uint16, 0x1234, "1234"),
    (vmstate.int32, -(1 << 31), "80000000"), (vmstate.uint32, 5, "00000005"),
    (vmstate.int64, -1, "ffffffffffffffff"), (vmstate.uint64, 1 << 63, "8000000000000000"),
    (vmstate.bool_, True, "01"), (vmstate.bool_, False, "00"),
    (vmstate.uint32_equal, 7, "00000007"), (vmstate.int32_le, -3, "fffffffd"),
])
def test_scalar_wire_bytes(info: vmstate.Scalar, value: int, wire: str) -> None:
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    info.put(f, value)
    f.flush()
    assert ch.getvalue() == bytes.fromhex(wire)
    assert info.get(QEMUFile(MemoryChannel(ch.getvalue()))) == value


@settings(max_examples=200)
@given(data=st.data())
def test_scalar_round_trip(data: st.DataObject) -> None:
    info = data.draw(st.sampled_from(SCALARS))
    value = data.draw(scalar_values(info))
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    info.check(value, "x")
    info.put(f, value)
    f.flush()
    assert len(ch.getvalue()) == info.size
    assert info.get(QEMUFile(MemoryChannel(ch.getvalue()))) == value


@pytest.mark.parametrize("info,value", [
    (vmstate.uint8, 256), (vmstate.uint8, -1), (vmstate.int8, 128), (vmstate.uint32, 1 << 32),
    (vmstate.int64, 1 << 63), (vmstate.uint16, True), (vmstate.uint16, "3"),
])
def test_scalar_out_of_range_refused_on_save(info: vmstate.Scalar, value: Any) -> None:
    with pytest.raises(MigrationError):
        info.check(value, "dev.x")


def test_bool_other_than_0_1_is_corrupt() -> None:
    with pytest.raises(CorruptStreamError) as ei:
        vmstate.bool_.get(QEMUFile(MemoryChannel(b"\x02")))
    assert ei.value.offset == 0


# ---------------------------------------------------------------- whole devices


@settings(max_examples=100, deadline=None)
@given(src=all_types_devices())
def test_every_field_type_round_trips(src: AllTypes) -> None:
    data, _ = save(src)
    dst = AllTypes(inner=Inner(a=1, extra=2), sub_val=3)
    before = vmstate_values(dst)
    loaded, f = load(data, dst)
    assert f.pos == len(data) and f.at_eof()
    assert vmstate_values(dst) == before, "load_state never touches the destination object"
    want = vmstate_values(src)
    got = vmstate_values(loaded)
    for name in ALLTYPES_IGNORED:
        want.pop(name)
        assert got.pop(name) == before[name]
    if src.sub_val == 0:  # subsection not sent: the destination keeps its value
        want["sub_val"] = dst.sub_val
    if src.inner.extra == 0:
        want["inner"] = attrs.evolve(src.inner, extra=dst.inner.extra)
    assert got == want
    # the encoding is deterministic: the loaded object saves to the same bytes
    if src.sub_val != 0 and src.inner.extra != 0:
        assert save(loaded)[0] == data
    vmstate.commit_state(dst, loaded)
    assert vmstate_values(dst) == vmstate_values(loaded)


def test_small_device_wire_bytes_by_hand() -> None:
    data, _ = save(Counter(value=5, flags=1, hi=0))
    assert data == bytes.fromhex("00000005 01")
    data, _ = save(Counter(value=5, flags=1, hi=7))
    assert data == (bytes.fromhex("00000005 01") + b"\x05" + b"\x0a" + b"counter/hi"
                    + bytes.fromhex("00000001") + bytes.fromhex("0000000000000007"))
    assert data == counter_bytes(5, 1, 7)


def test_buffer_vbuffer_unused_array_bytes() -> None:
    @vmstate.vmsd("mix")
    @attrs.define
    class Mix:
        b: bytes = vmstate.field(vmstate.buffer(3), default=b"abc")
        n: int = vmstate.field(vmstate.uint8, default=2)
        v: bytes = vmstate.field(vmstate.vbuffer("n", max_len=8), default=b"xy")
        pad: Any = vmstate.field(vmstate.unused(2), default=None)
        a: list = vmstate.field(vmstate.array(vmstate.uint16, 2), factory=lambda: [1, 2])
        c: int = vmstate.field(vmstate.uint8, default=1)
        va: list = vmstate.field(vmstate.varray(vmstate.int8, "c"), factory=lambda: [-1])
        p: Point = vmstate.field(vmstate.struct_(Point), factory=lambda: Point(1, -1))

    data, _ = save(Mix())
    assert data == b"abc" + b"\x02" + b"xy" + b"\x00\x00" + bytes.fromhex("0001 0002") + b"\x01" + b"\xff" + \
        bytes.fromhex("0001 ffff")
    loaded, _ = load(b"ABC" + b"\x01" + b"Q" + b"\xee\xee" + bytes.fromhex("0009 0008") + b"\x00"
                     + bytes.fromhex("0002 0003"), Mix())
    assert (loaded.b, loaded.n, loaded.v, loaded.a, loaded.c, loaded.va, loaded.p) == \
        (b"ABC", 1, b"Q", [9, 8], 0, [], Point(2, 3))


def test_save_refuses_inconsistent_values() -> None:
    with pytest.raises(MigrationError, match="buffer"):
        save(attrs.evolve(AllTypes(), blob=b"short"))
    with pytest.raises(MigrationError, match="array"):
        save(attrs.evolve(AllTypes(), arr=[1, 2, 3]))
    with pytest.raises(MigrationError, match="buffer"):
        save(attrs.evolve(AllTypes(), vlen=3, vblob=b"ab"))
    with pytest.raises(MigrationError, match="does not fit"):
        save(attrs.evolve(AllTypes(), u8=300))


# ---------------------------------------------------------------- versions


@vmstate.vmsd("counter", version_id=2, subsections=[vmstate.Subsection("counter/hi", needed=lambda d: d.hi != 0)])
@attrs.define
class CounterV2:
    """An older build of Counter: no ``flags`` field yet."""

    value: int = vmstate.field(vmstate.uint32, default=0)
    hi: int = vmstate.field(vmstate.uint64, default=0, subsection="counter/hi")


def test_versioned_field_absent_in_older_stream() -> None:
    data, desc = save(CounterV2(value=9))
    assert data == bytes.fromhex("00000009")
    assert desc["version"] == 2
    dst = Counter(value=0, flags=0x42)
    loaded, f = load(data, dst, version=2)
    assert loaded.value == 9 and loaded.flags == 0x42
    assert f.at_eof()
    # at version 3 the field is on the wire
    data3, desc3 = save(Counter(value=9, flags=3))
    assert data3 == bytes.fromhex("00000009 03") and desc3["version"] == 3
    loaded3, _ = load(data3, Counter(), version=3)
    assert (loaded3.value, loaded3.flags) == (9, 3)


def test_version_newer_than_local_refused() -> None:
    with pytest.raises(VersionMismatchError, match="newer"):
        load(bytes(16), Counter(), version=4)


def test_version_older_than_minimum_refused() -> None:
    with pytest.raises(VersionMismatchError, match="older"):
        load(bytes(16), Counter(), version=1)


# ---------------------------------------------------------------- subsections


@vmstate.vmsd("counter", version_id=3, minimum_version_id=2,
              subsections=[vmstate.Subsection("counter/new", needed=lambda d: True)])
@attrs.define
class CounterNewer:
    value: int = vmstate.field(vmstate.uint32, default=0)
    flags: int = vmstate.field(vmstate.uint8, default=0, version_id=3)
    extra: int = vmstate.field(vmstate.uint8, default=0, subsection="counter/new")


def test_unknown_subsection_with_matching_prefix() -> None:
    data, _ = save(CounterNewer(value=1, extra=2))
    with pytest.raises(UnknownSectionError, match="counter/new") as ei:
        load(data, Counter())
    assert ei.value.offset == 5  # the 0x05 byte right after value (4) and flags (1)


def test_subsection_of_another_device_ends_the_device() -> None:
    tail = b"\x05" + b"\x07" + b"other/x" + bytes.fromhex("00000001")
    loaded, f = load(bytes.fromhex("00000002 00") + tail, Counter())
    assert loaded.value == 2
    assert f.pos == 5, "the loader stops at a subsection that is not ours and leaves it unread"
    # too short a name to be one of ours (len(parent) + 1 at least): not a subsection either
    loaded, f = load(bytes.fromhex("00000002 00") + b"\x05\x03abc", Counter())
    assert f.pos == 5


def test_subsection_not_needed_is_not_sent() -> None:
    data, desc = save(Counter(value=1, hi=0))
    assert data == bytes.fromhex("00000001 00")
    assert "subsections" not in desc
    loaded, _ = load(data, Counter(hi=99))
    assert loaded.hi == 99, "the destination keeps its own value"
    data, desc = save(Counter(value=1, hi=5))
    assert [s["vmsd_name"] for s in desc["subsections"]] == ["counter/hi"]
    assert load(data, Counter(hi=99))[0].hi == 5


def test_subsection_version_checked() -> None:
    bad = bytes.fromhex("00000001 00") + b"\x05\x0acounter/hi" + bytes.fromhex("00000002") + bytes(8)
    with pytest.raises(VersionMismatchError) as ei:
        load(bad, Counter())
    assert ei.value.offset == 5


def test_nested_struct_subsection_round_trip() -> None:
    src = AllTypes(inner=Inner(a=1, extra=0x0BAD))
    data, desc = save(src)
    loaded, _ = load(data, AllTypes())
    assert loaded.inner == Inner(a=1, extra=0x0BAD)
    inner = next(fd for fd in desc["fields"] if fd["name"] == "inner")
    assert inner["struct"]["subsections"][0]["vmsd_name"] == "inner/extra"
    assert inner["size"] == 4 + 1 + 1 + len("inner/extra") + 4 + 2


# ---------------------------------------------------------------- bounds and "equal"


@vmstate.vmsd("vb")
@attrs.define
class VB:
    n: int = vmstate.field(vmstate.uint16, default=0)
    data: bytes = vmstate.field(vmstate.vbuffer("n", max_len=16), default=b"")
    c: int = vmstate.field(vmstate.uint16, default=0)
    items: list = vmstate.field(vmstate.varray(vmstate.uint8, "c", max_count=4), factory=list)


def test_vbuffer_over_max_len() -> None:
    with pytest.raises(CorruptStreamError, match="16") as ei:
        load(bytes.fromhex("0011") + bytes(17) + bytes(2), VB())
    assert ei.value.offset == 2


def test_vbuffer_at_max_len_loads() -> None:
    loaded, _ = load(bytes.fromhex("0010") + b"z" * 16 + bytes.fromhex("0000"), VB())
    assert loaded.data == b"z" * 16


def test_varray_over_max_count() -> None:
    with pytest.raises(CorruptStreamError) as ei:
        load(bytes.fromhex("0000") + bytes.fromhex("ffff") + bytes(10), VB())
    assert ei.value.offset == 4


def test_truncated_device_data() -> None:
    with pytest.raises(TruncatedStreamError):
        load(bytes.fromhex("0008") + b"abc", VB())


@pytest.mark.parametrize("field_name,offset_of", [("eq8", "eq8"), ("eq32", "eq32"), ("ieq64", "ieq64")])
def test_equal_field_mismatch(field_name: str, offset_of: str) -> None:
    src = AllTypes()
    data, desc = save(src)
    dst = attrs.evolve(AllTypes(), **{field_name: getattr(src, field_name) + 1})
    with pytest.raises(ConfigurationMismatchError, match=field_name) as ei:
        load(data, dst)
    offset = 0
    for fd in desc["fields"]:
        if fd["name"] == offset_of:
            break
        offset += fd["size"] * fd.get("array_len", 1)
    assert ei.value.offset == offset


def test_int32_le_bound() -> None:
    src = AllTypes(le=AllTypes.LE_LIMIT)
    data, _ = save(src)
    assert load(data, AllTypes(le=AllTypes.LE_LIMIT))[0].le == AllTypes.LE_LIMIT
    with pytest.raises(ConfigurationMismatchError, match="at most"):
        load(data, AllTypes(le=AllTypes.LE_LIMIT - 1))


# ---------------------------------------------------------------- vmdesc


def test_vmdesc_shape() -> None:
    src = AllTypes(vlen=3, vblob=b"abc", n=2, varr=[1, 2], inners=[Inner(extra=1), Inner()])
    _, desc = save(src)
    assert desc["vmsd_name"] == "alltypes" and desc["version"] == 1
    assert "subsections" not in desc, "no subsection sent, no key"
    fields = {fd["name"]: fd for fd in desc["fields"] if "index" not in fd}
    for name, typ, size in [("i8", "int8", 1), ("i16", "int16", 2), ("i32", "int32", 4), ("i64", "int64", 8),
                            ("u8", "uint8", 1), ("u16", "uint16", 2), ("u32", "uint32", 4),
                            ("u64", "uint64", 8), ("flag", "bool", 1), ("blob", "buffer", 8),
                            ("vblob", "buffer", 3), ("pad", "unused_buffer", 3),
                            ("eq8", "uint8 equal", 1), ("eq16", "uint16 equal", 2), ("eq32", "uint32 equal", 4),
                            ("ieq32", "int32 equal", 4), ("ieq64", "int64 equal", 8), ("le", "int32 le", 4)]:
        assert fields[name] == {"name": name, "type": typ, "size": size}, name
    assert fields["arr"] == {"name": "arr", "array_len": 4, "type": "uint16", "size": 2}
    assert fields["varr"] == {"name": "varr", "array_len": 2, "type": "int32", "size": 4}
    point_struct = {"vmsd_name": "point", "version": 1, "fields": [
        {"name": "x", "type": "int16", "size": 2}, {"name": "y", "type": "int16", "size": 2}]}
    assert fields["points"] == {"name": "points", "array_len": 3, "type": "struct", "struct": point_struct,
                                "size": 4}
    assert fields["inner"] == {"name": "inner", "type": "struct", "size": 4, "struct": {
        "vmsd_name": "inner", "version": 1, "fields": [{"name": "a", "type": "uint32", "size": 4}]}}
    # arrays of structs with subsections are not compressed: one entry per element
    inners = [fd for fd in desc["fields"] if fd["name"] == "inners"]
    assert [fd["index"] for fd in inners] == [0, 1]
    assert inners[0]["struct"]["subsections"] == [
        {"vmsd_name": "inner/extra", "version": 1, "fields": [{"name": "extra", "type": "uint16", "size": 2}]}]
    assert "subsections" not in inners[1]["struct"]
    assert inners[0]["size"] == 4 + 1 + 1 + 11 + 4 + 2 and inners[1]["size"] == 4
    # every field's size adds up to the bytes on the wire
    data, _ = save(attrs.evolve(src, sub_val=0))
    assert sum(fd["size"] * fd.get("array_len", 1) for fd in desc["fields"]) == len(data)
    # the subsection appears once it is sent
    _, desc = save(attrs.evolve(src, sub_val=1))
    assert desc["subsections"] == [{"vmsd_name": "alltypes/sub", "version": 1,
                                     "fields": [{"name": "sub_val", "type": "uint32", "size": 4}]}]
    assert vmstate.describe(src) == save(src)[1]


def test_single_element_array_has_no_array_len() -> None:
    _, desc = save(AllTypes(n=1, varr=[7]))
    varr = next(fd for fd in desc["fields"] if fd["name"] == "varr")
    assert varr == {"name": "varr", "type": "int32", "size": 4}
    _, desc = save(AllTypes(n=0, varr=[]))
    assert all(fd["name"] != "varr" for fd in desc["fields"]), "an empty array describes nothing"


# ---------------------------------------------------------------- descriptions


def test_description_errors() -> None:
    with pytest.raises(RegistrationError, match="earlier"):
        @vmstate.vmsd("bad")
        @attrs.define
        class LengthAfter:
            data: bytes = vmstate.field(vmstate.vbuffer("n"), default=b"")
            n: int = vmstate.field(vmstate.uint8, default=0)

    with pytest.raises(RegistrationError, match="parent"):
        @vmstate.vmsd("dev", subsections=[vmstate.Subsection("other/x", needed=bool)])
        @attrs.define
        class BadPrefix:
            x: int = vmstate.field(vmstate.uint8, default=0, subsection="other/x")

    with pytest.raises(RegistrationError, match="unknown subsection"):
        @vmstate.vmsd("dev")
        @attrs.define
        class NoSuchSub:
            x: int = vmstate.field(vmstate.uint8, default=0, subsection="dev/x")

    with pytest.raises(RegistrationError, match="attrs"):
        @vmstate.vmsd("dev")
        class NotAttrs:
            pass


def test_minimum_version_defaults_to_version() -> None:
    @vmstate.vmsd("strict", version_id=4)
    @attrs.define
    class Strict:
        x: int = vmstate.field(vmstate.uint8, default=0)

    d = vmstate.vmsd_of(Strict)
    assert (d.version_id, d.minimum_version_id) == (4, 4)
    with pytest.raises(VersionMismatchError):
        load(b"\x01", Strict(), version=3)


def test_field_wire_layout_independent_of_python_struct() -> None:
    # a last cross-check of the be64 layout against struct, for signed values
    data, _ = save(AllTypes(i64=-2))
    assert data[1 + 2 + 4: 1 + 2 + 4 + 8] == struct.pack(">q", -2)


# ---------------------------------------------------------------- field types of a third party


@attrs.frozen
class LE32:
    """A little-endian uint32 written by hand against the FieldType protocol (not a class of ours)."""

    name = "le32"

    def put(self, f: QEMUFile, value: Any, ctx: vmstate.FieldContext) -> list[dict[str, Any]]:
        if not 0 <= value < 1 << 32:
            raise MigrationError(f"{ctx.where}: {value} does not fit le32")
        f.put_buffer(struct.pack("<I", value))
        return [{"name": ctx.name, "type": self.name, "size": 4}]

    def get(self, f: QEMUFile, current: Any, ctx: vmstate.FieldContext) -> Any:
        return struct.unpack("<I", f.get_bytes(4, limit=4))[0]


@attrs.frozen
class Checksum:
    """A type that uses the context: a be16 sum of an earlier buffer's bytes, checked on load."""

    of: str
    name = "uint16 equal"

    def put(self, f: QEMUFile, value: Any, ctx: vmstate.FieldContext) -> list[dict[str, Any]]:
        f.put_be16(sum(ctx.values[self.of]) & 0xFFFF)
        return [{"name": ctx.name, "type": self.name, "size": 2}]

    def get(self, f: QEMUFile, current: Any, ctx: vmstate.FieldContext) -> Any:
        off = f.pos
        v = f.get_be16()
        if v != sum(ctx.values[self.of]) & 0xFFFF:
            raise CorruptStreamError(f"{ctx.where}: checksum 0x{v:04x} does not match", off)
        return vmstate.KEEP


@vmstate.vmsd("thirdparty")
@attrs.define
class ThirdParty:
    a: int = vmstate.field(LE32(), default=0)
    n: int = vmstate.field(vmstate.uint8, default=2)
    many: list = vmstate.field(vmstate.varray(LE32(), "n"), factory=lambda: [1, 2])
    data: bytes = vmstate.field(vmstate.buffer(3), default=b"abc")
    sum_: Any = vmstate.field(Checksum("data"), default=None)


def test_third_party_field_type_round_trips() -> None:
    assert isinstance(LE32(), vmstate.FieldType) and isinstance(vmstate.uint32, vmstate.FieldType)
    src = ThirdParty(a=0x01020304, n=3, many=[5, 6, 0xFFFFFFFF], data=b"xyz")
    data, desc = save(src)
    assert data == (bytes.fromhex("04030201") + b"\x03" + bytes.fromhex("05000000 06000000 ffffffff") + b"xyz"
                    + struct.pack(">H", sum(b"xyz")))
    assert desc["fields"] == [
        {"name": "a", "type": "le32", "size": 4},
        {"name": "n", "type": "uint8", "size": 1},
        {"name": "many", "array_len": 3, "type": "le32", "size": 4},
        {"name": "data", "type": "buffer", "size": 3},
        {"name": "sum_", "type": "uint16 equal", "size": 2},
    ]
    loaded, f = load(data, ThirdParty(sum_="mine"))
    assert f.at_eof()
    assert (loaded.a, loaded.n, loaded.many, loaded.data) == (src.a, 3, [5, 6, 0xFFFFFFFF], b"xyz")
    assert loaded.sum_ == "mine", "KEEP leaves the destination's value"
    bad = bytearray(data)
    bad[-3] ^= 1  # a byte of `data`: the checksum no longer matches
    with pytest.raises(CorruptStreamError, match="checksum") as ei:
        load(bytes(bad), ThirdParty())
    assert ei.value.offset == len(data) - 2
    with pytest.raises(MigrationError, match="thirdparty.a"):
        save(ThirdParty(a=-1))


def test_registration_refuses_what_is_not_a_field_type() -> None:
    with pytest.raises(RegistrationError, match=r"Bad\.x: .*not a vmstate field type"):
        @vmstate.vmsd("bad")
        @attrs.define
        class Bad:
            x: int = vmstate.field("uint32", default=0)  # type: ignore[arg-type]

    with pytest.raises(RegistrationError, match=r"BadElem\.xs\[\]: .*not a vmstate field type"):
        @vmstate.vmsd("bad")
        @attrs.define
        class BadElem:
            xs: list = vmstate.field(vmstate.array(struct.Struct(">I"), 2), factory=list)  # type: ignore[arg-type]

    class NoGet:
        name = "half"

        def put(self, f: QEMUFile, value: Any, ctx: vmstate.FieldContext) -> list[dict[str, Any]]:
            return []

    with pytest.raises(RegistrationError, match=r"Half\.h"):
        @vmstate.vmsd("half")
        @attrs.define
        class Half:
            h: int = vmstate.field(NoGet(), default=0)  # type: ignore[arg-type]


def test_unused_padding_is_not_a_loaded_value() -> None:
    @vmstate.vmsd("padonly")
    @attrs.define
    class PadOnly:
        pad: Any = vmstate.field(vmstate.unused(4), default="untouched")
        pads: list = vmstate.field(vmstate.array(vmstate.unused(1), 2), factory=lambda: ["p", "q"])

    dst = PadOnly()
    loaded, f = load(bytes(6), dst)
    assert f.at_eof() and loaded.pad == "untouched" and loaded.pads == ["p", "q"]
