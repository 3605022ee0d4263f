"""Hypothesis strategies for XBZRLE pages, encodings and cache workloads.

Pages are built from a drawn seed plus a drawn *layout* rather than drawn byte
by byte: hypothesis then shrinks the layout (run positions and lengths, which
is what matters to XBZRLE) instead of 4096 individual bytes.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

PAGE = 4096

# Lengths around the ULEB128 one/two-byte boundary and the page edges.
BOUNDARY_LENGTHS = (1, 2, 3, 126, 127, 128, 129, 130, 255, 256, 257, 4093, 4094, 4095, 4096)

run_lengths = st.one_of(
    st.sampled_from(BOUNDARY_LENGTHS),
    st.integers(1, 16),
    st.integers(1, PAGE),
)


def _differ(rng: np.random.Generator, count: int) -> np.ndarray:
    """XOR masks that are never zero, so every touched byte really differs."""
    return rng.integers(1, 256, count, dtype=np.uint8)


@st.composite
def page_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(old, new) pages covering the interesting shapes of a page delta."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = draw(st.sampled_from(["random", "zeros", "ones"]))
    if base == "random":
        old = rng.integers(0, 256, PAGE, dtype=np.uint8)
    else:
        old = np.full(PAGE, 0 if base == "zeros" else 0xFF, dtype=np.uint8)
    new = old.copy()
    mode = draw(st.sampled_from(["layout", "scatter", "equal", "all", "unrelated", "dense"]))
    if mode == "layout":
        # Alternating (equal gap, differing run) lengths from the start.
        pos = 0
        for gap, run in draw(st.lists(st.tuples(st.one_of(st.just(0), run_lengths), run_lengths), max_size=12)):
            pos += gap
            if pos >= PAGE:
                break
            end = min(PAGE, pos + run)
            new[pos:end] ^= _differ(rng, end - pos)
            pos = end
    elif mode == "scatter":
        for start, run in draw(st.lists(st.tuples(st.integers(0, PAGE - 1), run_lengths), max_size=20)):
            end = min(PAGE, start + run)
            new[start:end] ^= _differ(rng, end - start)
    elif mode == "all":
        new ^= _differ(rng, PAGE)
    elif mode == "unrelated":
        new = rng.integers(0, 256, PAGE, dtype=np.uint8)
    elif mode == "dense":
        # Many short runs: stresses run counts and overflow near 4096 bytes.
        p = draw(st.sampled_from([0.05, 0.2, 0.4, 0.5, 0.7]))
        mask = rng.random(PAGE) < p
        new[mask] ^= _differ(rng, int(mask.sum()))
    return old.tobytes(), new.tobytes()


@st.composite
def page_batches(draw: st.DrawFn, max_pages: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(old, new) uint8 arrays of shape (n, 4096), n in 0..max_pages."""
    pairs = draw(st.lists(page_pairs(), max_size=max_pages))
    old = np.frombuffer(b"".join(p[0] for p in pairs), dtype=np.uint8).reshape(-1, PAGE).copy()
    new = np.frombuffer(b"".join(p[1] for p in pairs), dtype=np.uint8).reshape(-1, PAGE).copy()
    return old, new


@st.composite
def mangled_encodings(draw: st.DrawFn) -> bytes:
    """Byte strings near valid encodings: truncated, spliced or bit-flipped."""
    from savevm_xbzrle.codec import encode

    kind = draw(st.sampled_from(["random", "truncate", "flip", "append", "fields"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "fields":
        # Hand-assembled ULEB fields, valid or not, with short data.
        parts = []
        for _ in range(draw(st.integers(1, 6))):
            first = draw(st.integers(0, 255))
            parts.append(bytes([first]))
            if first & 0x80:
                parts.append(bytes([draw(st.integers(0, 255))]))
            parts.append(draw(st.binary(max_size=4)))
        return b"".join(parts)
    old, new = draw(page_pairs())
    enc = encode(old, new) or b""
    if kind == "truncate" and enc:
        return enc[: draw(st.integers(0, len(enc) - 1))]
    if kind == "flip" and enc:
        pos = draw(st.integers(0, len(enc) - 1))
        bit = draw(st.integers(0, 7))
        return enc[:pos] + bytes([enc[pos] ^ (1 << bit)]) + enc[pos + 1 :]
    return enc + draw(st.binary(max_size=4))


ages = st.integers(0, 12)


@st.composite
def cache_workloads(draw: st.DrawFn) -> tuple[int, list[tuple[int, list[int], list[bool]]]]:
    """(cache_pages, steps): each step is (age, addresses, zero flags).

    Addresses come from a small pool that collides heavily in a small cache,
    so same-slot conflicts inside one batch are common.  Ages never decrease,
    like QEMU's dirty_sync_count.
    """
    cache_pages = draw(st.sampled_from([1, 2, 4, 8]))
    pool = [k * PAGE for k in range(3 * cache_pages + 2)]
    age = 0
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        age += draw(st.integers(0, 2))
        addrs = draw(st.lists(st.sampled_from(pool), max_size=10))
        zeros = draw(st.lists(st.booleans(), min_size=len(addrs), max_size=len(addrs)))
        steps.append((age, addrs, zeros))
    return cache_pages, steps
