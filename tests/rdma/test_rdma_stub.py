"""The RDMA-style transport: pages by shared-memory "remote write", control in the stream."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import socket
import threading
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
        shm.close()
        shm.unlink()


@pytest.mark.parametrize("shm_backed", [False, True], ids=["staged", "zero-copy"])
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


def test_rdma_block_mismatch_is_refused() -> None:
    """The destination registers blocks of other lengths: the source fails at setup, clearly."""
    lst = RdmaTransport().listen("127.0.0.1:0")
    errors: list[BaseException] = []

    def fake_destination() -> None:
        # answers the registration request with a wrong length, as a mismatched peer would
        import struct

        from savevm.return_path import NEGOTIATE_PONG, RPMessage, encode_json, frame

        ch = lst.accept(10)
        try:
            f = QEMUFile(ch)
            # a savevm destination: answer the negotiation PING (the source's first command)
            ch.sock.sendall(frame(RPMessage.PONG, struct.pack(">I", NEGOTIATE_PONG)))
            while True:  # skip to the HOOK record's control word
                if f.get_byte() == 0x80 and f.peek_byte() == 0:
                    f.get_be32()
                    break
            blocks = [{"idstr": "a", "length": 4096, "region": "nope", "direct": False}]
            ch.sock.sendall(frame(RPMessage.EXTENSION, encode_json({"kind": "rdma-blocks", "blocks": blocks})))
            ch.sock.recv(1 << 16)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            ch.close()

    t = threading.Thread(target=fake_destination)
    t.start()
    reg, _ = _registry([savevm_ram.RAMBlock("a", _src_memory(5))])
    mig = Migration(reg, lst.uri)
    mig.start()
    st = mig.wait(30)
    t.join(10)
    lst.close()
    assert st.status == "failed"
    assert "block 0 mismatch" in str(mig.error)


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
