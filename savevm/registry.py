"""SectionRegistry: the sections of one migration, by (idstr, instance_id).

QEMU keeps one global ``savevm_state.handlers`` list; we keep one registry
object per migration (or per program), so two migrations in one process do
not share state.  Section ids are assigned in registration order, which is
also the order sections appear in the stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs

from savevm.errors import RegistrationError
from savevm.format import MAX_IDSTR_LEN
from savevm.handlers import SaveVMHandlers

if TYPE_CHECKING:
    from savevm.config import MigrationConfig
    from savevm.plugins import PluginHost


@attrs.define(eq=False)
class SectionEntry:
    """One registered section (QEMU's SaveStateEntry)."""

    idstr: str
    instance_id: int
    version_id: int
    section_id: int
    #: live sections: the handlers
    handlers: SaveVMHandlers | None = None
    #: device sections: the attrs object whose class carries a vmstate description
    device: Any = None
    #: alias accepted on load (QEMU's alias_id / compat name)
    compat_idstr: str | None = None

    @property
    def is_live(self) -> bool:
        """Live (iterated) sections have handlers; devices have a vmstate."""
        return self.handlers is not None

    def is_active(self) -> bool:
        """QEMU's ``is_active`` check, defaulting to true."""
        return self.handlers is None or self.handlers.is_active()

    @property
    def key(self) -> tuple[str, int]:
        return (self.idstr, self.instance_id)


class SectionRegistry:
    """The live and device sections of a migration, in stream order."""

    def __init__(self, config: MigrationConfig | None = None, plugins: PluginHost | None = None) -> None:
        from savevm.config import MigrationConfig

        self.config = config or MigrationConfig()
        self.plugins = plugins
        self._entries: list[SectionEntry] = []
        self._by_key: dict[tuple[str, int], SectionEntry] = {}
        # ids start at 1: a QEMU 7.2 destination routes PART/END by load_section_id, which is
        # 0 for every entry it has not seen a START for, so a section id 0 would be misrouted
        self._next_id = 1

    # ---------------------------------------------------------------- registering
    def _check(self, idstr: str, instance_id: int, version_id: int) -> None:
        if not idstr or len(idstr.encode()) > MAX_IDSTR_LEN:
            raise RegistrationError(f"section idstr must be 1..{MAX_IDSTR_LEN} bytes, got {idstr!r}")
        if not 0 <= instance_id <= 0xFFFFFFFF or not 0 <= version_id <= 0xFFFFFFFF:
            raise RegistrationError(f"{idstr}: instance_id and version_id must fit in 32 bits")
        if (idstr, instance_id) in self._by_key:
            raise RegistrationError(f"section ({idstr!r}, instance {instance_id}) is already registered")

    def _add(self, entry: SectionEntry) -> SectionEntry:
        self._entries.append(entry)
        self._by_key[entry.key] = entry
        if entry.compat_idstr:
            self._by_key.setdefault((entry.compat_idstr, entry.instance_id), entry)
        self._next_id += 1
        return entry

    def register_live(
        self, idstr: str, instance_id: int, version_id: int, handlers: SaveVMHandlers,
        *, compat_idstr: str | None = None,
    ) -> SectionEntry:
        """Register an iterated section (QEMU's register_savevm_live).

        ``handlers`` must be a :class:`~savevm.handlers.SaveVMHandlers`: the
        core calls its declared methods directly, so an object that merely
        looks similar is refused here rather than failing mid-migration.
        """
        if not isinstance(handlers, SaveVMHandlers):
            raise RegistrationError(
                f"{idstr}: live handlers must subclass savevm.SaveVMHandlers, got {type(handlers).__name__}")
        self._check(idstr, instance_id, version_id)
        return self._add(SectionEntry(idstr, instance_id, version_id, self._next_id,
                                      handlers=handlers, compat_idstr=compat_idstr))

    def register_device(
        self, idstr: str, instance_id: int, device: Any, *, compat_idstr: str | None = None,
    ) -> SectionEntry:
        """Register a device section described by a vmstate class (vmstate_register)."""
        from savevm.vmstate import vmsd_of

        vmsd = vmsd_of(type(device))
        self._check(idstr, instance_id, vmsd.version_id)
        return self._add(SectionEntry(idstr, instance_id, vmsd.version_id, self._next_id,
                                      device=device, compat_idstr=compat_idstr))

    def unregister(self, idstr: str, instance_id: int = 0) -> None:
        """Remove a section (QEMU's unregister_savevm)."""
        entry = self._by_key.pop((idstr, instance_id), None)
        if entry is None:
            raise RegistrationError(f"section ({idstr!r}, {instance_id}) is not registered")
        self._entries.remove(entry)
        if entry.compat_idstr:
            self._by_key.pop((entry.compat_idstr, instance_id), None)

    # ---------------------------------------------------------------- lookup
    def find(self, idstr: str, instance_id: int) -> SectionEntry | None:
        """Entry by (idstr, instance_id), or by its compat name."""
        return self._by_key.get((idstr, instance_id))

    def __iter__(self) -> Iterator[SectionEntry]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def live(self) -> list[SectionEntry]:
        """Active live sections, in order."""
        return [e for e in self._entries if e.is_live and e.is_active()]

    def devices(self) -> list[SectionEntry]:
        """Device sections, in order."""
        return [e for e in self._entries if not e.is_live]

    def configure(self, config: MigrationConfig) -> None:
        """Give every live section the (new) config; the one way config reaches sections."""
        self.config = config
        for e in self._entries:
            if e.handlers is not None:
                e.handlers.configure(config)

    def digests(self) -> dict[str, str]:
        """``verify``: digests of every live section's state and every device's, by a stable name."""
        import hashlib

        from savevm.channels.memory import MemoryChannel
        from savevm.qemufile import QEMUFile
        from savevm.vmstate import save_state

        out: dict[str, str] = {}
        for e in self._entries:
            if e.handlers is not None:
                if e.is_active():
                    out.update(e.handlers.digests())
                continue
            ch = MemoryChannel()
            f = QEMUFile(ch, writable=True)
            save_state(f, e.device)
            f.flush()
            out[f"device/{e.idstr}/{e.instance_id}"] = hashlib.blake2b(ch.getvalue(), digest_size=16).hexdigest()
        return out

    def query_stats(self) -> dict[str, Any]:
        """Every active live section's query-migrate keys, merged."""
        out: dict[str, Any] = {}
        for e in self.live():
            assert e.handlers is not None
            out.update(e.handlers.query_stats())
        return out
