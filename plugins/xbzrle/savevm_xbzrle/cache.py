"""The XBZRLE page cache, with QEMU 7.2's semantics (docs/wire-format.md, XBZRLE).

XBZRLE can only send a delta for a page whose previous contents the sender
still remembers; this cache is that memory.  It is a direct-mapped table --
slot ``(addr // page_size) & (num_items - 1)`` for a global RAM address -- with
an age (the dirty-sync generation) per entry so that a page touched in the
current or previous generation is not evicted by a colliding page.  Matching
QEMU exactly matters: which pages hit decides which pages go out as XBZRLE
records and what the ``xbzrle-cache`` statistics say.

Storage is three numpy arrays (addresses, ages, one ``(num_items, page_size)``
data block) so that whole batches of pages can be looked up, inserted and
encoded with a handful of numpy calls.  Nothing is allocated until the first
insert, and the data block comes from ``np.zeros`` (calloc), whose pages the
OS maps only when written: a 64 MiB cache costs nothing until it is used and
then only what has been filled.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from savevm.config import check_xbzrle_cache_size
from savevm.errors import ConfigError

from .codec import PAGE_SIZE, encode_batch

__all__ = [
    "CACHED_PAGE_LIFETIME",
    "KIND_MISS",
    "KIND_OVERFLOW",
    "KIND_UNCHANGED",
    "KIND_XBZRLE",
    "KIND_ZERO",
    "PageCache",
    "XbzrleBatchResult",
    "xbzrle_save_batch",
]

#: A resident page touched within this many sync generations is not evicted.
CACHED_PAGE_LIFETIME = 2


def _check_size(size_bytes: Any, page_size: int) -> int:
    """The number of slots for ``size_bytes``: the parameter's own check (ConfigError names valid sizes)."""
    return check_xbzrle_cache_size(size_bytes, page_size)


