"""An RDMA-style transport: pages by "remote write", the stream carries control.

QEMU's RDMA migration (``migration/rdma.c``) registers the destination's
RAM with the NIC, writes pages straight into it, and leaves only
``RAM_SAVE_FLAG_HOOK`` markers and control messages in the stream.  This
plugin does the same on one host with shared memory:

* The URI scheme ``rdma:HOST:PORT`` is a TCP control channel marked as RDMA;
  the hooks act only on such channels, so choosing the transport is a
  matter of URI (or config), not code.
* Destination, registration: every block gets a *region*, an anonymous
  shared-memory file (``memfd_create``: it has no name in ``/dev/shm``, so
  nothing can be left behind there, whoever dies) holding a 4 KiB header
  and then the block's bytes, allocated in the background as soon as it is
  registered (as RDMA registration pins memory).  For a block the RAM plugin owns
  (``RAMBlock.allocate``: the demo's blocks, auto-created ones) the region
  *is* the block's memory, handed over through the RAM plugin's
  ``ram_block_memory`` hook: a page costs one copy, source memory to
  destination block.  A block over a program's own buffer gets a staging
  region, copied into the block when the writes are reported.
* Source, ``before_iterate(SETUP)`` writes a HOOK record, RAM_BLOCKS_REQUEST
  and a fresh 16-byte token (``secrets.token_bytes``); the destination
  writes that token into every region's header and answers on the return
  path with an ``rdma-blocks`` EXTENSION message: per block its name,
  length, and where the region is (its pid and the memfd's descriptor
  number).  The source checks the list against its own blocks (count,
  order, lengths, as QEMU's RAM_BLOCKS_REQUEST/RESULT exchange requires),
  then opens ``/proc/PID/fd/N`` only if that is a savevm-rdma memfd, and
  before any write checks the region's size and header: magic, the token,
  the block's index, name and length.  It opens no name the destination
  chose, so a destination cannot point it at someone else's memory.
* Source, ``ram_control_save_page``: a run of pages is copied into the
  mapped region (the "RDMA write") and never enters the stream.  A
  background thread maps the destination's pages into the source ahead of
  the copies by reading a byte of each (read faults map 16 pages at a time,
  writable on shared memory), so the copies do not fault page by page.
* Each ROUND/FINISH: ``before_iterate`` writes HOOK, ``after_iterate``
  writes REGISTER_FINISHED with the token and the list of written ranges;
  the destination checks the token and copies staged ranges into their
  blocks (nothing to copy for owned blocks).

Control payload format (all big-endian), after the ``be64 0x80`` record:
``be32 type``; type 4 (RAM_BLOCKS_REQUEST) is followed by the 16-byte
token; type 9 (REGISTER_FINISHED) by the token, ``be32 count`` and
``count × (be32 block index, be64 offset, be64 length)``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import struct
import weakref
from typing import Any

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
from savevm_ram.memory import Prefaulter
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
#: the memfd name of every region (``/proc/PID/fd/N`` reads ``/memfd:savevm-rdma (deleted)``)
MEMFD_NAME = "savevm-rdma"
#: a region starts with this header page; the block's bytes follow, page aligned
HEADER = 4096
MAGIC = b"savevm-rdma-v1\x00\x00"
TOKEN_BYTES = 16
_HDR = struct.Struct(">16s16sIQB")  # magic, token, block index, length, idstr length (idstr follows)


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


def _header(token: bytes, index: int, block: RAMBlock) -> bytes:
    name = block.idstr.encode()
    return _HDR.pack(MAGIC, token, index, block.used_length, len(name)) + name


class _Region:
    """One registered region: a memfd mapped shared, a header page, then the block's bytes."""

    def __init__(self, length: int) -> None:
        self.size = HEADER + max(length, PAGE_SIZE)
        self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)
        except OSError:
            os.close(self.fd)
            raise
        #: the bytes after the header: the block's memory (direct) or its staging copy
        self.data = np.frombuffer(self.map, dtype=np.uint8, offset=HEADER)
        # allocate the pages now, in the background, as RDMA registration pins memory: the source
        # then maps pages that exist instead of faulting each into existence (measured: 1 GiB
        # over rdma 0.91 -> 0.67 s, medians of 3 on a busy machine)
        # by writing (MADV_POPULATE_WRITE), which changes nothing, so it may race with the source's
        # writes; fallocate alone reserves shmem pages but leaves them unzeroed and not up to date,
        # so the zeroing then happened at the source's first fault on each page, one 4 KiB page per
        # fault, inside the migration (measured, 1 GiB: the source mapped the region in 0.66 s after
        # fallocate, in 0.06 s after populate).  fallocate is the fallback where populate is missing.
        self._fault = Prefaulter([(self.data, 0, self.size - HEADER)], name="savevm-rdma-populate",
                                 fallback=self._fallocate)

    def _fallocate(self) -> None:
        with contextlib.suppress(OSError):
            os.posix_fallocate(self.fd, HEADER, self.size - HEADER)

    def close(self, *, unmap: bool) -> None:
        """Close the descriptor; unmap too unless a block still lives in the mapping."""
        self._fault.stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if unmap:
            self.data = np.empty(0, dtype=np.uint8)
            with contextlib.suppress(BufferError, ValueError):
                self.map.close()


