"""What pending pages cost on the wire: the pipeline's tally by kind and the estimate priced from it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ram_strategies import PAGE, PAGEF, XBZRLE, ZERO, make_registry, parse_stream

import savevm
import savevm_ram
from savevm.channels.memory import MemoryChannel
from savevm.qemufile import QEMUFile
from savevm.save import StreamWriter
from savevm_ram.estimate import MIN_SAMPLE_PAGES, WINDOW_ITERATIONS, WireEstimator, tally_delta
from savevm_ram.wire import PAGE_RECORD_SIZE


# ---------------------------------------------------------------- the arithmetic
def test_no_evidence_prices_raw_pages() -> None:
    assert WireEstimator().estimate(1000) == 1000 * PAGE_RECORD_SIZE
    assert WireEstimator().estimate(0) == 0


def test_each_kind_at_its_share_and_size() -> None:
    """3000 XBZRLE deltas of 22 bytes, 1000 misses sent whole, 96 zero pages, 0 unchanged."""
    est = WireEstimator()
    est.add_iteration({"xbzrle": (2000, 44_000), "normal": (500, 500 * PAGE_RECORD_SIZE)})
    est.add_iteration({"xbzrle": (1000, 22_000), "normal": (500, 500 * PAGE_RECORD_SIZE), "zero": (96, 864)})
    # per pending page: 3000/4096 x 22 + 1000/4096 x 4104 + 96/4096 x 9
    assert est.estimate(4096) == 3000 * 22 + 1000 * PAGE_RECORD_SIZE + 96 * 9
    assert est.estimate(40960) == 10 * (3000 * 22 + 1000 * PAGE_RECORD_SIZE + 96 * 9)
    per = est.per_page()
    assert per["xbzrle"] == {"share": round(3000 / 4096, 4), "bytes-per-page": 22.0}
    assert per["normal"]["bytes-per-page"] == PAGE_RECORD_SIZE


def test_unchanged_pages_cost_nothing_and_the_window_forgets() -> None:
    est = WireEstimator(window=2)
    est.add_iteration({"normal": (2048, 2048 * PAGE_RECORD_SIZE)})
    est.add_iteration({"xbzrle": (1024, 0)})  # SKIP: unchanged since cached
    est.add_iteration({"xbzrle": (1024, 20_480)})  # the normal pages fell out of the window
    assert est.estimate(2048) == 20_480
    est.add_iteration({})  # an iteration that sent nothing says nothing
    assert est.estimate(2048) == 20_480


def test_a_small_sample_prices_only_its_share() -> None:
    est = WireEstimator()
    est.add_iteration({"zero": (MIN_SAMPLE_PAGES // 4, 9 * MIN_SAMPLE_PAGES // 4)})
    # a quarter of the pending pages at 9 bytes, the rest raw
    assert est.estimate(4000) == 1000 * 9 + 3000 * PAGE_RECORD_SIZE


@given(st.lists(st.dictionaries(st.sampled_from(["zero", "normal", "xbzrle", "compress"]),
                                st.tuples(st.integers(0, 5000), st.integers(0, 5000 * PAGE_RECORD_SIZE)),
                                max_size=4), max_size=12),
       st.integers(0, 1 << 22))
def test_estimate_stays_between_the_cheapest_kind_and_raw(its: list[dict], pending: int) -> None:
    its = [{k: (n, min(b, n * PAGE_RECORD_SIZE)) for k, (n, b) in it.items()} for it in its]
    est = WireEstimator()
    for it in its:
        est.add_iteration(it)
    got = est.estimate(pending)
    assert 0 <= got <= pending * PAGE_RECORD_SIZE
    seen = est.breakdown()
    pages = sum(n for n, _ in seen.values())
    if pages >= MIN_SAMPLE_PAGES:
        assert got == pytest.approx(pending * sum(b for _, b in seen.values()) / pages, abs=2)


def test_tally_delta() -> None:
    before = {"zero": (10, 90), "normal": (5, 5 * PAGE_RECORD_SIZE)}
    now = {"zero": (12, 108), "normal": (5, 5 * PAGE_RECORD_SIZE), "xbzrle": (3, 60)}
    assert tally_delta(now, before) == {"zero": (2, 18), "xbzrle": (3, 60)}


# ---------------------------------------------------------------- the pipeline's tally is the stream
def _record_sizes(data: bytes) -> dict[str, list[int]]:
    """Pages and bytes of page records by kind, parsed from the stream itself."""
    kinds = {ZERO: "zero", PAGEF: "normal", XBZRLE: "xbzrle"}
    out: dict[str, list[int]] = {}
    for ch in parse_stream(data)[1:]:  # after the setup chunk
        recs = ch.records
        ends = [r.off for r in recs[1:]] + [ch.end]
        for r, end in zip(recs, ends):
            if r.kind in kinds:
                n, b = out.setdefault(kinds[r.kind], [0, 0])
                out[kinds[r.kind]] = [n + 1, b + end - r.off]
    return out


def test_tally_counts_exactly_what_the_stream_carries() -> None:
    rng = np.random.default_rng(3)
    n_pages = 256
    mem = np.frombuffer(rng.bytes(n_pages * PAGE), dtype=np.uint8).copy()
    mem[: 32 * PAGE] = 0
    block = savevm_ram.RAMBlock("ram0", mem)
    ram = savevm_ram.RAMList([block, savevm_ram.RAMBlock("ram1", bytearray(8 * PAGE))])
    host = savevm.PluginHost(savevm.MigrationConfig().set_capability("xbzrle"))
    reg, h = make_registry(ram, host, host.config)
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    w = StreamWriter(f, reg, host.config)
    w.header()
    w.setup()
    while not w.iterate():
        pass
    skipped = 0
    for rnd in range(4):
        for p in range(40, 200):
            block.write(p * PAGE + 100 + rnd, bytes([rnd + 1, 7, 7]))  # a small delta
        block.write(210 * PAGE, rng.bytes(PAGE))  # a delta too big: overflow, sent whole
        block.mark_dirty(220 * PAGE, 3 * PAGE)  # marked, unchanged: XBZRLE skips them
        if rnd:
            skipped += 3
        w.pending(1 << 40)
        while not w.iterate():
            pass
    tally = h.save_live_sent_by_kind()
    w.complete_precopy()
    w.cleanup()
    parsed = _record_sizes(ch.getvalue())
    assert tally["zero"] == tuple(parsed["zero"])
    assert tally["normal"] == tuple(parsed["normal"])
    xn, xb = tally["xbzrle"]
    assert xb == parsed["xbzrle"][1] and xn == parsed["xbzrle"][0] + skipped
    assert xb / parsed["xbzrle"][0] < 30  # ~20 bytes a delta, header included


def test_pending_wire_is_raw_in_the_bulk_stage_then_priced() -> None:
    rng = np.random.default_rng(5)
    n_pages = 2048
    mem = np.frombuffer(rng.bytes(n_pages * PAGE), dtype=np.uint8).copy()
    block = savevm_ram.RAMBlock("ram0", mem)
    cfg = savevm.MigrationConfig().set_capability("xbzrle").set_parameter("max-bandwidth", 1 << 20)
    host = savevm.PluginHost(cfg)
    reg, h = make_registry(savevm_ram.RAMList([block]), host, cfg)
    f = QEMUFile(MemoryChannel(), writable=True, rate_limit=1 << 20)
    w = StreamWriter(f, reg, cfg)
    w.header()
    w.setup()
    assert h.save_live_pending_wire(0) == n_pages * PAGE_RECORD_SIZE  # nothing measured: raw
    w.iterate()
    assert 0 < h.save_live_pending(0) < n_pages * PAGE
    assert h.save_live_pending_wire(0) == h.save_live_pending(0) // PAGE * PAGE_RECORD_SIZE  # bulk: still raw
    f.set_rate_limit(0)
    while not w.iterate():
        pass
    # a few bytes of every page, pass after pass: XBZRLE deltas (once the first pass after the bulk stage,
    # which fills the cache and sends whole pages, has left the window of WINDOW_ITERATIONS iterations)
    for rnd in range(WINDOW_ITERATIONS + 1):
        for p in range(n_pages):
            block.write(p * PAGE + 8, bytes([rnd + 1] * 4))
        assert h.save_live_pending_wire(1 << 40) > 0  # below the threshold: synced
        while not w.iterate():
            pass
    for p in range(n_pages):
        block.write(p * PAGE + 8, b"\x09\x09\x09\x09")
    ram_bytes = h.save_live_pending(1 << 40)  # sync
    assert ram_bytes == n_pages * PAGE
    wire = h.save_live_pending_wire(0)
    assert n_pages * 12 < wire < n_pages * 30, wire  # 8 + 3 + a 6-byte delta a page, not 4104
    stats = h.query_stats()["ram"]
    assert stats["remaining"] == ram_bytes and stats["pending-wire-bytes"] == wire
    assert stats["wire-cost"]["xbzrle"]["share"] == 1.0
    # below the threshold the wire figure re-syncs, and the sync finds nothing new
    assert h.save_live_pending_wire(wire + 1) == wire
    w.complete_precopy()
    w.cleanup()