class PageCache:
    """Direct-mapped XBZRLE page cache keyed by global RAM address.

    ``size_bytes`` must be a power-of-two multiple of ``page_size`` and at
    least one page; it is never rounded (QEMU >= 2.11 rejects other sizes too).
    Memory is allocated lazily on the first insert (see the module docstring).

    Ages are the caller's dirty-sync generation counter
    (``dirty_sync_count``); an address of -1 marks an empty slot.
    """

    def __init__(self, size_bytes: int, page_size: int = PAGE_SIZE) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ConfigError("page-size", f"must be a positive integer, got {page_size!r}")
        if page_size & (page_size - 1):
            raise ConfigError("page-size", f"must be a power of two, got {page_size}")
        self.page_size = page_size
        self.num_items = _check_size(size_bytes, page_size)
        self._mask = self.num_items - 1
        self._shift = page_size.bit_length() - 1
        self._addr: np.ndarray | None = None
        self._age: np.ndarray | None = None
        self._data: np.ndarray | None = None

    # -- bookkeeping -----------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Configured size in bytes (``num_items * page_size``)."""
        return self.num_items * self.page_size

    @property
    def allocated(self) -> bool:
        """Whether the backing arrays exist yet (they appear on first insert)."""
        return self._data is not None

    def _alloc(self) -> None:
        self._addr = np.full(self.num_items, -1, dtype=np.int64)
        self._age = np.zeros(self.num_items, dtype=np.int64)
        self._data = np.zeros((self.num_items, self.page_size), dtype=np.uint8)

    def slot_of(self, addr: int) -> int:
        """Slot index for a RAM address (no hashing beyond the mask, as QEMU)."""
        return (addr >> self._shift) & self._mask

    def slots_of(self, addrs: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`slot_of`."""
        return (np.asarray(addrs, dtype=np.int64) >> self._shift) & self._mask

    def _view(self, slot: int) -> memoryview:
        assert self._data is not None
        return memoryview(self._data[slot]).toreadonly()

    def _page_bytes(self, data: Any) -> np.ndarray:
        if isinstance(data, np.ndarray):
            arr = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        else:
            arr = np.frombuffer(data, dtype=np.uint8)
        if arr.size != self.page_size:
            raise ValueError(f"page data must be {self.page_size} bytes, got {arr.size}")
        return arr

    # -- single page -----------------------------------------------------

    def lookup(self, addr: int, current_age: int) -> memoryview | None:
        """Return the cached copy of ``addr`` (read-only view) or None.

        A hit refreshes the entry's age to ``current_age`` (QEMU's
        ``cache_is_cached``), which is what protects it from eviction for the
        next two generations.
        """
        if addr < 0:
            raise ValueError(f"RAM address must be >= 0, got {addr}")
        if self._addr is None:
            return None
        slot = self.slot_of(addr)
        if self._addr[slot] != addr:
            return None
        assert self._age is not None
        self._age[slot] = current_age
        return self._view(slot)

    def peek(self, addr: int) -> memoryview | None:
        """Like :meth:`lookup` but without touching the age (for tests/tools)."""
        if self._addr is None:
            return None
        slot = self.slot_of(addr)
        return self._view(slot) if self._addr[slot] == addr else None

    def is_cached(self, addr: int) -> bool:
        """Whether ``addr`` is resident, without refreshing its age."""
        return self._addr is not None and bool(self._addr[self.slot_of(addr)] == addr)

    def insert(self, addr: int, data: Any, current_age: int) -> memoryview | None:
        """Copy ``data`` into the cache as ``addr``; return a view of the copy.

        Refused (None) when the slot holds a *different* address whose age
        + 2 > ``current_age``: a page touched in this or the previous sync
        generation beats a newcomer.  The same address always overwrites.
        """
        if addr < 0:
            raise ValueError(f"RAM address must be >= 0, got {addr}")
        page = self._page_bytes(data)
        if self._addr is None:
            self._alloc()
        assert self._addr is not None and self._age is not None and self._data is not None
        slot = self.slot_of(addr)
        resident = int(self._addr[slot])
        if resident != -1 and resident != addr and int(self._age[slot]) + CACHED_PAGE_LIFETIME > current_age:
            return None
        self._data[slot] = page
        self._age[slot] = current_age
        self._addr[slot] = addr
        return self._view(slot)

    def update_zero_page(self, addr: int, current_age: int) -> bool:
        """Record that ``addr`` was sent as a zero page; True if cached.

        QEMU inserts a zero page into the cache (``xbzrle_cache_zero_page``)
        so a stale non-zero copy cannot be used as the base of a later delta.
        It is an ordinary insert, subject to the same age rule.
        """
        if addr < 0:
            raise ValueError(f"RAM address must be >= 0, got {addr}")
        if self._addr is None:
            self._alloc()
        assert self._addr is not None and self._age is not None and self._data is not None
        slot = self.slot_of(addr)
        resident = int(self._addr[slot])
        if resident != -1 and resident != addr and int(self._age[slot]) + CACHED_PAGE_LIFETIME > current_age:
            return False
        self._data[slot] = 0
        self._age[slot] = current_age
        self._addr[slot] = addr
        return True

    # -- batches -----------------------------------------------------------

    def lookup_batch(self, addrs: np.ndarray, current_age: int) -> np.ndarray:
        """Hit mask for ``addrs``; every hit's age becomes ``current_age``.

        Equivalent to calling :meth:`lookup` for each address in order:
        lookups never change which address a slot holds, and all refreshed
        ages are the same value.
        """
        a = np.asarray(addrs, dtype=np.int64)
        if a.size and int(a.min()) < 0:
            raise ValueError("RAM addresses must be >= 0")
        if self._addr is None:
            return np.zeros(a.shape, dtype=np.bool_)
        assert self._age is not None
        slots = self.slots_of(a)
        hit = self._addr[slots] == a
        self._age[slots[hit]] = current_age
        return hit

    def get_batch(self, addrs: np.ndarray) -> np.ndarray:
        """The cached pages for resident ``addrs``, shape (k, page_size).

        A copy, or a read-only view when the slots are contiguous (read it
        before changing the cache).  Raises KeyError if one of them is not
        resident.  Does not touch ages.
        """
        a = np.asarray(addrs, dtype=np.int64)
        if a.size == 0:
            return np.empty((0, self.page_size), dtype=np.uint8)
        if self._addr is None:
            raise KeyError(int(a[0]))
        assert self._data is not None
        slots = self.slots_of(a)
        missing = np.flatnonzero(self._addr[slots] != a)
        if missing.size:
            raise KeyError(int(a[missing[0]]))
        first = int(slots[0])
        if int(slots[-1]) - first == slots.size - 1 and bool((np.diff(slots) == 1).all()):
            view = self._data[first : first + slots.size]
            view.flags.writeable = False  # a view of the cache, not a copy
            return view
        return self._data[slots]

    def insert_batch(self, addrs: np.ndarray, data: np.ndarray | None, current_age: int) -> np.ndarray:
        """Insert pages ``data[k]`` as ``addrs[k]`` in order; return success mask.

        ``data`` of None inserts zero pages (batched :meth:`update_zero_page`).
        The result is exactly that of calling :meth:`insert` for k = 0, 1, ...:
        within a group of pages that share a slot, the first one decides the
        winner (or the resident page does, if it is still young); after that
        only repeats of the winning address succeed and the last of those
        leaves its data in the slot.
        """
        a = np.asarray(addrs, dtype=np.int64).reshape(-1)
        if a.size and int(a.min()) < 0:
            raise ValueError("RAM addresses must be >= 0")
        if data is not None:
            pages = np.asarray(data, dtype=np.uint8).reshape(a.size, self.page_size)
        if a.size == 0:
            return np.zeros(0, dtype=np.bool_)
        if self._addr is None:
            self._alloc()
        assert self._addr is not None and self._age is not None and self._data is not None
        slots = self.slots_of(a)
        uniq, first, group = np.unique(slots, return_index=True, return_inverse=True)
        resident = self._addr[uniq]
        young = (resident != -1) & (self._age[uniq] + CACHED_PAGE_LIFETIME > current_age)
        winner = np.where(young, resident, a[first])
        ok = a == winner[group.reshape(-1)]
        idx = np.flatnonzero(ok)
        if idx.size:
            # Last successful page per slot: unique over the reversed order.
            s = slots[idx][::-1]
            _, last = np.unique(s, return_index=True)
            src = idx[::-1][last]
            dst = slots[src]
            if data is None:
                self._data[dst] = 0
            else:
                self._data[dst] = pages[src]
            self._addr[dst] = a[src]
            self._age[dst] = current_age
        return ok

    def overwrite(self, addrs: np.ndarray, data: np.ndarray) -> None:
        """New contents for resident pages in distinct slots (their ages were just refreshed).

        What ``insert_batch`` does for pages known to hit, without its
        slot arbitration; contiguous slots are one copy.
        """
        assert self._addr is not None and self._data is not None
        slots = self.slots_of(addrs)
        if slots.size == 0:
            return
        first = int(slots[0])
        if int(slots[-1]) - first == slots.size - 1 and bool((np.diff(slots) == 1).all()):
            self._data[first : first + slots.size] = data
        else:
            self._data[slots] = data

    def conflict_free_spans(self, addrs: np.ndarray) -> list[tuple[int, int]]:
        """Split ``addrs`` into consecutive spans with no slot used twice.

        Within such a span, a batch lookup followed by batch inserts/updates
        gives exactly the sequential per-page result, because each page's
        operations touch only its own slot.
        """
        slots = self.slots_of(addrs).reshape(-1)
        n = slots.size
        if n == 0:
            return []
        order = np.argsort(slots, kind="stable")
        prev = np.full(n, -1, dtype=np.int64)
        same = slots[order[1:]] == slots[order[:-1]]
        prev[order[1:][same]] = order[:-1][same]
        spans: list[tuple[int, int]] = []
        start = 0
        while start < n:
            clash = np.flatnonzero(prev[start:] >= start)
            stop = n if clash.size == 0 else start + int(clash[0])
            spans.append((start, stop))
            start = stop
        return spans

    # -- resize ------------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Change the cache size, keeping the entries that still fit.

        Every resident page moves to its slot in the new table.  Growing keeps
        everything (each new slot receives at most one old entry); shrinking
        keeps, for each new slot, the most recently used candidate (highest
        age; on a tie the one from the lower old slot).  Ages are preserved.

        Note: QEMU 7.2 itself never resizes a running cache -- a new
        ``xbzrle-cache-size`` takes effect with the next migration's fresh
        cache (docs/wire-format.md, XBZRLE) -- so a stream-compatible sender
        should not call this mid-migration.
        """
        items = _check_size(new_size, self.page_size)
        if items == self.num_items:
            return
        old_addr, old_age, old_data = self._addr, self._age, self._data
        self.num_items = items
        self._mask = items - 1
        self._addr = self._age = self._data = None
        if old_addr is None:
            return
        assert old_age is not None and old_data is not None
        used = np.flatnonzero(old_addr != -1)
        if used.size == 0:
            return
        self._alloc()
        assert self._addr is not None and self._age is not None and self._data is not None
        new_slot = self.slots_of(old_addr[used])
        # Sort by (new slot, age descending, old slot ascending); keep firsts.
        order = np.lexsort((used, -old_age[used], new_slot))
        ns = new_slot[order]
        keep = np.ones(ns.size, dtype=np.bool_)
        keep[1:] = ns[1:] != ns[:-1]
        chosen = used[order[keep]]
        target = ns[keep]
        self._addr[target] = old_addr[chosen]
        self._age[target] = old_age[chosen]
        self._data[target] = old_data[chosen]


