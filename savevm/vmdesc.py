"""The VM description (vmdesc): the JSON a stream carries after its EOF byte.

A stream with a vmdesc ends with exactly (as QEMU 7.2's savevm.c writes it)::

    ... | 0x00 (EOF) | 0x06 (VMDESCRIPTION) | be32 len | len bytes of JSON

and nothing after.  The loader reads it in passing; tools that must know the
device layout *before* walking the stream (``savevm analyze``, ``savevm
incoming --vmdesc``) find it from the end of the file instead.  They cannot
guess: the be32 length may hold any byte (an old heuristic, "the first ``{``
after the last NUL", lands on the length field whenever its low byte is
0x7b).  What makes an exact rule possible is that valid JSON never holds a raw
byte below 0x20 (QEMU's writer escapes them, as ours does), so no 0x06 byte
follows the marker except inside the four length bytes.  The marker is
therefore the last 0x06 byte whose be32 length is exactly the number of bytes
after it, and which the EOF byte precedes.

Everything here that reads bytes bounds them first: the JSON by
:data:`MAX_VMDESC`, the tail of a file by :data:`MAX_VMDESC_TAIL`, so a
corrupt length or a huge file costs at most that much memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import IO, TYPE_CHECKING, Any, NoReturn

import attrs

from savevm.errors import CorruptStreamError, TruncatedStreamError
from savevm.format import SectionType

if TYPE_CHECKING:
    from savevm.qemufile import QEMUFile

#: Bound on the vmdesc JSON we are willing to read.
MAX_VMDESC = 64 << 20
#: Bound on the file tail searched for a vmdesc: EOF byte, marker, be32 length, JSON.
MAX_VMDESC_TAIL = MAX_VMDESC + 6
#: First tail read of :func:`read_vmdesc`; each retry reads 16 times more, up to the bound.
_FIRST_READ = 64 << 10

_MARKER = bytes([SectionType.VMDESCRIPTION])
# the marker, its be32 length: what precedes the JSON
_HEAD = 5


def vmdesc_json(desc: dict[str, Any]) -> bytes:
    """JSON in the shape of QEMU's compact JSONWriter (``", "`` and ``": "``).

    Like QEMU's writer, it escapes every character below 0x20 (``json``
    always does) and every non-ASCII one (``ensure_ascii``); :func:`find_vmdesc`
    relies on the first.
    """
    return json.dumps(desc, separators=(", ", ": "), ensure_ascii=True).encode()


def parse_vmdesc(raw: bytes | bytearray | memoryview, offset: int | None = None) -> dict[str, Any]:
    """Decode a vmdesc's JSON, refusing what cannot be one.

    ``offset`` is where ``raw`` starts in the stream, for the error.  The
    size is bounded before decoding, and nesting too deep for the decoder is
    reported like any other corruption instead of escaping as RecursionError.
    """
    if len(raw) > MAX_VMDESC:
        raise CorruptStreamError(f"vmdesc length {len(raw)} exceeds {MAX_VMDESC}", offset)
    try:
        desc = json.loads(bytes(raw))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CorruptStreamError(f"vmdesc is not valid JSON: {exc}", offset) from exc
    except RecursionError as exc:
        raise CorruptStreamError("vmdesc JSON is nested too deeply to decode", offset) from exc
    if not isinstance(desc, dict):
        raise CorruptStreamError(f"vmdesc JSON is a {type(desc).__name__}, expected an object", offset)
    return desc


# ---------------------------------------------------------------------------
# finding it at the end of a stream
# ---------------------------------------------------------------------------

#: _locate's answer when the bytes given cannot decide and earlier ones are needed.
_MORE = -1


def _locate(data: bytes | bytearray, whole: bool) -> int | None:
    """Index of the vmdesc marker in ``data``, a stream's last bytes.

    None: there is no vmdesc.  ``_MORE``: the answer depends on bytes before
    ``data`` (only when ``whole`` is false, i.e. ``data`` is a suffix of
    something longer that has not been read yet).
    """
    end = len(data)
    # lowest index the marker may have: its JSON is at most MAX_VMDESC bytes
    floor = max(0, end - _HEAD - MAX_VMDESC)
    more = _MORE if not whole and end < MAX_VMDESC_TAIL else None
    # the first search reaches back to the bound (the JSON may be that long); later ones
    # only four bytes (see below)
    reach: int | None = None
    hi = end - (_HEAD - 1)  # the marker needs its four length bytes after it
    while True:
        lo = floor if reach is None else max(floor, reach)
        p = data.rfind(_MARKER, lo, hi) if lo < hi else -1
        if p < 0:
            # earlier bytes matter only if this search wanted to reach before ``data``
            return more if reach is None or reach < 0 else None
        if p == 0:
            if more is not None:
                return more  # the byte before the marker is not in ``data``
        elif data[p - 1] == SectionType.EOF and int.from_bytes(data[p + 1 : p + _HEAD], "big") == end - p - _HEAD:
            return p
        # Not the marker.  Valid JSON holds no 0x06, so a 0x06 after the real marker can
        # only be one of its own length bytes: the marker, if any, is among the four before.
        reach, hi = p - 4, p


def find_vmdesc(data: bytes | bytearray | memoryview) -> tuple[int, dict[str, Any]] | None:
    """Find the vmdesc at the end of ``data``; (offset of its 0x06 marker, the JSON) or None.

    ``data`` is the end of a stream: from anywhere before its EOF byte to its
    last byte (a whole stream, or a file's tail, or a live reader's buffer).
    None means there is no vmdesc: the stream ends at EOF, or something
    follows the vmdesc, or the vmdesc is cut short.  A truncated vmdesc is
    not reported as an error because the structure alone cannot tell it
    from trailing bytes; the stream loader, which walks up to it, reports
    the truncation at its offset.  A marker whose JSON does not decode to an
    object raises :class:`~savevm.errors.CorruptStreamError`.
    """
    base = 0
    if isinstance(data, bytes | bytearray):
        buf = data
    else:  # a view is copied, but only as far back as a vmdesc can reach
        view = data if data.format == "B" and data.ndim == 1 else data.cast("B")
        base = max(0, len(view) - MAX_VMDESC_TAIL)
        buf = bytes(view[base:])
    p = _locate(buf, whole=True)
    if p is None:
        return None
    return base + p, parse_vmdesc(memoryview(buf)[p + _HEAD :], base + p + _HEAD)


def _read_tail(fh: IO[bytes]) -> tuple[int, dict[str, Any]] | None:
    size = fh.seek(0, os.SEEK_END)
    want = _FIRST_READ
    tail = b""
    while True:
        n = min(want, size, MAX_VMDESC_TAIL)
        if n > len(tail):
            fh.seek(size - n)
            k = n - len(tail)
            chunk = fh.read(k)
            if len(chunk) != k:
                raise TruncatedStreamError(f"the file shrank while its vmdesc was read ({len(chunk)} of {k} bytes)",
                                           size - n + len(chunk))
            tail = chunk + tail
        whole = n == size or n >= MAX_VMDESC_TAIL
        p = _locate(tail, whole)
        if p is None:
            return None
        if p != _MORE:
            base = size - len(tail)
            return base + p, parse_vmdesc(memoryview(tail)[p + _HEAD :], base + p + _HEAD)
        want *= 16


def read_vmdesc(path: str | os.PathLike[str] | IO[bytes]) -> dict[str, Any] | None:
    """The vmdesc at the end of a stream file, or None if it has none.

    Reads the file's tail lazily (64 KiB first, more only while the answer
    depends on earlier bytes, never more than :data:`MAX_VMDESC_TAIL`), so
    a many-GiB stream costs a few reads.  See :func:`find_vmdesc` for the
    rule and for what None means; errors carry file offsets.  ``path`` may
    also be a seekable binary file object (e.g. a spooled stdin).
    """
    found = locate_vmdesc(path)
    return None if found is None else found[1]


def locate_vmdesc(path: str | os.PathLike[str] | IO[bytes]) -> tuple[int, dict[str, Any]] | None:
    """Like :func:`read_vmdesc`, with the file offset of the vmdesc's 0x06 marker.

    The JSON follows at offset + 5 and runs to the end of the file; a tool
    that copies a stream's vmdesc (``savevm rewrite``) copies those bytes.
    """
    if isinstance(path, str | os.PathLike):
        with open(path, "rb") as fh:
            return _read_tail(fh)
    return _read_tail(path)


# ---------------------------------------------------------------------------
# what a vmdesc says about sizes
# ---------------------------------------------------------------------------


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CorruptStreamError(f"vmdesc: {what} is {value!r}, expected a non-negative integer")
    return value


def _field_size(fd: Any) -> int:
    if not isinstance(fd, dict):
        raise CorruptStreamError(f"vmdesc: field {fd!r} is not an object")
    return _count(fd.get("size", 0), f"size of field {fd.get('name')!r}") * _count(
        fd.get("array_len", 1), f"array_len of field {fd.get('name')!r}")


def _list(desc: dict[str, Any], key: str) -> list[Any]:
    v = desc.get(key, [])
    if not isinstance(v, list):
        raise CorruptStreamError(f"vmdesc: {key!r} of {desc.get('vmsd_name', desc.get('name'))!r} is not a list")
    return v


def _desc_size(desc: Any) -> int:
    """Bytes a described vmstate takes: its fields, then each subsection with its header."""
    if not isinstance(desc, dict):
        raise CorruptStreamError(f"vmdesc: {desc!r} is not an object")
    total = sum(_field_size(fd) for fd in _list(desc, "fields"))
    for sub in _list(desc, "subsections"):
        if not isinstance(sub, dict):
            raise CorruptStreamError(f"vmdesc: subsection {sub!r} is not an object")
        name = str(sub.get("vmsd_name", ""))
        # each sent subsection: 0x05, u8 name length, name, be32 version, then its fields
        total += 1 + 1 + len(name.encode()) + 4 + _desc_size(sub)
    return total


def device_sizes(vmdesc: dict[str, Any]) -> dict[tuple[str, int], int]:
    """(idstr, instance_id) -> bytes of its FULL section body, from a vmdesc.

    This is what lets a loader skip device sections it does not model, as
    analyze-migration.py walks them.  The vmdesc comes from a stream, so a
    malformed one raises :class:`~savevm.errors.CorruptStreamError` (offset
    unknown: the JSON has been decoded by now).
    """
    out: dict[tuple[str, int], int] = {}
    try:
        for dev in _list(vmdesc, "devices"):
            if not isinstance(dev, dict) or not isinstance(dev.get("name"), str):
                raise CorruptStreamError(f"vmdesc: device {dev!r} has no name")
            out[(dev["name"], _count(dev.get("instance_id"), f"instance_id of {dev['name']!r}"))] = _desc_size(dev)
    except RecursionError as exc:
        raise CorruptStreamError("vmdesc: subsections nested too deeply") from exc
    return out



# ---------------------------------------------------------------------------
# decoding device state through a vmdesc
# ---------------------------------------------------------------------------

#: Bytes of one blob kept as hex in a decoded device (the rest is read, counted and dropped).
MAX_HEX_BYTES = 64 << 10
#: Nesting (structs in structs, subsections in subsections) a vmdesc may have when decoded.
MAX_DECODE_DEPTH = 64
#: Values (every element of every field) one :class:`DecodeBudget` allows by default.
MAX_DECODE_VALUES = 1 << 20
#: Hex bytes kept across all blobs of one :class:`DecodeBudget` by default.
MAX_HEX_TOTAL = 64 << 20

#: Integer VMStateInfo names -> (bytes, signed).  Every one is big-endian on the wire:
#: "int32 le" means "less or equal" (the loader requires the received value to be at most
#: its own, QEMU's get_int32_le) and is written by the plain int32 put.  A timer is the
#: be64 expiry in ns, -1 when not armed.
_INTS: dict[str, tuple[int, bool]] = {
    "int8": (1, True), "int16": (2, True), "int32": (4, True), "int64": (8, True),
    "int32 equal": (4, True), "int32 le": (4, True), "int64 equal": (8, True), "timer": (8, True),
    "uint8": (1, False), "uint16": (2, False), "uint32": (4, False), "uint64": (8, False),
    "uint8 equal": (1, False), "uint16 equal": (2, False), "uint32 equal": (4, False),
    "uint64 equal": (8, False),
}
#: be64 holding an IEEE double's bits
_FLOATS = frozenset({"CPU_Double_U", "float64"})
#: types whose nested description QEMU writes straight into the field object (no "struct" child)
_INLINE_NESTED = frozenset({"vstruct", "tmp"})
#: QEMU's null-pointer marker: an info also named "uint64" that writes the single byte '0'
_NULLPTR_MARKER = 0x30


@attrs.define
class DecodeBudget:
    """What decoding may still spend, shared by every device of one stream.

    The vmdesc comes from the stream, so it decides how many values there
    are (an ``array_len`` of a billion zero-size elements costs no stream
    bytes at all) and how much hex is kept; the budget bounds both for a
    whole run, not per device, so many small hostile devices cannot add up.
    """

    values: int = MAX_DECODE_VALUES
    hex_bytes: int = MAX_HEX_TOTAL
    #: bytes of one blob kept as hex (the rest is read and dropped, and the field says "truncated")
    hex_per_blob: int = MAX_HEX_BYTES


class _DeviceDecoder:
    """One device's walk over the stream, field by field as its vmdesc entry describes it."""

    def __init__(self, f: QEMUFile, budget: DecodeBudget) -> None:
        self.f = f
        self.budget = budget

    def fail(self, msg: str, offset: int | None = None) -> NoReturn:
        raise CorruptStreamError(msg, self.f.pos if offset is None else offset)

    def count(self, value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(f"vmdesc: {what} is {value!r}, expected a non-negative integer")
        return value

    def items(self, desc: dict[str, Any], key: str, where: str) -> list[Any]:
        v = desc.get(key, [])
        if not isinstance(v, list):
            self.fail(f"vmdesc: {key!r} of {where} is not a list")
        return v

    def vmsd(self, desc: Any, where: str, depth: int) -> dict[str, Any]:
        """Fields, then subsections, of one description (a device, a struct, a subsection)."""
        if depth > MAX_DECODE_DEPTH:
            self.fail(f"vmdesc: {where} is nested more than {MAX_DECODE_DEPTH} levels deep")
        if not isinstance(desc, dict):
            self.fail(f"vmdesc: the description of {where} is not an object")
        out: dict[str, Any] = {}
        for key in ("vmsd_name", "version"):
            if key in desc:
                out[key] = desc[key]
        out["fields"] = [self.field(fd, where, depth) for fd in self.items(desc, "fields", where)]
        subs = self.items(desc, "subsections", where)
        if subs:
            out["subsections"] = [self.subsection(sd, where, depth) for sd in subs]
        return out

    def subsection(self, sd: Any, where: str, depth: int) -> dict[str, Any]:
        """``0x05, counted name, be32 version``, then the subsection's own fields.

        (docs/wire-format.md, Device state.)
        """
        if not isinstance(sd, dict):
            self.fail(f"vmdesc: a subsection of {where} is not an object")
        want = sd.get("vmsd_name")
        off = self.f.pos
        t = self.f.get_byte()
        if t != SectionType.SUBSECTION:
            self.fail(f"expected subsection {want!r} of {where} (byte 0x05), found 0x{t:02x}", off)
        name = self.f.get_counted_string()
        if name != want:
            self.fail(f"subsection of {where} is {name!r}, the vmdesc describes {want!r} here", off)
        version = self.f.get_be32()
        if "version" in sd and version != sd["version"]:
            self.fail(f"subsection {name!r} has version {version}, the vmdesc says {sd['version']!r}", off)
        body = self.vmsd(sd, name, depth + 1)
        return {"vmsd_name": name, "version": version, "offset": off, "fields": body["fields"],
                **({"subsections": body["subsections"]} if "subsections" in body else {})}

    def field(self, fd: Any, where: str, depth: int) -> dict[str, Any]:
        if not isinstance(fd, dict):
            self.fail(f"vmdesc: a field of {where} is not an object")
        name = fd.get("name")
        name = name if isinstance(name, str) else repr(name)
        path = f"{where}.{name}"
        out: dict[str, Any] = {"name": name}
        if "index" in fd:
            out["index"] = self.count(fd["index"], f"index of {path}")
            path += f"[{out['index']}]"
        typ = fd.get("type")
        if not isinstance(typ, str):
            self.fail(f"vmdesc: field {path} has type {typ!r}, expected a string")
        size = self.count(fd.get("size"), f"size of {path}")
        out.update({"type": typ, "size": size, "offset": self.f.pos})
        if "array_len" in fd:
            n = self.count(fd["array_len"], f"array_len of {path}")
            if n > self.budget.values:
                self.fail(f"vmdesc: {path} has {n} elements, more than the {self.budget.values} values "
                          "left to decode")
            out["array_len"] = n
            out["value"] = [self.element(fd, typ, size, f"{path}[{i}]", depth, out) for i in range(n)]
        else:
            out["value"] = self.element(fd, typ, size, path, depth, out)
        return out

    def element(self, fd: dict[str, Any], typ: str, size: int, path: str, depth: int,
                out: dict[str, Any]) -> Any:
        """One value of ``size`` stream bytes, decoded by its type; unknown types become hex."""
        if self.budget.values <= 0:
            self.fail(f"decoding {path}: more values than the decoder allows ({MAX_DECODE_VALUES} by default)")
        self.budget.values -= 1
        f = self.f
        start = f.pos
        nested: Any = None
        if typ == "struct":
            nested = fd.get("struct")
            if not isinstance(nested, dict):
                self.fail(f"vmdesc: struct field {path} has no 'struct' description")
        elif typ in _INLINE_NESTED and "fields" in fd:
            nested = fd
        if nested is not None:
            value = self.vmsd(nested, path, depth + 1)
            used = f.pos - start
            if used != size:
                self.fail(f"vmdesc: {path} is {size} bytes, but the fields and subsections it describes "
                          f"take {used}", start)
            return value
        if typ == "bool" and size == 1:
            b = f.get_byte()
            return bool(b) if b <= 1 else b  # QEMU reads any non-zero byte as true; show the odd ones
        if typ in _INTS:
            width, signed = _INTS[typ]
            if size == width:
                return int.from_bytes(f.get_bytes(size, limit=8), "big", signed=signed)
            if typ == "uint64" and size == 1:
                b = f.get_byte()
                if b == _NULLPTR_MARKER:
                    out["null_pointer"] = True
                    return None
                out["format"] = "hex"
                return f"{b:02x}"
        if typ in _FLOATS and size == 8:
            (v,) = struct.unpack(">d", f.get_bytes(8, limit=8))
            return v if math.isfinite(v) else repr(v)  # JSON has no NaN or infinity
        return self.blob(size, out)

    def blob(self, size: int, out: dict[str, Any]) -> str:
        """``size`` raw bytes as hex, keeping at most what the budget allows."""
        b = self.budget
        keep = min(size, b.hex_per_blob, b.hex_bytes)
        raw = self.f.get_bytes(keep, limit=keep)
        b.hex_bytes -= keep
        if size > keep:
            self.f.skip(size - keep)
            out["truncated"] = True
        out["format"] = "hex"
        return raw.hex()


def decode_device(f: QEMUFile, device: dict[str, Any], budget: DecodeBudget | None = None) -> dict[str, Any]:
    """Read one FULL section's data from ``f`` field by field, as its vmdesc entry describes it.

    ``device`` is an entry of the stream's vmdesc ``devices``; ``f`` stands
    at the section's first data byte and is left after the last one (the
    footer is the caller's).  The device state carries no types or lengths of
    its own (docs/wire-format.md, Device state), so the vmdesc is the only key to it: ints
    are decoded signed or unsigned by the type table, big-endian; bools,
    doubles, structs (recursively, each checked against its described size),
    arrays (``array_len``: one value list; ``index``: one entry per element)
    and subsections (their 0x05 header checked against the vmdesc); any
    other type, or a size the type cannot have, is kept as hex.  Every field
    gets its stream ``offset``.  A description that does not fit the bytes
    raises :class:`~savevm.errors.CorruptStreamError` at the offset where
    they part; hostile sizes and counts cost at most ``budget``.
    """
    d = _DeviceDecoder(f, budget if budget is not None else DecodeBudget())
    if not isinstance(device, dict):
        d.fail("vmdesc: a device entry is not an object")
    start = f.pos
    name = device.get("name")
    body = d.vmsd(device, name if isinstance(name, str) else repr(name), 0)
    size = f.pos - start
    declared = device.get("size")  # old-style (save_state) devices carry their total
    if declared is not None and declared != size:
        d.fail(f"vmdesc: device {name!r} is {declared!r} bytes but its fields take {size}", start)
    return {"name": name, "instance_id": device.get("instance_id"), **body, "offset": start, "size": size}

__all__ = [
    "MAX_DECODE_DEPTH", "MAX_DECODE_VALUES", "MAX_HEX_BYTES", "MAX_HEX_TOTAL", "MAX_VMDESC", "MAX_VMDESC_TAIL",
    "DecodeBudget", "decode_device", "device_sizes", "find_vmdesc", "locate_vmdesc", "parse_vmdesc", "read_vmdesc",
    "vmdesc_json",
]
