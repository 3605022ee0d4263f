"""Writing the whole stream: header, configuration, sections, EOF, vmdesc.

:class:`StreamWriter` holds the steps QEMU's savevm.c runs
(``qemu_savevm_state_header`` / ``_setup`` / ``_iterate`` /
``_complete_precopy``); :class:`savevm.migration.Migration` drives them
live, and :func:`snapshot` runs them back to back (QEMU's ``savevm``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from savevm import vmstate
from savevm.convergence import Pending
from savevm.errors import MigrationError
from savevm.format import (
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    TARGET_PAGE_SIZE,
    Command,
    SectionType,
)
from savevm.handlers import SaveContext
from savevm.logging import get_logger
from savevm.vmdesc import vmdesc_json

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.qemufile import QEMUFile
    from savevm.registry import SectionEntry, SectionRegistry

log = get_logger("savevm.save")


class StreamWriter:
    """The save side of one stream."""

    def __init__(self, f: QEMUFile, registry: SectionRegistry, config: MigrationConfig | None = None) -> None:
        self.f = f
        self.registry = registry
        self.config = config or registry.config
        self.vmdesc: dict[str, Any] | None = None

    # ---------------------------------------------------------------- pieces
    def _section_header(self, kind: SectionType, e: SectionEntry) -> None:
        f = self.f
        f.put_byte(kind)
        f.put_be32(e.section_id)
        if kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            f.put_counted_string(e.idstr)
            f.put_be32(e.instance_id)
            f.put_be32(e.version_id)

    def _section_footer(self, e: SectionEntry) -> None:
        if self.config.send_section_footer:
            self.f.put_byte(SectionType.SECTION_FOOTER)
            self.f.put_be32(e.section_id)

    def _check(self) -> None:
        self.f.check_error()

    # ---------------------------------------------------------------- phases
    def header(self) -> None:
        """Magic, version and the configuration record."""
        f = self.f
        f.put_be32(QEMU_VM_FILE_MAGIC)
        f.put_be32(QEMU_VM_FILE_VERSION)
        if self.config.send_configuration:
            f.put_byte(SectionType.CONFIGURATION)
            name = self.config.machine.encode()
            f.put_be32(len(name))
            f.put_buffer(name)
        log.debug("savevm_state_header", machine=self.config.machine)

    def command(self, cmd: Command, data: bytes) -> None:
        """A QEMU_VM_COMMAND record (OPEN_RETURN_PATH, PING): ``0x08 | be16 cmd | be16 len | data``."""
        f = self.f
        f.put_byte(SectionType.COMMAND)
        f.put_be16(cmd)
        f.put_be16(len(data))
        f.put_buffer(data)

    def setup(self, ctx: SaveContext | None = None) -> None:
        """START section of every active live section (``qemu_savevm_state_setup``)."""
        ctx = ctx or SaveContext()
        for e in self.registry.live():
            log.debug("savevm_section_start", id=e.section_id, name=e.idstr)
            self._section_header(SectionType.SECTION_START, e)
            assert e.handlers is not None
            e.handlers.save_setup(self.f, ctx)
            self._section_footer(e)
            self._check()
        self.f.flush()
        self._check()

    def iterate(self) -> bool:
        """One pass over live sections; True when every one reports done.

        Like ``qemu_savevm_state_iterate``: stop before a section if the
        rate limit is used up, and after the first section not finished.
        """
        for e in self.registry.live():
            if self.f.rate_limit_exceeded():
                self._check()
                return False
            self._section_header(SectionType.SECTION_PART, e)
            assert e.handlers is not None
            done = e.handlers.save_live_iterate(self.f)
            self._section_footer(e)
            self._check()
            if not done:
                return False
        return True

    def pending(self, threshold: int) -> int:
        """Bytes all live sections still have to send."""
        total = 0
        for e in self.registry.live():
            assert e.handlers is not None
            total += e.handlers.save_live_pending(threshold)
        return total

    def pending_estimate(self, threshold: int, estimate: str = "wire") -> Pending:
        """What all live sections still have to send, as RAM bytes and as expected wire bytes.

        Only the figure the stop rule uses (``estimate``: ``wire`` or
        ``qemu``) is asked with ``threshold``, so a section re-syncs its
        dirty state on that figure alone; the other is read with a
        threshold of 0, which never syncs.
        """
        ram = wire = 0
        for e in self.registry.live():
            h = e.handlers
            assert h is not None
            if estimate == "qemu":
                ram += h.save_live_pending(threshold)
                wire += h.save_live_pending_wire(0)
            else:
                wire += h.save_live_pending_wire(threshold)
                ram += h.save_live_pending(0)
        return Pending(ram, wire, estimate)

    def sent_by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind: (pages, bytes)}`` every live section sent so far, summed by kind."""
        out: dict[str, tuple[int, int]] = {}
        for e in self.registry.live():
            assert e.handlers is not None
            for kind, (n, b) in e.handlers.save_live_sent_by_kind().items():
                n0, b0 = out.get(kind, (0, 0))
                out[kind] = (n0 + n, b0 + b)
        return out

    def complete_precopy(self) -> None:
        """END of live sections, FULL device sections, EOF and vmdesc (program paused)."""
        for e in self.registry.live():
            self._section_header(SectionType.SECTION_END, e)
            assert e.handlers is not None
            e.handlers.save_live_complete_precopy(self.f)
            self._section_footer(e)
            log.debug("savevm_section_end", id=e.section_id, name=e.idstr)
            self._check()
        devices = []
        for e in self.registry.devices():
            self._section_header(SectionType.SECTION_FULL, e)
            part = vmstate.save_state(self.f, e.device)
            self._section_footer(e)
            devices.append({"name": e.idstr, "instance_id": e.instance_id, **part})
            self._check()
        self.f.put_byte(SectionType.EOF)
        self.vmdesc = {"page_size": TARGET_PAGE_SIZE, "devices": devices}
        if self.config.send_vmdesc:
            blob = vmdesc_json(self.vmdesc)
            self.f.put_byte(SectionType.VMDESCRIPTION)
            self.f.put_be32(len(blob))
            self.f.put_buffer(blob)
        self.f.flush()
        self._check()

    def cleanup(self) -> None:
        """``save_cleanup`` on every live section, whatever happened."""
        for e in self.registry:
            if e.handlers is not None:
                try:
                    e.handlers.save_cleanup()
                except Exception:  # cleanup must reach every section
                    log.exception("save_cleanup_failed", section=e.idstr)

    def cancel(self) -> None:
        """``cancel`` on every live section."""
        for e in self.registry:
            if e.handlers is not None:
                try:
                    e.handlers.cancel()
                except Exception:
                    log.exception("section_cancel_failed", section=e.idstr)


def save_stream(f: QEMUFile, registry: SectionRegistry, config: MigrationConfig | None = None) -> StreamWriter:
    """Write a complete stream (QEMU's ``qemu_savevm_state``): iterate until done.

    The rate limit of ``f`` is honoured; live sections keep iterating until
    they report nothing pending, then everything is completed.
    """
    w = StreamWriter(f, registry, config)
    try:
        w.header()
        w.setup()
        while True:
            f.rate_limit_wait()
            if w.iterate():
                break
        f.set_rate_limit(0)
        w.complete_precopy()
    except MigrationError:
        w.cancel()
        raise
    finally:
        w.cleanup()
    return w
