"""SectionRegistry: keys, section ids, limits, live vs device sections."""

from __future__ import annotations

import pytest

from savevm.channels.memory import MemoryChannel
from savevm.errors import RegistrationError
from savevm.load import load_stream
from savevm.qemufile import QEMUFile
from savevm.registry import SectionRegistry
from savevm.save import save_stream
from tests.core.samples import ChunkedLive, Counter


def test_duplicate_key_refused() -> None:
    reg = SectionRegistry()
    reg.register_live("ram", 0, 4, ChunkedLive())
    with pytest.raises(RegistrationError, match="already registered"):
        reg.register_live("ram", 0, 4, ChunkedLive())
    with pytest.raises(RegistrationError):
        reg.register_device("ram", 0, Counter())
    reg.register_live("ram", 1, 4, ChunkedLive())  # another instance is fine
    assert len(reg) == 2


def test_section_ids_follow_registration_order() -> None:
    reg = SectionRegistry()
    a = reg.register_device("a", 0, Counter())
    b = reg.register_live("b", 0, 1, ChunkedLive())
    c = reg.register_device("c", 3, Counter())
    assert [e.section_id for e in (a, b, c)] == [1, 2, 3], "from 1: QEMU misroutes a PART for id 0"
    assert [e.idstr for e in reg] == ["a", "b", "c"]
    reg.unregister("b")
    d = reg.register_device("d", 0, Counter())
    assert d.section_id == 4, "ids are never reused"
    assert [e.idstr for e in reg] == ["a", "c", "d"]
    with pytest.raises(RegistrationError):
        reg.unregister("b")


def test_idstr_length_limits() -> None:
    reg = SectionRegistry()
    reg.register_device("x" * 255, 0, Counter())
    with pytest.raises(RegistrationError):
        reg.register_device("x" * 256, 0, Counter())
    with pytest.raises(RegistrationError):
        reg.register_device("é" * 128, 0, Counter())  # 256 bytes in UTF-8
    with pytest.raises(RegistrationError):
        reg.register_live("", 0, 1, ChunkedLive())


def test_instance_and_version_fit_32_bits() -> None:
    reg = SectionRegistry()
    with pytest.raises(RegistrationError):
        reg.register_live("a", 1 << 32, 1, ChunkedLive())
    with pytest.raises(RegistrationError):
        reg.register_live("a", 0, -1, ChunkedLive())


def test_device_needs_a_description() -> None:
    with pytest.raises(RegistrationError, match="vmsd"):
        SectionRegistry().register_device("plain", 0, object())


def test_live_and_device_lists() -> None:
    reg = SectionRegistry()
    live = ChunkedLive()
    idle = ChunkedLive(active=False)
    reg.register_device("dev0", 0, Counter())
    reg.register_live("live", 0, 1, live)
    reg.register_live("idle", 0, 1, idle)
    reg.register_device("dev1", 0, Counter())
    assert [e.idstr for e in reg.live()] == ["live"]
    assert [e.idstr for e in reg.devices()] == ["dev0", "dev1"]
    assert reg.find("idle", 0).is_live and not reg.find("idle", 0).is_active()
    assert reg.find("dev0", 0).is_active()
    assert reg.find("dev0", 1) is None


def test_compat_name_lookup() -> None:
    reg = SectionRegistry()
    e = reg.register_device("0000:00:02.0/vga", 0, Counter(), compat_idstr="vga")
    assert reg.find("vga", 0) is e
    reg.unregister("0000:00:02.0/vga")
    assert reg.find("vga", 0) is None


def test_inactive_live_section_is_not_in_the_stream() -> None:
    reg = SectionRegistry()
    reg.register_live("active", 0, 1, ChunkedLive(b"A" * 300, chunk=100))
    idle = ChunkedLive(b"I" * 300, active=False)
    reg.register_live("idle", 0, 1, idle)
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    save_stream(f, reg)
    data = ch.getvalue()
    assert b"\x06active" in data
    assert b"\x04idle" not in data and b"I" * 10 not in data
    assert idle.calls == ["save_cleanup"], "an inactive section is neither set up nor iterated"

    dst = SectionRegistry()
    got = ChunkedLive()
    dst_idle = ChunkedLive(active=False)
    dst.register_live("active", 0, 1, got)
    dst.register_live("idle", 0, 1, dst_idle)
    res = load_stream(QEMUFile(MemoryChannel(data)), dst)
    assert got.received == b"A" * 300
    assert [s[0] for s in res.sections] == ["active"]
    assert dst_idle.calls == [], "load_setup/cleanup skip inactive sections too"
