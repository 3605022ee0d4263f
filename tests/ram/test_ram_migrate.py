"""End-to-end: blocks over every kind of buffer, through a snapshot file, a live
in-process pipe with a program writing all the while, and tcp between two processes."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ram_strategies as rs

import savevm
from savevm.channels import listen, memory_pipe
from savevm.qemufile import QEMUFile
from savevm.save import StreamWriter
from savevm_ram import RAMBlock, RAMList

P = rs.PAGE
KINDS = ["bytearray", "numpy", "numpy_u32_2d", "mmap", "shm"]


class Buffers:
    """Makes writable buffers of each kind and releases the ones that need it."""

    def __init__(self) -> None:
        self._shm: list[shared_memory.SharedMemory] = []
        self._mmaps: list[mmap.mmap] = []

    def make(self, kind: str, n: int) -> Any:
        if kind == "bytearray":
            return bytearray(n)
        if kind == "numpy":
            return np.zeros(n, dtype=np.uint8)
        if kind == "numpy_u32_2d":
            return np.zeros((n // 256, 64), dtype=np.uint32)  # not bytes, not 1-D: cast by RAMBlock
        if kind == "mmap":
            m = mmap.mmap(-1, n)
            self._mmaps.append(m)
            return m
        if kind == "shm":
            s = shared_memory.SharedMemory(create=True, size=n)
            self._shm.append(s)
            return s.buf
        raise ValueError(kind)

    def release(self) -> None:
        import gc

        gc.collect()
        for s in self._shm:
            try:
                s.close()
            except BufferError:  # a view is still alive somewhere; unlink anyway
                pass
            s.unlink()
        for m in self._mmaps:
            try:
                m.close()
            except BufferError:
                pass


@pytest.fixture
def buffers() -> Iterator[Buffers]:
    b = Buffers()
    yield b
    b.release()


def build(buffers: Buffers, layout: list[tuple[str, str, int]], dirty: str = "tracked") -> RAMList:
    return RAMList([RAMBlock(name, buffers.make(kind, pages * P), dirty=dirty) for name, kind, pages in layout])


def layout_of(kinds: list[str], sizes: list[int]) -> list[tuple[str, str, int]]:
    return [(f"blk.{k}.{i}", k, n) for i, (k, n) in enumerate(zip(kinds, sizes))]


def contents(ram: RAMList) -> dict[str, bytes]:
    return {b.idstr: b.host[: b.used_length].tobytes() for b in ram}


# ----------------------------------------------------------------- snapshot / restore
@pytest.mark.parametrize("src_kinds,dst_kinds", [
    (KINDS, KINDS),
    (KINDS, list(reversed(KINDS))),
    (["shm", "mmap", "numpy", "bytearray", "numpy_u32_2d"], ["bytearray"] * 5),
])
def test_snapshot_restore_every_buffer_kind(tmp_path: Path, buffers: Buffers, src_kinds: list[str],
                                            dst_kinds: list[str]) -> None:
    sizes = [64, 5, 300, 17, 1]
    rng = np.random.default_rng(42)
    src = build(buffers, layout_of(src_kinds, sizes))
    for b in src:
        rs.fill_random(b, rng, zero_every=3)
    names = [b.idstr for b in src]
    dst = RAMList([RAMBlock(n, buffers.make(k, s * P)) for n, k, s in
                   zip([f"blk.{k}.{i}" for i, k in enumerate(src_kinds)], dst_kinds, sizes)])
    for b in dst:
        b.host[:] = 0xEE
    reg, _ = rs.make_registry(src)
    path = tmp_path / "state.bin"
    n = savevm.snapshot(path, reg)
    assert n == path.stat().st_size > sum(sizes) * P // 2
    dreg, dh = rs.make_registry(dst)
    res = savevm.restore(path, dreg)
    assert res.sections == [("ram", 0, 4)]
    assert contents(dst) == contents(src)
    assert dh.counters.loaded_pages == sum(sizes)
    assert sorted(names) == sorted(contents(dst))


# ----------------------------------------------------------------- live, two threads
def live_migrate(src: RAMList, dst: RAMList, start_writer: Callable[[], rs.Dirtier],
                 threshold: int = 64 * P, min_writes: int = 300, max_seconds: float = 30.0) -> dict[str, Any]:
    """QEMU's migration loop over a memory pipe, the loader on another thread."""
    wch, rch = memory_pipe(max_buffered=8 << 20)
    reg, h = rs.make_registry(src)
    dreg, dh = rs.make_registry(dst)
    box: dict[str, Any] = {}

    def loader() -> None:
        try:
            box["result"] = savevm.load_stream(QEMUFile(rch), dreg)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=loader, daemon=True)
    t.start()
    f = QEMUFile(wch, writable=True)
    w = StreamWriter(f, reg)
    writer = None
    try:
        w.header()
        w.setup()
        writer = start_writer()
        iterations = 0
        writes_after_bulk = None
        deadline = time.monotonic() + max_seconds
        while True:
            pending = w.pending(threshold)
            if not h.bulk_stage and writes_after_bulk is None:
                writes_after_bulk = writer.writes
            settled = writes_after_bulk is not None and writer.writes - writes_after_bulk >= min_writes
            if pending < threshold and settled:
                break
            w.iterate()
            iterations += 1
            if pending < threshold:
                time.sleep(0.001)  # little to send: let the program run (and dirty more)
            assert time.monotonic() < deadline, f"did not converge: {iterations} iterations, {writer.writes} writes"
        writer.stop()
        w.complete_precopy()
    finally:
        if writer is not None and writer.is_alive():
            writer.stop()
        w.cleanup()
        wch.close()
    t.join(30)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]
    return {"iterations": iterations, "writes": writer.writes, "stats": h.query_stats()["ram"], "src": h,
            "dst": dh}


