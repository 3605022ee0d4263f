"""The RDMA-style transport: pages by shared-memory "remote write", control in the stream."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import pytest

import savevm
import savevm_ram
from savevm.channels import MemoryChannel
from savevm.migration import Incoming, Migration
from savevm.qemufile import QEMUFile
from savevm_rdma_stub import RdmaChannel, RdmaTransport

N = 8 << 20


def _src_memory(seed: int = 3) -> np.ndarray:
    m = np.frombuffer(np.random.default_rng(seed).bytes(N), dtype=np.uint8).copy()
    m[: 1 << 20] = 0
    return m


def _registry(blocks: list[savevm_ram.RAMBlock]) -> tuple[savevm.SectionRegistry, savevm_ram.RAMHandlers]:
    reg = savevm.PluginHost().new_registry()
    h = savevm_ram.register_ram(reg, savevm_ram.RAMList(blocks))
    return reg, h


def _destination(conn: Any, shm_backed: bool) -> None:
    """Child process: receive over rdma:, report sha256 of each block and the stream size."""
    shm = None
    if shm_backed:
        shm = shared_memory.SharedMemory(create=True, size=N)
        shm.unlink()  # the mapping is all the test needs: no name left in /dev/shm, whatever happens
        a = savevm_ram.RAMBlock("a", shm)
    else:
        a = savevm_ram.RAMBlock("a", np.zeros(N, dtype=np.uint8))
    reg, h = _registry([a, savevm_ram.RAMBlock("b", bytearray(1 << 20))])
    inc = Incoming(reg, "rdma:127.0.0.1:0")
    conn.send(inc.listen())
    st = inc.run()
    sums = {b.idstr: hashlib.sha256(b.mv[: b.used_length]).hexdigest() for b in h.ram}
    conn.send((st.status, st.stream_bytes, sums, h.counters.loaded_pages))
    if shm is not None:
        del a, reg, h, inc
        with contextlib.suppress(BufferError):  # a view may still be alive; the name is gone already
            shm.close()


@pytest.mark.parametrize("shm_backed", [False, True], ids=["numpy", "shared-memory"])
def test_rdma_migration_between_processes(shm_backed: bool) -> None:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_destination, args=(child, shm_backed))
    proc.start()
    try:
        uri = parent.recv()
        assert uri.startswith("rdma:127.0.0.1:")
        src_a = _src_memory()
        src_b = bytearray(os.urandom(1 << 20))
        reg, h = _registry([savevm_ram.RAMBlock("a", src_a), savevm_ram.RAMBlock("b", src_b)])
        stats = Migration(reg, uri).run()
        assert stats.status == "completed"
        status, stream_bytes, sums, loaded = parent.recv()
    finally:
        proc.join(30)
    assert status == "completed"
    assert sums == {"a": hashlib.sha256(src_a).hexdigest(), "b": hashlib.sha256(src_b).hexdigest()}
    # pages went out of band: the stream holds only headers, the block list and control records
    assert stream_bytes < 64 << 10, stream_bytes
    assert stats.ram["transferred"] >= N  # out-of-band bytes are accounted
    assert loaded >= (N + (1 << 20)) // 4096


def test_rdma_hooks_ignore_other_channels() -> None:
    """Installed but unused, the transport leaves a tcp/memory migration's stream alone."""
    src = _src_memory(4)
    reg, h = _registry([savevm_ram.RAMBlock("a", src)])
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    savevm.save_stream(f, reg)
    f.flush()
    assert h.counters.control == 0
    assert len(ch.getvalue()) > N // 2  # the random pages are in the stream itself


