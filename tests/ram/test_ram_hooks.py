"""The RAM plugin's hooks (ram_control_*, ram_page_codecs) and the hot-path rule."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import pytest
import ram_strategies as rs

import savevm
from savevm.channels.memory import MemoryChannel
from savevm.migration import Incoming
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile
from savevm.save import StreamWriter
from savevm_ram import SKIP, PageCodec, RAMBlock, RAMList, hookspecs, register_ram
from savevm_ram.wire import (
    RAM_CONTROL_BLOCK_REG,
    RAM_CONTROL_FINISH,
    RAM_CONTROL_HOOK,
    RAM_CONTROL_ROUND,
    RAM_CONTROL_SETUP,
)

P = rs.PAGE
hookimpl = savevm.hookimpl


def src_ram(sizes: dict[str, int], seed: int = 5) -> RAMList:
    rng = np.random.default_rng(seed)
    blocks = []
    for name, n in sizes.items():
        b = RAMBlock(name, bytearray(n * P))
        rs.fill_random(b, rng, zero_every=4)
        blocks.append(b)
    return RAMList(blocks)


def twin(ram: RAMList, fill: int = 0xEE) -> RAMList:
    return RAMList([RAMBlock(b.idstr, bytearray([fill]) * b.used_length) for b in ram])


def registry_with(ram: RAMList, *plugins: object) -> tuple[savevm.SectionRegistry, Any]:
    """The documented order: register the section, then the plugins on its host."""
    reg = savevm.SectionRegistry(plugins=PluginHost(load_entrypoints=False))
    h = register_ram(reg, ram)
    for p in plugins:
        reg.plugins.register(p)
    return reg, h


def migrate(reg: savevm.SectionRegistry, rate: int = 0, dirty: Any = None) -> tuple[bytes, int]:
    """header/setup/iterate.../complete into memory; returns (stream, iterate calls)."""
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True, rate_limit=rate)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    n = 0
    while True:
        f.reset_rate_limit()
        n += 1
        done = w.iterate()
        if dirty is not None and n == 1:
            dirty()  # the program writes after the first PART; the next sync finds it
            w.pending(1 << 40)
            continue
        if done:
            break
        assert n < 500
    f.set_rate_limit(0)
    w.complete_precopy()
    w.cleanup()
    return ch.getvalue(), n


def load_into(stream: bytes, ram: RAMList, *plugins: object) -> savevm.LoadResult:
    reg, _ = registry_with(ram, *plugins)
    return savevm.load_stream(QEMUFile(MemoryChannel(stream)), reg)


def assert_same(a: RAMList, b: RAMList) -> None:
    for blk in a:
        assert bytes(b.find(blk.idstr).host[: blk.used_length]) == bytes(blk.host[: blk.used_length]), blk.idstr


# ----------------------------------------------------------------- before / after
class IterateRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    @hookimpl
    def ram_control_before_iterate(self, rs: Any, f: QEMUFile, flags: int) -> None:
        self.calls.append(("before", flags, f.pos))

    @hookimpl
    def ram_control_after_iterate(self, rs: Any, f: QEMUFile, flags: int) -> None:
        self.calls.append(("after", flags, f.pos))


def _check_before_after(calls: list[tuple[str, int, int]], chunks: list[rs.Chunk], iterations: int) -> None:
    flags = [(k, fl) for k, fl, _ in calls]
    assert flags == ([("before", RAM_CONTROL_SETUP), ("after", RAM_CONTROL_SETUP)]
                     + [("before", RAM_CONTROL_ROUND), ("after", RAM_CONTROL_ROUND)] * iterations
                     + [("before", RAM_CONTROL_FINISH), ("after", RAM_CONTROL_FINISH)])
    assert len(chunks) == iterations + 2
    for i, c in enumerate(chunks):
        before, after = calls[2 * i][2], calls[2 * i + 1][2]
        eos = c.records[-1].off
        if c.kind == rs.SECTION_START:
            assert before == after == eos  # after the block list, before the EOS
        else:
            assert before == c.start  # before any page of the chunk
            assert after == eos       # after all of them, before the EOS


def test_hook_ram_control_before_iterate() -> None:
    ram = src_ram({"a": 20, "b": 7})
    rec = IterateRecorder()
    reg, _ = registry_with(ram, rec)
    stream, n = migrate(reg, rate=10 * 20_000)
    assert n > 2
    _check_before_after(rec.calls, rs.parse_stream(stream), n)


def test_hook_ram_control_after_iterate() -> None:
    """Only ``after`` implemented: called alone, with the same flags, and nothing breaks."""
    class AfterOnly:
        def __init__(self) -> None:
            self.flags: list[int] = []

        @hookimpl
        def ram_control_after_iterate(self, rs: Any, f: QEMUFile, flags: int) -> None:
            self.flags.append(flags)

    ram = src_ram({"a": 12})
    p = AfterOnly()
    reg, _ = registry_with(ram, p)
    stream, n = migrate(reg, rate=10 * 10_000)
    assert p.flags == [RAM_CONTROL_SETUP] + [RAM_CONTROL_ROUND] * n + [RAM_CONTROL_FINISH]
    dst = twin(ram)
    load_into(stream, dst)
    assert_same(ram, dst)


# ----------------------------------------------------------------- save_page
class SavePageSpy:
    """Sees every run; takes them out of band into ``dest`` when ``take`` is set."""

    def __init__(self, take: bool = False, dest: RAMList | None = None) -> None:
        self.take = take
        self.dest = dest
        self.runs: list[tuple[str, int, int]] = []

    @hookimpl
    def ram_control_before_iterate(self, rs: Any, f: QEMUFile, flags: int) -> None:
        if flags == 0:  # RAM_CONTROL_SETUP: this migration's pages are ours to see
            rs.claim_pages()

    @hookimpl
    def ram_control_save_page(self, rs: Any, f: QEMUFile, block: RAMBlock, offset: int, size: int) -> int | None:
        self.runs.append((block.idstr, offset, size))
        if not self.take:
            return None
        assert self.dest is not None
        self.dest.find(block.idstr).host[offset : offset + size] = block.host[offset : offset + size]
        return size


def test_hook_ram_control_save_page() -> None:
    ram = src_ram({"a": 600, "b": 40})
    pages = 640
    spy = SavePageSpy()
    reg, h = registry_with(ram, spy)
    stream, _ = migrate(reg)
    assert 0 < len(spy.runs) <= 6, "called per run of pages, not per page"
    assert sum(size for _, _, size in spy.runs) == pages * P
    covered = sorted((b, off + k * P) for b, off, size in spy.runs for k in range(size // P))
    assert covered == sorted([("a", i * P) for i in range(600)] + [("b", i * P) for i in range(40)])
    # not taken: every page is in the stream
    assert len(rs.page_records(rs.parse_stream(stream))) == pages
    dst = twin(ram)
    load_into(stream, dst)
    assert_same(ram, dst)


def test_hook_ram_control_save_page_takes_pages() -> None:
    ram = src_ram({"a": 300, "b": 20})
    dst = twin(ram)
    spy = SavePageSpy(take=True, dest=dst)
    reg, h = registry_with(ram, spy)
    stream, _ = migrate(reg, dirty=lambda: ram.find("b").write(3 * P, b"late"))
    chunks = rs.parse_stream(stream)
    assert rs.page_records(chunks) == [], "pages a transport took must not be in the stream"
    st = h.query_stats()["ram"]
    assert h.counters.control == 321
    assert st["transferred"] >= 321 * P  # out-of-band bytes are accounted
    load_into(stream, dst)
    assert_same(ram, dst)


# ----------------------------------------------------------------- load_hook
class HookTransport:
    """Writes a HOOK record with a payload at each ROUND (source) and reads it back (destination)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.events: list[tuple[int, Any]] = []

    @hookimpl
    def ram_control_before_iterate(self, rs: Any, f: QEMUFile, flags: int) -> None:
        if flags == RAM_CONTROL_ROUND:
            payload = f"round {len(self.sent)}".encode()
            f.put_be64(0x80)
            f.put_be32(len(payload))
            f.put_buffer(payload)
            self.sent.append(payload)

    @hookimpl
    def ram_control_load_hook(self, rs: Any, f: QEMUFile, flags: int, data: Any) -> bool | None:
        if flags == RAM_CONTROL_BLOCK_REG:
            self.events.append((flags, (data.idstr, data.used_length)))
            return None
        assert flags == RAM_CONTROL_HOOK and data is None
        n = f.get_be32()
        self.events.append((flags, f.get_bytes(n, limit=64)))
        return True