# --------------------------------------------------------------------------
# QEMU's save_xbzrle_page for a batch

#: Page was sent as a zero page (the cache only learned about it).
KIND_ZERO = 0
#: Cache miss: send a normal page.
KIND_MISS = 1
#: Hit, unchanged since the cached copy: send nothing.
KIND_UNCHANGED = 2
#: Hit, delta fits: send an XBZRLE record with ``encoded[k]``.
KIND_XBZRLE = 3
#: Hit, delta too large: send a normal page.
KIND_OVERFLOW = 4


@attrs.define(eq=False)
class XbzrleBatchResult:
    """What to send for each page of :func:`xbzrle_save_batch`, plus counters.

    ``encoded[k]`` is the XBZRLE payload for ``KIND_XBZRLE`` pages and None
    otherwise.  Counters are increments for :class:`XbzrleStats` (``bytes``
    is not included: it depends on the record header length, which only the
    RAM section writer knows).
    """

    kind: np.ndarray
    encoded: list[bytes | None]
    cache_miss: int = 0
    pages: int = 0
    overflow: int = 0
    #: batch index -> the bytes to send as a normal page for a miss or an overflow that updated
    #: the cache: the very copy the cache now holds, taken before encoding, so a program writing
    #: the page meanwhile cannot make the destination's copy and the cache differ (QEMU sends
    #: these from its cache for the same reason).  Pages not listed are sent from memory.
    copies: dict[int, np.ndarray] = attrs.field(factory=dict)


