"""Names from a stream never pick a path; files holding program state are private and not redirectable."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

import savevm
import savevm_ram
from savevm.channels import MemoryChannel, listen, open_channel
from savevm.cli.blockfiles import BlockDir, block_path_parts
from savevm.cli.qemu_guest import QemuGuest
from savevm.config import MigrationConfig
from savevm.errors import ConfigError, MigrationError
from savevm.migration import Incoming
from savevm.plugins import PluginHost


@pytest.mark.parametrize("name", ["../escaped/pwned.txt", "a/../../b", "/..", ".", "x\x00y", "", "/"])
def test_names_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(MigrationError):
        block_path_parts(name)


def test_rom_names_become_folders(tmp_path: Path) -> None:
    with BlockDir(str(tmp_path)) as d:
        d.write_block("/rom@etc/acpi/rsdp", bytes(4096))
    f = tmp_path / "rom@etc" / "acpi" / "rsdp"
    assert f.stat().st_size == 4096
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_symlinks_inside_the_dump_dir_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"keep")
    (root / "pc.ram").symlink_to(victim)          # the file itself
    (root / "rom@etc").symlink_to(outside)        # a directory on the way
    with BlockDir(str(root)) as d:
        with pytest.raises(MigrationError):
            d.write_block("pc.ram", bytes(4096))
        with pytest.raises(MigrationError):
            d.write_block("/rom@etc/victim", bytes(4096))
    assert victim.read_bytes() == b"keep"


def _stream_with_block(name: str, data: bytes) -> bytes:
    ch = MemoryChannel()
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock(name, bytearray(data))]))
    savevm.save_stream(savevm.QEMUFile(ch, writable=True), reg)
    return ch.getvalue()


def test_hostile_block_name_never_writes_outside_dump_dir(tmp_path: Path) -> None:
    """A peer names a RAM block ``../escaped/pwned.txt``: the load fails and nothing lands outside."""
    dump = tmp_path / "dump"
    data = _stream_with_block("../escaped/pwned.txt", b"P" * 4096)
    guest = QemuGuest(dump_dir=str(dump))
    reg = PluginHost(MigrationConfig()).new_registry()
    guest.register(reg)
    inc = Incoming(reg, channel=MemoryChannel(data), guest=guest)
    inc.start()
    st = inc.wait(10)
    assert st.status == "failed", st
    assert "would leave the folder" in (st.error_desc or "")
    assert not (tmp_path / "escaped").exists()
    assert list(tmp_path.rglob("pwned.txt")) == []


def test_file_transport_writes_a_private_file_and_ignores_planted_links(tmp_path: Path) -> None:
    target = tmp_path / "snap.qevm"
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file")
    # the old fixed name: a planted symlink there must not be followed
    (tmp_path / "snap.qevm.part").symlink_to(victim)
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", bytearray(8192))]))
    savevm.snapshot(target, reg)
    assert victim.read_bytes() == b"root's file"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part") and not p.is_symlink()]


def test_routing_only_maps_like_to_like() -> None:
    cfg = MigrationConfig.from_dict({"transports": {"tcp": "exec"}})
    with pytest.raises(ConfigError, match="cannot route tcp: URIs over 'exec'"):
        open_channel("tcp:127.0.0.1:1", PluginHost(cfg))
    ok = MigrationConfig.from_dict({"transports": {"tcp": "rdma"}})
    assert PluginHost(ok).get_transport("tcp").scheme == "rdma"


def test_tcp_with_empty_host_listens_on_every_interface() -> None:
    lst = listen("tcp::0", PluginHost())
    try:
        port = int(lst.uri.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        ch = lst.accept(5)
        ch.close()
    finally:
        lst.close()


def test_unix_listener_is_private(tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    lst = listen(f"unix:{path}", PluginHost())
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        lst.close()
