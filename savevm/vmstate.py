"""Device sections described by attrs classes, encoded as QEMU's vmstate.

A device is an ordinary (non-frozen) attrs class whose fields carry a
vmstate type in their metadata; the class decorator :func:`vmsd` turns the
field list into a :class:`VMStateDescription`::

    @vmstate.vmsd("serial", version_id=2, minimum_version_id=1,
                  subsections=[vmstate.Subsection("serial/fifo", needed=lambda s: s.fifo_len > 0)])
    @attrs.define
    class Serial:
        lcr: int = vmstate.field(vmstate.uint8, default=0)
        divider: int = vmstate.field(vmstate.uint16, default=12)
        scratch: int = vmstate.field(vmstate.uint8, default=0, version_id=2)
        fifo_len: int = vmstate.field(vmstate.uint8, default=0, subsection="serial/fifo")
        fifo: bytes = vmstate.field(vmstate.vbuffer("fifo_len", max_len=255), default=b"",
                                    subsection="serial/fifo")

On the wire a field is its value's bytes only (docs/wire-format.md, Device state), and a
subsection is ``0x05, counted name, be32 version, fields``.  Loading never
touches the device: :func:`load_state` returns a new object built with
``attrs.evolve``, and the caller commits it when the whole stream is known
good, so a failed migration leaves the destination's devices as they were.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from savevm.errors import (
    ConfigurationMismatchError,
    CorruptStreamError,
    MigrationError,
    RegistrationError,
    UnknownSectionError,
    VersionMismatchError,
)
from savevm.format import SectionType

if TYPE_CHECKING:
    from savevm.qemufile import QEMUFile

VMSD_ATTR = "__vmsd__"


# ---------------------------------------------------------------------------
# the field type protocol (VMStateInfo)
# ---------------------------------------------------------------------------


@attrs.frozen
class FieldContext:
    """Where a field is being saved or loaded, handed to its type's ``put``/``get``.

    A type cannot work from its value alone: a variable buffer or array
    reads its length from an earlier field, every vmdesc entry carries the
    field's name, and errors must say which field failed.  One object holds
    all three, so an array passes it on to its elements (with the index in
    ``where``) and what a type may use can grow without changing signatures.
    """

    #: the field's name, as the vmdesc writes it
    name: str
    #: the field's path for messages: ``"serial.fifo[3]"``
    where: str
    #: the fields of the enclosing description by name.  Saving: the device's values.
    #: Loading: the destination's values, overwritten by each field as it is loaded, so a
    #: length field read earlier in the stream is what a later field sees.
    values: Mapping[str, Any]

    def element(self, index: int) -> FieldContext:
        """The context of element ``index`` of an array field."""
        return FieldContext(self.name, f"{self.where}[{index}]", self.values)


class _Keep(enum.Enum):
    KEEP = "keep"


#: What ``FieldType.get`` returns when the bytes carried no value (padding): the
#: destination keeps its own, and the field is not counted as loaded.
KEEP = _Keep.KEEP


@runtime_checkable
class FieldType(Protocol):
    """A vmstate field type: how a value sits on the wire (QEMU's VMStateInfo).

    The walker (:func:`save_state` / :func:`load_state`) handles what is the
    description's business: field order, field versions and subsections.
    A type handles one value: ``put`` writes it and returns its vmdesc
    entries, ``get`` reads it.  Anything with these members can be used in
    :func:`field`, ours or a third party's; checks a type makes against the
    destination ("equal", "le") belong in its ``get``, bounds on lengths read
    from the stream too.

    Optional: a type whose vmdesc entries cannot be described once for a
    whole array (QEMU's ``vmsd_can_compress``; here, structs with
    subsections) sets ``compressible = False``; the default is True.
    """

    @property
    def name(self) -> str:
        """The type name the vmdesc writes (``"uint32"``, ``"buffer"``, ``"struct"``...)."""
        ...

    def put(self, f: QEMUFile, value: Any, ctx: FieldContext) -> list[dict[str, Any]]:
        """Write ``value``; return its vmdesc field entries.

        Usually one entry, ``{"name": ctx.name, "type": self.name, "size": n}``
        with ``n`` the bytes written (nested data included); an empty array
        describes nothing.  A value the description cannot hold raises
        :class:`~savevm.errors.MigrationError` naming ``ctx.where``.
        """
        ...

    def get(self, f: QEMUFile, current: Any, ctx: FieldContext) -> Any:
        """Read a value from ``f`` and return it, or :data:`KEEP`.

        ``current`` is the destination's own value (the reference of "equal"
        checks, the base of a nested struct).  Bad data raises a
        :class:`~savevm.errors.StreamError` subclass with its offset.
        """
        ...


def _compressible(info: FieldType) -> bool:
    return bool(getattr(info, "compressible", True))


# ---------------------------------------------------------------------------
# field types
# ---------------------------------------------------------------------------


@attrs.frozen
class Scalar:
    """A fixed-width big-endian integer or bool."""

    name: str
    fmt: str
    lo: int
    hi: int
    #: "equal" types: the loaded value must equal the destination's own.
    equal: bool = False
    #: "int32 le": the loaded value must be <= the destination's own.
    less_equal: bool = False

    @property
    def size(self) -> int:
        return struct.calcsize(self.fmt)

    def check(self, value: Any, where: str) -> None:
        if isinstance(value, bool) and self.name != "bool":
            raise MigrationError(f"{where}: expected an int for {self.name}, got bool")
        if not isinstance(value, int) or not self.lo <= int(value) <= self.hi:
            raise MigrationError(f"{where}: value {value!r} does not fit {self.name} [{self.lo}, {self.hi}]")

    def put(self, f: QEMUFile, value: Any, ctx: FieldContext | None = None) -> list[dict[str, Any]]:
        """Write the value (``ctx`` may be left out to use a scalar as a plain codec)."""
        self.check(value, ctx.where if ctx is not None else self.name)
        f.put_buffer(struct.pack(self.fmt, int(value)))
        return [{"name": ctx.name if ctx is not None else self.name, "type": self.name, "size": self.size}]

    def get(self, f: QEMUFile, current: Any = None, ctx: FieldContext | None = None) -> Any:
        """Read the value; "equal"/"le" checks against ``current`` apply inside a description (``ctx``)."""
        off = f.pos
        (v,) = struct.unpack(self.fmt, f.get_bytes(self.size, limit=self.size))
        if self.name == "bool":
            if v > 1:
                raise CorruptStreamError(f"bool field holds {v}, expected 0 or 1", off)
            v = bool(v)
        if ctx is not None:
            if self.equal and v != current:
                raise ConfigurationMismatchError(f"{ctx.where}: received {v}, this side requires {current}", off)
            if self.less_equal and v > current:
                raise ConfigurationMismatchError(
                    f"{ctx.where}: received {v}, this side allows at most {current}", off)
        return v


def _int(name: str, bits: int, signed: bool, **kw: bool) -> Scalar:
    fmt = {8: "b", 16: "h", 32: "i", 64: "q"}[bits]
    fmt = ">" + (fmt if signed else fmt.upper())
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return Scalar(name, fmt, lo, hi, **kw)


int8 = _int("int8", 8, True)
int16 = _int("int16", 16, True)
int32 = _int("int32", 32, True)
int64 = _int("int64", 64, True)
uint8 = _int("uint8", 8, False)
uint16 = _int("uint16", 16, False)
uint32 = _int("uint32", 32, False)
uint64 = _int("uint64", 64, False)
uint8_equal = _int("uint8 equal", 8, False, equal=True)
uint16_equal = _int("uint16 equal", 16, False, equal=True)
uint32_equal = _int("uint32 equal", 32, False, equal=True)
int32_equal = _int("int32 equal", 32, True, equal=True)
int64_equal = _int("int64 equal", 64, True, equal=True)
int32_le = _int("int32 le", 32, True, less_equal=True)
bool_ = Scalar("bool", ">B", 0, 1)


@attrs.frozen
class Buffer:
    """Raw bytes: fixed ``size``, or taken from an earlier field (``length_field``)."""

    size: int | None = None
    length_field: str | None = None
    max_len: int = 1 << 20
    unused: bool = False

    @property
    def name(self) -> str:
        return "unused_buffer" if self.unused else "buffer"

    def length(self, values: Mapping[str, Any]) -> int:
        if self.size is not None:
            return self.size
        assert self.length_field is not None
        return int(values[self.length_field])

    def put(self, f: QEMUFile, value: Any, ctx: FieldContext) -> list[dict[str, Any]]:
        """Write the bytes (zeros for padding); their count must be what the description says."""
        n = self.length(ctx.values)
        if self.unused:
            f.put_buffer(bytes(n))
        else:
            b = bytes(value)
            if len(b) != n:
                raise MigrationError(f"{ctx.where}: buffer is {len(b)} bytes, description says {n}")
            f.put_buffer(b)
        return [{"name": ctx.name, "type": self.name, "size": n}]

    def get(self, f: QEMUFile, current: Any, ctx: FieldContext) -> Any:
        """Read the bytes, bounded by ``max_len`` first; padding is skipped (:data:`KEEP`)."""
        off = f.pos
        n = self.length(ctx.values)
        if n > self.max_len or n < 0:
            raise CorruptStreamError(f"{ctx.where}: buffer length {n} exceeds its maximum {self.max_len}", off)
        if self.unused:
            f.skip(n)
            return KEEP
        return f.get_bytes(n, limit=self.max_len)


def buffer(size: int) -> Buffer:
    """A fixed-size byte buffer (``VMSTATE_BUFFER``)."""
    return Buffer(size=size)


def vbuffer(length_field: str, max_len: int = 1 << 20) -> Buffer:
    """A byte buffer whose length is an earlier field's value (``VMSTATE_VBUFFER``).

    ``max_len`` bounds what a corrupt stream can make us allocate.
    """
    return Buffer(length_field=length_field, max_len=max_len)


def unused(size: int) -> Buffer:
    """Padding the loader skips (``VMSTATE_UNUSED``); the attribute value is ignored."""
    return Buffer(size=size, unused=True)


@attrs.frozen
class Array:
    """``count`` elements of ``element``, or a count taken from an earlier field."""

    element: FieldType
    count: int | None = None
    count_field: str | None = None
    max_count: int = 1 << 16

    def length(self, values: Mapping[str, Any]) -> int:
        if self.count is not None:
            return self.count
        assert self.count_field is not None
        return int(values[self.count_field])

    @property
    def name(self) -> str:
        return self.element.name

    def put(self, f: QEMUFile, value: Any, ctx: FieldContext) -> list[dict[str, Any]]:
        """Write the elements back to back.

        The vmdesc describes element 0 once with ``array_len`` when the
        element type allows it, else each element with its ``index``; a
        single element is described as a plain field, as QEMU does.
        """
        n = self.length(ctx.values)
        seq = list(value)
        if len(seq) != n:
            raise MigrationError(f"{ctx.where}: array has {len(seq)} elements, description says {n}")
        entries: list[dict[str, Any]] = []
        for i, elem in enumerate(seq):
            entries.extend(self.element.put(f, elem, ctx.element(i))[:1])
        if not entries:
            return []
        if _compressible(self.element) and n > 1:
            out = {"name": ctx.name, "array_len": n}
            out.update({k: v for k, v in entries[0].items() if k != "name"})
            return [out]
        if n == 1:
            return entries
        return [{"name": ctx.name, "index": i, **{k: v for k, v in e.items() if k != "name"}}
                for i, e in enumerate(entries)]

    def get(self, f: QEMUFile, current: Any, ctx: FieldContext) -> Any:
        """Read the elements, the count bounded by ``max_count`` first; a tuple stays a tuple."""
        off = f.pos
        n = self.length(ctx.values)
        if n < 0 or n > self.max_count:
            raise CorruptStreamError(f"{ctx.where}: array count {n} exceeds its maximum {self.max_count}", off)
        cur = list(current) if current is not None else []
        out = []
        for i in range(n):
            c = cur[i] if i < len(cur) else None
            v = self.element.get(f, c, ctx.element(i))
            out.append(c if v is KEEP else v)
        return type(current)(out) if isinstance(current, tuple) else out


def array(element: FieldType, count: int) -> Array:
    """A fixed-length array (``VMSTATE_ARRAY``)."""
    return Array(element, count=count)


def varray(element: FieldType, count_field: str, max_count: int = 1 << 16) -> Array:
    """A variable-length array counted by an earlier field (``VMSTATE_VARRAY_*``)."""
    return Array(element, count_field=count_field, max_count=max_count)


@attrs.frozen
class Struct:
    """A nested device description (``VMSTATE_STRUCT``): its fields inline, then its subsections."""

    cls: type

    @property
    def name(self) -> str:
        return "struct"

    @property
    def vmsd(self) -> VMStateDescription:
        return vmsd_of(self.cls)

    @property
    def compressible(self) -> bool:
        """An array of these is described once only if no element can carry a subsection."""
        return not _has_subsections(self.vmsd)

    def put(self, f: QEMUFile, value: Any, ctx: FieldContext) -> list[dict[str, Any]]:
        """Write the nested device; its vmdesc goes under ``"struct"``."""
        start = f.pos
        sub = save_state(f, value)
        return [{"name": ctx.name, "type": "struct", "struct": sub, "size": f.pos - start}]

    def get(self, f: QEMUFile, current: Any, ctx: FieldContext) -> Any:
        """Load a new nested object over ``current`` (or a default one), at its own version."""
        base = current if current is not None else self.cls()
        return load_state(f, base, self.vmsd.version_id)


def struct_(cls: type) -> Struct:
    """Nest another vmstate class."""
    return Struct(cls)


# ---------------------------------------------------------------------------
# descriptions
# ---------------------------------------------------------------------------


@attrs.frozen
class FieldSpec:
    """A field's place in the description."""

    info: FieldType
    version_id: int = 0
    subsection: str | None = None


