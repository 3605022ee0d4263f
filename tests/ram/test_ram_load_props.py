"""Property tests: random valid page records reload to what a simple model says,
and random save-side schedules migrate memory exactly."""

from __future__ import annotations

import numpy as np
import ram_strategies as rs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from savevm.channels.memory import MemoryChannel
from savevm.qemufile import QEMUFile
from savevm.save import StreamWriter
from savevm_ram import RAMBlock, RAMList

P = rs.PAGE
NAMES = ["a", "b", "c"]
SIZES = [4, 2, 1]  # pages; small, so records hit the same page often

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def initial(seed: int) -> list[bytearray]:
    rng = np.random.default_rng(seed)
    return [bytearray(rng.integers(0, 256, n * P, dtype=np.uint8).tobytes()) for n in SIZES]


def build(chunks: list[list[rs.PageOp]], in_start: bool) -> bytes:
    """START (block list [+ first chunk's pages]) + PARTs + END."""
    sb = rs.StreamBuilder()
    sb.start()
    blocks = list(zip(NAMES, [n * P for n in SIZES]))
    setup = rs.setup_payload(blocks)
    rest = chunks
    if in_start and chunks:
        setup = setup[:-8] + rs.encode_ops(chunks[0], NAMES)  # pages before the setup EOS
        rest = chunks[1:]
    sb.add(setup)
    sb.footer()
    for i, ops in enumerate(rest):
        sb.part(end=i == len(rest) - 1)
        sb.add(rs.encode_ops(ops, NAMES))
        sb.footer()
    return sb.eof()


@SETTINGS
@given(chunks=rs.page_ops(SIZES), seed=st.integers(0, 1000), in_start=st.booleans(),
       reads=st.lists(st.integers(1, 9000), min_size=1, max_size=6) | st.just([]))
def test_random_records_reload_to_model(chunks: list[list[rs.PageOp]], seed: int, in_start: bool,
                                        reads: list[int]) -> None:
    mem = initial(seed)
    ram = RAMList([RAMBlock(n, bytearray(m)) for n, m in zip(NAMES, mem)])
    stream = build(chunks, in_start)
    rs.model_apply(mem, chunks)
    ch = rs.ChunkedChannel(stream, reads) if reads else MemoryChannel(stream)
    res = rs.load_bytes(b"", ram, channel=ch)
    assert res.bytes_read == len(stream)
    for n, m in zip(NAMES, mem):
        assert bytes(ram.find(n).buffer) == bytes(m), n


@SETTINGS
@given(runs=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4), st.booleans(), st.integers(0, 255)),
                     min_size=1, max_size=12))
@example(runs=[(0, 1, True, 1), (0, 1, True, 0)])  # a zero page filled, then zeroed, in one run
@example(runs=[(1, 1, True, 0), (0, 1, True, 5), (1, 1, True, 7), (0, 1, True, 0)])
def test_continue_runs_with_repeats_last_record_wins(runs: list[tuple[int, int, bool, int]]) -> None:
    """Long CONTINUE runs (the loader's batch path) that revisit pages: stream order decides."""
    a = RAMBlock("a", bytearray(4 * P))
    model = bytearray(4 * P)
    recs = rs.page_hdr(0, rs.ZERO, "a") + b"\x00"
    for page, count, zero, byte in runs:
        for k in range(count):
            pg = (page + k * (k % 2)) % 4  # some runs repeat the same page, some step
            val = (byte + k) & 0xFF
            body = bytes([val]) if zero else bytes([val]) * P
            recs += rs.page_hdr(pg * P, (rs.ZERO if zero else rs.PAGEF) | rs.CONT) + body
            model[pg * P : (pg + 1) * P] = bytes([val]) * P
    stream = rs.ram_stream([("a", 4 * P)], recs + rs.be64(rs.EOS))
    rs.load_bytes(stream, RAMList([a]))
    assert bytes(a.buffer) == bytes(model)


