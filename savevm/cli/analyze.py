"""``savevm analyze``: what is in a stream file (ours or a real QEMU's).

Like QEMU's analyze-migration.py it reads the vmdesc from the end of the
file first, so device sections it has no description for are walked (or,
with ``--dump-devices``, decoded field by field) through the stream's own
vmdesc.  Unlike it, everything else goes through the real loader
(:class:`~savevm.load.StreamLoader`), so every check of a live migration
applies and a stream the loader would refuse is reported at the offset the
loader names.  Only two things are relaxed, because a file on disk has no
destination to match: the machine is whatever the configuration record
names (unless ``--machine`` asks for one), and the RAM blocks are created
as the RAM section's own block list announces them -- each only after its
size has been checked against a limit (``--max-ram``, by default the memory
this machine has available), so an announced exabyte is a clear error and
not an allocation failure.

The RAM plugin's loader is used as it is; what the report counts on top of
it (records and bytes by kind, block names, where each section sits) is
observed through its public seams: the codecs it is handed, its hook
facade, the block list it looks names up in, and the stream loader's
``section_loaded`` / ``unmodelled_device`` extension points.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from typing import IO, Any

import attrs
import numpy as np

from savevm.channels.fd import FdChannel
from savevm.config import MigrationConfig
from savevm.errors import ChannelError, MigrationError, PluginError, UnknownSectionError
from savevm.format import TARGET_PAGE_SIZE, Command, SectionType
from savevm.handlers import SaveVMHandlers
from savevm.host import mem_available
from savevm.load import StreamLoader
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile
from savevm.registry import SectionRegistry
from savevm.vmdesc import DecodeBudget, decode_device, locate_vmdesc

#: The RAM section's idstr and version (QEMU's ram_mig_init), for when the plugin is missing.
_RAM_IDSTR = "ram"
_RAM_VERSION = 4
_RAM_PLUGIN_NEEDED = "the RAM plugin (savevm-ram) is needed to analyze RAM sections: pip install -e plugins/ram"
#: RAM record kinds the report counts, in the order it lists them.
RECORD_KINDS = ("zero", "normal", "xbzrle", "compressed", "savevm-codec")
#: RAM_SAVE_FLAG_XBZRLE / COMPRESS_PAGE (docs/wire-format.md, RAM section): which kind a codec's pages are.
_CODEC_KINDS = {0x40: "xbzrle", 0x100: "compressed"}
#: A zero record is header + fill byte, a normal one header + page (block names counted apart).
_ZERO_RECORD = 8 + 1
_PAGE_RECORD = 8 + TARGET_PAGE_SIZE
#: stdin is copied to a temporary file in chunks of this size (the vmdesc is at its end).
_SPOOL_CHUNK = 1 << 20


def available_memory() -> int:
    """Bytes this machine can give the RAM blocks of a stream: MemAvailable, else free pages.

    The default for ``--max-ram``: a stream that announces more than the
    machine has is refused before anything is allocated, rather than
    failing (or swapping) half-way through.
    """
    avail = mem_available()
    if avail is not None:
        return avail
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 1 << 30


class _NoRamPlugin(SaveVMHandlers):
    """Stands in for the RAM section when savevm_ram is not installed.

    Registering it lets the loader parse everything else; only a stream that
    really has a RAM section meets it, and then the user is told what to
    install instead of reading "unknown section 'ram'".
    """

    def load_state(self, f: QEMUFile, version_id: int) -> None:
        raise PluginError(_RAM_PLUGIN_NEEDED)


def _ram_plugin() -> Any:
    """The savevm_ram module, or None: a stream without RAM is analyzed without it."""
    try:
        import savevm_ram
    except ImportError:
        return None
    return savevm_ram


# ---------------------------------------------------------------------------
# what is counted
# ---------------------------------------------------------------------------


@attrs.define
class KindCount:
    """Records of one kind and the stream bytes they took."""

    count: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        """``{"count": ..., "bytes": ...}`` for the JSON report."""
        return {"count": self.count, "bytes": self.bytes}


@attrs.define
class RecordCounts:
    """RAM records by kind, beyond the RAM plugin's own counters.

    A record's bytes are its be64 header and its body (a savevm codec's
    page adds its codec id byte); the block names that records carry when
    they do not continue the previous block are counted under
    ``block_names``, because a name belongs to no kind of page.
    """

    codecs: dict[str, KindCount] = attrs.field(factory=lambda: {k: KindCount() for k in _CODEC_KINDS.values()}
                                               | {"savevm-codec": KindCount()})
    block_names: KindCount = attrs.field(factory=KindCount)

    def name_lookup(self, idstr: str) -> None:
        self.block_names.count += 1
        self.block_names.bytes += 1 + len(idstr.encode())

    def listed(self, idstr: str) -> None:
        """A block list entry: its name was looked up too, but it is not a page record's name."""
        self.block_names.count -= 1
        self.block_names.bytes -= 1 + len(idstr.encode())