def field(info: FieldType, *, version_id: int = 0, subsection: str | None = None, **kwargs: Any) -> Any:
    """An attrs field carrying a vmstate type.

    ``version_id``: the field is on the wire only for section versions
    >= this (QEMU's ``VMSTATE_*_V``).  ``subsection``: the field belongs to
    that subsection, not to the main body.  Other keyword arguments go to
    :func:`attrs.field`.
    """
    md = dict(kwargs.pop("metadata", {}) or {})
    md["vmstate"] = FieldSpec(info, version_id, subsection)
    return attrs.field(metadata=md, **kwargs)


@attrs.frozen
class Subsection:
    """A subsection: sent only when ``needed(device)`` is true."""

    name: str
    needed: Callable[[Any], bool]
    version_id: int = 1
    minimum_version_id: int = 0


@attrs.frozen
class VMStateDescription:
    """The wire description of a device (QEMU's VMStateDescription)."""

    name: str
    version_id: int
    minimum_version_id: int
    fields: tuple[tuple[str, FieldSpec], ...]
    subsections: tuple[tuple[Subsection, tuple[tuple[str, FieldSpec], ...]], ...] = ()


def vmsd(
    name: str,
    version_id: int = 1,
    minimum_version_id: int | None = None,
    subsections: Sequence[Subsection] = (),
) -> Callable[[type], type]:
    """Class decorator: describe an attrs class as a vmstate device."""

    def deco(cls: type) -> type:
        if not attrs.has(cls):
            raise RegistrationError(f"{cls.__name__}: @vmsd goes above @attrs.define")
        main: list[tuple[str, FieldSpec]] = []
        subs: dict[str, list[tuple[str, FieldSpec]]] = {s.name: [] for s in subsections}
        seen: set[str] = set()
        for a in attrs.fields(cls):
            spec = a.metadata.get("vmstate")
            if spec is None:
                continue
            _check_type(spec.info, f"{cls.__name__}.{a.name}")
            _check_refs(cls, a.name, spec, seen)
            seen.add(a.name)
            if spec.subsection is None:
                main.append((a.name, spec))
            elif spec.subsection in subs:
                subs[spec.subsection].append((a.name, spec))
            else:
                raise RegistrationError(f"{cls.__name__}.{a.name}: unknown subsection {spec.subsection!r}")
        for s in subsections:
            if not s.name.startswith(name):
                raise RegistrationError(f"subsection {s.name!r} must start with its parent name {name!r}")
        mv = version_id if minimum_version_id is None else minimum_version_id
        desc = VMStateDescription(
            name, version_id, mv, tuple(main), tuple((s, tuple(subs[s.name])) for s in subsections)
        )
        setattr(cls, VMSD_ATTR, desc)
        return cls

    return deco