def test_hook_ram_control_load_hook() -> None:
    ram = src_ram({"a": 10, "bb": 30, "c": 2})
    src_t = HookTransport()
    reg, _ = registry_with(ram, src_t)
    stream, n = migrate(reg, rate=10 * 30_000)
    assert len(src_t.sent) == n > 1
    chunks = rs.parse_stream(stream, hook_payload=lambda r: r.take(r.be32()))
    assert [r.body for c in chunks for r in c.records if r.kind == rs.HOOK] == src_t.sent
    dst = twin(ram)
    dst_t = HookTransport()
    load_into(stream, dst, dst_t)
    assert dst_t.events == ([(RAM_CONTROL_BLOCK_REG, (b.idstr, b.used_length)) for b in ram]
                            + [(RAM_CONTROL_HOOK, p) for p in src_t.sent])
    assert_same(ram, dst)


def test_hook_record_not_handled_is_an_error() -> None:
    """A load_hook that returns None for HOOK leaves the record unhandled: error at the record."""
    class Deaf:
        @hookimpl
        def ram_control_load_hook(self, rs: Any, f: QEMUFile, flags: int, data: Any) -> bool | None:
            return None

    stream = rs.ram_stream([("a", P)], rs.be64(0x80) + rs.be64(rs.EOS))
    off = stream.index(rs.be64(0x80), 30)
    with pytest.raises(savevm.CorruptStreamError) as ei:
        load_into(stream, RAMList([RAMBlock("a", bytearray(P))]), Deaf())
    assert ei.value.offset == off