class _CountingCodec:
    """A page codec that counts the records it decodes and the bytes they take."""

    #: no loader fast path around load_page (the compress codec offers one): every record is counted
    inflate_pages = None

    def __init__(self, codec: Any, counts: RecordCounts) -> None:
        self._codec = codec
        kind = _CODEC_KINDS.get(codec.wire_flag, "savevm-codec")
        self._count = counts.codecs[kind]
        # the be64 header was read before the codec is called; a savevm codec's id byte too
        self._header = 8 + (1 if kind == "savevm-codec" else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._codec, name)

    def load_page(self, f: QEMUFile, block: Any, page: int, dest: np.ndarray, offset: int) -> None:
        start = f.pos
        self._codec.load_page(f, block, page, dest, offset)
        self._count.count += 1
        self._count.bytes += self._header + f.pos - start


def _counting_hooks(plugins: Any, counts: RecordCounts) -> Any:
    """The RAM hook facade, handing out counting codecs and noting the block list's names."""
    from savevm_ram.control import RAMHooks
    from savevm_ram.wire import RAM_CONTROL_BLOCK_REG

    class CountingHooks(RAMHooks):
        def page_codecs(self, config: MigrationConfig) -> list[Any]:
            return [_CountingCodec(c, counts) for c in super().page_codecs(config)]

        def load_hook(self, rs: Any, f: QEMUFile, flags: int, data: Any) -> bool | None:
            if flags == RAM_CONTROL_BLOCK_REG and data is not None:
                counts.listed(data.idstr)
            return super().load_hook(rs, f, flags, data)

    return CountingHooks(plugins)


def _stream_ram_list(savevm_ram: Any, limit: int, counts: RecordCounts) -> Any:
    """A RAMList that creates blocks as announced (within ``limit``) and remembers their order.

    A RAMList keeps QEMU's largest-first order; the report lists blocks as
    the stream does, which is what someone comparing with a hex dump sees.
    Every name the loader looks up is counted; the block list's own lookups
    are taken back out by the counting hooks.
    """

    class StreamRAMList(savevm_ram.RAMList):
        def __init__(self) -> None:
            super().__init__(auto_create=True, max_auto_bytes=limit)
            self.stream_order: list[Any] = []

        def create(self, idstr: str, length: int) -> Any:
            have = sum(b.max_length for b in self)
            if have + length > limit:
                raise MigrationError(
                    f"RAMBlock {idstr!r} of {length} bytes would bring the stream's RAM to {have + length} bytes, "
                    f"over the limit of {limit} (--max-ram; default: the memory available here)")
            try:
                block = super().create(idstr, length)
            except MemoryError as exc:
                raise MigrationError(f"RAMBlock {idstr!r}: cannot allocate {length} bytes") from exc
            self.stream_order.append(block)
            return block

        def find(self, idstr: str) -> Any:
            counts.name_lookup(idstr)
            return super().find(idstr)

    return StreamRAMList()


# ---------------------------------------------------------------------------
# the loader, observed
# ---------------------------------------------------------------------------


@attrs.define
class SectionRecord:
    """One section record as it sits in the stream (``offset`` of its type byte, ``size`` through its footer)."""

    kind: str
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int
    size: int
    how: str

    def as_dict(self) -> dict[str, Any]:
        """The report's section entry (``idstr``/``instance_id``/``version_id``/``how`` as before, and more)."""
        return {"type": self.kind, "section_id": self.section_id, "idstr": self.idstr,
                "instance_id": self.instance_id, "version_id": self.version_id, "offset": self.offset,
                "size": self.size, "how": self.how}


