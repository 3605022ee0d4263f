"""Shared helpers for the RAM plugin tests: hand-built streams, an independent
RAM-stream parser, registries, a dirtying writer thread, hypothesis strategies.

Loaded by ``conftest.py`` as the module ``ram_strategies`` (the test folders
have no ``__init__.py`` and several of them own a ``strategies.py``).
"""

from __future__ import annotations

import hashlib
import random
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

import savevm
from savevm.channels.memory import MemoryChannel
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile
from savevm_ram import RAMBlock, RAMList, register_ram

PAGE = 4096

# RAM_SAVE_FLAG_* spelled out here on purpose (not imported from the plugin)
FULL, ZERO, MEM_SIZE, PAGEF, EOS, CONT, XBZRLE, HOOK, COMPRESS = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100)

MAGIC = 0x5145564D
SECTION_START, SECTION_PART, SECTION_END, SECTION_FOOTER, EOF = 0x01, 0x02, 0x03, 0x7E, 0x00


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def counted(name: str) -> bytes:
    b = name.encode()
    return struct.pack(">B", len(b)) + b


def page_hdr(offset: int, flags: int, block: str | None = None) -> bytes:
    """A page record header: be64(offset|flags) [+ counted name unless CONTINUE]."""
    out = be64(offset | flags)
    if block is not None:
        assert not flags & CONT
        out += counted(block)
    return out


# ----------------------------------------------------------------- whole streams
class StreamBuilder:
    """Builds a full migration stream byte by byte, remembering offsets."""

    def __init__(self, machine: str = "savevm", section_id: int = 1) -> None:
        self.buf = bytearray()
        self.section_id = section_id
        self.buf += struct.pack(">II", MAGIC, 3)
        m = machine.encode()
        self.buf += struct.pack(">BI", 0x07, len(m)) + m

    @property
    def pos(self) -> int:
        return len(self.buf)

    def add(self, data: bytes) -> int:
        """Append ``data``; return the offset where it starts."""
        off = len(self.buf)
        self.buf += data
        return off

    def start(self, version: int = 4, idstr: str = "ram", instance: int = 0) -> None:
        self.buf += struct.pack(">BI", SECTION_START, self.section_id) + counted(idstr)
        self.buf += struct.pack(">II", instance, version)

    def part(self, end: bool = False) -> None:
        self.buf += struct.pack(">BI", SECTION_END if end else SECTION_PART, self.section_id)

    def footer(self) -> None:
        self.buf += struct.pack(">BI", SECTION_FOOTER, self.section_id)

    def eof(self) -> bytes:
        self.buf += bytes([EOF])
        return bytes(self.buf)


def setup_payload(blocks: Iterable[tuple[str, int]]) -> bytes:
    """MEM_SIZE + (counted name, be64 used_length)* + EOS."""
    blocks = list(blocks)
    out = be64(sum(n for _, n in blocks) | MEM_SIZE)
    for name, n in blocks:
        out += counted(name) + be64(n)
    return out + be64(EOS)


def ram_stream(blocks: list[tuple[str, int]], *chunks: bytes) -> bytes:
    """START(setup payload) + one PART per chunk (each must end with its EOS) + EOF."""
    sb = StreamBuilder()
    sb.start()
    sb.add(setup_payload(blocks))
    sb.footer()
    for c in chunks:
        sb.part()
        sb.add(c)
        sb.footer()
    return sb.eof()


# ----------------------------------------------------------------- independent parser
@dataclass
class Record:
    off: int
    flags: int
    addr: int
    block: str | None
    cont: bool
    body: bytes = b""

    @property
    def kind(self) -> int:
        return self.flags & ~CONT

    @property
    def page(self) -> int:
        return self.addr // PAGE


@dataclass
class Chunk:
    kind: int  # SECTION_START / PART / END
    start: int  # offset of the first RAM byte
    end: int  # offset after the EOS
    records: list[Record] = field(default_factory=list)
    blocks: list[tuple[str, int]] = field(default_factory=list)

    @property
    def pages(self) -> list[Record]:
        return [r for r in self.records if r.kind in (ZERO, PAGEF, XBZRLE, COMPRESS)]


