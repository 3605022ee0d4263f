"""The page search, bulk stage, counters, pending/sync and rate limiting.

(docs/wire-format.md, RAM section; docs/qemu-compatibility.md, Convergence.)
"""

from __future__ import annotations

import numpy as np
import pytest
import ram_strategies as rs

import savevm_ram.save as ram_save
import savevm_ram.search as ram_search
from savevm.channels.memory import MemoryChannel
from savevm.qemufile import QEMUFile
from savevm.save import StreamWriter
from savevm_ram import RAMBlock, RAMList

P = rs.PAGE


def dense_ram(sizes: dict[str, int], seed: int = 3, zero_every: int = 0) -> RAMList:
    rng = np.random.default_rng(seed)
    blocks = []
    for name, n in sizes.items():
        b = RAMBlock(name, bytearray(n * P))
        b.host[:] = rng.integers(1, 256, n * P, dtype=np.uint8)
        if zero_every:
            for p in range(0, n, zero_every):
                b.host[p * P : (p + 1) * P] = 0
        blocks.append(b)
    return RAMList(blocks)


def start(ram: RAMList, rate: int = 0) -> tuple[StreamWriter, object, MemoryChannel, QEMUFile]:
    reg, h = rs.make_registry(ram)
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True, rate_limit=rate)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    return w, h, ch, f


def finish(w: StreamWriter, f: QEMUFile) -> None:
    f.set_rate_limit(0)
    w.complete_precopy()
    w.cleanup()


# ----------------------------------------------------------------- bulk stage
def test_first_round_sends_every_page_once_in_block_order() -> None:
    ram = dense_ram({"small": 2, "big": 6, "mid": 4})
    assert [b.idstr for b in ram] == ["big", "mid", "small"]
    w, h, ch, f = start(ram, rate=10 * 5000)  # 5000 bytes per window: about one page
    results = []
    bulk = []
    for _ in range(50):
        f.reset_rate_limit()
        results.append(w.iterate())
        bulk.append(h.bulk_stage)
        if results[-1]:
            break
    finish(w, f)
    chunks = rs.parse_stream(ch.getvalue())
    parts = [c for c in chunks if c.kind == rs.SECTION_PART]
    assert len(parts) == len(results) > 2, "a small rate limit must split the first round"
    assert results[0] is False and results[-1] is True
    sent = [(p.block, p.page) for c in parts for p in c.pages]
    expected = [("big", i) for i in range(6)] + [("mid", i) for i in range(4)] + [("small", i) for i in range(2)]
    assert sent == expected
    assert len(parts[0].pages) < len(expected)
    # bulk stage: on until the search wraps after the last page, then off
    assert bulk[:-1] == [True] * (len(bulk) - 1) and bulk[-1] is False
    assert chunks[-1].pages == []  # END: nothing left


def test_bulk_stage_ends_only_after_complete_round() -> None:
    ram = dense_ram({"a": 3, "b": 2})
    w, h, ch, f = start(ram)
    assert h.bulk_stage is True
    assert h.saver.search.find_dirty_run() == (0, 0, 3)
    h.saver.bitmap.clear(ram[0], 0, 3)
    assert h.bulk_stage is True
    assert h.saver.search.find_dirty_run() == (1, 0, 2)
    h.saver.bitmap.clear(ram[1], 0, 2)
    assert h.bulk_stage is True
    assert h.saver.search.find_dirty_run() is None
    assert h.bulk_stage is False
    finish(w, f)


def test_find_dirty_run_none_when_clean() -> None:
    ram = dense_ram({"a": 3, "b": 2})
    w, h, ch, f = start(ram)
    assert w.iterate() is True
    for _ in range(3):
        assert h.saver.search.find_dirty_run() is None
    h.saver.search.last_seen_block, h.saver.search.last_page = 1, 1  # from anywhere
    assert h.saver.search.find_dirty_run() is None
    finish(w, f)


def test_pages_behind_search_position_found_after_wrap() -> None:
    ram = dense_ram({"a": 8, "b": 6})
    a, b = ram.find("a"), ram.find("b")
    w, h, ch, f = start(ram)
    assert w.iterate() is True
    a.mark_dirty(2 * P, P)
    b.mark_dirty(1 * P, 2 * P)  # b@1..2: behind the position b@3 in the same block
    b.mark_dirty(5 * P, 1)      # b@5: ahead
    h.saver.sync()
    h.saver.search.last_seen_block, h.saver.search.last_page = 1, 3
    found = []
    while (run := h.saver.search.find_dirty_run()) is not None:
        found.append(run)
        h.saver.bitmap.clear(ram[run[0]], run[1], run[2])
        assert len(found) < 10
    assert found == [(1, 5, 1), (0, 2, 1), (1, 1, 2)]
    finish(w, f)


