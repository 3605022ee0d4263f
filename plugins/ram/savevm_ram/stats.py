"""RAM counters, shaped like the ``ram`` object of QMP query-migrate."""

from __future__ import annotations

from typing import Any

import attrs

from savevm_ram.wire import PAGE_SIZE


@attrs.define
class RAMCounters:
    """QEMU's ram_counters (source) plus what the destination counts."""

    transferred: int = 0
    total: int = 0
    duplicate: int = 0
    normal: int = 0
    #: pages sent through a codec (XBZRLE, compressed, third-party)
    encoded: int = 0
    #: bytes of those pages' records (header + encoded body): what the codecs cost on the wire
    encoded_bytes: int = 0
    #: pages a transport took out of band (ram_control_save_page)
    control: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    pages_per_second: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    #: target pages handled (sent in any form, or skipped as unchanged)
    target_pages: int = 0
    #: destination: pages loaded
    loaded_pages: int = 0

    def as_qmp(self, remaining: int) -> dict[str, Any]:
        """The ``ram`` dict of query-migrate (``mbps`` is added by the migration)."""
        return {
            "transferred": self.transferred,
            "remaining": remaining,
            "total": self.total,
            "duplicate": self.duplicate,
            "skipped": 0,
            "normal": self.normal,
            "normal-bytes": self.normal * PAGE_SIZE,
            "dirty-pages-rate": self.dirty_pages_rate,
            "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": 0,
            "page-size": PAGE_SIZE,
            "multifd-bytes": 0,
            "pages-per-second": self.pages_per_second,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
            # savevm's own keys: pages a codec encoded (and their bytes), pages a transport carried
            # outside the stream (the rdma_stub transport's "remote writes")
            "encoded-pages": self.encoded,
            "encoded-bytes": self.encoded_bytes,
            "transport-pages": self.control,
        }