class Reader:
    def __init__(self, data: bytes) -> None:
        self.d = data
        self.p = 0

    def take(self, n: int) -> bytes:
        if self.p + n > len(self.d):
            raise AssertionError(f"parser: stream ends at {len(self.d)}, need {n} bytes at {self.p}")
        out = self.d[self.p : self.p + n]
        self.p += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def be16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def be32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def be64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def counted(self) -> str:
        return self.take(self.u8()).decode()


def parse_stream(data: bytes, hook_payload: Callable[[Reader], bytes] | None = None) -> list[Chunk]:
    """Parse a stream holding only a ``ram`` live section; return its chunks."""
    r = Reader(data)
    assert r.be32() == MAGIC and r.be32() == 3
    assert r.u8() == 0x07
    r.take(r.be32())
    chunks: list[Chunk] = []
    last: str | None = None
    while True:
        t = r.u8()
        if t == EOF:
            break
        assert t in (SECTION_START, SECTION_PART, SECTION_END), f"section type {t:#x} at {r.p - 1}"
        sid = r.be32()
        if t == SECTION_START:
            assert r.counted() == "ram"
            assert r.be32() == 0 and r.be32() == 4
        ch = Chunk(t, r.p, 0)
        while True:
            off = r.p
            v = r.be64()
            flags, addr = v & 0xFFF, v & ~0xFFF
            kind = flags & ~CONT
            if kind == MEM_SIZE:
                total = addr
                while total > 0:
                    name = r.counted()
                    n = r.be64()
                    ch.blocks.append((name, n))
                    total -= n
                ch.records.append(Record(off, flags, addr, None, False))
                continue
            if kind == EOS:
                ch.records.append(Record(off, flags, addr, None, False))
                break
            if kind == HOOK:
                body = hook_payload(r) if hook_payload else b""
                ch.records.append(Record(off, flags, addr, None, False, body))
                continue
            cont = bool(flags & CONT)
            if cont:
                assert last is not None, f"CONTINUE with no previous block at {off}"
            else:
                last = r.counted()
            if kind == ZERO:
                body = r.take(1)
            elif kind == PAGEF:
                body = r.take(PAGE)
            elif kind == XBZRLE:
                assert r.u8() == 0x01
                body = r.take(r.be16())
            elif kind == COMPRESS:
                body = r.take(r.be32())
            else:
                raise AssertionError(f"unknown RAM flags {flags:#x} at {off}")
            ch.records.append(Record(off, flags, addr, last, cont, body))
        ch.end = r.p
        assert r.u8() == SECTION_FOOTER and r.be32() == sid
        chunks.append(ch)
    if r.p < len(data):
        assert r.u8() == 0x06
        r.take(r.be32())
    assert r.p == len(data)
    return chunks


def page_records(chunks: list[Chunk]) -> list[Record]:
    return [p for c in chunks for p in c.pages]


# ----------------------------------------------------------------- registries and blocks
def make_host() -> PluginHost:
    """A plugin host without installed entry points (so no XBZRLE codec sneaks in)."""
    return PluginHost(load_entrypoints=False)


def make_registry(ram: RAMList, plugins: PluginHost | None = None,
                  config: savevm.MigrationConfig | None = None) -> tuple[savevm.SectionRegistry, Any]:
    reg = savevm.SectionRegistry(config=config, plugins=plugins or make_host())
    h = register_ram(reg, ram)
    return reg, h


def fill_random(block: RAMBlock, rng: np.random.Generator, zero_every: int = 3) -> None:
    """Random content, with every ``zero_every``-th page zero."""
    n = block.used_length
    block.host[:n] = rng.integers(0, 256, n, dtype=np.uint8)
    for p in range(0, block.pages, zero_every):
        block.host[p * PAGE : (p + 1) * PAGE] = 0


def digest(block: RAMBlock) -> str:
    return hashlib.sha256(block.host[: block.used_length].tobytes()).hexdigest()


def load_bytes(data: bytes, ram: RAMList, plugins: PluginHost | None = None,
               channel: Any = None) -> savevm.LoadResult:
    reg, _ = make_registry(ram, plugins)
    f = QEMUFile(channel if channel is not None else MemoryChannel(data))
    return savevm.load_stream(f, reg)


