"""Corrupted streams: whatever the damage, the loader raises from savevm's error tree.

A valid stream exercising every record type (RAM block list, ZERO, PAGE,
CONTINUE and block names, XBZRLE, COMPRESS_PAGE, a device with a
subsection, EOF, vmdesc) is damaged by hypothesis (byte flips, truncation,
inserted and deleted runs); loading it must either succeed or raise a
``savevm.MigrationError`` - never an IndexError, ValueError, struct.error or
numpy error - and must not touch memory outside the destination's blocks.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savevm
import savevm_ram
from savevm.channels import MemoryChannel
from savevm.load import StreamLoader
from savevm.qemufile import QEMUFile
from savevm.save import StreamWriter
from savevm_ram.demo import DemoDevice

PAGES = 24


def _build() -> bytes:
    cfg = savevm.MigrationConfig().set_capability("xbzrle").set_capability("compress")
    rng = np.random.default_rng(11)
    a = np.frombuffer(rng.bytes(PAGES * 4096), dtype=np.uint8).copy()
    a[: 4 * 4096] = 0
    a[8 * 4096 : 12 * 4096] = np.frombuffer((b"text " * 1000)[:4096] * 4, dtype=np.uint8)
    b = bytearray(4 * 4096)
    reg = savevm.PluginHost(cfg).new_registry()
    h = savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("a", a), savevm_ram.RAMBlock("b", b)]))
    reg.register_device("demo-device", 0, DemoDevice(counter=3, writes=2))
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    while not w.iterate():
        pass
    for r in range(2):  # rounds after the bulk stage: XBZRLE pages on the second
        for p in range(12, PAGES):
            h.ram.find("a").write(p * 4096 + 100 * r, bytes([r + 1] * 3))
        w.pending(1 << 62)
        while not w.iterate():
            pass
    w.complete_precopy()
    f.flush()
    return ch.getvalue()


STREAM = _build()


def _load(data: bytes) -> savevm_ram.RAMHandlers:
    guard = np.full(3 * PAGES * 4096, 0xAB, dtype=np.uint8)
    a = guard[PAGES * 4096 : 2 * PAGES * 4096]  # a block with guard zones on both sides
    reg = savevm.PluginHost().new_registry()
    h = savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("a", a),
                                                         savevm_ram.RAMBlock("b", bytearray(4 * 4096))]))
    reg.register_device("demo-device", 0, DemoDevice())
    try:
        StreamLoader(QEMUFile(MemoryChannel(data)), reg).load()
    except savevm.MigrationError:
        pass
    assert (guard[: PAGES * 4096] == 0xAB).all() and (guard[2 * PAGES * 4096 :] == 0xAB).all()
    return h


def test_the_valid_stream_loads_and_has_every_record_kind() -> None:
    c = _load(STREAM).counters
    assert c.duplicate > 0 and c.normal > 0
    assert c.encoded >= 4 + 12, "compressed pages in the bulk stage, XBZRLE pages in the last round"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(STREAM) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_byte_flips(flips: list[tuple[int, int]]) -> None:
    data = bytearray(STREAM)
    for at, val in flips:
        data[at] = val
    _load(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(STREAM) - 1), st.integers(0, 64), st.binary(max_size=64))
def test_splices(at: int, cut: int, insert: bytes) -> None:
    _load(STREAM[:at] + insert + STREAM[at + cut :])


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(STREAM)))
def test_truncation(n: int) -> None:
    _load(STREAM[:n])
