"""Page fingerprints: one 64-bit number per 4 KiB page, computed by numpy at ~5 GB/s.

A fingerprint is the sum, modulo 2**64, of each 64-bit word of the page
times a fixed odd multiplier for its position.  Any change confined to one
word always changes it (odd multipliers are invertible modulo 2**64), and
unrelated changes collide with probability about 2**-64.  It is not a
cryptographic hash: it guards against accidents (a program writing around
the dirty tracker, a transport bug), not against a forger, and it is fast
enough to run on every page of a migration.

Both sides of a ``verify`` migration compute it, so the multipliers are
fixed by this module (SplitMix64 from a constant seed), not by a random
generator whose stream could change between numpy versions.
"""

from __future__ import annotations

import hashlib

import numpy as np

from savevm_ram.wire import PAGE_SIZE

_WORDS = PAGE_SIZE // 8
_MASK = (1 << 64) - 1


def _splitmix64(seed: int, n: int) -> list[int]:
    out = []
    x = seed
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & _MASK
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        out.append((z ^ (z >> 31)) | 1)  # odd: every word position is invertible
    return out


MULTIPLIERS = np.array(_splitmix64(0x73766D6670, _WORDS), dtype=np.uint64)
#: the fingerprint of an all-zero page (zero pages need no arithmetic)
ZERO_FINGERPRINT = 0


def fingerprints(pages: np.ndarray) -> np.ndarray:
    """Fingerprints of an (n, 4096) uint8 array of pages (any C-contiguous rows)."""
    w = pages.reshape(len(pages), PAGE_SIZE).view(np.uint64)
    out: np.ndarray = np.einsum("ij,j->i", w, MULTIPLIERS)
    return out


def fingerprints_at(view: np.ndarray, idx: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Fingerprints of pages ``idx`` of an (n, 4096) view, gathered ``chunk`` pages at a time.

    ``view[idx]`` gathers into a new array; a whole sample at once (32 MiB
    for 8192 pages) is fresh memory the kernel must fault in on every call,
    which cost the audit 90 ms at a migration's first sync.  A 1 MiB
    temporary is reused by the allocator from chunk to chunk.
    """
    out = np.empty(len(idx), dtype=np.uint64)
    for i in range(0, len(idx), chunk):
        out[i : i + chunk] = fingerprints(view[idx[i : i + chunk]])
    return out


def block_fingerprints(host: np.ndarray, n_pages: int, chunk: int = 1024) -> np.ndarray:
    """Fingerprints of the first ``n_pages`` pages of a block, in 4 MiB steps (bounded temporaries)."""
    out = np.empty(n_pages, dtype=np.uint64)
    view = host[: n_pages * PAGE_SIZE].reshape(n_pages, PAGE_SIZE)
    for i in range(0, n_pages, chunk):
        out[i : i + chunk] = fingerprints(view[i : i + chunk])
    return out


def digest(fps: np.ndarray) -> str:
    """One hex digest of a block from its page fingerprints (what the two sides compare)."""
    return hashlib.blake2b(np.ascontiguousarray(fps, dtype="<u8").tobytes(), digest_size=16).hexdigest()