def save_bytes(reg: savevm.SectionRegistry) -> bytes:
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    savevm.save_stream(f, reg)
    f.flush()
    return ch.getvalue()


class ChunkedChannel:
    """A read channel that hands out data in chunks of given sizes (tests partial reads)."""

    name = "chunked"

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = data
        self.pos = 0
        self.sizes = sizes or [len(data) or 1]
        self.i = 0

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), self.sizes[self.i % len(self.sizes)], len(self.data) - self.pos)
        self.i += 1
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def writev(self, bufs: Any) -> int:
        raise OSError("read-only")

    def close(self) -> None:
        pass


class Dirtier(threading.Thread):
    """Keeps writing random pages of some blocks until stopped (the running program).

    ``mode``: ``tracked`` writes through RAMBlock.write, or writes the numpy
    buffer and calls mark_dirty (alternately); ``compare`` writes the buffer
    only and never tells anyone.
    """

    def __init__(self, blocks: list[RAMBlock], mode: str, seed: int = 1, pause: float = 0.0005) -> None:
        super().__init__(daemon=True)
        self.blocks = blocks
        self.mode = mode
        self.rng = random.Random(seed)
        self.pause = pause
        self.writes = 0
        self._stop_evt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._stop_evt.is_set():
                b = self.rng.choice(self.blocks)
                page = self.rng.randrange(b.pages)
                off = page * PAGE + self.rng.randrange(0, PAGE - 64)
                n = self.rng.randrange(1, 64)
                data = bytes(self.rng.getrandbits(8) for _ in range(n))
                if self.mode == "compare":
                    b.host[off : off + n] = np.frombuffer(data, dtype=np.uint8)
                elif self.writes % 2:
                    b.write(off, data)
                else:
                    b.host[off : off + n] = np.frombuffer(data, dtype=np.uint8)
                    b.mark_dirty(off, n)
                self.writes += 1
                if self.writes % 8 == 0:
                    time.sleep(self.pause)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(10)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


# ----------------------------------------------------------------- hypothesis: page records
@dataclass
class PageOp:
    block: int
    page: int
    zero: bool
    fill: int  # ZERO fill byte
    seed: int  # PAGE content seed
    cont: bool  # use CONTINUE (only valid when the previous record was the same block)


def page_content(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAGE, dtype=np.uint8).tobytes()


@st.composite
def page_ops(draw: st.DrawFn, sizes: list[int], max_ops: int = 40) -> list[list[PageOp]]:
    """Chunks of page records; CONTINUE is used (if drawn) only where valid,
    i.e. the previous page record of the stream was of the same block."""
    n_chunks = draw(st.integers(1, 4))
    chunks: list[list[PageOp]] = []
    last: int | None = None
    for _ in range(n_chunks):
        ops: list[PageOp] = []
        for _ in range(draw(st.integers(0, max_ops // n_chunks))):
            bi = draw(st.integers(0, len(sizes) - 1)) if last is None or draw(st.booleans()) else last
            page = draw(st.integers(0, sizes[bi] - 1))
            zero = draw(st.booleans())
            fill = draw(st.sampled_from([0, 0, 1, 0x5A, 0xFF])) if zero else 0
            seed = draw(st.integers(0, 1 << 30))
            cont = last == bi and draw(st.booleans())
            ops.append(PageOp(bi, page, zero, fill, seed, cont))
            last = bi
        chunks.append(ops)
    return chunks


def encode_ops(ops: list[PageOp], names: list[str]) -> bytes:
    out = bytearray()
    for op in ops:
        flags = (ZERO if op.zero else PAGEF) | (CONT if op.cont else 0)
        out += page_hdr(op.page * PAGE, flags, None if op.cont else names[op.block])
        out += bytes([op.fill]) if op.zero else page_content(op.seed)
    out += be64(EOS)
    return bytes(out)


def model_apply(mem: list[bytearray], chunks: list[list[PageOp]]) -> None:
    """The simple model: later records overwrite earlier ones; ZERO memsets the fill byte."""
    for ops in chunks:
        for op in ops:
            a = op.page * PAGE
            mem[op.block][a : a + PAGE] = bytes([op.fill]) * PAGE if op.zero else page_content(op.seed)