def _check_type(info: Any, where: str) -> None:
    if isinstance(info, Array):  # first: an array takes its name from its element
        _check_type(info.element, f"{where}[]")
    if not isinstance(info, FieldType):
        raise RegistrationError(
            f"{where}: {info!r} is not a vmstate field type (a FieldType has name, put and get)")


def _check_refs(cls: type, fname: str, spec: FieldSpec, seen: set[str]) -> None:
    info = spec.info
    ref = getattr(info, "length_field", None) or getattr(info, "count_field", None)
    if ref is not None and ref not in seen:
        raise RegistrationError(f"{cls.__name__}.{fname}: length field {ref!r} must come earlier")


def vmsd_of(cls: type) -> VMStateDescription:
    """The description attached by :func:`vmsd`."""
    d = getattr(cls, VMSD_ATTR, None)
    if d is None:
        raise RegistrationError(f"{cls.__name__} has no vmstate description (decorate it with @vmsd)")
    return d


# ---------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------


def save_state(f: QEMUFile, obj: Any) -> dict[str, Any]:
    """Write ``obj``'s fields and needed subsections; return its vmdesc part.

    The returned dict has ``vmsd_name``, ``version``, ``fields`` and (if any
    subsection was sent) ``subsections``, as QEMU's JSON writer shapes them.
    """
    d = vmsd_of(type(obj))
    out: dict[str, Any] = {"vmsd_name": d.name, "version": d.version_id}
    values = attrs.asdict(obj, recurse=False)
    out["fields"] = _save_fields(f, obj, d.fields, values, d.name)
    subs = []
    for sub, fields in d.subsections:
        if not sub.needed(obj):
            continue
        f.put_byte(SectionType.SUBSECTION)
        f.put_counted_string(sub.name)
        f.put_be32(sub.version_id)
        subs.append({"vmsd_name": sub.name, "version": sub.version_id,
                     "fields": _save_fields(f, obj, fields, values, sub.name)})
    if subs:
        out["subsections"] = subs
    return out