class _AnalyzingLoader(StreamLoader):
    """The stream loader, noting where each section is and decoding the devices nobody models."""

    def __init__(self, *args: Any, dump_devices: bool, devices: dict[tuple[str, int], Any] | None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.dump_devices = dump_devices
        self.device_descs = devices
        self.budget = DecodeBudget()
        self.records: list[SectionRecord] = []
        self.devices: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.header_end: int | None = None
        self._how = "loaded"

    def header(self) -> None:
        super().header()
        self.header_end = self.f.pos

    def unmodelled_device(self, section_id: int, idstr: str, instance_id: int, version_id: int) -> bool:
        desc = None if self.device_descs is None else self.device_descs.get((idstr, instance_id))
        if desc is None:
            why = "has no vmdesc" if self.device_descs is None else "does not describe it in its vmdesc"
            raise UnknownSectionError(
                f"device section {idstr!r} instance {instance_id}: the stream {why}, and device data carries "
                "no length of its own", self.f.pos)
        if not self.dump_devices:
            self._how = "skipped (vmdesc)"
            return super().unmodelled_device(section_id, idstr, instance_id, version_id)
        if isinstance(desc, dict) and "version" in desc and desc["version"] != version_id:
            raise UnknownSectionError(
                f"device section {idstr!r} instance {instance_id} is version {version_id}, its vmdesc entry "
                f"describes version {desc['version']!r}", self.f.pos)
        dev = decode_device(self.f, desc, self.budget)
        self.devices.append({"section_id": section_id, "version_id": version_id, **dev})
        self._how = "decoded (vmdesc)"
        return True

    def command_read(self, cmd: Command, data: bytes, offset: int) -> None:
        self.commands.append({"command": cmd.name, "offset": offset, "size": 5 + len(data),
                              "data": data.hex()})

    def section_loaded(self, kind: SectionType, section_id: int, idstr: str, instance_id: int, version_id: int,
                       offset: int) -> None:
        self.records.append(SectionRecord(kind.name.removeprefix("SECTION_"), section_id, idstr, instance_id,
                                          version_id, offset, self.f.pos - offset, self._how))
        self._how = "loaded"


# ---------------------------------------------------------------------------
# the input
# ---------------------------------------------------------------------------


class StreamSource:
    """The stream to analyze, as a seekable file: a path, or stdin (``-``).

    The vmdesc sits at the very end of a stream and device sections cannot
    be walked without it, so anything that is not a regular file (a pipe on
    stdin, a FIFO, a character device) is first copied to an unlinked
    temporary file (bounded memory; disk space of the stream's size).  A
    regular file, also one redirected to stdin, is used as it is.
    """

    def __init__(self, path: str) -> None:
        self.name = path
        self._spool: IO[bytes] | None = None
        what = "the stream from stdin" if path == "-" else repr(path)
        try:
            fd = os.dup(sys.stdin.fileno()) if path == "-" else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError) as exc:
            raise ChannelError(f"cannot open {what}: {exc}") from exc
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise ChannelError(f"cannot read {what}: it is a directory")
            if not stat.S_ISREG(mode):  # a pipe, a FIFO, a character device: not seekable
                self._spool = tempfile.TemporaryFile(prefix="savevm-analyze-")
                with os.fdopen(os.dup(fd), "rb") as src:
                    shutil.copyfileobj(src, self._spool, _SPOOL_CHUNK)
                self._spool.flush()
                os.close(fd)
                fd = os.dup(self._spool.fileno())
            self.file: IO[bytes] = os.fdopen(os.dup(fd), "rb")
        except BaseException as exc:
            os.close(fd)
            if self._spool is not None:
                self._spool.close()
            if isinstance(exc, OSError) and not isinstance(exc, ChannelError):
                raise ChannelError(f"cannot read {what}: {exc}") from exc
            raise
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def pread(self, n: int, offset: int) -> bytes:
        """``n`` bytes at ``offset`` (for copying sections through)."""
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        """Release the descriptors and the spool file."""
        self.file.close()
        os.close(self.fd)
        if self._spool is not None:
            self._spool.close()

    def __enter__(self) -> StreamSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# the analysis
# ---------------------------------------------------------------------------


@attrs.define
class Analysis:
    """Everything one run found: the report, and what ``--extract-ram`` / ``rewrite`` go on with."""

    report: dict[str, Any]
    #: the RAM blocks in stream order (loaded content), empty without the RAM plugin
    blocks: list[Any]
    sections: list[SectionRecord]
    #: offset after the header and configuration record (None if the header was refused)
    header_end: int | None
    #: (offset of the 0x06 marker, the JSON) or None
    vmdesc_at: tuple[int, dict[str, Any]] | None
    #: the RAM section's (section_id, version_id), if the stream has one
    ram_section: tuple[int, int] | None

    @property
    def ok(self) -> bool:
        """The stream loaded completely."""
        return bool(self.report["status"] == "ok")


