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
import os
from typing import IO, Any

from savevm.errors import CorruptStreamError, TruncatedStreamError
from savevm.format import SectionType

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


def read_vmdesc(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The vmdesc at the end of a stream file, or None if it has none.

    Reads the file's tail lazily (64 KiB first, more only while the answer
    depends on earlier bytes, never more than :data:`MAX_VMDESC_TAIL`), so
    a many-GiB stream costs a few reads.  See :func:`find_vmdesc` for the
    rule and for what None means; errors carry file offsets.
    """
    with open(path, "rb") as fh:
        found = _read_tail(fh)
    return None if found is None else found[1]


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


__all__ = [
    "MAX_VMDESC", "MAX_VMDESC_TAIL", "device_sizes", "find_vmdesc", "parse_vmdesc", "read_vmdesc",
    "vmdesc_json",
]