@pytest.mark.parametrize("kinds", [KINDS, ["numpy", "shm"]])
def test_live_tracked_provider(buffers: Buffers, kinds: list[str]) -> None:
    sizes = [256, 40, 600, 9, 3][: len(kinds)]
    rng = np.random.default_rng(1)
    src = build(buffers, layout_of(kinds, sizes))
    for b in src:
        rs.fill_random(b, rng)
    initial = contents(src)
    dst = RAMList([RAMBlock(b.idstr, buffers.make(k, b.used_length)) for b, k in zip(src, reversed(kinds))])

    def start() -> rs.Dirtier:
        d = rs.Dirtier(list(src), "tracked", seed=2)
        d.start()
        return d

    out = live_migrate(src, dst, start)
    assert out["writes"] >= 300
    assert contents(src) != initial, "the writer must have changed memory"
    assert contents(dst) == contents(src)
    st = out["stats"]
    assert st["dirty-sync-count"] >= 3
    assert st["normal"] + st["duplicate"] > sum(sizes), "pages dirtied after the bulk stage are resent"


def test_live_compare_provider(buffers: Buffers) -> None:
    """dirty="compare": the program writes its numpy buffer directly and tells nobody."""
    sizes = [300, 64, 7]
    src = RAMList([RAMBlock(f"cmp{i}", buffers.make(k, n * P), dirty="compare")
                   for i, (k, n) in enumerate(zip(["numpy", "shm", "mmap"], sizes))])
    rng = np.random.default_rng(9)
    for b in src:
        rs.fill_random(b, rng)
    initial = contents(src)
    dst = RAMList([RAMBlock(b.idstr, np.full(b.used_length, 0xEE, np.uint8)) for b in src])

    def start() -> rs.Dirtier:
        d = rs.Dirtier(list(src), "compare", seed=4)
        d.start()
        return d

    out = live_migrate(src, dst, start)
    assert contents(src) != initial
    assert contents(dst) == contents(src)
    assert out["stats"]["normal"] + out["stats"]["duplicate"] > sum(sizes)


def test_live_without_tracking_is_caught(buffers: Buffers) -> None:
    """The tests above can fail: with the dirty log switched off the destination would go stale,
    and the tracker audit refuses to complete instead of handing over a copy that differs."""
    from savevm_ram.dirty import UntrackedWriteError

    src = RAMList([RAMBlock("x", np.zeros(64 * P, np.uint8))])
    rs.fill_random(src[0], np.random.default_rng(0))
    dst = RAMList([RAMBlock("x", bytearray(64 * P))])
    src[0].mark_dirty = lambda offset, length: None  # type: ignore[method-assign]

    def start() -> rs.Dirtier:
        d = rs.Dirtier(list(src), "tracked", seed=5)
        d.start()
        return d

    with pytest.raises(UntrackedWriteError, match="without being marked dirty"):
        live_migrate(src, dst, start, min_writes=100)


# ----------------------------------------------------------------- tcp between two processes
SOURCE_SCRIPT = Path(__file__).with_name("_tcp_source.py")


def test_tcp_two_processes() -> None:
    layout = [("pc.ram", 512), ("vga.vram", 64), ("rom", 3)]
    dst = RAMList([RAMBlock(name, bytearray(n * P)) for name, n in layout])
    lst = listen("tcp:127.0.0.1:0")
    proc = subprocess.Popen([sys.executable, str(SOURCE_SCRIPT), lst.uri, json.dumps(layout)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ch = lst.accept(timeout=30)
        dreg, dh = rs.make_registry(dst)
        res = savevm.load_stream(QEMUFile(ch), dreg)
        ch.close()
        out, err = proc.communicate(timeout=60)
    finally:
        lst.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["writes"] > 0 and report["iterations"] >= 1
    assert res.sections == [("ram", 0, 4)]
    assert {b.idstr: rs.digest(b) for b in dst} == report["sha256"]
    assert report["sha256"] != report["initial_sha256"], "the source kept writing during the migration"
