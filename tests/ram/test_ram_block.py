"""RAMBlock and RAMList: buffers, writes, the dirty log, resizing, ordering."""

from __future__ import annotations

import array
from pathlib import Path

import numpy as np
import pytest
import ram_strategies as rs

import savevm
from savevm_ram import RAMBlock, RAMList
from savevm_ram.dirty import DirtyBitmap

P = rs.PAGE


def logged(b: RAMBlock) -> list[int]:
    return np.flatnonzero(b._take_log()).tolist()


@pytest.mark.parametrize("data,nbytes", [
    (b"\x01\x02\x03\x04", 4),
    (bytearray(b"\x05" * 10), 10),
    (memoryview(b"\x06" * 7), 7),
    (np.arange(4, dtype=np.uint32), 16),                   # elements are not bytes
    (np.ones((3, 5), dtype=np.uint8), 15),
    (memoryview(array.array("I", [1, 2, 3])), 12),
])
def test_write_counts_bytes_and_marks_pages(data: object, nbytes: int) -> None:
    b = RAMBlock("a", bytearray(3 * P))
    b._start_log()
    off = P - 2  # straddles pages 0 and 1
    b.write(off, data)  # type: ignore[arg-type]
    expected = data.tobytes() if isinstance(data, np.ndarray) else bytes(memoryview(data).cast("B"))
    assert len(expected) == nbytes
    assert bytes(b.host[off : off + nbytes]) == expected
    assert bytes(b.host[off + nbytes : off + nbytes + 8]) == bytes(8)
    assert logged(b) == [0, 1]
    assert logged(b) == []  # taking the log clears it


def test_write_outside_used_length_refused() -> None:
    b = RAMBlock("a", bytearray(4 * P), used_length=2 * P)
    with pytest.raises(savevm.MigrationError):
        b.write(2 * P - 1, b"xx")
    with pytest.raises(savevm.MigrationError):
        b.write(-1, b"x")
    assert not b.host.any()


def test_mark_dirty_ranges() -> None:
    b = RAMBlock("a", bytearray(8 * P))
    b.mark_dirty(0, P)  # not migrating: ignored, no error
    b._start_log()
    b.mark_dirty(P, 1)
    b.mark_dirty(3 * P - 1, 2)
    b.mark_dirty(6 * P, 0)
    assert logged(b) == [1, 2, 3]
    b.mark_dirty(0, 8 * P)
    assert logged(b) == list(range(8))


@pytest.mark.parametrize("make,err", [
    (lambda: RAMBlock("a", b"\x00" * P), "read-only"),
    (lambda: RAMBlock("a", bytearray(P + 1)), "multiple"),
    (lambda: RAMBlock("a", np.zeros((4, 2 * P), np.uint8)[:, :P]), "contiguous"),
    (lambda: RAMBlock("", bytearray(P)), "idstr"),
    (lambda: RAMBlock("x" * 256, bytearray(P)), "idstr"),
    (lambda: RAMBlock("a", bytearray(P), used_length=2 * P), "used_length"),
    (lambda: RAMBlock("a", bytearray(P), dirty="magic"), "provider"),  # type: ignore[arg-type]
    (lambda: RAMBlock("a", bytearray(2 * P), page_size=2 * P), "page"),
])
def test_block_validation(make: object, err: str) -> None:
    with pytest.raises(savevm.RegistrationError, match=err):
        make()  # type: ignore[operator]


def test_ramlist_order_names_and_offsets() -> None:
    ram = RAMList([RAMBlock("s", bytearray(P)), RAMBlock("l", bytearray(4 * P)),
                   RAMBlock("m1", bytearray(2 * P)), RAMBlock("m2", bytearray(2 * P))])
    assert [b.idstr for b in ram] == ["l", "m1", "m2", "s"]  # largest first, ties keep insertion order
    assert [b.offset for b in ram] == [0, 4 * P, 6 * P, 8 * P]
    assert ram.total_bytes == 9 * P
    v = ram.version
    with pytest.raises(savevm.RegistrationError):
        ram.add(RAMBlock("s", bytearray(P)))
    assert ram.version == v
    ram.remove("m1")
    assert ram.version == v + 1 and ram.find("m1") is None
    assert [b.offset for b in ram] == [0, 4 * P, 6 * P]


def test_resize_rules() -> None:
    calls: list[int] = []
    b = RAMBlock("a", bytearray(4 * P), used_length=P, resizable=True, on_resize=lambda blk, n: calls.append(n))
    b.resize(P)
    assert calls == []  # same length: nothing to do
    b.resize(4 * P)
    b.resize(2 * P)
    assert calls == [4 * P, 2 * P] and b.used_length == 2 * P and b.pages == 2
    for bad in (5 * P, 0, P + 1):
        with pytest.raises(savevm.MigrationError):
            b.resize(bad)
    assert b.used_length == 2 * P
    fixed = RAMBlock("f", bytearray(2 * P))
    with pytest.raises(savevm.MigrationError, match="not resizable"):
        fixed.resize(P)


@pytest.mark.parametrize("provider", ["tracked", "compare"])
def test_dirty_bitmap_sync(provider: str) -> None:
    a = RAMBlock("a", np.zeros(5 * P, np.uint8), dirty=provider)
    ram = RAMList([a])
    bm = DirtyBitmap(ram)
    bm.start()
    assert bm.dirty_pages == 5 and bm.bitmap(a).tolist() == [True] * 5
    bm.clear(a, 0, 5)
    assert bm.sync() == 0 and bm.dirty_pages == 0
    if provider == "tracked":
        a.write(2 * P, b"x")
        a.write(4 * P + 1, b"y")
    else:
        a.host[2 * P] = 1
        a.host[4 * P + 1] = 2
    assert bm.sync() == 2
    assert bm.bitmap(a).tolist() == [False, False, True, False, True]
    assert bm.remaining_bytes == 2 * P
    assert bm.sync() == 0  # nothing new; already-dirty pages are not counted twice
    assert bm.sync_count == 3
    if provider == "compare":
        a.host[2 * P] = 1  # same value again: not a change
        assert bm.sync() == 0
    bm.stop()


@pytest.mark.parametrize("used_every", [2, 3, 7])
def test_sparse_memory_round_trips_through_the_fast_loader(tmp_path: Path, used_every: int) -> None:
    """Short runs of ZERO and PAGE records, alternating (a hash table's memory), load byte-exact."""
    import savevm_ram

    src = np.frombuffer(np.random.default_rng(used_every).bytes(3000 * 4096), dtype=np.uint8).copy()
    pages = src.reshape(-1, 4096)
    pages[np.arange(len(pages)) % used_every != 0] = 0
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("m", src)]))
    savevm.snapshot(tmp_path / "s.mig", reg)
    dst = np.full_like(src, 0x5A)
    reg2 = savevm.SectionRegistry()
    handlers = savevm_ram.register_ram(reg2, savevm_ram.RAMList([savevm_ram.RAMBlock("m", dst)]))
    savevm.restore(tmp_path / "s.mig", reg2)
    assert np.array_equal(src, dst)
    used = len(range(0, 3000, used_every))
    assert handlers.counters.normal == used and handlers.counters.duplicate == 3000 - used