def _save_fields(f: QEMUFile, obj: Any, fields: Sequence[tuple[str, FieldSpec]],
                 values: dict[str, Any], where: str) -> list[dict[str, Any]]:
    desc: list[dict[str, Any]] = []
    for fname, spec in fields:
        desc.extend(spec.info.put(f, values[fname], FieldContext(fname, f"{where}.{fname}", values)))
    return desc


def _has_subsections(d: VMStateDescription) -> bool:
    # only the fields' own types count, not those of array elements (unlike QEMU's
    # vmsd_can_compress, which recurses through arrays of structs too)
    return bool(d.subsections) or any(not _compressible(s.info) for _, s in d.fields)


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------


def load_state(f: QEMUFile, obj: Any, version_id: int) -> Any:
    """Read a device's state and return a *new* object holding it.

    ``obj`` is the destination's current device: it supplies the
    description, the values of fields absent from the stream (newer fields,
    subsections not sent), and the reference values of "equal" fields.
    """
    d = vmsd_of(type(obj))
    if version_id > d.version_id:
        raise VersionMismatchError(
            f"{d.name}: stream has version {version_id}, newer than supported {d.version_id}", f.pos)
    if version_id < d.minimum_version_id:
        raise VersionMismatchError(
            f"{d.name}: stream has version {version_id}, older than minimum {d.minimum_version_id}", f.pos)
    values = attrs.asdict(obj, recurse=False)
    changed: dict[str, Any] = {}
    _load_fields(f, obj, d.fields, version_id, values, changed, d.name)
    subs = {s.name: (s, fields) for s, fields in d.subsections}
    while True:
        if f.peek_byte() != SectionType.SUBSECTION:
            break
        n = f.fill(2)
        view = f.buffered()
        if n < 2:
            break
        name_len = view[1]
        if name_len < len(d.name) + 1:
            break
        if f.fill(2 + name_len) < 2 + name_len:
            break
        raw = bytes(f.buffered()[2 : 2 + name_len])
        if not raw.startswith(d.name.encode()):
            break
        start = f.pos
        name = raw.decode(errors="replace")
        if name not in subs:
            raise UnknownSectionError(f"{d.name}: unknown subsection {name!r}", start)
        f.consume(2 + name_len)
        sub, fields = subs[name]
        sv = f.get_be32()
        if sv > sub.version_id or sv < sub.minimum_version_id:
            raise VersionMismatchError(
                f"{name}: subsection version {sv} not in [{sub.minimum_version_id}, {sub.version_id}]", start)
        _load_fields(f, obj, fields, sv, values, changed, name)
    return attrs.evolve(obj, **changed) if changed else obj


