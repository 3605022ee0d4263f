"""An RDMA-style transport: pages by "remote write", the stream carries control.

QEMU's RDMA migration (``migration/rdma.c``) registers the destination's
RAM with the NIC, writes pages straight into it, and leaves only
``RAM_SAVE_FLAG_HOOK`` markers and control messages in the stream.  This
plugin does the same on one host with POSIX shared memory:

* The URI scheme ``rdma:HOST:PORT`` is a TCP control channel marked as RDMA;
  the hooks act only on such channels, so choosing the transport is a
  matter of URI (or config), not code.
* Destination, ``RAM_CONTROL_BLOCK_REG`` (one per block of the MEM_SIZE
  list): the block is "registered".  A block whose buffer is a
  ``multiprocessing.shared_memory.SharedMemory`` is registered as itself
  (true zero-copy remote writes); any other block gets a shared staging
  region of its size.
* Source, ``before_iterate(SETUP)`` writes a HOOK record;
  ``after_iterate(SETUP)`` waits for the destination's answer, an
  ``rdma-blocks`` EXTENSION message on the return path: the block list
  (name, length, region name), which must match the source's blocks in count, order and length,
  as QEMU's RAM_BLOCKS_REQUEST/RESULT exchange requires.
* Source, ``ram_control_save_page``: a run of pages is copied into the
  mapped region (the "RDMA write") and never enters the stream.
* Each ROUND/FINISH: ``before_iterate`` writes HOOK, ``after_iterate``
  writes the list of written ranges and a REGISTER_FINISHED marker; the
  destination's HOOK handler reads them and copies staged ranges into its
  block (nothing to copy for zero-copy blocks).

Control payload format (all big-endian), after the ``be64 0x80`` record:
``be32 type`` then, for type 9 (REGISTER_FINISHED), ``be32 count`` and
``count × (be32 block index, be64 offset, be64 length)``.
"""

from __future__ import annotations

import struct
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from savevm.channels.base import Transport
from savevm.channels.sockets import SocketChannel, SocketListener, TcpTransport
from savevm.config import MigrationConfig
from savevm.errors import ChannelError, CorruptStreamError
from savevm.hookspecs import hookimpl
from savevm.logging import get_logger
from savevm.qemufile import QEMUFile
from savevm.return_path import RPMessage, encode_json
from savevm_ram.block import RAMBlock
from savevm_ram.state import RAMState
from savevm_ram.wire import (
    CONTROL_RAM_BLOCKS_REQUEST,
    CONTROL_REGISTER_FINISHED,
    PAGE_SIZE,
    RAM_CONTROL_BLOCK_REG,
    RAM_CONTROL_HOOK,
    RAM_CONTROL_SETUP,
    Flag,
)

log = get_logger("savevm.rdma_stub")

MAX_RANGES = 1 << 22
#: the return-path EXTENSION message carrying RAM_BLOCKS_RESULT
REGISTRATION_KIND = "rdma-blocks"


class RdmaChannel(SocketChannel):
    """A TCP socket that carries the control stream of an RDMA-style migration."""

    rdma = True


class _RdmaListener:
    def __init__(self, inner: SocketListener) -> None:
        self._inner = inner
        self.uri = "rdma:" + inner.uri.partition(":")[2]

    def accept(self, timeout: float | None = None) -> RdmaChannel:
        ch = self._inner.accept(timeout)
        return RdmaChannel(ch.sock, "rdma:" + ch.name)

    def close(self) -> None:
        self._inner.close()


class RdmaTransport:
    """``rdma:HOST:PORT``: control over TCP, pages through shared memory."""

    scheme = "rdma"
    address_kind = "inet"

    def connect(self, address: str) -> RdmaChannel:
        ch = TcpTransport().connect(address)
        return RdmaChannel(ch.sock, f"rdma:{address}")

    def listen(self, address: str) -> _RdmaListener:
        return _RdmaListener(TcpTransport().listen(address))


def _is_rdma(f: QEMUFile) -> bool:
    return bool(getattr(f.channel, "rdma", False))


@hookimpl
def savevm_get_transport(scheme: str, config: MigrationConfig) -> Transport | None:
    """Offer the ``rdma`` scheme."""
    return RdmaTransport() if scheme == "rdma" else None


# --------------------------------------------------------------------------- source
class _SourceState:
    def __init__(self) -> None:
        self.regions: list[tuple[shared_memory.SharedMemory, np.ndarray]] = []
        self.index: dict[str, int] = {}
        self.ranges: list[tuple[int, int, int]] = []
        self.bytes = 0

    def close(self) -> None:
        """Unmap the destination's regions (the destination owns and unlinks them)."""
        for shm, _ in self.regions:
            try:
                shm.close()
            except BufferError:
                pass
        self.regions.clear()


def _src(rs: RAMState) -> _SourceState:
    st = rs.transport_state.get("rdma")
    if st is None:
        st = rs.transport_state["rdma"] = _SourceState()
    return st


@hookimpl
def ram_control_before_iterate(rs: RAMState, f: QEMUFile, flags: int) -> None:
    """qemu_rdma_registration_start: a HOOK record tells the destination to listen."""
    if not _is_rdma(f):
        return
    f.put_be64(Flag.HOOK)
    if flags == RAM_CONTROL_SETUP:
        rs.claim_pages()  # this migration's pages go by remote write
        f.put_be32(CONTROL_RAM_BLOCKS_REQUEST)
        f.flush()


