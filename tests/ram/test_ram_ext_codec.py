"""Third-party page codecs: announced at setup, their own flag, refused when missing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import savevm
import savevm_ram
from savevm.channels import MemoryChannel
from savevm.load import StreamLoader
from savevm.qemufile import QEMUFile
from savevm.save import save_stream
from savevm_ram import PageCodec
from savevm_ram.wire import Flag


class FillCodec(PageCodec):
    """Encodes pages made of one repeated byte as that byte (a toy run-length codec)."""

    name = "fill"
    priority = 50

    def __init__(self) -> None:
        self.encoded = 0

    def enabled(self, config: savevm.MigrationConfig) -> bool:
        return True

    def encode_pages(self, rs: Any, block: Any, pages: np.ndarray, data: np.ndarray, last_stage: bool) -> list[Any]:
        out: list[Any] = []
        for row in data:
            if (row == row[0]).all():
                out.append(bytes((int(row[0]),)))
                self.encoded += 1
            else:
                out.append(None)
        return out

    def load_page(self, f: Any, block: Any, page: int, dest: np.ndarray, offset: int) -> None:
        dest[:] = f.get_byte()


class FillPlugin:
    def __init__(self) -> None:
        self.codecs: list[FillCodec] = []

    @savevm.hookimpl
    def ram_page_codecs(self, config: savevm.MigrationConfig) -> list[PageCodec]:
        c = FillCodec()
        self.codecs.append(c)
        return [c]


def _memory(seed: int) -> np.ndarray:
    m = np.frombuffer(np.random.default_rng(seed).bytes(64 * 4096), dtype=np.uint8).copy()
    for p in range(0, 64, 3):
        m[p * 4096 : (p + 1) * 4096] = 7 + p  # pages of one repeated nonzero byte
    return m


def _stream(src: np.ndarray) -> tuple[bytes, FillPlugin]:
    plug = FillPlugin()
    host = savevm.PluginHost()
    host.register(plug, name="fill")
    reg = host.new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("m", src)]))
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    save_stream(f, reg)
    f.flush()
    return ch.getvalue(), plug


def test_third_party_codec_round_trip() -> None:
    src = _memory(1)
    data, plug = _stream(src)
    assert plug.codecs[-1].encoded == 22
    assert (int(Flag.SAVEVM_CODECS)).to_bytes(8, "big") + b"\x01\x00\x04fill" in data
    dst = np.zeros_like(src)
    host = savevm.PluginHost()
    host.register(FillPlugin(), name="fill")
    reg = host.new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("m", dst)]))
    StreamLoader(QEMUFile(MemoryChannel(data)), reg).load()
    assert np.array_equal(src, dst)


def test_destination_without_the_codec_refuses_at_setup() -> None:
    data, _ = _stream(_memory(2))
    dst = np.zeros(64 * 4096, dtype=np.uint8)
    reg = savevm.PluginHost().new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("m", dst)]))
    with pytest.raises(savevm.ConfigurationMismatchError, match="'fill'") as ei:
        StreamLoader(QEMUFile(MemoryChannel(data)), reg).load()
    assert data[ei.value.offset : ei.value.offset + 8] == int(Flag.SAVEVM_CODECS).to_bytes(8, "big")
    assert not dst.any(), "refused before any page was written"


def test_auto_create_blocks_and_its_bound() -> None:
    """RAMList(auto_create=True) makes the stream's blocks; a bound keeps a hostile stream in check."""
    src = np.frombuffer(np.random.default_rng(3).bytes(16 * 4096), dtype=np.uint8).copy()
    reg = savevm.PluginHost().new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("x/y", src)]))
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    save_stream(f, reg)
    f.flush()
    ram = savevm_ram.RAMList(auto_create=True)
    reg2 = savevm.PluginHost().new_registry()
    savevm_ram.register_ram(reg2, ram)
    StreamLoader(QEMUFile(MemoryChannel(ch.getvalue())), reg2).load()
    got = ram.find("x/y")
    assert got is not None and bytes(got.mv[: got.used_length]) == src.tobytes()
    small = savevm_ram.RAMList(auto_create=True, max_auto_bytes=4096)
    reg3 = savevm.PluginHost().new_registry()
    savevm_ram.register_ram(reg3, small)
    with pytest.raises(savevm.CorruptStreamError, match="max_auto_bytes"):
        StreamLoader(QEMUFile(MemoryChannel(ch.getvalue())), reg3).load()


class StatsFillCodec(FillCodec):
    """FillCodec switched on by a capability of its own (the default ``enabled``), with stats."""

    name = "fill"
    capability = "fill"

    def enabled(self, config: savevm.MigrationConfig) -> bool:
        return PageCodec.enabled(self, config)

    def query_stats(self) -> dict[str, Any]:
        return {"fill": {"pages": self.encoded}}


class StatsFillPlugin:
    @savevm.hookimpl
    def savevm_migration_capabilities(self) -> list[str]:
        return ["fill"]

    @savevm.hookimpl
    def ram_page_codecs(self, config: savevm.MigrationConfig) -> list[PageCodec]:
        return [StatsFillCodec()]


@pytest.mark.parametrize("on", [True, False])
def test_plugin_codec_enabled_by_its_capability_and_counted_in_query_migrate(on: bool) -> None:
    from savevm.migration import Incoming, Migration

    src_mem, dst_mem = _memory(3), np.zeros(64 * 4096, dtype=np.uint8)
    hosts = [savevm.PluginHost(extra=[StatsFillPlugin()]) for _ in range(2)]
    cfg = hosts[0].config.set_capability("fill", on)
    src, dst = hosts[0].new_registry(), hosts[1].new_registry()
    savevm_ram.register_ram(src, savevm_ram.RAMList([savevm_ram.RAMBlock("m", src_mem)]))
    savevm_ram.register_ram(dst, savevm_ram.RAMList([savevm_ram.RAMBlock("m", dst_mem)]))
    inc = Incoming(dst, "tcp:127.0.0.1:0")
    uri = inc.listen()
    inc.start()
    mig = Migration(src, uri, config=cfg)
    st = mig.run().as_qmp()
    assert inc.wait(30).status == "completed"
    assert np.array_equal(src_mem, dst_mem)
    assert st["transport"] == "tcp"
    if on:
        assert st["fill"] == {"pages": 22}  # the codec's own key reaches query-migrate
        assert st["ram"]["encoded-pages"] == 22
        assert 22 * 9 <= st["ram"]["encoded-bytes"] < 22 * 40  # header (+ block name once) + 2-byte body
    else:
        assert "fill" not in st and st["ram"]["encoded-pages"] == 0