def _is_run(idx: np.ndarray) -> bool:
    """Are these ascending indices consecutive (so a slice can stand for them)?"""
    return int(idx[-1]) - int(idx[0]) == idx.size - 1


def xbzrle_save_batch(
    cache: PageCache,
    addrs: np.ndarray,
    pages: np.ndarray,
    current_age: int,
    last_stage: bool,
    zero_mask: np.ndarray | None = None,
    *,
    snapshot: bool = False,
) -> XbzrleBatchResult:
    """Run QEMU's per-page XBZRLE send decision for a batch, in page order.

    For each page (in order): a zero page (``zero_mask``) is only inserted as
    zeros; otherwise a miss counts ``cache_miss`` and, unless ``last_stage``,
    inserts the page (the normal page sent is then byte-identical to the
    cached copy); a hit counts ``pages``, is encoded against the cached copy
    and, unless ``last_stage``, the cached copy becomes the new contents when
    the result is a delta or an overflow.  Pages whose addresses share a
    cache slot are handled in separate sub-batches so the outcome equals
    processing one page at a time.

    ``pages`` may be a view of memory the program keeps writing: what is
    cached, encoded and sent (``copies``) is then taken from one copy of it.
    ``snapshot=True`` says ``pages`` is such a copy already (the RAM
    pipeline's promise to codecs), which saves copying it again.
    """
    a = np.asarray(addrs, dtype=np.int64).reshape(-1)
    data = np.asarray(pages, dtype=np.uint8).reshape(a.size, cache.page_size)
    zero = np.zeros(a.size, dtype=np.bool_) if zero_mask is None else np.asarray(zero_mask, dtype=np.bool_).reshape(-1)
    kind = np.empty(a.size, dtype=np.int8)
    encoded: list[bytes | None] = [None] * a.size
    result = XbzrleBatchResult(kind=kind, encoded=encoded)
    for lo, hi in cache.conflict_free_spans(a):
        span = np.arange(lo, hi)
        z = span[zero[lo:hi]]
        if z.size:
            cache.insert_batch(a[z], None, current_age)
            kind[z] = KIND_ZERO
        rest = span[~zero[lo:hi]]
        if rest.size == 0:
            continue
        hit = cache.lookup_batch(a[rest], current_age)
        miss = rest[~hit]
        result.cache_miss += int(miss.size)
        kind[miss] = KIND_MISS
        if miss.size and not last_stage:
            snap = data[miss]  # a copy (fancy indexing): the cached bytes are the sent bytes
            ok = cache.insert_batch(a[miss], snap, current_age)
            for j in np.flatnonzero(ok).tolist():
                result.copies[int(miss[j])] = snap[j]
        hits = rest[hit]
        if hits.size == 0:
            continue
        result.pages += int(hits.size)
        # one snapshot: encoded, cached and (on overflow) sent from the same bytes
        new = data[int(hits[0]) : int(hits[-1]) + 1] if snapshot and _is_run(hits) else data[hits]
        enc = encode_batch(cache.get_batch(a[hits]), new)
        lens = np.fromiter((-1 if e is None else len(e) for e in enc), dtype=np.int64, count=len(enc))
        over = lens < 0
        delta = lens > 0
        kind[hits[over]] = KIND_OVERFLOW
        kind[hits[delta]] = KIND_XBZRLE
        kind[hits[lens == 0]] = KIND_UNCHANGED
        result.overflow += int(over.sum())
        for k, e in zip(hits.tolist(), enc):
            if e:
                encoded[k] = e
        if not last_stage:
            # a hit already refreshed the age, and slots are distinct here, so this is QEMU's
            # in-place memcpy into the cached page
            changed = np.flatnonzero(over | delta)
            if changed.size:
                cache.overwrite(a[hits[changed]], new[changed] if changed.size < hits.size else new)
                for j in np.flatnonzero(over).tolist():
                    result.copies[int(hits[j])] = new[j]
    return result