@hookimpl
def ram_control_after_iterate(rs: RAMState, f: QEMUFile, flags: int) -> None:
    """qemu_rdma_registration_stop: exchange block registrations, or report writes."""
    if not _is_rdma(f):
        return
    st = _src(rs)
    if flags == RAM_CONTROL_SETUP:
        _exchange_blocks(rs, f, st)
        return
    f.put_be32(CONTROL_REGISTER_FINISHED)
    f.put_be32(len(st.ranges))
    for bi, off, ln in st.ranges:
        f.put_buffer(struct.pack(">IQQ", bi, off, ln))
    st.ranges.clear()


def _exchange_blocks(rs: RAMState, f: QEMUFile, st: _SourceState) -> None:
    """RAM_BLOCKS_RESULT: the destination's registered regions, over the return path."""
    f.flush()
    rp = f.return_path
    if rp is None:
        raise ChannelError("rdma: the channel has no return path for block registration")
    timeout = rs.config.parameters.x_handover_timeout / 1000
    msg = rp.take_extension(REGISTRATION_KIND, timeout)
    if msg is None:
        raise ChannelError(f"rdma: no block registration from the destination within {timeout:g}s "
                           "(is it savevm with the rdma_stub plugin?)")
    result = msg.get("blocks")
    blocks = list(rs.ram)
    if not isinstance(result, list) or len(result) != len(blocks):
        raise ChannelError(f"rdma: destination registered {len(result) if isinstance(result, list) else '?'} "
                           f"blocks, source has {len(blocks)}")
    for i, (b, r) in enumerate(zip(blocks, result)):
        if not isinstance(r, dict) or r.get("idstr") != b.idstr or r.get("length") != b.used_length:
            raise ChannelError(f"rdma: block {i} mismatch: source {b.idstr}/{b.used_length}, destination {r!r}")
        shm = shared_memory.SharedMemory(name=str(r["region"]))
        # Python < 3.13 would unlink an attached segment at exit: it is not ours to remove
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        st.regions.append((shm, np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)))
        st.index[b.idstr] = i
    log.info("qemu_rdma_registration_stop", blocks=len(blocks), zero_copy=[r["direct"] for r in result])


@hookimpl
def ram_control_save_page(rs: RAMState, f: QEMUFile, block: RAMBlock, offset: int, size: int) -> int | None:
    """The "RDMA write": copy the run into the destination's registered memory."""
    if not _is_rdma(f):
        return None
    st = _src(rs)
    i = st.index.get(block.idstr)
    if i is None:
        return None
    region = st.regions[i][1]
    region[offset : offset + size] = block.host[offset : offset + size]
    st.ranges.append((i, offset, size))
    st.bytes += size
    return size


# --------------------------------------------------------------------------- destination
class _DestState:
    def __init__(self) -> None:
        self.blocks: list[RAMBlock] = []
        self.regions: list[tuple[shared_memory.SharedMemory | None, np.ndarray, bool]] = []
        self.owned: list[shared_memory.SharedMemory] = []

    def close(self) -> None:
        for shm in self.owned:
            try:
                shm.close()
                shm.unlink()
            except (OSError, BufferError):
                pass
        self.owned.clear()


def _dst(rs: RAMState) -> _DestState:
    st = rs.transport_state.get("rdma-dest")
    if st is None:
        st = rs.transport_state["rdma-dest"] = _DestState()
    return st


@hookimpl
def ram_control_load_hook(rs: RAMState, f: QEMUFile, flags: int, data: RAMBlock | None) -> bool | None:
    """BLOCK_REG: register a block; HOOK: answer registration or apply reported writes."""
    if not _is_rdma(f):
        return None
    st = _dst(rs)
    if flags == RAM_CONTROL_BLOCK_REG:
        assert data is not None, "BLOCK_REG always names its block"
        _register(st, data)
        return True
    if flags != RAM_CONTROL_HOOK:
        return None
    off = f.pos
    kind = f.get_be32()
    if kind == CONTROL_RAM_BLOCKS_REQUEST:
        result = [{"idstr": b.idstr, "length": b.used_length, "region": r[0].name if r[0] else "", "direct": r[2]}
                  for b, r in zip(st.blocks, st.regions)]
        rp = f.return_path
        if rp is None or not rp.send(RPMessage.EXTENSION, encode_json({"kind": REGISTRATION_KIND,
                                                                      "blocks": result})):
            raise ChannelError("rdma: cannot answer the block registration (no negotiated return path)")
        return True
    if kind != CONTROL_REGISTER_FINISHED:
        raise CorruptStreamError(f"rdma: unexpected control message type {kind}", off)
    count = f.get_be32()
    if count > MAX_RANGES:
        raise CorruptStreamError(f"rdma: {count} ranges is implausible", off)
    for _ in range(count):
        roff = f.pos
        bi, o, ln = struct.unpack(">IQQ", f.get_bytes(20, limit=20))
        if bi >= len(st.blocks):
            raise CorruptStreamError(f"rdma: write to unregistered block {bi}", roff)
        b = st.blocks[bi]
        if o + ln > b.used_length or o % PAGE_SIZE or ln % PAGE_SIZE:
            raise CorruptStreamError(f"rdma: write [{o}, {o + ln}) outside {b.idstr!r}", roff)
        shm, region, direct = st.regions[bi]
        if not direct:
            b.host[o : o + ln] = region[o : o + ln]
        rs.counters.loaded_pages += ln // PAGE_SIZE
    return True


def _register(st: _DestState, block: RAMBlock) -> None:
    buf = getattr(block, "buffer", None)
    if isinstance(buf, shared_memory.SharedMemory):
        st.blocks.append(block)
        st.regions.append((buf, block.host, True))
        return
    shm = shared_memory.SharedMemory(create=True, size=max(block.used_length, 1))
    st.owned.append(shm)
    st.blocks.append(block)
    st.regions.append((shm, np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf), False))
    log.debug("rdma_register_block", block=block.idstr, region=shm.name)
