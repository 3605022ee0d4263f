"""XBZRLE statistics as reported by QMP ``query-migrate`` (``xbzrle-cache``).

The counters are cumulative and, as in QEMU 7.2, are never reset between
migrations (docs/wire-format.md, XBZRLE); only the two rates are per period.
The RAM section updates the counters as pages are sent and calls
:meth:`XbzrleStats.update_rates` once per rate period (in QEMU: inside the
bitmap sync, when more than a second has passed since the last period).
"""

from __future__ import annotations

from typing import Any

import attrs

from savevm_ram.wire import PAGE_SIZE

__all__ = ["XbzrleStats"]



@attrs.define
class XbzrleStats:
    """The QMP ``XBZRLECacheStats`` fields, plus the period snapshots.

    ``bytes`` counts XBZRLE traffic excluding each record's 8-byte offset
    word, and 4096 per overflowed page; ``pages`` counts every cache hit
    (unchanged, encoded or overflowed); ``cache_miss`` every miss.
    """

    cache_size: int = 0
    bytes: int = 0
    pages: int = 0
    cache_miss: int = 0
    cache_miss_rate: float = 0.0
    encoding_rate: float = 0.0
    overflow: int = 0
    # Counter values at the end of the previous rate period.
    _prev_cache_miss: int = attrs.field(default=0, repr=False)
    _prev_pages: int = attrs.field(default=0, repr=False)
    _prev_bytes: int = attrs.field(default=0, repr=False)

    def update_rates(self, target_pages_sent_delta: int) -> None:
        """Close a rate period in which ``target_pages_sent_delta`` pages went out.

        ``cache_miss_rate`` = misses in the period / pages sent in the period;
        ``encoding_rate`` = (hits in the period * 4096) / XBZRLE bytes in the
        period, or 0 when the period had no hits or no bytes.  A period in
        which no page was sent changes nothing (QEMU returns early there, so
        the snapshots also stay and the next period spans both).
        """
        if target_pages_sent_delta <= 0:
            return
        self.cache_miss_rate = (self.cache_miss - self._prev_cache_miss) / target_pages_sent_delta
        self._prev_cache_miss = self.cache_miss
        encoded = self.bytes - self._prev_bytes
        hits = self.pages - self._prev_pages
        self.encoding_rate = 0.0 if hits == 0 or encoded == 0 else hits * PAGE_SIZE / encoded
        self._prev_pages = self.pages
        self._prev_bytes = self.bytes

    def as_qmp(self) -> dict[str, Any]:
        """The ``xbzrle-cache`` member of ``query-migrate``, hyphenated keys."""
        return {
            "cache-size": self.cache_size,
            "bytes": self.bytes,
            "pages": self.pages,
            "cache-miss": self.cache_miss,
            "cache-miss-rate": self.cache_miss_rate,
            "encoding-rate": self.encoding_rate,
            "overflow": self.overflow,
        }