# --------------------------------------------------------------------------- source
class _SourceState:
    def __init__(self) -> None:
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.maps: list[mmap.mmap] = []
        self.regions: list[np.ndarray] = []
        self.index: dict[str, int] = {}
        self.ranges: list[tuple[int, int, int]] = []
        self.bytes = 0
        self.prefault: Prefaulter | None = None

    def close(self) -> None:
        """Unmap the destination's regions (the destination owns them)."""
        if self.prefault is not None:
            self.prefault.stop()
            self.prefault = None
        self.regions.clear()
        for m in self.maps:
            with contextlib.suppress(BufferError, ValueError):
                m.close()
        self.maps.clear()


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
        f.put_buffer(_src(rs).token)
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
    f.put_buffer(st.token)
    f.put_be32(len(st.ranges))
    if st.ranges:
        rec = np.array(st.ranges, dtype=[("i", ">u4"), ("off", ">u8"), ("len", ">u8")])
        f.put_buffer(rec.tobytes())
    st.ranges.clear()


def _open_region(pid: Any, fd: Any, i: int, b: RAMBlock, token: bytes) -> mmap.mmap:
    """Map the destination's region ``i`` after checking it is the one this migration registered."""
    if not isinstance(pid, int) or not isinstance(fd, int) or isinstance(pid, bool) or pid <= 0 or fd < 0:
        raise ChannelError(f"rdma: block {i} ({b.idstr}): bad region location pid={pid!r} fd={fd!r}")
    path = f"/proc/{pid}/fd/{fd}"
    try:
        target = os.readlink(path)
    except OSError as exc:
        raise ChannelError(f"rdma: cannot reach the destination's registered memory {path} ({exc}); the "
                           "rdma transport needs both ends on one host, in one pid namespace, as one user") from exc
    if target != f"/memfd:{MEMFD_NAME} (deleted)":
        raise ChannelError(f"rdma: block {i} ({b.idstr}): {path} is {target!r}, not a savevm-rdma region")
    rfd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(rfd).st_size
        if size < HEADER + b.used_length:
            raise ChannelError(f"rdma: block {i} ({b.idstr}): region holds {size} bytes, "
                               f"expected at least {HEADER} + {b.used_length}")
        m = mmap.mmap(rfd, size, mmap.MAP_SHARED)
    finally:
        os.close(rfd)
    want = _header(token, i, b)
    if m[: len(want)] != want:
        m.close()
        raise ChannelError(f"rdma: block {i} ({b.idstr}): the region's header does not name this migration's "
                           "block (wrong token, index, name or length): not writing to it")
    return m


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
    if msg.get("token") != st.token.hex():
        raise ChannelError("rdma: the destination's registration answers another migration (token mismatch)")
    for i, (b, r) in enumerate(zip(blocks, result)):
        m = _open_region(r.get("pid"), r.get("fd"), i, b, st.token)
        st.maps.append(m)
        st.regions.append(np.frombuffer(m, dtype=np.uint8, offset=HEADER))
        st.index[b.idstr] = i
    # map the destination's pages ahead of the copies, in the background, by reads (they never change a byte)
    st.prefault = Prefaulter([(reg, 0, b.used_length) for reg, b in zip(st.regions, blocks)],
                             name="savevm-rdma-map", shared=True)
    log.info("qemu_rdma_registration_stop", blocks=len(blocks), zero_copy=[r.get("direct") for r in result])