# ----------------------------------------------------------------- page codecs
class ZCodec(PageCodec):
    """Pages starting 0xCC: zlib (be32 length + data) under 0x100; 0xAA: SKIP; others: not mine."""

    name = "testz"
    wire_flag = 0x100
    priority = 10

    def __init__(self, log: dict[str, Any]) -> None:
        self.log = log

    def enabled(self, config: Any) -> bool:
        return True

    def encode_pages(self, rs: Any, block: RAMBlock, pages: np.ndarray, data: np.ndarray,
                     last_stage: bool) -> list[Any]:
        self.log.setdefault("batches", []).append(len(pages))
        out: list[Any] = []
        for d in data:
            assert d.any(), "zero pages never reach a codec"
            if d[0] == 0xAA:
                out.append(SKIP)
            elif d[0] == 0xCC:
                z = zlib.compress(d.tobytes())
                out.append(struct.pack(">I", len(z)) + z)
            else:
                out.append(None)
        return out

    def load_page(self, f: QEMUFile, block: RAMBlock, page: int, dest: np.ndarray, offset: int) -> None:
        n = f.get_be32()
        dest[:] = np.frombuffer(zlib.decompress(f.get_bytes(n, limit=2 * P)), np.uint8)
        self.log["loaded"] = self.log.get("loaded", 0) + 1


class CodecPlugin:
    def __init__(self) -> None:
        self.log: dict[str, Any] = {}

    @hookimpl
    def ram_page_codecs(self, config: Any) -> list[PageCodec]:
        return [ZCodec(self.log)]


def codec_ram() -> RAMList:
    ram = src_ram({"a": 64, "b": 9}, seed=11)
    for b in ram:
        for p in range(b.pages):
            if p % 4 == 1:
                b.host[p * P : (p + 1) * P] = 0xCC  # compressible, tag 0xCC
            elif p % 4 == 2:
                b.host[p * P] = 0xAA                 # skipped: the destination has it
    return ram


@pytest.mark.parametrize("order", ["plugin_after_section", "plugin_before_section"])
def test_hook_ram_page_codecs(order: str) -> None:
    ram = codec_ram()
    src_p, dst_p = CodecPlugin(), CodecPlugin()
    if order == "plugin_after_section":
        reg, h = registry_with(ram, src_p)
    else:
        host = PluginHost(load_entrypoints=False)
        host.add_hookspecs(hookspecs)
        host.register(src_p)
        reg = savevm.SectionRegistry(plugins=host)
        h = register_ram(reg, ram)
    stream, _ = migrate(reg, dirty=lambda: ram.find("a").host.__setitem__(slice(4 * P, 5 * P), 0xCC)
                        or ram.find("a").mark_dirty(4 * P, P))
    recs = rs.page_records(rs.parse_stream(stream))
    kinds = {(r.block, r.page): r.kind for r in recs}
    n_tagged = sum(1 for b in ram for p in range(b.pages) if b.host[p * P] == 0xCC)
    assert sum(r.kind == 0x100 for r in recs) == n_tagged
    assert not any(b.host[p * P] == 0xAA and (b.idstr, p) in kinds for b in ram for p in range(b.pages))
    assert kinds[("a", 4)] == 0x100  # was a zero page in the bulk stage
    assert src_p.log["batches"] and len(src_p.log["batches"]) < len(recs) / 4, "codecs get batches"
    assert h.counters.encoded == n_tagged
    # destination: 0xAA pages are already there, everything else is garbage
    dst = twin(ram)
    for b in ram:
        for p in range(b.pages):
            if b.host[p * P] == 0xAA:
                dst.find(b.idstr).host[p * P : (p + 1) * P] = b.host[p * P : (p + 1) * P]
    if order == "plugin_after_section":
        load_into(stream, dst, dst_p)
    else:
        host = PluginHost(load_entrypoints=False)
        host.add_hookspecs(hookspecs)
        host.register(dst_p)
        dreg = savevm.SectionRegistry(plugins=host)
        register_ram(dreg, dst)
        savevm.load_stream(QEMUFile(MemoryChannel(stream)), dreg)
    assert dst_p.log["loaded"] == n_tagged
    assert_same(ram, dst)