def test_runs_split_at_clean_pages_and_max_run() -> None:
    ram = dense_ram({"a": 300})
    a = ram.find("a")
    w, h, ch, f = start(ram)
    assert h.saver.search.find_dirty_run(256) == (0, 0, 256)
    h.saver.bitmap.clear(a, 0, 256)
    h.saver.bitmap.clear(a, 260, 1)
    assert h.saver.search.find_dirty_run(256) == (0, 256, 4)
    h.saver.bitmap.clear(a, 256, 4)
    assert h.saver.search.find_dirty_run(256) == (0, 261, 39)
    assert ram_search.MAX_BATCH_PAGES >= 256
    finish(w, f)


def test_iterate_time_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_WAIT: with a zero time budget one iterate sends one run and is not done."""
    monkeypatch.setattr(ram_save, "MAX_WAIT", -1.0)
    ram = dense_ram({"a": 3, "b": 2, "c": 1})
    w, h, ch, f = start(ram)
    assert [w.iterate() for _ in range(4)] == [False, False, False, True]
    finish(w, f)
    parts = [c for c in rs.parse_stream(ch.getvalue()) if c.kind == rs.SECTION_PART]
    assert [[(p.block, p.page) for p in c.pages] for c in parts] == [
        [("a", 0), ("a", 1), ("a", 2)], [("b", 0), ("b", 1)], [("c", 0)], []]


# ----------------------------------------------------------------- counters
def test_counters_match_stream() -> None:
    ram = dense_ram({"a": 30, "b": 11}, zero_every=3)
    a = ram.find("a")
    w, h, ch, f = start(ram, rate=10 * 40_000)
    syncs = 1  # setup
    for i in range(40):
        f.reset_rate_limit()
        w.iterate()
        if i in (3, 7):
            a.write(5 * P, b"x" * 10)
            a.write(6 * P, bytes(P))  # now a zero page
            w.pending(1 << 40)
            syncs += 1
    finish(w, f)
    syncs += 1  # complete
    chunks = rs.parse_stream(ch.getvalue())
    pages = rs.page_records(chunks)
    st = h.query_stats()["ram"]
    zeros = sum(p.kind == rs.ZERO for p in pages)
    normals = sum(p.kind == rs.PAGEF for p in pages)
    assert zeros > 10 and normals > 20
    assert st["duplicate"] == zeros
    assert st["normal"] == normals
    assert st["normal-bytes"] == normals * P
    assert st["total"] == 41 * P
    assert st["transferred"] > 0
    assert st["transferred"] == sum(c.end - c.start for c in chunks)
    assert st["dirty-sync-count"] == syncs
    assert st["remaining"] == 0
    assert st["page-size"] == P
    assert st["precopy-bytes"] + st["downtime-bytes"] == st["transferred"]
    assert st["downtime-bytes"] == chunks[-1].end - chunks[-1].start


def test_pending_below_threshold_syncs() -> None:
    ram = dense_ram({"a": 8})
    a = ram.find("a")
    w, h, ch, f = start(ram)
    c0 = h.query_stats()["ram"]["dirty-sync-count"]
    assert c0 == 1
    # above the threshold: no sync, the estimate is the bitmap
    assert w.pending(4 * P) == 8 * P
    assert h.query_stats()["ram"]["dirty-sync-count"] == 1
    assert w.iterate() is True
    a.write(0, b"x")
    a.write(3 * P, b"y")
    # below the threshold: re-sync and count what the sync found
    assert w.pending(4 * P) == 2 * P
    assert h.query_stats()["ram"]["dirty-sync-count"] == 2
    assert w.pending(1) == 2 * P  # 2 pages >= 1 byte: no sync
    assert h.query_stats()["ram"]["dirty-sync-count"] == 2
    finish(w, f)


# ----------------------------------------------------------------- rate limit
@pytest.mark.parametrize("budget", [3000, 20_000, 100_000, 1_500_000])
def test_iterate_stops_after_about_the_budget(budget: int) -> None:
    ram = dense_ram({"a": 1024})  # 4 MiB, all non-zero
    w, h, ch, f = start(ram)
    f.set_rate_limit(budget * 10)
    f.reset_rate_limit()
    before = f.pos
    assert h.save_live_iterate(f) is False
    sent = f.pos - before
    assert sent > budget
    assert sent <= budget + (8 + 2 + P) + 8  # at most one page record past the budget, then EOS
    finish(w, f)


def test_rate_limited_round_trip() -> None:
    """A whole snapshot through a rate-limited file still arrives intact."""
    ram = dense_ram({"a": 40, "b": 9}, zero_every=5)
    w, h, ch, f = start(ram, rate=10 * 30_000)
    for _ in range(100):
        f.reset_rate_limit()
        if w.iterate():
            break
    else:
        raise AssertionError("never done")
    finish(w, f)
    dst = RAMList([RAMBlock("a", bytearray(40 * P)), RAMBlock("b", bytearray(9 * P))])
    rs.load_bytes(ch.getvalue(), dst)
    for b in ram:
        assert bytes(dst.find(b.idstr).buffer) == bytes(b.buffer)