@hookimpl
def ram_control_save_page(rs: RAMState, f: QEMUFile, block: RAMBlock, offset: int, size: int) -> int | None:
    """The "RDMA write": copy the run into the destination's registered memory."""
    if not _is_rdma(f):
        return None
    st = _src(rs)
    i = st.index.get(block.idstr)
    if i is None:
        return None
    st.regions[i][offset : offset + size] = block.host[offset : offset + size]
    st.ranges.append((i, offset, size))
    st.bytes += size
    return size


# --------------------------------------------------------------------------- destination
class _DestState:
    def __init__(self) -> None:
        self.blocks: list[RAMBlock] = []
        #: per registered block: its region and whether the region is the block's own memory
        self.regions: list[tuple[_Region, bool]] = []
        #: regions made for owned blocks by ram_block_memory, waiting for their BLOCK_REG
        self.direct: dict[str, _Region] = {}
        self.token: bytes | None = None

    def close(self) -> None:
        for region, direct in self.regions:
            region.close(unmap=not direct)  # a direct region is the block's memory from now on
        for region in self.direct.values():
            region.close(unmap=False)
        self.regions.clear()
        self.direct.clear()


def _dst(rs: RAMState) -> _DestState:
    st = rs.transport_state.get("rdma-dest")
    if st is None:
        st = rs.transport_state["rdma-dest"] = _DestState()
    return st


#: regions made while the destination waited (ram_incoming_memory), by block, until its stream
#: registers them (weak: a block that is dropped takes its region's descriptor with it)
_AHEAD: weakref.WeakKeyDictionary[RAMBlock, _Region] = weakref.WeakKeyDictionary()


@hookimpl
def ram_incoming_memory(rs: RAMState, scheme: str, block: RAMBlock) -> Any | None:
    """Listening on rdma: make the block's region now, so it is allocated while the destination waits.

    RDMA registers (and so allocates) memory before anything is written;
    doing it at listen time takes the shared memory's page allocation
    (4 KiB pages: about a second per GiB here) out of the migration.
    """
    if scheme != RdmaTransport.scheme or block in _AHEAD:
        return None
    region = _AHEAD[block] = _Region(block.max_length)
    log.debug("rdma_region_ahead", block=block.idstr, bytes=block.max_length)
    return region.data[: block.max_length]


@hookimpl
def ram_block_memory(rs: RAMState, f: QEMUFile, block: RAMBlock) -> Any | None:
    """An owned block moves into its region, so remote writes land in the block itself."""
    if not _is_rdma(f):
        return None
    region = _AHEAD.pop(block, None)
    if region is None or region.fd < 0 or region.size < HEADER + block.max_length:
        region = _Region(block.max_length)
    _dst(rs).direct[block.idstr] = region
    log.debug("rdma_register_block", block=block.idstr, direct=True)
    return region.data[: block.max_length]


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
        _answer_registration(st, f)
        return True
    if kind != CONTROL_REGISTER_FINISHED:
        raise CorruptStreamError(f"rdma: unexpected control message type {kind}", off)
    tok_off = f.pos
    if st.token is None or f.get_bytes(TOKEN_BYTES, limit=TOKEN_BYTES) != st.token:
        raise CorruptStreamError("rdma: reported writes carry another migration's token", tok_off)
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
        region, direct = st.regions[bi]
        if not direct:
            b.host[o : o + ln] = region.data[o : o + ln]
        rs.counters.loaded_pages += ln // PAGE_SIZE
    return True


def _answer_registration(st: _DestState, f: QEMUFile) -> None:
    """RAM_BLOCKS_REQUEST: stamp the source's token into every region, and say where they are."""
    st.token = f.get_bytes(TOKEN_BYTES, limit=TOKEN_BYTES)
    result = []
    for i, (b, (region, direct)) in enumerate(zip(st.blocks, st.regions)):
        hdr = _header(st.token, i, b)
        region.map[: len(hdr)] = hdr
        result.append({"idstr": b.idstr, "length": b.used_length, "pid": os.getpid(), "fd": region.fd,
                       "direct": direct})
    rp = f.return_path
    if rp is None or not rp.send(RPMessage.EXTENSION, encode_json({"kind": REGISTRATION_KIND, "blocks": result,
                                                                  "token": st.token.hex()})):
        raise ChannelError("rdma: cannot answer the block registration (no negotiated return path)")


def _register(st: _DestState, block: RAMBlock) -> None:
    region = st.direct.pop(block.idstr, None)
    direct = region is not None
    if region is None:
        region = _Region(block.used_length)
    st.blocks.append(block)
    st.regions.append((region, direct))
    log.debug("rdma_register_block", block=block.idstr, direct=direct)