def _load_fields(f: QEMUFile, obj: Any, fields: Sequence[tuple[str, FieldSpec]], version_id: int,
                 values: dict[str, Any], changed: dict[str, Any], where: str) -> None:
    for fname, spec in fields:
        if spec.version_id > version_id:
            continue
        v = spec.info.get(f, values.get(fname), FieldContext(fname, f"{where}.{fname}", values))
        if v is not KEEP:
            values[fname] = v
            changed[fname] = v


def commit_state(device: Any, loaded: Any) -> None:
    """Copy loaded vmstate fields onto the live device object (after a good load)."""
    for a in attrs.fields(type(device)):
        if "vmstate" in a.metadata:
            setattr(device, a.name, getattr(loaded, a.name))


def describe(obj: Any) -> dict[str, Any]:
    """The vmdesc JSON part of ``obj`` without a stream (writes to a scratch file)."""
    from savevm.channels.memory import MemoryChannel
    from savevm.qemufile import QEMUFile

    f = QEMUFile(MemoryChannel(), writable=True)
    return save_state(f, obj)


__all__ = [
    "KEEP", "Array", "Buffer", "FieldContext", "FieldSpec", "FieldType", "Scalar", "Struct", "Subsection",
    "VMStateDescription", "array", "bool_", "buffer", "commit_state", "describe", "field", "int8", "int16", "int32",
    "int32_equal", "int32_le", "int64", "int64_equal", "load_state", "save_state", "struct_",
    "uint8", "uint8_equal", "uint16", "uint16_equal", "uint32", "uint32_equal", "uint64",
    "unused", "varray", "vbuffer", "vmsd", "vmsd_of",
]
