"""MigrationStats: the shape of QMP ``query-migrate``."""

from __future__ import annotations

import json
from typing import Any

import attrs


@attrs.define
class MigrationStats:
    """A point-in-time view of a migration, as ``query-migrate`` reports it.

    Times are milliseconds; ``ram`` and ``xbzrle_cache`` are the dicts the
    RAM section and the XBZRLE codec report, with QMP's hyphenated keys.
    """

    status: str = "none"
    total_time: int | None = None
    expected_downtime: int | None = None
    downtime: int | None = None
    setup_time: int | None = None
    ram: dict[str, Any] | None = None
    xbzrle_cache: dict[str, Any] | None = None
    compression: dict[str, Any] | None = None
    cpu_throttle_percentage: int | None = None
    error_desc: str | None = None
    #: savevm extras (not in QMP): iteration count and bytes of the whole stream
    iterations: int | None = None
    stream_bytes: int | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    def as_qmp(self) -> dict[str, Any]:
        """A dict with QMP's key names, leaving out what is not set (as QMP does)."""
        out: dict[str, Any] = {"status": self.status}
        for key in ("total_time", "expected_downtime", "downtime", "setup_time", "ram", "xbzrle_cache",
                    "compression", "cpu_throttle_percentage", "error_desc", "iterations", "stream_bytes"):
            v = getattr(self, key)
            if v is not None:
                out[key.replace("_", "-")] = v
        out.update(self.extra)
        return out

    def to_json(self) -> str:
        """One JSON object (for ``--json``)."""
        return json.dumps(self.as_qmp(), sort_keys=False)
