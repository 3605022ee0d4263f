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
