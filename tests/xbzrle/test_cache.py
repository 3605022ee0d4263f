"""XBZRLE page cache (QEMU 7.2 page_cache.c semantics), batch save path, stats."""

from __future__ import annotations

import numpy as np
import pytest
import xbzrle_strategies
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from savevm.errors import ConfigError
from savevm_xbzrle.cache import (
    KIND_MISS,
    KIND_OVERFLOW,
    KIND_UNCHANGED,
    KIND_XBZRLE,
    KIND_ZERO,
    PageCache,
    xbzrle_save_batch,
)
from savevm_xbzrle.codec import encode
from savevm_xbzrle.stats import XbzrleStats

S = xbzrle_strategies
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAGE = 4096


def page(value: int) -> bytes:
    return bytes([value]) * PAGE


class ModelCache:
    """The section 5 rules, as plainly as possible."""

    def __init__(self, items: int) -> None:
        self.items = items
        self.slots: list[tuple[int, int, bytes] | None] = [None] * items

    def slot(self, addr: int) -> int:
        return (addr // PAGE) & (self.items - 1)

    def lookup(self, addr: int, age: int) -> bytes | None:
        e = self.slots[self.slot(addr)]
        if e is None or e[0] != addr:
            return None
        self.slots[self.slot(addr)] = (addr, age, e[2])
        return e[2]

    def insert(self, addr: int, data: bytes, age: int) -> bool:
        e = self.slots[self.slot(addr)]
        if e is not None and e[0] != addr and e[1] + 2 > age:
            return False
        self.slots[self.slot(addr)] = (addr, age, data)
        return True


def state(cache: PageCache) -> list[tuple[int, int, bytes] | None]:
    if not cache.allocated:
        return [None] * cache.num_items
    out: list[tuple[int, int, bytes] | None] = []
    for k in range(cache.num_items):
        addr = int(cache._addr[k])
        out.append(None if addr == -1 else (addr, int(cache._age[k]), cache._data[k].tobytes()))
    return out


# ---------------------------------------------------------------------------
# size validation


@pytest.mark.parametrize("size", [4096, 8192, 65536, 64 * 1024 * 1024])
def test_valid_sizes(size: int) -> None:
    c = PageCache(size)
    assert c.num_items == size // PAGE and c.size_bytes == size


@pytest.mark.parametrize(
    "size, hint",
    [
        (0, "smallest valid size: 4096"),
        (100, "smallest valid size: 4096"),
        (4095, "smallest valid size: 4096"),
        (4097, "nearest valid sizes: 4096, 8192"),
        (12288, "nearest valid sizes: 8192, 16384"),  # 3 pages: not a power of two
        (100000, "nearest valid sizes: 65536, 131072"),
        (65536 + 4096, "nearest valid sizes: 65536, 131072"),
        (-4096, "smallest valid size: 4096"),
    ],
)
def test_invalid_sizes_are_rejected_not_rounded(size: int, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        PageCache(size)
    assert info.value.key == "xbzrle-cache-size"
    text = str(info.value)
    assert "must be a power-of-two number of 4096-byte pages and >= 4096" in text
    assert hint in text


@pytest.mark.parametrize("size", [4096.0, "4096", True, None])
def test_non_integer_size(size: object) -> None:
    with pytest.raises(ConfigError):
        PageCache(size)  # type: ignore[arg-type]


def test_lazy_allocation() -> None:
    c = PageCache(64 * 1024 * 1024)
    assert not c.allocated
    assert c.lookup(0, 1) is None
    assert not c.lookup_batch(np.array([0, 4096]), 1).any()
    assert c.insert(0, page(1), 1) is not None
    assert c.allocated


# ---------------------------------------------------------------------------
# single-page semantics


def test_slot_mapping_uses_global_address_mask() -> None:
    c = PageCache(4 * PAGE)
    assert [c.slot_of(k * PAGE) for k in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert c.slot_of(5 * PAGE + 123) == 1  # offset within the page is ignored
    assert c.slots_of(np.array([0, 4 * PAGE, 7 * PAGE])).tolist() == [0, 0, 3]


def test_insert_returns_readonly_copy() -> None:
    c = PageCache(2 * PAGE)
    src = bytearray(page(7))
    view = c.insert(PAGE, src, 0)
    assert view is not None and bytes(view) == page(7) and view.readonly
    src[0] = 9  # the cache holds a copy
    assert bytes(c.lookup(PAGE, 0)) == page(7)


def test_age_rule() -> None:
    c = PageCache(2 * PAGE)  # addresses 0 and 2*PAGE share slot 0
    assert c.insert(0, page(1), 5) is not None
    # resident page touched in this or the previous generation wins
    assert c.insert(2 * PAGE, page(2), 5) is None
    assert c.insert(2 * PAGE, page(2), 6) is None
    assert c.is_cached(0)
    # two generations later it may be replaced
    assert c.insert(2 * PAGE, page(2), 7) is not None
    assert c.is_cached(2 * PAGE) and not c.is_cached(0)


def test_hit_refreshes_age() -> None:
    c = PageCache(2 * PAGE)
    c.insert(0, page(1), 1)
    assert bytes(c.lookup(0, 5)) == page(1)  # hit at generation 5
    assert c.insert(2 * PAGE, page(2), 6) is None  # 5 + 2 > 6
    assert c.insert(2 * PAGE, page(2), 7) is not None
    # a miss does not touch the resident entry's age
    c.insert(0, page(3), 20)
    assert c.lookup(2 * PAGE, 30) is None
    assert c.insert(2 * PAGE, page(4), 22) is not None


def test_same_address_always_overwrites() -> None:
    c = PageCache(PAGE)
    c.insert(0, page(1), 10)
    assert c.insert(0, page(2), 10) is not None
    assert bytes(c.peek(0)) == page(2)


def test_update_zero_page() -> None:
    c = PageCache(2 * PAGE)
    c.insert(PAGE, page(9), 1)
    assert c.update_zero_page(PAGE, 1)  # stale copy replaced by zeros
    assert bytes(c.peek(PAGE)) == bytes(PAGE)
    c.insert(0, page(3), 4)
    assert not c.update_zero_page(2 * PAGE, 5)  # young resident wins, as insert
    assert bytes(c.peek(0)) == page(3)
    assert c.update_zero_page(2 * PAGE, 6)
    assert c.is_cached(2 * PAGE) and not c.is_cached(0)


# ---------------------------------------------------------------------------
# batches == sequential


@SETTINGS
@given(S.cache_workloads())
def test_batch_operations_equal_sequential(workload) -> None:
    items, steps = workload
    batch = PageCache(items * PAGE)
    seq = PageCache(items * PAGE)
    model = ModelCache(items)
    for n, (age, addrs, zeros) in enumerate(steps):
        a = np.array(addrs, dtype=np.int64)
        data = np.array([[(x // PAGE + 17 * n) % 256] * PAGE for x in addrs], dtype=np.uint8).reshape(-1, PAGE)
        # lookups first (refresh ages), then inserts of everything
        hits = batch.lookup_batch(a, age)
        assert hits.tolist() == [seq.lookup(x, age) is not None for x in addrs]
        assert hits.tolist() == [model.lookup(x, age) is not None for x in addrs]
        if any(zeros):
            got = batch.insert_batch(a, None, age)
            expect = [seq.update_zero_page(x, age) for x in addrs]
            assert got.tolist() == expect == [model.insert(x, bytes(PAGE), age) for x in addrs]
        else:
            got = batch.insert_batch(a, data, age)
            expect = [seq.insert(x, d, age) is not None for x, d in zip(addrs, data)]
            assert got.tolist() == expect == [model.insert(x, d.tobytes(), age) for x, d in zip(addrs, data)]
        assert state(batch) == state(seq) == model.slots


def test_insert_batch_same_slot_in_order() -> None:
    c = PageCache(PAGE)  # one slot: every address collides
    ok = c.insert_batch(np.array([0, PAGE, 0, 0]), np.stack([np.full(PAGE, v, np.uint8) for v in (1, 2, 3, 4)]), 0)
    # first wins the empty slot; a different address is then refused (age 0 + 2 > 0);
    # repeats of the winner overwrite, the last one's data stays
    assert ok.tolist() == [True, False, True, True]
    assert bytes(c.peek(0)) == page(4)


def test_conflict_free_spans() -> None:
    c = PageCache(4 * PAGE)
    addrs = np.array([0, 1, 2, 4, 5, 9, 3, 8, 12]) * PAGE
    # slots 0 1 2 | 0 1 | 1 3 0 | 0: a span ends where its slot set would repeat
    assert c.conflict_free_spans(addrs) == [(0, 3), (3, 5), (5, 8), (8, 9)]
    assert c.conflict_free_spans(np.array([], dtype=np.int64)) == []


# ---------------------------------------------------------------------------
# resize


def test_resize_grow_keeps_everything() -> None:
    c = PageCache(2 * PAGE)
    c.insert(0, page(1), 3)
    c.insert(3 * PAGE, page(2), 4)
    c.resize(8 * PAGE)
    assert c.num_items == 8
    assert bytes(c.peek(0)) == page(1) and bytes(c.peek(3 * PAGE)) == page(2)
    assert c.slot_of(3 * PAGE) == 3


def test_resize_shrink_keeps_most_recent() -> None:
    c = PageCache(4 * PAGE)
    c.insert(0, page(1), 1)  # new slot 0
    c.insert(2 * PAGE, page(2), 5)  # new slot 0, younger: kept
    c.insert(1 * PAGE, page(3), 2)  # new slot 1
    c.insert(3 * PAGE, page(4), 2)  # new slot 1, same age: lower old slot kept
    c.resize(2 * PAGE)
    assert not c.is_cached(0) and bytes(c.peek(2 * PAGE)) == page(2)
    assert bytes(c.peek(PAGE)) == page(3) and not c.is_cached(3 * PAGE)
    # ages are preserved: the kept page is still young at generation 6
    assert c.insert(0, page(9), 6) is None


def test_resize_validation_and_lazy() -> None:
    c = PageCache(2 * PAGE)
    with pytest.raises(ConfigError):
        c.resize(3 * PAGE)
    assert c.num_items == 2
    c.resize(PAGE)
    assert c.num_items == 1 and not c.allocated


# ---------------------------------------------------------------------------
# save_xbzrle_page for a batch


def reference_save(
    cache: PageCache, addrs, pages, age: int, last_stage: bool, zeros
) -> tuple[list, list, int, int, int]:
    kinds, encs, miss, hits, ovf = [], [], 0, 0, 0
    for addr, data, zero in zip(addrs, pages, zeros):
        if zero:
            cache.update_zero_page(addr, age)
            kinds.append(KIND_ZERO)
            encs.append(None)
            continue
        cached = cache.lookup(addr, age)
        if cached is None:
            miss += 1
            if not last_stage:
                cache.insert(addr, data, age)
            kinds.append(KIND_MISS)
            encs.append(None)
            continue
        hits += 1
        enc = encode(cached, data)
        if not last_stage and enc != b"":
            cache.insert(addr, data, age)
        if enc is None:
            ovf += 1
            kinds.append(KIND_OVERFLOW)
            encs.append(None)
        elif enc == b"":
            kinds.append(KIND_UNCHANGED)
            encs.append(None)
        else:
            kinds.append(KIND_XBZRLE)
            encs.append(enc)
    return kinds, encs, miss, hits, ovf


@SETTINGS
@given(S.cache_workloads(), st.booleans(), st.integers(0, 2**32 - 1))
def test_save_batch_equals_per_page(workload, last_stage: bool, seed: int) -> None:
    items, steps = workload
    rng = np.random.default_rng(seed)
    batch = PageCache(items * PAGE)
    seq = PageCache(items * PAGE)
    for age, addrs, zeros in steps:
        a = np.array(addrs, dtype=np.int64)
        # pages: small mutations of a per-address base so hits encode well,
        # sometimes identical, sometimes fully different (overflow)
        data = np.empty((len(addrs), PAGE), np.uint8)
        for k, x in enumerate(addrs):
            data[k] = (x // PAGE) * 7 % 256
            mode = rng.integers(0, 4)
            if mode == 1:
                data[k, rng.integers(0, PAGE, 5)] ^= 0x55
            elif mode == 2:
                data[k] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        res = xbzrle_save_batch(batch, a, data, age, last_stage and age > 3, np.array(zeros, bool))
        kinds, encs, miss, hits, ovf = reference_save(seq, addrs, data, age, last_stage and age > 3, zeros)
        assert res.kind.tolist() == kinds
        assert res.encoded == encs
        assert (res.cache_miss, res.pages, res.overflow) == (miss, hits, ovf)
        assert state(batch) == state(seq)


# ---------------------------------------------------------------------------
# stats


def test_stats_rates_and_qmp() -> None:
    s = XbzrleStats(cache_size=64 * 1024 * 1024)
    s.cache_miss, s.pages, s.bytes = 10, 40, 20480
    s.update_rates(100)
    assert s.cache_miss_rate == pytest.approx(0.1)
    assert s.encoding_rate == pytest.approx(40 * 4096 / 20480)
    # next period: rates use deltas only
    s.cache_miss, s.pages, s.bytes = 15, 40, 20480
    s.update_rates(10)
    assert s.cache_miss_rate == pytest.approx(0.5)
    assert s.encoding_rate == 0.0  # no hits in the period
    # a period with no pages sent changes nothing
    s.cache_miss += 5
    s.update_rates(0)
    assert s.cache_miss_rate == pytest.approx(0.5)
    s.update_rates(5)
    assert s.cache_miss_rate == pytest.approx(1.0)
    s.overflow = 2
    assert s.as_qmp() == {
        "cache-size": 64 * 1024 * 1024,
        "bytes": 20480,
        "pages": 40,
        "cache-miss": 20,
        "cache-miss-rate": pytest.approx(1.0),
        "encoding-rate": 0.0,
        "overflow": 2,
    }


def test_negative_addresses_rejected() -> None:
    # -1 marks an empty slot; it must never be looked up or stored.
    c = PageCache(2 * PAGE)
    c.insert(0, page(1), 0)
    for call in (
        lambda: c.lookup(-1, 0),
        lambda: c.insert(-PAGE, page(1), 0),
        lambda: c.update_zero_page(-1, 0),
        lambda: c.lookup_batch(np.array([0, -1]), 0),
        lambda: c.insert_batch(np.array([-1]), None, 0),
    ):
        with pytest.raises(ValueError):
            call()
