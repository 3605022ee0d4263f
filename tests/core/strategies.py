"""Hypothesis strategies shared by the core tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from savevm import vmstate

# ---------------------------------------------------------------------------
# QEMUFile operation sequences
# ---------------------------------------------------------------------------

#: A QEMUFile op is (kind, value); the reader replays the same list with getters.
OP_KINDS = ("byte", "be16", "be32", "be64", "str", "buf", "async", "iov")


def counted_strings() -> st.SearchStrategy[str]:
    """Text whose UTF-8 form fits a u8 length."""
    return st.text(max_size=80).filter(lambda s: len(s.encode()) <= 255)


def qemufile_op() -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        st.tuples(st.just("byte"), st.integers(0, 0xFF)),
        st.tuples(st.just("be16"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("be32"), st.integers(0, 0xFFFFFFFF)),
        st.tuples(st.just("be64"), st.integers(0, 0xFFFFFFFFFFFFFFFF)),
        st.tuples(st.just("str"), counted_strings()),
        st.tuples(st.just("buf"), st.binary(max_size=1500)),
        # both sides of the 512-byte copy threshold
        st.tuples(st.just("async"), st.binary(max_size=3000)),
        st.tuples(st.just("iov"), st.lists(st.binary(max_size=1200), max_size=5)),
    )


def qemufile_ops() -> st.SearchStrategy[list[tuple[str, Any]]]:
    return st.lists(qemufile_op(), max_size=40)


def op_size(kind: str, value: Any) -> int:
    """Bytes an op puts on the wire."""
    if kind == "byte":
        return 1
    if kind in ("be16", "be32", "be64"):
        return {"be16": 2, "be32": 4, "be64": 8}[kind]
    if kind == "str":
        return 1 + len(value.encode())
    if kind == "iov":
        return sum(len(b) for b in value)
    return len(value)


# ---------------------------------------------------------------------------
# vmstate values
# ---------------------------------------------------------------------------

SCALARS: tuple[vmstate.Scalar, ...] = (
    vmstate.int8, vmstate.int16, vmstate.int32, vmstate.int64,
    vmstate.uint8, vmstate.uint16, vmstate.uint32, vmstate.uint64,
    vmstate.bool_,
)


def scalar_values(info: vmstate.Scalar) -> st.SearchStrategy[Any]:
    """Every value a scalar vmstate type can carry."""
    if info.name == "bool":
        return st.booleans()
    return st.integers(info.lo, info.hi)


def all_types_devices() -> st.SearchStrategy[Any]:
    """Instances of :class:`tests.core.samples.AllTypes` whose "equal" fields match the defaults."""
    from tests.core.samples import AllTypes, Inner, Point

    points = st.builds(Point, x=scalar_values(vmstate.int16), y=scalar_values(vmstate.int16))
    inners = st.builds(Inner, a=scalar_values(vmstate.uint32), extra=scalar_values(vmstate.uint16))

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        vblob = draw(st.binary(max_size=300))
        varr = draw(st.lists(scalar_values(vmstate.int32), max_size=20))
        return AllTypes(
            i8=draw(scalar_values(vmstate.int8)),
            i16=draw(scalar_values(vmstate.int16)),
            i32=draw(scalar_values(vmstate.int32)),
            i64=draw(scalar_values(vmstate.int64)),
            u8=draw(scalar_values(vmstate.uint8)),
            u16=draw(scalar_values(vmstate.uint16)),
            u32=draw(scalar_values(vmstate.uint32)),
            u64=draw(scalar_values(vmstate.uint64)),
            flag=draw(st.booleans()),
            blob=draw(st.binary(min_size=8, max_size=8)),
            vlen=len(vblob),
            vblob=vblob,
            arr=draw(st.lists(scalar_values(vmstate.uint16), min_size=4, max_size=4)),
            n=len(varr),
            varr=varr,
            inner=draw(inners),
            points=draw(st.lists(points, min_size=3, max_size=3)),
            inners=draw(st.lists(inners, min_size=2, max_size=2)),
            le=draw(st.integers(vmstate.int32_le.lo, AllTypes.LE_LIMIT)),
            sub_val=draw(scalar_values(vmstate.uint32)),
        )

    return build()


def live_payloads() -> st.SearchStrategy[bytes]:
    """State for :class:`tests.core.samples.ChunkedLive`."""
    return st.binary(max_size=5000)