def test_codec_pages_refused_without_the_codec_plugin() -> None:
    ram = codec_ram()
    reg, _ = registry_with(ram, CodecPlugin())
    stream, _ = migrate(reg)
    with pytest.raises(savevm.CorruptStreamError, match="decoder"):
        load_into(stream, twin(ram))


# ----------------------------------------------------------------- hot path
class HookCounter:
    def __init__(self, pm: Any) -> None:
        self.names: list[str] = []
        pm.add_hookcall_monitoring(lambda name, impls, kw: self.names.append(name), lambda *a: None)


def test_no_hook_calls_without_implementations(monkeypatch: pytest.MonkeyPatch) -> None:
    facade_calls: list[str] = []
    orig = PluginHost.hook

    def counting(self: PluginHost, name: str) -> Any:
        facade_calls.append(name)
        return orig(self, name)

    monkeypatch.setattr(PluginHost, "hook", counting)
    ram = src_ram({"a": 700, "b": 300})
    reg, h = registry_with(ram)
    mon = HookCounter(reg.plugins.pm)
    stream, n = migrate(reg, rate=10 * 400_000, dirty=lambda: ram.find("a").write(0, b"x" * 3 * P))
    dst = twin(ram)
    dreg, _ = registry_with(dst)
    dmon = HookCounter(dreg.plugins.pm)
    savevm.load_stream(QEMUFile(MemoryChannel(stream)), dreg)
    assert_same(ram, dst)
    assert n > 3
    assert facade_calls == []
    assert [x for x in mon.names + dmon.names if x.startswith("ram_")] == []


def test_hook_calls_scale_with_iterations_not_pages() -> None:
    counts = []
    for pages in (16, 1024):
        ram = src_ram({"a": pages})
        rec = IterateRecorder()
        reg, _ = registry_with(ram, rec)
        mon = HookCounter(reg.plugins.pm)
        _, n = migrate(reg)
        ram_calls = [x for x in mon.names if x.startswith("ram_")]
        assert len(ram_calls) == 2 * (n + 2)  # before + after per chunk, nothing per page
        counts.append(len(ram_calls))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("ret", ["not_supp", "delayed"])
def test_save_page_special_results(ret: str) -> None:
    """RAM_SAVE_CONTROL_NOT_SUPP: not taken, pages go in the stream; DELAYED: taken (queued)."""
    from savevm_ram.wire import RAM_SAVE_CONTROL_DELAYED, RAM_SAVE_CONTROL_NOT_SUPP

    ram = src_ram({"a": 20})
    dst = twin(ram)

    class Special:
        @hookimpl
        def ram_control_before_iterate(self, rs: Any, f: QEMUFile, flags: int) -> None:
            if flags == 0:
                rs.claim_pages()

        @hookimpl
        def ram_control_save_page(self, rs: Any, f: QEMUFile, block: RAMBlock, offset: int, size: int) -> int:
            if ret == "not_supp":
                return RAM_SAVE_CONTROL_NOT_SUPP
            dst.find(block.idstr).host[offset : offset + size] = block.host[offset : offset + size]
            return RAM_SAVE_CONTROL_DELAYED

    reg, h = registry_with(ram, Special())
    stream, _ = migrate(reg)
    n_pages = len(rs.page_records(rs.parse_stream(stream)))
    assert n_pages == (20 if ret == "not_supp" else 0)
    assert h.counters.control == (0 if ret == "not_supp" else 20)
    load_into(stream, dst)
    assert_same(ram, dst)


def test_save_page_not_called_unless_claimed() -> None:
    """An installed transport that does not claim the migration costs nothing per run."""
    ram = src_ram({"a": 64})

    class Idle:
        calls = 0

        @hookimpl
        def ram_control_save_page(self, rs: Any, f: QEMUFile, block: RAMBlock, offset: int, size: int) -> None:
            Idle.calls += 1

    reg, _ = registry_with(ram, Idle())
    stream, _ = migrate(reg)
    assert Idle.calls == 0
    assert len(rs.page_records(rs.parse_stream(stream))) == 64