def analyze(src: StreamSource, *, machine: str | None = None, dump_devices: bool = False,
            max_ram: int | None = None, plugins: PluginHost | None = None) -> Analysis:
    """Load ``src`` into scratch memory and report what it held.

    ``machine``: the machine name the stream must carry (default: accept the
    stream's own).  ``max_ram``: bytes of RAM blocks the stream may make us
    create (default :func:`available_memory`).  ``plugins``: the plugin host
    whose codecs decode pages (default: every installed plugin; a stream
    that announces a third-party codec needs the plugin that provides it).
    Stream errors end up in the report (``status``, ``error``, ``offset``); a
    missing RAM plugin, when the stream needs it, raises
    :class:`~savevm.errors.PluginError`.
    """
    savevm_ram = _ram_plugin()
    limit = available_memory() if max_ram is None else max_ram
    cfg = MigrationConfig() if machine is None else attrs.evolve(MigrationConfig(), machine=machine)
    host = plugins if plugins is not None else PluginHost(cfg)
    reg = SectionRegistry(cfg, host)
    host.register_sections(reg)
    counts = RecordCounts()
    ram: Any = None
    handlers: Any = None
    if savevm_ram is not None:
        ram = _stream_ram_list(savevm_ram, limit, counts)
        handlers = savevm_ram.register_ram(reg, ram)
        handlers.hooks = _counting_hooks(handlers.hooks.plugins, counts)
    else:
        reg.register_live(_RAM_IDSTR, 0, _RAM_VERSION, _NoRamPlugin())
    report: dict[str, Any] = {"file": src.name, "machine": "", "bytes": src.size, "status": "ok", "sections": [],
                              "vmdesc": False, "vmdesc_offset": None, "vmdesc_bytes": None, "max_ram": limit}
    loader: _AnalyzingLoader | None = None
    vmdesc_at: tuple[int, dict[str, Any]] | None = None
    ch = FdChannel(os.dup(src.fd), f"file:{src.name}")
    f = QEMUFile(ch)
    try:
        vmdesc_at = locate_vmdesc(src.file)
        if vmdesc_at is not None:
            report.update(vmdesc=True, vmdesc_offset=vmdesc_at[0], vmdesc_bytes=src.size - vmdesc_at[0] - 5)
        vmdesc = vmdesc_at[1] if vmdesc_at is not None else None
        descs = None
        if vmdesc is not None:
            devs = vmdesc.get("devices")
            descs = {(d["name"], d["instance_id"]): d for d in (devs if isinstance(devs, list) else [])
                     if isinstance(d, dict) and isinstance(d.get("name"), str)
                     and isinstance(d.get("instance_id"), int)}
        os.lseek(ch.fd, 0, os.SEEK_SET)
        loader = _AnalyzingLoader(f, reg, cfg, vmdesc=vmdesc, any_machine=machine is None,
                                  dump_devices=dump_devices, devices=descs)
        loader.load()
    except PluginError:
        raise
    except MigrationError as exc:
        report["status"] = "error"
        report["error"] = str(exc)
        report["offset"] = getattr(exc, "offset", None)
    except MemoryError:
        report["status"] = "error"
        report["error"] = "not enough memory for the RAM blocks the stream announces"
        report["offset"] = None
    finally:
        ch.close()
    records = loader.records if loader is not None else []
    if loader is not None and loader.result.machine is not None:
        report["machine"] = loader.result.machine
    report["sections"] = [r.as_dict() for r in records]
    report["commands"] = loader.commands if loader is not None else []
    blocks = list(ram.stream_order) if ram is not None else []
    c = handlers.counters if handlers is not None else None
    report["ram"] = _ram_report(blocks, c, counts)
    if dump_devices:
        report["devices"] = loader.devices if loader is not None else []
    ram_section = next(((r.section_id, r.version_id) for r in records if r.idstr == _RAM_IDSTR), None)
    return Analysis(report, blocks, records, loader.header_end if loader is not None else None, vmdesc_at,
                    ram_section)


