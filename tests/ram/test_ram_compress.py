"""The zlib page codec (capability ``compress``)."""

from __future__ import annotations

import numpy as np
import pytest
import ram_strategies as rs
from zlib_ng import zlib_ng

import savevm
import savevm_ram
from savevm.channels import MemoryChannel
from savevm.load import StreamLoader
from savevm.qemufile import QEMUFile
from savevm.save import save_stream
from savevm_ram.compress import COMPRESS_BOUND


def _src() -> np.ndarray:
    rng = np.random.default_rng(5)
    mem = np.frombuffer(rng.bytes(96 * 4096), dtype=np.uint8).copy()  # incompressible pages
    text = np.frombuffer((b"savevm compress " * 256)[:4096], dtype=np.uint8)
    for p in range(0, 96, 2):
        mem[p * 4096 : (p + 1) * 4096] = text  # compressible pages
    mem[5 * 4096 : 6 * 4096] = 0
    return mem


def _save(mem: np.ndarray, caps: tuple[str, ...] = ("compress",)) -> tuple[bytes, dict]:
    cfg = savevm.MigrationConfig()
    for c in caps:
        cfg = cfg.set_capability(c)
    reg = savevm.PluginHost(cfg).new_registry()
    h = savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", mem)]))
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    save_stream(f, reg)
    f.flush()
    return ch.getvalue(), h.query_stats()


def _records(data: bytes) -> list[tuple[int, bytes]]:
    """(flags, body) of each COMPRESS_PAGE record, from an independent stream parser."""
    return [(r.flags, r.body) for r in rs.page_records(rs.parse_stream(data)) if r.kind == rs.COMPRESS]


def test_compress_round_trip_and_qemu_bounds() -> None:
    mem = _src()
    data, stats = _save(mem)
    comp = stats["compression"]
    assert comp["pages"] == 48, "the compressible half is compressed, random pages go raw"
    assert comp["compression-rate"] > 5
    recs = _records(data)
    assert len(recs) == 48
    for _flags, body in recs:
        assert len(body) <= COMPRESS_BOUND  # what a QEMU destination accepts
        assert zlib_ng.decompress(body) == (b"savevm compress " * 256)[:4096]  # a complete zlib stream
    dst = np.zeros_like(mem)
    reg = savevm.PluginHost().new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", dst)]))
    StreamLoader(QEMUFile(MemoryChannel(data)), reg).load()
    assert np.array_equal(mem, dst)
    plain, _ = _save(mem, ())
    assert len(data) < len(plain) * 0.6


def test_corrupt_compressed_page_is_refused() -> None:
    mem = _src()
    data, _ = _save(mem)
    _, body = _records(data)[0]
    at = data.index(body)
    bad = data[:at] + bytes([body[0] ^ 0xFF]) + data[at + 1 :]
    reg = savevm.PluginHost().new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", np.zeros_like(mem))]))
    with pytest.raises(savevm.CorruptStreamError, match="does not decompress"):
        StreamLoader(QEMUFile(MemoryChannel(bad)), reg).load()
