"""Reading the whole stream, validating everything.

:class:`StreamLoader` is QEMU's ``qemu_loadvm_state`` without its habits:
every length is bounded before allocation, every id and version is checked,
and device state is decoded into new objects that are committed only after
EOF, so a failed load leaves the destination's devices untouched.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import attrs

from savevm import vmstate
from savevm.channels.memory import MemoryChannel
from savevm.errors import (
    BadMagicError,
    ConfigurationMismatchError,
    CorruptStreamError,
    FooterMismatchError,
    TrailingDataError,
    TruncatedStreamError,
    UnknownSectionError,
    VersionMismatchError,
)
from savevm.format import (
    COMMAND_ARG_LEN,
    MULTIFD_MAGIC,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    TARGET_PAGE_BITS,
    Command,
    SectionType,
)
from savevm.logging import get_logger
from savevm.qemufile import QEMUFile
from savevm.vmdesc import MAX_VMDESC, MAX_VMDESC_TAIL, device_sizes, find_vmdesc, parse_vmdesc

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.registry import SectionEntry, SectionRegistry
    from savevm.return_path import DestReturnPath

log = get_logger("savevm.load")

#: Bound on the device state buffered while waiting for the vmdesc that sizes it (a QEMU x86
#: machine sends about 100 KiB; a machine with big device state, e.g. VGA memory, a few MiB).
MAX_DEFERRED_DEVICES = 256 << 20
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
                 return_path: DestReturnPath | None = None, any_machine: bool = False,
                 skip_unknown_devices: bool = False, keep_vmdesc: bool = True) -> None:
        self.f = f
        #: device sections this side does not model are skipped, sized from the stream's own
        #: vmdesc (which follows EOF, so they are buffered until it arrives): a program that
        #: only wants RAM from a real QEMU says so; everyone else gets a clear refusal
        self.skip_unknown_devices = skip_unknown_devices
        #: decode the vmdesc into ``result.vmdesc`` (a tool wants it; a migration only skips it,
        #: so a hostile vmdesc costs no memory)
        self.keep_vmdesc = keep_vmdesc
        #: devices, EOF and vmdesc were consumed while sizing deferred device sections
        self._tail_done = False
        #: the source asked for verify (SAVEVM_OPTIONS): digests go with LOADED
        self.verify = False
        self._t0_ns = time.monotonic_ns()
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
        if magic == MULTIFD_MAGIC:
            raise ConfigurationMismatchError(
                "this connection is a multifd channel: the source has capability multifd, whose pages travel "
                "over extra connections savevm does not receive; turn multifd off on the source", off)
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
        # subsections of the configuration record (docs/wire-format.md, Header and configuration)
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
                if self._tail_done:
                    return
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
        if entry is None and kind == SectionType.SECTION_FULL and self.skip_unknown_devices:
            self._defer_devices((section_id, idstr, instance_id, version_id), off)
            return
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
            hint = ""
            if kind == SectionType.SECTION_FULL:
                hint = ("; the source sends device state this program does not model (a QEMU sends its CPUs, "
                        "timers and chipset this way): to take only what is registered here, let savevm skip "
                        "the other device sections, sized from the stream's own vmdesc "
                        "(savevm incoming --skip-unknown-devices, or StreamLoader/Incoming "
                        "skip_unknown_devices=True; savevm.cli.qemu_guest:QemuGuest does so)")
            raise UnknownSectionError(
                f"unknown section {idstr!r} instance {instance_id} (registered: {known}){hint}",
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
            self._progress()
        else:
            loaded = vmstate.load_state(f, entry.device, version_id)
            self._pending_devices.append((entry, loaded))
        self._footer(section_id, entry)
        self.result.sections.append((idstr, instance_id, version_id))
        self.section_loaded(kind, section_id, idstr, instance_id, version_id, off)

    def _progress(self) -> None:
        """A live chunk is loaded: tell a savevm source how far this side has got (PROGRESS)."""
        rp = self.return_path
        if rp is not None and rp.negotiated:
            rp.progress(self.f.pos, 0, time.monotonic_ns() - self._t0_ns)

    def _defer_devices(self, first: tuple[int, str, int, int], off: int) -> None:
        """An unknown device section and no vmdesc yet: buffer the tail, then walk it by the vmdesc.

        QEMU writes its device sections after the last RAM chunk, then EOF,
        then the vmdesc that sizes them, on the same connection; device state
        is small, so the rest of the stream is read into memory (bounded)
        until the vmdesc at its end is found: the last ``0x06`` whose be32
        length reaches exactly to the end, right after an EOF byte.  The
        source stops sending there (it closes, or waits for our SHUT).
        """
        f = self.f
        base = f.pos  # first byte of the first deferred section's body
        buf = bytearray()
        limit = MAX_DEFERRED_DEVICES + MAX_VMDESC_TAIL
        found: tuple[int, dict[str, Any]] | None = None
        while found is None:
            chunk = f.get_available(1 << 20)
            if not chunk and self._skip_sizes:
                break  # a source that sent no vmdesc: the reference's sizes are the fallback
            if not chunk:
                raise TruncatedStreamError(
                    f"the stream ended after {len(buf)} bytes of device state with no vmdesc to size "
                    f"section {first[1]!r} by (pass a vmdesc from the same kind of source: "
                    "savevm incoming --vmdesc REF)", base + len(buf))
            buf += chunk
            if len(buf) > limit:
                raise CorruptStreamError(
                    f"more than {limit} bytes of device state without a vmdesc after section {first[1]!r}",
                    base)
            found = find_vmdesc(buf)
        desc: dict[str, Any] | None = None
        if found is not None:
            marker, desc = found
            if marker < 1 or buf[marker - 1] != SectionType.EOF:
                raise CorruptStreamError("the vmdesc does not follow an EOF byte", base + marker)
            self._skip_sizes = device_sizes(desc)  # the stream's own sizes win over a reference's
            region = bytes(buf[: marker - 1])
        else:
            if not buf or buf[-1] != SectionType.EOF:
                raise TruncatedStreamError("the stream ended inside its device sections", base + len(buf))
            region = bytes(buf[:-1])
        g = QEMUFile(MemoryChannel(region), base_offset=base)
        outer, self.f = self.f, g
        try:
            section_id, idstr, instance_id, version_id = first
            self._full_body(section_id, idstr, instance_id, version_id, off)
            while not g.at_eof():
                t_off = g.pos
                t = g.get_byte()
                if t != SectionType.SECTION_FULL:
                    raise CorruptStreamError(
                        f"expected a device section (0x04) before EOF, found 0x{t:02x}", t_off)
                sid = g.get_be32()
                name = g.get_counted_string()
                inst = g.get_be32()
                ver = g.get_be32()
                self._full_body(sid, name, inst, ver, t_off)
        finally:
            self.f = outer
        if self.keep_vmdesc and desc is not None:
            self.result.vmdesc = desc
        self._tail_done = True
        log.info("loadvm_devices_sized_by_vmdesc", devices=len(self._skip_sizes),
                 skipped=len(self.result.skipped))

    def _full_body(self, section_id: int, idstr: str, instance_id: int, version_id: int, off: int) -> None:
        """A deferred FULL section: load it if registered, else skip it by its described size."""
        f = self.f
        entry = self.registry.find(idstr, instance_id)
        if entry is None:
            if not self.unmodelled_device(section_id, idstr, instance_id, version_id):
                raise UnknownSectionError(
                    f"device section {idstr!r} instance {instance_id} is neither registered here nor described "
                    "by the stream's vmdesc", off)
            self._check_footer(section_id, idstr)
            self.result.skipped.append((idstr, instance_id, version_id))
            self.section_loaded(SectionType.SECTION_FULL, section_id, idstr, instance_id, version_id, off)
            return
        if entry.is_live:
            raise CorruptStreamError(f"section {idstr!r} is a live section but arrived as FULL", off)
        if version_id > entry.version_id:
            raise VersionMismatchError(
                f"section {idstr!r} version {version_id} is newer than supported {entry.version_id}", off)
        self._by_id[section_id] = (entry, version_id)
        loaded = vmstate.load_state(f, entry.device, version_id)
        self._pending_devices.append((entry, loaded))
        self._footer(section_id, entry)
        self.result.sections.append((idstr, instance_id, version_id))
        self.section_loaded(SectionType.SECTION_FULL, section_id, idstr, instance_id, version_id, off)

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
        self._progress()
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
        if c == Command.SAVEVM_OPTIONS:
            if rp is None or not rp.negotiated:
                raise CorruptStreamError("savevm options from a source that did not negotiate savevm's return path",
                                         off)
            self._options(data, off)
            return
        if c == Command.PING:
            value = int.from_bytes(data, "big")
            log.debug("loadvm_process_command", cmd=c.name, value=value)
            if rp is not None:
                rp.on_ping(value)
            return
        raise CorruptStreamError(f"command {c.name} (postcopy/COLO) is not supported by savevm", off)

    def _options(self, data: bytes, off: int) -> None:
        """SAVEVM_OPTIONS: what the source asks of this migration (``verify``)."""
        from savevm.return_path import decode_json

        opts = decode_json(data, "SAVEVM_OPTIONS")
        unknown = sorted(set(opts) - {"verify"})
        if unknown:
            raise CorruptStreamError(f"savevm options {unknown} are not known here (a newer source?)", off)
        if opts.get("verify"):
            self.verify = True
            for e in self.registry.live():
                assert e.handlers is not None
                e.handlers.load_verify()
        log.debug("loadvm_savevm_options", options=opts)

    def trailer(self) -> None:
        """The vmdesc after EOF, then nothing (a file) or the handover (a live source)."""
        if self._tail_done:
            return
        f = self.f
        rp = self.return_path
        rp_open = rp is not None and rp.open
        if rp_open and not self.config.send_vmdesc:
            return  # nothing follows EOF until we answer (SHUT, or savevm's LOADED): do not peek
        nxt = f.peek_byte()
        if nxt is None:
            return
        off = f.pos
        if nxt == SectionType.VMDESCRIPTION:
            f.get_byte()
            n = f.get_be32()
            if n > MAX_VMDESC:
                raise CorruptStreamError(f"vmdesc length {n} exceeds {MAX_VMDESC}", off + 1)
            if self.keep_vmdesc:
                self.result.vmdesc = parse_vmdesc(f.get_bytes(n, limit=MAX_VMDESC), off + 5)
            else:
                f.skip(n)  # never needed here: not even decoded
        else:
            raise TrailingDataError(f"unexpected byte 0x{nxt:02x} after EOF (expected vmdesc or end)", off)
        if rp_open:
            # a live source waits for our SHUT (QEMU) or LOADED (savevm, whose GO/ABORT follows):
            # peeking for more would wait forever
            return
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
