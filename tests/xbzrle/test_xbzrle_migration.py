"""XBZRLE end to end: through the RAM plugin, the stream and the loader."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import savevm
import savevm_ram
from savevm.channels import memory_pipe
from savevm.load import StreamLoader
from savevm.qemufile import QEMUFile
from savevm.save import StreamWriter

RAM = 4 << 20
ROUNDS = 12


def _migrate(capabilities: tuple[str, ...], *, cache_size: str | None = None,
             resize_to: str | None = None) -> tuple[int, dict, np.ndarray, np.ndarray]:
    """Bulk stage, then ROUNDS rounds that rewrite 2 bytes of every page, then complete."""
    cfg = savevm.MigrationConfig()
    for c in capabilities:
        cfg = cfg.set_capability(c)
    if cache_size:
        cfg = cfg.set_parameter("xbzrle-cache-size", cache_size)
    rng = np.random.default_rng(7)
    src = np.frombuffer(rng.bytes(RAM), dtype=np.uint8).copy()
    src[: 16 * 4096] = 0  # some zero pages too
    reg = savevm.PluginHost(cfg).new_registry()
    handlers = savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("ram0", src)]))
    dst = np.zeros(RAM, dtype=np.uint8)
    reg2 = savevm.PluginHost(savevm.MigrationConfig()).new_registry()
    savevm_ram.register_ram(reg2, savevm_ram.RAMList([savevm_ram.RAMBlock("ram0", dst)]))
    wch, rch = memory_pipe()
    errors: list[BaseException] = []

    def load() -> None:
        try:
            StreamLoader(QEMUFile(rch), reg2).load()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=load)
    t.start()
    f = QEMUFile(wch, writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    while not w.iterate():  # bulk stage
        pass
    block = handlers.ram[0]
    for r in range(ROUNDS):
        if resize_to and r == ROUNDS // 2:
            handlers.configure(cfg.set_parameter("xbzrle-cache-size", resize_to))
        for page in range(block.pages):
            block.write(page * 4096 + (r * 37 + page) % 4000, bytes([r + 1, page & 0xFF]))
        w.pending(1 << 62)  # below threshold: sync
        while not w.iterate():
            pass
    w.complete_precopy()
    sent = f.pos
    f.close()
    t.join(30)
    assert not errors, errors
    return sent, handlers.query_stats(), src, dst


def test_xbzrle_migration_is_5x_smaller_and_exact() -> None:
    plain_bytes, plain_stats, src0, dst0 = _migrate(())
    xb_bytes, xb_stats, src1, dst1 = _migrate(("xbzrle",))
    assert np.array_equal(src0, dst0)
    assert np.array_equal(src1, dst1)
    xc = xb_stats["xbzrle-cache"]
    assert xc["pages"] > 0 and xc["bytes"] > 0
    assert xc["cache-miss"] >= 1
    assert "xbzrle-cache" not in plain_stats
    assert plain_bytes >= 5 * xb_bytes, (plain_bytes, xb_bytes)


def test_xbzrle_cache_resize_while_migrating_takes_effect() -> None:
    # start with a cache of 16 pages (most pages miss), grow it mid-migration: the
    # second half must hit, and the result must still be exact
    sent, stats, src, dst = _migrate(("xbzrle",), cache_size="64K", resize_to="8M")
    assert np.array_equal(src, dst)
    assert stats["xbzrle-cache"]["cache-size"] == 8 << 20
    small, small_stats, _, _ = _migrate(("xbzrle",), cache_size="64K")
    assert stats["xbzrle-cache"]["pages"] > small_stats["xbzrle-cache"]["pages"]
    assert sent < small


def test_xbzrle_page_without_plugin_is_refused() -> None:
    from savevm.errors import CorruptStreamError

    cfg = savevm.MigrationConfig().set_capability("xbzrle")
    src = np.frombuffer(np.random.default_rng(1).bytes(64 * 4096), dtype=np.uint8).copy()
    reg = savevm.PluginHost(cfg).new_registry()
    h = savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("ram0", src)]))
    ch = savevm.channels.MemoryChannel()
    f = QEMUFile(ch, writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    while not w.iterate():
        pass
    for r in range(2):  # the first pass after the bulk stage only fills the cache
        h.ram[0].write(4096, bytes([r, 2]))
        w.pending(1 << 62)
        while not w.iterate():
            pass
    w.complete_precopy()
    f.flush()
    data = ch.getvalue()
    dst = np.zeros_like(src)
    host = savevm.PluginHost(savevm.MigrationConfig(plugins=savevm.config.PluginSettings(disable=("xbzrle",))))
    reg2 = host.new_registry()
    savevm_ram.register_ram(reg2, savevm_ram.RAMList([savevm_ram.RAMBlock("ram0", dst)]))
    with pytest.raises(CorruptStreamError, match="XBZRLE page .* no decoder"):
        StreamLoader(QEMUFile(savevm.channels.MemoryChannel(data)), reg2).load()