def _against_fake_destination(answer: Any, src: np.ndarray) -> Migration:
    """Migrate ``src`` to a fake rdma destination whose registration reply is ``answer(token)``."""
    lst = RdmaTransport().listen("127.0.0.1:0")

    def fake_destination() -> None:
        import struct

        from savevm.return_path import NEGOTIATE_PONG, RPMessage, encode_json, frame

        ch = lst.accept(10)
        try:
            f = QEMUFile(ch)
            # a savevm destination: answer the negotiation PING (the source's first command)
            ch.sock.sendall(frame(RPMessage.PONG, struct.pack(">I", NEGOTIATE_PONG)))
            window = b""
            while window != b"\x00" * 7 + b"\x80" + b"\x00\x00\x00\x04":  # HOOK, RAM_BLOCKS_REQUEST
                window = (window + bytes([f.get_byte()]))[-12:]
            token = f.get_bytes(16, limit=16)
            ch.sock.sendall(frame(RPMessage.EXTENSION, encode_json({"kind": "rdma-blocks", **answer(token)})))
            ch.sock.recv(1 << 16)
        except OSError:
            pass
        finally:
            ch.close()

    t = threading.Thread(target=fake_destination)
    t.start()
    reg, _ = _registry([savevm_ram.RAMBlock("a", src)])
    mig = Migration(reg, lst.uri)
    mig.start()
    st = mig.wait(30)
    t.join(10)
    lst.close()
    assert st.status == "failed"
    return mig


def test_rdma_block_mismatch_is_refused() -> None:
    """The destination registers blocks of other lengths: the source fails at setup, clearly."""
    mig = _against_fake_destination(lambda token: {
        "blocks": [{"idstr": "a", "length": 4096, "pid": os.getpid(), "fd": 0, "direct": False}],
        "token": token.hex()}, _src_memory(5))
    assert "block 0 mismatch" in str(mig.error)


def test_rdma_token_mismatch_is_refused() -> None:
    mig = _against_fake_destination(lambda token: {
        "blocks": [{"idstr": "a", "length": N, "pid": os.getpid(), "fd": 0, "direct": False}],
        "token": "00" * 16}, _src_memory(5))
    assert "token mismatch" in str(mig.error)


def test_rdma_never_writes_memory_that_is_not_a_region(tmp_path: Any) -> None:
    """A destination that points the source at another file: refused before a byte is written."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"\x00" * (N + 4096))
    fd = os.open(victim, os.O_RDWR)
    try:
        mig = _against_fake_destination(lambda token: {
            "blocks": [{"idstr": "a", "length": N, "pid": os.getpid(), "fd": fd, "direct": True}],
            "token": token.hex()}, _src_memory(5))
    finally:
        os.close(fd)
    assert "not a savevm-rdma region" in str(mig.error)
    assert victim.read_bytes() == b"\x00" * (N + 4096)


@pytest.mark.parametrize("fault", ["token", "length", "index"])
def test_rdma_checks_the_region_header_before_writing(fault: str) -> None:
    """A memfd that looks like a region but whose header is not this migration's block: not written."""
    from savevm_rdma_stub.plugin import _HDR, HEADER, MAGIC, MEMFD_NAME

    fd = os.memfd_create(MEMFD_NAME)
    os.ftruncate(fd, HEADER + N)
    region = mmap.mmap(fd, HEADER + N)

    def answer(token: bytes) -> dict[str, Any]:
        hdr = _HDR.pack(MAGIC, b"\x01" * 16 if fault == "token" else token, 1 if fault == "index" else 0,
                        N - 4096 if fault == "length" else N, 1) + b"a"
        region[: len(hdr)] = hdr
        return {"blocks": [{"idstr": "a", "length": N, "pid": os.getpid(), "fd": fd, "direct": True}],
                "token": token.hex()}

    try:
        mig = _against_fake_destination(answer, _src_memory(5))
        assert "header does not name" in str(mig.error)
        assert not any(region[HEADER:])  # not one page was written
    finally:
        region.close()
        os.close(fd)


def _owned_destination(conn: Any) -> None:
    """Child process: blocks the RAM plugin owns, received over rdma: and written in place."""
    a = savevm_ram.RAMBlock.allocate("a", N)
    reg, h = _registry([a, savevm_ram.RAMBlock("b", bytearray(1 << 20))])
    inc = Incoming(reg, "rdma:127.0.0.1:0")
    conn.send(inc.listen())
    st = inc.run()
    sums = {b.idstr: hashlib.sha256(b.mv[: b.used_length]).hexdigest() for b in h.ram}
    addr = h.ram.find("a").host.ctypes.data  # type: ignore[union-attr]
    mapping = next(line for line in open("/proc/self/maps")
                   if int(line.split("-")[0], 16) <= addr < int(line.split()[0].split("-")[1], 16))
    conn.send((st.status, sums, mapping.strip()))


