"""Reading the whole stream, validating everything.

:class:`StreamLoader` is QEMU's ``qemu_loadvm_state`` without its habits:
every length is bounded before allocation, every id and version is checked,
and device state is decoded into new objects that are committed only after
EOF, so a failed load leaves the destination's devices untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from savevm import vmstate
from savevm.errors import (
    BadMagicError,
    ConfigurationMismatchError,
    CorruptStreamError,
    FooterMismatchError,
    TrailingDataError,
    UnknownSectionError,
    VersionMismatchError,
)
from savevm.format import (
    COMMAND_ARG_LEN,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    TARGET_PAGE_BITS,
    Command,
    SectionType,
)
from savevm.logging import get_logger
from savevm.vmdesc import MAX_VMDESC, device_sizes, parse_vmdesc

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.qemufile import QEMUFile
    from savevm.registry import SectionEntry, SectionRegistry
    from savevm.return_path import DestReturnPath

log = get_logger("savevm.load")

#: Bound on the machine name in the configuration record.
MAX_MACHINE_NAME = 256


@attrs.define
class LoadResult:
    """What a successful load saw."""

    machine: str | None = None
    sections: list[tuple[str, int, int]] = attrs.field(factory=list)  # (idstr, instance, version)
    vmdesc: dict[str, Any] | None = None
    bytes_read: int = 0
    #: FULL sections skipped because only the vmdesc knew them
    skipped: list[tuple[str, int, int]] = attrs.field(factory=list)


class StreamLoader:
    """The load side of one stream."""

    def __init__(self, f: QEMUFile, registry: SectionRegistry, config: MigrationConfig | None = None,
                 *, require_eof: bool = True, vmdesc: dict[str, Any] | None = None,
                 return_path: DestReturnPath | None = None, any_machine: bool = False) -> None:
        self.f = f
        #: accept whatever machine the configuration record names (a tool reading a file,
        #: e.g. ``savevm analyze``); a migration must stay strict, since state saved for
        #: one machine type does not fit another
        self.any_machine = any_machine
        #: the destination's return path (a live migration over a socket): OPEN_RETURN_PATH opens
        #: it, each PING is answered on it, and a savevm source's handover follows the stream
        self.return_path = return_path
        #: device sizes from a vmdesc read ahead of time, to skip devices we do not model
        self._skip_sizes = device_sizes(vmdesc) if vmdesc else {}
        self.registry = registry
        self.config = config or registry.config
        self.require_eof = require_eof
        self._by_id: dict[int, tuple[SectionEntry, int]] = {}
        self._pending_devices: list[tuple[SectionEntry, Any]] = []
        self.result = LoadResult()

    # ---------------------------------------------------------------- entry
    def load(self) -> LoadResult:
        """Read the stream to its end; raise a StreamError subclass on any problem."""
        started = False
        try:
            self.header()
            started = True  # from here every live section gets load_abort/load_cleanup
            self.setup()
            self.sections()
            self.trailer()
        except BaseException:
            if started:
                self._abort()
            raise
        finally:
            if started:
                self._cleanup()
        self.commit()
        self.result.bytes_read = self.f.pos
        return self.result

    # ---------------------------------------------------------------- header
    def header(self) -> None:
        f = self.f
        off = f.pos
        magic = f.get_be32()
        if magic != QEMU_VM_FILE_MAGIC:
            raise BadMagicError(
                f"not a migration stream: magic 0x{magic:08x}, expected 0x{QEMU_VM_FILE_MAGIC:08x} (QEVM)", off)
        off = f.pos
        version = f.get_be32()
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise VersionMismatchError("SaveVM v2 format is obsolete and not supported", off)
        if version != QEMU_VM_FILE_VERSION:
            raise VersionMismatchError(f"unsupported stream version {version}, expected {QEMU_VM_FILE_VERSION}", off)
        if self.config.send_configuration:
            off = f.pos
            t = f.get_byte()
            if t != SectionType.CONFIGURATION:
                raise CorruptStreamError(
                    f"configuration section missing: found byte 0x{t:02x}, expected 0x07", off)
            self._configuration()

    def _configuration(self) -> None:
        f = self.f
        off = f.pos
        n = f.get_be32()
        if n > MAX_MACHINE_NAME:
            raise CorruptStreamError(f"machine name length {n} exceeds {MAX_MACHINE_NAME}", off)
        name = f.get_bytes(n, limit=MAX_MACHINE_NAME).decode(errors="replace")
        self.result.machine = name
        if name != self.config.machine and not self.any_machine:
            raise ConfigurationMismatchError(
                f"machine type mismatch: stream is for {name!r}, this side is {self.config.machine!r}", off)
        # subsections of the configuration record (qemu-format.md 1.3)
        while f.peek_byte() == SectionType.SUBSECTION:
            if f.fill(2) < 2:
                break
            ln = f.buffered()[1]
            if f.fill(2 + ln) < 2 + ln:
                break
            raw = bytes(f.buffered()[2:2 + ln])
            if not raw.startswith(b"configuration/"):
                break
            off = f.pos
            f.consume(2 + ln)
            f.get_be32()  # subsection version (1 for all three)
            self._config_subsection(raw.decode(errors="replace"), off)

    def _config_subsection(self, name: str, off: int) -> None:
        f = self.f
        if name == "configuration/target-page-bits":
            bits = f.get_be32()
            if bits != TARGET_PAGE_BITS:
                raise ConfigurationMismatchError(
                    f"target page bits {bits} in the stream, this side uses {TARGET_PAGE_BITS}", off)
        elif name == "configuration/capabilities":
            count = f.get_be32()
            if count > 64:
                raise CorruptStreamError(f"capability count {count} is implausible (max 64)", off)
            for _ in range(count):
                cap_off = f.pos
                cap = f.get_counted_string()
                if cap == "x-ignore-shared":
                    raise ConfigurationMismatchError(
                        "capability x-ignore-shared is on in the stream but savevm does not support it", cap_off)
                raise ConfigurationMismatchError(f"unknown validated capability {cap!r} in the stream", cap_off)
        elif name == "configuration/uuid":
            f.skip(16)
        else:
            raise UnknownSectionError(f"unknown configuration subsection {name!r}", off)

    # ---------------------------------------------------------------- body
    def setup(self) -> None:
        for e in self.registry.live():
            assert e.handlers is not None
            e.handlers.load_setup()

    def sections(self) -> None:
        f = self.f
        while True:
            off = f.pos
            t = f.get_byte()
            if t in (SectionType.SECTION_START, SectionType.SECTION_FULL):
                self._start_full(SectionType(t), off)
            elif t in (SectionType.SECTION_PART, SectionType.SECTION_END):
                self._part_end(SectionType(t), off)
            elif t == SectionType.EOF:
                log.debug("qemu_loadvm_state_section", type="EOF")
                return
            elif t == SectionType.COMMAND:
                self._command(off)
            else:
                raise CorruptStreamError(f"unknown section type 0x{t:02x}, expected 0x00-0x04 or 0x08", off)

    def _start_full(self, kind: SectionType, off: int) -> None:
        f = self.f
        section_id = f.get_be32()
        idstr_off = f.pos
        idstr = f.get_counted_string()
        instance_off = f.pos
        instance_id = f.get_be32()
        version_off = f.pos
        version_id = f.get_be32()
        log.debug("qemu_loadvm_state_section_startfull", section_id=section_id, idstr=idstr,
                  instance_id=instance_id, version_id=version_id)
        entry = self.registry.find(idstr, instance_id)
        if entry is None and kind == SectionType.SECTION_FULL and self.unmodelled_device(
                section_id, idstr, instance_id, version_id):
            self._check_footer(section_id, idstr)
            self.result.skipped.append((idstr, instance_id, version_id))
            self.section_loaded(kind, section_id, idstr, instance_id, version_id, off)
            return
        if entry is None:
            known = ", ".join(f"{e.idstr}/{e.instance_id}" for e in self.registry) or "none"
            # point at the field at fault: the instance if the idstr is known, else the idstr
            name_known = any(idstr in (e.idstr, e.compat_idstr) for e in self.registry)
            raise UnknownSectionError(
                f"unknown section {idstr!r} instance {instance_id} (registered: {known})",
                instance_off if name_known else idstr_off)
        if version_id > entry.version_id:
            raise VersionMismatchError(
                f"section {idstr!r} version {version_id} is newer than supported {entry.version_id}",
                version_off)
        if not entry.is_live:
            minimum = vmstate.vmsd_of(type(entry.device)).minimum_version_id
            if version_id < minimum:
                raise VersionMismatchError(
                    f"section {idstr!r} version {version_id} is older than the minimum {minimum}",
                    version_off)
        if kind == SectionType.SECTION_START and not entry.is_live:
            raise CorruptStreamError(f"section {idstr!r} is a device section but arrived as START", off)
        if kind == SectionType.SECTION_FULL and entry.is_live:
            raise CorruptStreamError(f"section {idstr!r} is a live section but arrived as FULL", off)
        self._by_id[section_id] = (entry, version_id)
        if entry.is_live:
            assert entry.handlers is not None
            entry.handlers.load_state(f, version_id)
        else:
            loaded = vmstate.load_state(f, entry.device, version_id)
            self._pending_devices.append((entry, loaded))
        self._footer(section_id, entry)
        self.result.sections.append((idstr, instance_id, version_id))
        self.section_loaded(kind, section_id, idstr, instance_id, version_id, off)

    def _part_end(self, kind: SectionType, off: int) -> None:
        f = self.f
        id_off = f.pos
        section_id = f.get_be32()
        found = self._by_id.get(section_id)
        if found is None:
            raise UnknownSectionError(f"{kind.name} for section id {section_id} that was never started", id_off)
        entry, version_id = found
        if not entry.is_live:
            raise CorruptStreamError(f"{kind.name} for device section {entry.idstr!r}", off)
        assert entry.handlers is not None
        entry.handlers.load_state(f, version_id)
        self._footer(section_id, entry)
        self.section_loaded(kind, section_id, entry.idstr, entry.instance_id, version_id, off)

    # ---------------------------------------------------------------- extension points
    def unmodelled_device(self, section_id: int, idstr: str, instance_id: int, version_id: int) -> bool:
        """A FULL section no registered device claims; the stream is at its first data byte.

        A migration can only skip it, by the size the source's vmdesc gives
        (a real QEMU's CPU state, which we do not model), as
        analyze-migration.py walks it.  True: the data has been consumed and
        the footer is next; False: the section is refused as unknown.  Tools
        override this to decode the data instead (``savevm analyze
        --dump-devices``).
        """
        size = self._skip_sizes.get((idstr, instance_id))
        if size is None:
            return False
        self.f.skip(size)
        return True

    def section_loaded(self, kind: SectionType, section_id: int, idstr: str, instance_id: int, version_id: int,
                       offset: int) -> None:
        """One section record (``offset`` = its type byte) has been read through its footer.

        Nothing to do for a migration; tools that report where each section
        sits and how large it is (``savevm analyze``) override it.
        """

    def command_read(self, cmd: Command, data: bytes, offset: int) -> None:
        """A QEMU_VM_COMMAND record (``offset`` = its 0x08 byte) was read, before it is acted on.

        Nothing to do for a migration; ``savevm analyze`` lists commands
        beside the sections.
        """

    def _footer(self, section_id: int, entry: SectionEntry) -> None:
        self._check_footer(section_id, entry.idstr)

    def _check_footer(self, section_id: int, idstr: str) -> None:
        if not self.config.send_section_footer:
            return
        f = self.f
        off = f.pos
        t = f.get_byte()
        if t != SectionType.SECTION_FOOTER:
            raise FooterMismatchError(
                f"missing section footer for {idstr!r}: found byte 0x{t:02x}, expected 0x7e", off)
        sid_off = f.pos
        sid = f.get_be32()
        if sid != section_id:
            raise FooterMismatchError(
                f"section footer of {idstr!r} names section id {sid}, expected {section_id}", sid_off)

    def _command(self, off: int) -> None:
        f = self.f
        cmd = f.get_be16()
        length = f.get_be16()
        try:
            c = Command(cmd)
        except ValueError:
            raise CorruptStreamError(f"unknown command {cmd}", off) from None
        want = COMMAND_ARG_LEN.get(c)
        if want is None:
            raise CorruptStreamError(f"invalid command {c.name}", off)
        if want >= 0 and length != want:
            raise CorruptStreamError(f"command {c.name} has length {length}, expected {want}", off)
        data = f.get_bytes(length, limit=0xFFFF)
        self.command_read(c, data, off)
        rp = self.return_path
        if c == Command.OPEN_RETURN_PATH:
            log.debug("loadvm_process_command", cmd=c.name)
            if rp is not None:
                rp.on_open()
            return
        if c == Command.PING:
            value = int.from_bytes(data, "big")
            log.debug("loadvm_process_command", cmd=c.name, value=value)
            if rp is not None:
                rp.on_ping(value)
            return
        raise CorruptStreamError(f"command {c.name} (postcopy/COLO) is not supported by savevm", off)

    def trailer(self) -> None:
        f = self.f
        if self.return_path is not None and self.return_path.negotiated and not self.config.send_vmdesc:
            return  # nothing follows EOF until the handover, which waits for us: do not peek
        nxt = f.peek_byte()
        if nxt is None:
            return
        off = f.pos
        if nxt == SectionType.VMDESCRIPTION:
            f.get_byte()
            n = f.get_be32()
            if n > MAX_VMDESC:
                raise CorruptStreamError(f"vmdesc length {n} exceeds {MAX_VMDESC}", off + 1)
            raw = f.get_bytes(n, limit=MAX_VMDESC)
            self.result.vmdesc = parse_vmdesc(raw, off + 5)
        else:
            raise TrailingDataError(f"unexpected byte 0x{nxt:02x} after EOF (expected vmdesc or end)", off)
        if self.return_path is not None and self.return_path.negotiated:
            return  # a savevm source's handover (GO / ABORT) follows; the caller reads it
        if self.require_eof and f.peek_byte() is not None:
            raise TrailingDataError("trailing data after the vmdesc", f.pos)

    # ---------------------------------------------------------------- finish
    def commit(self) -> None:
        """Hand loaded device state to the devices (only after a good load)."""
        for entry, loaded in self._pending_devices:
            vmstate.commit_state(entry.device, loaded)
        self._pending_devices.clear()

    def _abort(self) -> None:
        self._pending_devices.clear()
        for e in self.registry.live():
            assert e.handlers is not None
            try:
                e.handlers.load_abort()
            except Exception:
                log.exception("load_abort_failed", section=e.idstr)

    def _cleanup(self) -> None:
        for e in self.registry.live():
            assert e.handlers is not None
            try:
                e.handlers.load_cleanup()
            except Exception:
                log.exception("load_cleanup_failed", section=e.idstr)


def load_stream(f: QEMUFile, registry: SectionRegistry, config: MigrationConfig | None = None,
                *, require_eof: bool = True, vmdesc: dict[str, Any] | None = None) -> LoadResult:
    """Load a complete stream into the registry's sections.

    With ``vmdesc`` (see :func:`savevm.vmdesc.read_vmdesc`), FULL device sections that are
    not registered but described there are skipped instead of rejected.
    """
    return StreamLoader(f, registry, config, require_eof=require_eof, vmdesc=vmdesc).load()


__all__ = ["LoadResult", "StreamLoader", "TARGET_PAGE_BITS", "load_stream"]
