"""The XBZRLE codec's fast paths agree with its careful ones.

* loading: a record wholly in the read stage is validated and applied in
  one pass (``_load_staged``); a record split across reads, or a corrupt one,
  takes the careful path.  Both must leave the same page, or raise the same
  error at the same offset, with the page untouched;
* saving: misses and overflows go out as normal pages from the very copy
  the cache now holds, so a program writing the page meanwhile cannot make
  the destination's copy and the cache's differ.
"""

from __future__ import annotations

import numpy as np
import xbzrle_strategies
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ram_strategies import ChunkedChannel

from savevm.errors import CorruptStreamError
from savevm.qemufile import QEMUFile
from savevm_xbzrle.cache import KIND_MISS, KIND_OVERFLOW, KIND_XBZRLE, PageCache, xbzrle_save_batch
from savevm_xbzrle.codec import PAGE_SIZE, decode, encode
from savevm_xbzrle.encoder import XbzrleCodec

S = xbzrle_strategies
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAGE = PAGE_SIZE


class _Block:
    idstr = "ram0"


def _load(record: bytes, start: bytes, chunk: int) -> tuple[bytes, int | None, str | None, int]:
    """Load one record after 5 bytes of something else; (page, error offset, error text, bytes consumed)."""
    f = QEMUFile(ChunkedChannel(b"\xaa" * 5 + record + b"\x10" * 8, [chunk]))
    f.get_buffer_into(memoryview(bytearray(5)))
    arena = np.frombuffer(b"\xee" * PAGE + start + b"\xee" * PAGE, np.uint8).copy()
    page = arena[PAGE : 2 * PAGE]
    try:
        XbzrleCodec().load_page(f, _Block(), 3, page, 0)
        err: tuple[int | None, str | None] = (None, None)
    except CorruptStreamError as exc:
        err = (exc.offset, exc.detail)
    assert arena[:PAGE].tobytes() == b"\xee" * PAGE and arena[2 * PAGE :].tobytes() == b"\xee" * PAGE
    return page.tobytes(), err[0], err[1], f.pos


@SETTINGS
@given(st.one_of(S.mangled_encodings(), S.page_pairs().map(lambda p: encode(*p) or b"")),
       st.sampled_from([0x01, 0x01, 0x02]), st.integers(0, 3))
def test_staged_and_careful_loads_agree(enc: bytes, flag: int, length_skew: int) -> None:
    enc = enc[:PAGE + 8]
    n = min(len(enc) + (length_skew if length_skew < 2 else 0), 0xFFFF)
    record = bytes((flag,)) + n.to_bytes(2, "big") + enc
    start = np.random.default_rng(len(enc)).integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    fast = _load(record, start, 1 << 20)  # everything staged at once
    slow = _load(record, start, 1)  # one byte per read: never wholly staged
    assert fast == slow
    page, off, _why, pos = fast
    if off is None:
        # the length may claim more than the encoding: the loader then takes the bytes that follow it
        expect = bytearray(start)
        decode((record + b"\x10" * 8)[3 : 3 + n], expect)
        assert page == bytes(expect) and pos == 5 + 3 + n
    else:
        assert page == start  # a rejected record changes nothing


def test_the_staged_path_is_the_common_one() -> None:
    old = np.zeros(PAGE, np.uint8)
    new = old.copy()
    new[1024:1032] = np.arange(1, 9)
    enc = encode(old, new)
    assert enc is not None
    f = QEMUFile(ChunkedChannel(b"\x01" + len(enc).to_bytes(2, "big") + enc, [1 << 20]))
    f.fill(3 + len(enc))
    page = np.zeros(PAGE, np.uint8)
    assert XbzrleCodec._load_staged(f, page) is True
    assert np.array_equal(page, new) and f.pos == 3 + len(enc)


# ---------------------------------------------------------------- the source sends what it caches
def test_misses_and_overflows_go_out_from_the_cached_copy() -> None:
    rng = np.random.default_rng(1)
    mem = rng.integers(0, 256, (8, PAGE), dtype=np.uint8)  # the program's memory: the batch is a view of it
    addrs = np.arange(8, dtype=np.int64) * PAGE
    cache = PageCache(16 * PAGE)
    r = xbzrle_save_batch(cache, addrs, mem, 1, False)
    assert (r.kind == KIND_MISS).all() and sorted(r.copies) == list(range(8))
    sent = {k: v.copy() for k, v in r.copies.items()}
    mem[:] ^= 0xFF  # the program writes every page before the records reach the socket
    for k in range(8):
        assert np.array_equal(sent[k], cache.peek(int(addrs[k])))  # what goes out is what is cached
        assert np.array_equal(r.copies[k], sent[k])
    # next round: page 0 changed a little (a delta), page 1 entirely (an overflow)
    mem[:] ^= 0xFF
    mem[0, 10] ^= 1
    mem[1] = rng.integers(0, 256, PAGE, dtype=np.uint8)
    r = xbzrle_save_batch(cache, addrs[:2], mem[:2], 2, False)
    assert r.kind.tolist() == [KIND_XBZRLE, KIND_OVERFLOW] and list(r.copies) == [1]
    snap = r.copies[1].copy()
    mem[1] = 0
    assert np.array_equal(snap, cache.peek(PAGE)) and np.array_equal(r.copies[1], snap)
    # the delta was made against the old cached copy, and the cache moved on to the new contents
    assert np.array_equal(cache.peek(0), mem[0])