# ----------------------------------------------------------------- block memory
class MemoryGiver:
    """Hands out bytearrays for owned blocks, and records which blocks it was offered."""

    def __init__(self) -> None:
        self.offered: list[tuple[str, int, int]] = []
        self.given: dict[str, bytearray] = {}

    @hookimpl
    def ram_block_memory(self, rs: Any, f: QEMUFile, block: RAMBlock) -> Any:
        self.offered.append((block.idstr, block.used_length, block.max_length))
        mem = self.given[block.idstr] = bytearray(block.max_length)
        return mem


def test_hook_ram_block_memory() -> None:
    """Owned blocks move onto the memory the hook returns, before pages land; others are never offered."""
    ram = src_ram({"a": 10, "bb": 30})
    stream, _ = migrate(registry_with(ram)[0])
    owned = RAMBlock.allocate("a", 10 * P)
    owned.host[3] = 7  # bytes already there are carried over to the new memory
    dst = RAMList([owned, RAMBlock("bb", bytearray(30 * P))])
    giver = MemoryGiver()
    load_into(stream, dst, giver)
    assert giver.offered == [("a", 10 * P, 10 * P)]
    assert_same(ram, dst)
    assert bytes(giver.given["a"]) == bytes(ram.find("a").host)  # type: ignore[union-attr]
    assert dst.find("a").buffer is giver.given["a"]  # type: ignore[union-attr]


def test_block_memory_none_keeps_the_block() -> None:
    class Declines:
        @hookimpl
        def ram_block_memory(self, rs: Any, f: QEMUFile, block: RAMBlock) -> Any:
            return None

    ram = src_ram({"a": 4})
    stream, _ = migrate(registry_with(ram)[0])
    owned = RAMBlock.allocate("a", 4 * P)
    host = owned.host
    load_into(stream, RAMList([owned]), Declines())
    assert owned.host is host
    assert bytes(host) == bytes(ram.find("a").host)  # type: ignore[union-attr]


class EarlyGiver(MemoryGiver):
    """Offers memory while the destination waits (only for one scheme), and the same memory again."""

    def __init__(self, scheme: str) -> None:
        super().__init__()
        self.scheme = scheme
        self.early: list[tuple[str, str]] = []

    @hookimpl
    def ram_incoming_memory(self, rs: Any, scheme: str, block: RAMBlock) -> Any:
        self.early.append((scheme, block.idstr))
        if scheme != self.scheme:
            return None
        mem = self.given[block.idstr] = bytearray(block.max_length)
        return mem

    @hookimpl
    def ram_block_memory(self, rs: Any, f: QEMUFile, block: RAMBlock) -> Any:
        self.offered.append((block.idstr, block.used_length, block.max_length))
        return self.given.get(block.idstr)


def test_hook_ram_incoming_memory() -> None:
    """Listening moves owned blocks onto the transport's memory before any stream; the load keeps them there."""
    ram = src_ram({"a": 10, "bb": 30})
    stream, _ = migrate(registry_with(ram)[0])
    owned = RAMBlock.allocate("a", 10 * P)
    owned.host[5] = 9  # bytes already there move with the block
    program = RAMBlock("bb", bytearray(30 * P))
    dst = RAMList([owned, program])
    giver = EarlyGiver("tcp")
    reg, handlers = registry_with(dst, giver)
    inc = Incoming(reg, "tcp:127.0.0.1:0")
    try:
        inc.listen()
        assert giver.early == [("tcp", "a")]  # a program's own buffer is never offered
        assert owned.buffer is giver.given["a"] and giver.given["a"][5] == 9
        assert owned.discardable is False  # the transport's memory is not for MADV_DONTNEED
    finally:
        inc.cancel()
    savevm.load_stream(QEMUFile(MemoryChannel(stream)), reg)
    assert giver.offered == [("a", 10 * P, 10 * P)]  # offered again with the stream: the same memory
    assert owned.buffer is giver.given["a"]
    assert_same(ram, dst)
    assert bytes(giver.given["a"]) == bytes(ram.find("a").host)  # type: ignore[union-attr]


def test_incoming_memory_only_for_the_transports_own_scheme() -> None:
    owned = RAMBlock.allocate("a", 4 * P)
    host = owned.host
    giver = EarlyGiver("rdma")
    reg, _ = registry_with(RAMList([owned]), giver)
    inc = Incoming(reg, "tcp:127.0.0.1:0")
    try:
        inc.listen()
    finally:
        inc.cancel()
    assert giver.early == [("tcp", "a")] and owned.host is host and owned.discardable