def _ram_report(blocks: list[Any], c: Any, counts: RecordCounts) -> dict[str, Any]:
    zero = c.duplicate if c else 0
    normal = c.normal if c else 0
    kinds = {"zero": KindCount(zero, zero * _ZERO_RECORD), "normal": KindCount(normal, normal * _PAGE_RECORD),
             **counts.codecs}
    return {
        "blocks": [{"idstr": b.idstr, "used_length": b.used_length, "pages": _nonzero_pages(b)} for b in blocks],
        "total": sum(b.used_length for b in blocks),
        "zero": zero,
        "normal": normal,
        "encoded": c.encoded if c else 0,
        "records": {k: kinds[k].as_dict() for k in RECORD_KINDS},
        "block_names": counts.block_names.as_dict() if c else KindCount().as_dict(),
    }


def _nonzero_pages(block: Any) -> int:
    """Pages of the loaded block holding anything but zeros (in chunks: no block-sized temporary)."""
    host = block.host[: block.used_length]
    step = 4096 * TARGET_PAGE_SIZE
    return sum(int(np.count_nonzero(host[i : i + step].reshape(-1, TARGET_PAGE_SIZE).any(axis=1)))
               for i in range(0, len(host), step))


def analyze_file(path: str, machine: str | None = None, *, dump_devices: bool = False,
                 max_ram: int | None = None) -> dict[str, Any]:
    """The report of :func:`analyze` for a path (``-``: stdin)."""
    with StreamSource(path) as src:
        return analyze(src, machine=machine, dump_devices=dump_devices, max_ram=max_ram).report



# ---------------------------------------------------------------------------
# text output
# ---------------------------------------------------------------------------


def text_report(rep: dict[str, Any]) -> list[str]:
    """The report as the lines ``savevm analyze`` prints without ``--json``."""
    from savevm.cli.progress import human

    lines = [f"== {rep['file']} ==", f"machine      {rep['machine']}", f"bytes        {rep['bytes']}"]
    if rep["status"] == "ok":
        lines.append("status       ok")
    else:
        off = rep.get("offset")
        lines.append("status       error")
        lines.append(f"error        {rep['error']}")
        lines.append(f"offset       {off} (0x{off:x})" if off is not None else "offset       unknown")
    if rep["vmdesc"]:
        lines.append(f"vmdesc       {rep['vmdesc_bytes']} bytes of JSON, marker at offset {rep['vmdesc_offset']}")
    else:
        lines.append("vmdesc       none")
    rows = [(s["offset"], s["type"], s["section_id"], s["idstr"], s["instance_id"], s["version_id"], s["size"],
             s["how"]) for s in rep["sections"]]
    rows += [(c["offset"], "CMD", "-", c["command"], "-", "-", c["size"], "read") for c in rep.get("commands", [])]
    if rows:
        w = max(len(r[3]) for r in rows)
        lines.append("sections     (stream order)")
        lines.append(f"  {'offset':>10}  {'type':<5}  {'id':>4}  {'idstr':<{w}}  {'inst':>4}  {'ver':>4}  "
                     f"{'bytes':>10}  how")
        for off, typ, sid, idstr, inst, ver, size, how in sorted(rows, key=lambda r: r[0]):
            lines.append(f"  {off:>10}  {typ:<5}  {sid:>4}  {idstr:<{w}}  {inst:>4}  {ver:>4}  {size:>10}  {how}")
    ram = rep["ram"]
    for b in ram["blocks"]:
        lines.append(f"ram block    {b['idstr']}  {human(b['used_length'])}  non-zero pages {b['pages']}")
    if ram["blocks"] or any(v["count"] for v in ram["records"].values()):
        lines.append(f"ram records  {'kind':<14}{'records':>10}  {'bytes':>12}")
        for kind, v in ram["records"].items():
            lines.append(f"             {kind:<14}{v['count']:>10}  {v['bytes']:>12}")
        n = ram["block_names"]
        lines.append(f"             {'(block names)':<14}{n['count']:>10}  {n['bytes']:>12}")
    for x in rep.get("extracted", {}).get("files", []):
        lines.append(f"extracted    {x['path']}  ({x['bytes']} bytes)")
    return lines

__all__ = ["Analysis", "KindCount", "RECORD_KINDS", "RecordCounts", "SectionRecord", "StreamSource",
           "analyze", "analyze_file", "available_memory", "text_report"]