def _our_shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "savevm" in n} if os.path.isdir("/dev/shm") else set()


def test_rdma_writes_owned_blocks_in_place() -> None:
    """An owned block's memory *is* its registered region: no staging copy on the destination."""
    before = _our_shm()
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_owned_destination, args=(child,))
    proc.start()
    try:
        uri = parent.recv()
        src_a = _src_memory(8)
        src_b = bytearray(os.urandom(1 << 20))
        reg, h = _registry([savevm_ram.RAMBlock("a", src_a), savevm_ram.RAMBlock("b", src_b)])
        assert Migration(reg, uri).run().status == "completed"
        status, sums, mapping = parent.recv()
    finally:
        proc.join(30)
    assert status == "completed"
    assert sums == {"a": hashlib.sha256(src_a).hexdigest(), "b": hashlib.sha256(src_b).hexdigest()}
    assert "/memfd:savevm-rdma" in mapping, mapping  # the block lives in the region the source wrote
    assert _our_shm() <= before  # nothing named in /dev/shm after a success


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as fh:
        return fh.read()


@pytest.mark.parametrize("victim", ["destination", "source"])
def test_rdma_kill9_either_side_leaves_no_segment(victim: str) -> None:
    """Regions are memfds: no /dev/shm name exists to leak, whoever is killed; the survivor fails."""
    env = {**os.environ}
    cli = [sys.executable, "-m", "savevm.cli"]
    guest = ["--guest", "savevm_ram.demo:DemoProgram", "--guest-arg", "size=32M", "--guest-arg", "blocks=1"]
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    dest = subprocess.Popen([*cli, "incoming", "rdma:127.0.0.1:0", "--print-uri", "--json", "--timeout", "30",
                             *guest, "--guest-arg", "role=destination"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    src = None
    try:
        assert dest.stdout is not None
        uri = dest.stdout.readline().strip()
        src = subprocess.Popen([*cli, "migrate", uri, "--json", *guest, "--guest-arg", "dirty_rate=0",
                                "--set", "max-bandwidth=4M"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.monotonic() + 20
        while "/memfd:savevm-rdma" not in _maps(src.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in (dest.pid, src.pid):  # registered memory is memfd-backed on both sides, never /dev/shm
            assert "/memfd:savevm-rdma" in _maps(p) and "/dev/shm/" not in _maps(p)
        killed, survivor = (dest, src) if victim == "destination" else (src, dest)
        killed.kill()
        killed.wait(10)
        out, _ = survivor.communicate(timeout=60)
        assert json.loads(out.strip().splitlines()[-1])["status"] == "failed"
    finally:
        for p in (dest, src):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    if os.path.isdir("/dev/shm"):
        assert not [n for n in set(os.listdir("/dev/shm")) - shm_before if "savevm" in n]


def test_rdma_uri_and_channel() -> None:
    lst = RdmaTransport().listen("127.0.0.1:0")
    try:
        host, port = lst.uri.split(":")[1:]
        c = RdmaTransport().connect(f"{host}:{port}")
        s = lst.accept(5)
        assert isinstance(c, RdmaChannel) and isinstance(s, RdmaChannel) and c.rdma and s.rdma
        c.close()
        s.close()
    finally:
        lst.close()
    with pytest.raises(savevm.URIError):
        savevm.channels.open_channel("rdma:nohostport")
    with pytest.raises(savevm.ChannelError):
        s2 = socket.socket()
        s2.bind(("127.0.0.1", 0))
        port = s2.getsockname()[1]
        s2.close()
        savevm.channels.open_channel(f"rdma:127.0.0.1:{port}")


def test_transport_swapped_by_config_alone() -> None:
    """``[transports] tcp = "rdma"``: the same tcp: URI now moves pages by remote write."""
    cfg = savevm.MigrationConfig.from_dict({"transports": {"tcp": "rdma"}})
    src = _src_memory(6)
    dst = np.zeros_like(src)
    sreg = savevm.PluginHost(cfg).new_registry()
    sh = savevm_ram.register_ram(sreg, savevm_ram.RAMList([savevm_ram.RAMBlock("a", src)]))
    dreg = savevm.PluginHost(cfg).new_registry()
    savevm_ram.register_ram(dreg, savevm_ram.RAMList([savevm_ram.RAMBlock("a", dst)]))
    inc = Incoming(dreg, "tcp:127.0.0.1:0")
    uri = inc.listen()
    assert uri.startswith("rdma:")  # the listener says what really carries it
    inc.start()
    st = Migration(sreg, "tcp:" + uri.partition(":")[2]).run()
    assert inc.wait(30).status == "completed" and st.status == "completed"
    assert np.array_equal(src, dst)
    assert sh.counters.control == N // 4096, "every page went out of band"
    with pytest.raises(savevm.ConfigError, match="transports"):
        savevm.MigrationConfig.from_dict({"transports": ["tcp"]})
    with pytest.raises(savevm.URIError, match="routed to 'nope'"):
        savevm.PluginHost(savevm.MigrationConfig.from_dict({"transports": {"tcp": "nope"}})).get_transport("tcp")


def test_rdma_checks_the_region_size_before_mapping() -> None:
    """A savevm-rdma memfd smaller than header + block: refused, nothing written."""
    from savevm_rdma_stub.plugin import HEADER, MEMFD_NAME

    fd = os.memfd_create(MEMFD_NAME)
    os.ftruncate(fd, HEADER + N - 4096)
    try:
        mig = _against_fake_destination(lambda token: {
            "blocks": [{"idstr": "a", "length": N, "pid": os.getpid(), "fd": fd, "direct": True}],
            "token": token.hex()}, _src_memory(5))
        assert "region holds" in str(mig.error)
        assert not any(os.pread(fd, HEADER + N, 0))
    finally:
        os.close(fd)


def _resident_shmem_kib() -> int:
    """RssShmem of this process (kB): shared-memory pages mapped here."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    pytest.skip("no RssShmem in /proc/self/status")


def test_region_pages_are_faulted_in_by_writing_and_stop_with_close() -> None:
    """A region's pages end up present (zeroed, so another process maps them without faulting them
    into existence), and closing a region stops its background populate promptly."""
    from savevm_rdma_stub import plugin

    before = _resident_shmem_kib()
    r = plugin._Region(64 << 20)
    assert r._fault.wait(30)
    assert _resident_shmem_kib() - before >= (64 << 10) * 0.9  # populated in this mapping, not just reserved
    assert not r.data.any()
    r.close(unmap=True)

    big = plugin._Region(4 << 30)  # larger than it can populate before close: close must not wait for it all
    t = time.monotonic()
    big.close(unmap=True)
    assert time.monotonic() - t < 2.0
    assert big._fault.done()


def test_region_falls_back_to_fallocate_without_populate(monkeypatch: pytest.MonkeyPatch) -> None:
    from savevm_ram import memory
    from savevm_rdma_stub import plugin

    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(memory, "populate", lambda host, a, n: False)
    monkeypatch.setattr(plugin.os, "posix_fallocate", lambda fd, off, n: calls.append((fd, off, n)))
    r = plugin._Region(8 << 20)
    assert r._fault.wait(30)
    assert calls == [(r.fd, plugin.HEADER, 8 << 20)]
    r.close(unmap=True)


def test_source_maps_a_region_by_reading_and_never_writes_it() -> None:
    """map_shared (the source's run-ahead) leaves every byte as it was, even while the destination writes."""
    from savevm_ram.memory import map_shared

    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 16 << 20)
        m1 = mmap.mmap(fd, 16 << 20)
        m2 = mmap.mmap(fd, 16 << 20)
    finally:
        os.close(fd)
    a1 = np.frombuffer(m1, dtype=np.uint8)
    a2 = np.frombuffer(m2, dtype=np.uint8)
    a1[:] = np.random.default_rng(1).integers(0, 256, 16 << 20, dtype=np.uint8)
    want = a1.copy()
    map_shared(a2, 0, 16 << 20)
    assert np.array_equal(a1, want)
    del a1, a2
    m1.close()
    m2.close()
