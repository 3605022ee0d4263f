"""Sample devices, live handlers and hand-built stream pieces for the core tests."""

from __future__ import annotations

import struct
from typing import Any

import attrs

from savevm import vmstate
from savevm.handlers import SaveContext, SaveVMHandlers
from savevm.qemufile import QEMUFile

# ---------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------


@vmstate.vmsd("point")
@attrs.define
class Point:
    x: int = vmstate.field(vmstate.int16, default=0)
    y: int = vmstate.field(vmstate.int16, default=0)


@vmstate.vmsd("inner", subsections=[vmstate.Subsection("inner/extra", needed=lambda s: s.extra != 0)])
@attrs.define
class Inner:
    a: int = vmstate.field(vmstate.uint32, default=0)
    extra: int = vmstate.field(vmstate.uint16, default=0, subsection="inner/extra")


@vmstate.vmsd("alltypes", version_id=1,
              subsections=[vmstate.Subsection("alltypes/sub", needed=lambda d: d.sub_val != 0)])
@attrs.define
class AllTypes:
    """One field of every vmstate type the core offers."""

    LE_LIMIT = 1000

    i8: int = vmstate.field(vmstate.int8, default=0)
    i16: int = vmstate.field(vmstate.int16, default=0)
    i32: int = vmstate.field(vmstate.int32, default=0)
    i64: int = vmstate.field(vmstate.int64, default=0)
    u8: int = vmstate.field(vmstate.uint8, default=0)
    u16: int = vmstate.field(vmstate.uint16, default=0)
    u32: int = vmstate.field(vmstate.uint32, default=0)
    u64: int = vmstate.field(vmstate.uint64, default=0)
    flag: bool = vmstate.field(vmstate.bool_, default=False)
    blob: bytes = vmstate.field(vmstate.buffer(8), default=bytes(8))
    vlen: int = vmstate.field(vmstate.uint16, default=0)
    vblob: bytes = vmstate.field(vmstate.vbuffer("vlen", max_len=1024), default=b"")
    pad: Any = vmstate.field(vmstate.unused(3), default=None)
    arr: list = vmstate.field(vmstate.array(vmstate.uint16, 4), factory=lambda: [0, 0, 0, 0])
    n: int = vmstate.field(vmstate.uint8, default=0)
    varr: list = vmstate.field(vmstate.varray(vmstate.int32, "n", max_count=32), factory=list)
    inner: Inner = vmstate.field(vmstate.struct_(Inner), factory=Inner)
    points: list = vmstate.field(vmstate.array(vmstate.struct_(Point), 3), factory=lambda: [Point()] * 3)
    inners: list = vmstate.field(vmstate.array(vmstate.struct_(Inner), 2), factory=lambda: [Inner(), Inner()])
    eq8: int = vmstate.field(vmstate.uint8_equal, default=7)
    eq16: int = vmstate.field(vmstate.uint16_equal, default=0x1234)
    eq32: int = vmstate.field(vmstate.uint32_equal, default=0xDEADBEEF)
    ieq32: int = vmstate.field(vmstate.int32_equal, default=-5)
    ieq64: int = vmstate.field(vmstate.int64_equal, default=-(1 << 40))
    le: int = vmstate.field(vmstate.int32_le, default=LE_LIMIT)
    sub_val: int = vmstate.field(vmstate.uint32, default=0, subsection="alltypes/sub")


#: AllTypes fields the loader does not carry over (padding).
ALLTYPES_IGNORED = {"pad"}


@vmstate.vmsd("counter", version_id=3, minimum_version_id=2,
              subsections=[vmstate.Subsection("counter/hi", needed=lambda d: d.hi != 0)])
@attrs.define
class Counter:
    """A small device whose wire bytes the tests spell out by hand."""

    value: int = vmstate.field(vmstate.uint32, default=0)
    flags: int = vmstate.field(vmstate.uint8, default=0, version_id=3)
    hi: int = vmstate.field(vmstate.uint64, default=0, subsection="counter/hi")


def counter_bytes(value: int, flags: int, hi: int) -> bytes:
    """Counter's vmstate at version 3, written out by hand."""
    out = struct.pack(">IB", value, flags)
    if hi:
        name = b"counter/hi"
        out += b"\x05" + bytes([len(name)]) + name + struct.pack(">I", 1) + struct.pack(">Q", hi)
    return out


# ---------------------------------------------------------------------------
# a live section
# ---------------------------------------------------------------------------


class ChunkedLive(SaveVMHandlers):
    """Sends ``data`` in ``chunk``-byte PART chunks, then an END with what is left.

    Wire: START = be32 total; PART/END = be32 n + n bytes.  On the load side
    the bytes go to ``incoming`` and are published to ``received`` only in
    ``load_cleanup`` after a load that was not aborted.
    """

    def __init__(self, data: bytes = b"", chunk: int = 100, active: bool = True) -> None:
        self.data = data
        self.chunk = chunk
        self.active = active
        self.sent = 0
        self.iterations = 0
        self.calls: list[str] = []
        # load side
        self.total: int | None = None
        self.incoming = bytearray()
        self.received: bytes | None = None
        self.aborted = False

    def is_active(self) -> bool:
        return self.active

    def save_setup(self, f: QEMUFile, ctx: SaveContext) -> None:
        self.calls.append("save_setup")
        f.put_be32(len(self.data))

    def _send(self, f: QEMUFile, n: int) -> None:
        piece = self.data[self.sent:self.sent + n]
        f.put_be32(len(piece))
        f.put_buffer_async(piece)
        self.sent += len(piece)

    def save_live_iterate(self, f: QEMUFile) -> bool:
        self.calls.append("save_live_iterate")
        self.iterations += 1
        self._send(f, self.chunk)
        return self.sent >= len(self.data)

    def save_live_complete_precopy(self, f: QEMUFile) -> None:
        self.calls.append("save_live_complete_precopy")
        self._send(f, len(self.data) - self.sent)

    def save_live_pending(self, threshold: int) -> int:
        return len(self.data) - self.sent

    def save_cleanup(self) -> None:
        self.calls.append("save_cleanup")

    def load_setup(self) -> None:
        self.calls.append("load_setup")

    def load_state(self, f: QEMUFile, version_id: int) -> None:
        self.calls.append(f"load_state v{version_id}")
        if self.total is None:
            self.total = f.get_be32()
            return
        n = f.get_be32()
        self.incoming += f.get_bytes(n, limit=self.total - len(self.incoming))

    def load_abort(self) -> None:
        self.calls.append("load_abort")
        self.aborted = True

    def load_cleanup(self) -> None:
        self.calls.append("load_cleanup")
        if not self.aborted and self.total == len(self.incoming):
            self.received = bytes(self.incoming)


# ---------------------------------------------------------------------------
# hand-built stream pieces (docs/wire-format.md, Header and configuration to End of stream)
# ---------------------------------------------------------------------------


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def header(machine: str = "savevm", version: int = 3) -> bytes:
    name = machine.encode()
    return b"QEVM" + be32(version) + b"\x07" + be32(len(name)) + name


def start_full(kind: int, sid: int, idstr: str, instance: int, version: int) -> bytes:
    name = idstr.encode()
    return bytes([kind]) + be32(sid) + bytes([len(name)]) + name + be32(instance) + be32(version)


def part_end(kind: int, sid: int) -> bytes:
    return bytes([kind]) + be32(sid)


def footer(sid: int) -> bytes:
    return b"\x7e" + be32(sid)


def vmdesc(blob: bytes) -> bytes:
    return b"\x06" + be32(len(blob)) + blob