# ----------------------------------------------------------------- save side
STEP = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.integers(0, 40), st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, 2), st.integers(0, 40), st.just(0)),
    st.tuples(st.just("iterate"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("pending"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, max_size=30), rate=st.sampled_from([0, 50_000, 400_000]),
       provider=st.sampled_from(["tracked", "compare"]), seed=st.integers(0, 1000))
# a compared page changed after a sync, sent, then changed back to what that sync saw: it must go again
@example(steps=[("zero", 0, 2, 0), ("pending", 0, 0, 0), ("write", 0, 2, 1), ("iterate", 0, 0, 0),
                ("zero", 0, 2, 0)], rate=0, provider="compare", seed=0)
def test_random_schedule_migrates_exactly(steps: list[tuple[str, int, int, int]], rate: int, provider: str,
                                          seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = [41, 17, 300]  # 300 pages: more than one 256-page run
    src = RAMList([RAMBlock(f"blk{i}", np.zeros(n * P, np.uint8), dirty=provider) for i, n in enumerate(sizes)])
    for b in src:
        rs.fill_random(b, rng, zero_every=4)
    reg, h = rs.make_registry(src)
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True, rate_limit=rate)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    for op, bi, page, val in steps:
        b = src[bi]
        page %= b.pages
        if op in ("write", "zero"):
            if provider == "tracked":
                b.write(page * P + 7, bytes([val]) * 100) if op == "write" else b.write(page * P, bytes(P))
            else:
                b.host[page * P : page * P + (100 if op == "write" else P)] = val
        elif op == "iterate":
            f.reset_rate_limit()
            w.iterate()
        else:
            w.pending(1 << 30)
    f.set_rate_limit(0)
    w.complete_precopy()
    w.cleanup()
    assert h.saver.bitmap.dirty_pages == 0
    dst = RAMList([RAMBlock(f"blk{i}", bytearray(b"\xee" * (n * P))) for i, n in enumerate(sizes)])
    rs.load_bytes(ch.getvalue(), dst)
    for b in src:
        assert bytes(dst.find(b.idstr).buffer) == b.host.tobytes(), b.idstr


# ---------------------------------------------------------------- zero spans discarded in whole huge pages
BIG = 2048  # pages (8 MiB): four huge pages


@st.composite
def run_chunks(draw: st.DrawFn) -> list[list[tuple[int, int, str]]]:
    """Chunks of contiguous runs (first page, length, "zero" | "data" | "fill"), long enough to cover
    huge pages and to continue across chunk ends, revisiting pages in later chunks."""
    chunks = []
    ends: list[int] = []  # where earlier runs ended: a later run may continue exactly there
    for _ in range(draw(st.integers(1, 5))):
        runs = []
        for _ in range(draw(st.integers(0, 5))):
            picks = st.sampled_from([0, 1, 300, 511, 512, 1000, 1024, 1535, 2047]) | st.integers(0, BIG - 1)
            if ends:
                picks = picks | st.sampled_from(ends)
            first = draw(picks)
            n = draw(st.integers(1, min(1100, BIG - first)))
            runs.append((first, n, draw(st.sampled_from(["zero", "zero", "data", "fill"]))))
            if first + n < BIG:
                ends.append(first + n)
        chunks.append(runs)
    return chunks


def _ops(chunks: list[list[tuple[int, int, str]]], seed: int) -> list[list[rs.PageOp]]:
    """Page records; every other run starts with a record naming its block (the loader's general
    path), the rest use CONTINUE (its fast path)."""
    out: list[list[rs.PageOp]] = []
    emitted = False
    for c, runs in enumerate(chunks):
        ops = []
        for r, (first, n, kind) in enumerate(runs):
            named = (c + r) % 2 == 0 or not emitted  # the stream's first record must name its block
            emitted = True
            for k in range(n):
                ops.append(rs.PageOp(0, first + k, kind != "data", 0x5A if kind == "fill" else 0,
                                     seed + 7919 * c + 104729 * r + k, cont=not (named and k == 0)))
        out.append(ops)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(chunks=run_chunks(), seed=st.integers(0, 1 << 20),
       reads=st.lists(st.integers(1, 70000), min_size=1, max_size=8) | st.just([]))
# data written inside a zero span, then the span continued over the whole huge page: in one chunk,
# and with the data in a later chunk (the general path's first record of a chunk)
@example(chunks=[[(0, 300, "zero"), (100, 10, "data"), (300, 400, "zero")]], seed=1, reads=[])
@example(chunks=[[(0, 300, "zero")], [(100, 1, "data"), (300, 400, "zero")]], seed=2, reads=[])
@example(chunks=[[(0, 300, "zero")], [(100, 1, "data"), (300, 400, "zero")]], seed=3, reads=[4200, 9, 1])
@example(chunks=[[], [(0, 300, "zero"), (100, 1, "data"), (300, 400, "zero")]], seed=4, reads=[])  # named data
def test_zero_spans_in_discardable_memory_reload_to_model(chunks: list[list[tuple[int, int, str]]], seed: int,
                                                          reads: list[int]) -> None:
    """Memory the RAM plugin allocated gives whole huge pages back for zero spans (MADV_DONTNEED);
    whatever the order of zero, data and filled pages across chunks, and wherever reads cut the
    runs, the block ends as the simple model says: a discard never takes a page a later record wrote."""
    ops = _ops(chunks, seed)
    block = RAMBlock.allocate("a", BIG * P)
    assert block.discardable
    block.host.reshape(BIG, P)[:, ::509] = 0xC3  # stale bytes everywhere
    mem = [bytearray(block.host.tobytes())]
    rs.model_apply(mem, ops)
    sb = rs.StreamBuilder()
    sb.start()
    sb.add(rs.setup_payload([("a", BIG * P)]))
    sb.footer()
    for i, c in enumerate(ops):
        sb.part(end=i == len(ops) - 1)
        sb.add(rs.encode_ops(c, ["a"]))
        sb.footer()
    stream = sb.eof()
    ch = rs.ChunkedChannel(stream, reads) if reads else MemoryChannel(stream)
    rs.load_bytes(b"", RAMList([block]), channel=ch)
    got = block.host.reshape(BIG, P)
    want = np.frombuffer(bytes(mem[0]), dtype=np.uint8).reshape(BIG, P)
    bad = np.flatnonzero((got != want).any(axis=1))
    assert not len(bad), f"{len(bad)} pages differ, first {int(bad[0])}"
