"""What the RAM section's pending pages are expected to cost on the wire.

QEMU's stop rule counts dirty pages × 4 KiB.  A page does not cost that: a
zero page is a 9-byte record, an XBZRLE delta of a few changed bytes about
20 bytes, a compressed page its compressed size, and only the rest a full
4104-byte record.  The page pipeline counts, for every page it handles, the
kind it went out as and the bytes that took (:class:`SentTally`);
:class:`WireEstimator` keeps the last iterations' counts and prices the
pending pages with them:

    wire = sum over kinds k of  pending pages × share of k × bytes per page of k

where the shares and sizes are measured over a window of recent iterations
(XBZRLE's share is its cache hit rate, its size the encoded records; its
misses went out as ``normal`` pages and are priced as such; SKIP-ped
unchanged pages cost 0).  Extrapolation is bounded by evidence: a window
of fewer than :data:`MIN_SAMPLE_PAGES` pages prices only its share of the
pending pages at the measured rate and the rest at the raw record size;
and nothing measured during the bulk stage counts, because there pages
are sent for the first time (no cache, whatever share of zero pages that
part of memory has) and say nothing about the pages dirtied later.
Until the window has data the estimate is the raw one, QEMU's figure plus
the record headers.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

from savevm_ram.wire import PAGE_RECORD_SIZE

#: Iterations (each at most 50 ms of sending) whose counts price the pending pages.
WINDOW_ITERATIONS = 8
#: Pages the window must hold before its prices are trusted for all pending pages.
MIN_SAMPLE_PAGES = 1024


class SentTally:
    """Pages and bytes sent in one migration, by kind (``zero``, ``normal``, a codec's name, ``transport``).

    Cumulative; the pipeline adds to it as it writes records.
    """

    def __init__(self) -> None:
        self._pages: dict[str, int] = {}
        self._bytes: dict[str, int] = {}

    def add(self, kind: str, pages: int, nbytes: int) -> None:
        """``pages`` more pages of ``kind`` went out, costing ``nbytes`` on the wire."""
        if pages or nbytes:
            self._pages[kind] = self._pages.get(kind, 0) + pages
            self._bytes[kind] = self._bytes.get(kind, 0) + nbytes

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """``{kind: (pages, bytes)}`` so far."""
        return {k: (n, self._bytes.get(k, 0)) for k, n in self._pages.items()}


def tally_delta(now: Mapping[str, tuple[int, int]],
                before: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """What was sent between two snapshots, by kind (kinds with nothing new are left out)."""
    out: dict[str, tuple[int, int]] = {}
    for k, (n, b) in now.items():
        n0, b0 = before.get(k, (0, 0))
        if n != n0 or b != b0:
            out[k] = (n - n0, b - b0)
    return out


class WireEstimator:
    """Prices pending pages with what the last iterations after the bulk stage cost, kind by kind."""

    def __init__(self, window: int = WINDOW_ITERATIONS) -> None:
        self._window: collections.deque[dict[str, tuple[int, int]]] = collections.deque(maxlen=window)

    def add_iteration(self, sent: Mapping[str, tuple[int, int]]) -> None:
        """One iteration's pages and bytes by kind (after the bulk stage; empty iterations say nothing)."""
        if any(n for n, _ in sent.values()):
            self._window.append(dict(sent))

    def breakdown(self) -> dict[str, tuple[int, int]]:
        """``{kind: (pages, bytes)}`` summed over the window."""
        out: dict[str, tuple[int, int]] = {}
        for it in list(self._window):  # one C-level copy: query-migrate reads this from another thread
            for k, (n, b) in it.items():
                n0, b0 = out.get(k, (0, 0))
                out[k] = (n0 + n, b0 + b)
        return out

    def estimate(self, pending_pages: int) -> int:
        """Expected wire bytes of ``pending_pages`` dirty pages.

        Priced kind by kind at the window's shares and sizes; with fewer
        than :data:`MIN_SAMPLE_PAGES` pages in the window, only that
        fraction of them, and the rest at the raw record size.
        """
        if pending_pages <= 0:
            return 0
        seen = self.breakdown()
        total_pages = sum(n for n, _ in seen.values())
        if total_pages <= 0:
            return pending_pages * PAGE_RECORD_SIZE
        priced = pending_pages if total_pages >= MIN_SAMPLE_PAGES else pending_pages * total_pages // MIN_SAMPLE_PAGES
        wire = 0.0
        for n, b in seen.values():
            share = n / total_pages
            per_page = b / n if n else 0.0
            wire += priced * share * per_page
        return int(wire) + (pending_pages - priced) * PAGE_RECORD_SIZE

    def per_page(self) -> dict[str, dict[str, float]]:
        """Each kind's share of the window's pages and its bytes per page (for stats and tests)."""
        seen = self.breakdown()
        total = sum(n for n, _ in seen.values())
        return {k: {"share": round(n / total, 4) if total else 0.0, "bytes-per-page": round(b / n, 1) if n else 0.0}
                for k, (n, b) in seen.items()}
