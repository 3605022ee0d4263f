"""When a live migration stops iterating, and how it makes a busy program converge.

QEMU measures the bandwidth over windows of at least 100 ms
(``migration_update_counters``), allows ``threshold = bandwidth ×
downtime-limit`` bytes to be left for the pause, and iterates while more is
pending.  When the program dirties memory faster than half of what is sent
in two consecutive >= 1 s periods, auto-converge throttles it, 20% first and
10% more each time (``migration_trigger_throttle``).

:class:`Convergence` holds that policy and its figures for one migration, so
the migration thread only asks "iterate again?" and reports what it sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from savevm.qemufile import BUFFER_DELAY

if TYPE_CHECKING:
    from savevm.config import MigrationConfig


class Convergence:
    """Bandwidth windows, the stop threshold and auto-converge for one migration (source side)."""

    def __init__(self, config: Callable[[], MigrationConfig], set_throttle: Callable[[int], None],
                 log: Any) -> None:
        #: the migration's current config (parameters change while it runs)
        self._config = config
        self._set_throttle = set_throttle
        self.log = log
        #: bytes per ms over the last window
        self.bandwidth = 0.0
        #: bytes that may be left for the pause (0 until the first window closes, as in QEMU)
        self.threshold_size = 0
        #: ms the pause would take if it started now
        self.expected_downtime: int | None = None
        self.mbps = 0.0
        self.throttle_percentage = 0
        #: the highest throttle applied (the live value returns to 0 at the end)
        self.max_throttle_percentage = 0
        self._dirty_rate_high_cnt = 0
        self._window_start = time.monotonic()
        self._window_bytes = 0

    # ------------------------------------------------------------ the stop rule
    def start(self, stream_pos: int) -> None:
        """The first window begins (after setup)."""
        self._window_start = time.monotonic()
        self._window_bytes = stream_pos

    def should_iterate(self, pending: int) -> bool:
        """Iterate again while pending bytes do not fit in the threshold (QEMU's rule)."""
        return bool(pending) and pending >= self.threshold_size

    def update(self, stream_pos: int, pending: int) -> None:
        """Once per loop, after the rate-limit wait: close the window if 100 ms have passed.

        Waiting out the window first matters: counting after the next iterate
        measured up to two budgets per 100 ms, which doubled the bandwidth and
        the threshold and started completion with too much pending.
        """
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed < BUFFER_DELAY:
            return
        sent = stream_pos - self._window_bytes
        self.bandwidth = sent / (elapsed * 1000)
        self.threshold_size = int(self.bandwidth * self._config().parameters.downtime_limit)
        self.mbps = sent * 8 / elapsed / 1e6
        if self.bandwidth > 0:
            self.expected_downtime = int(pending / self.bandwidth)
        self.log.debug("migrate_transferred", bytes=sent, ms=round(elapsed * 1000, 1),
                       bandwidth=round(self.bandwidth, 1), threshold=self.threshold_size,
                       expected_downtime=self.expected_downtime)
        self._window_start = now
        self._window_bytes = stream_pos

    # ------------------------------------------------------------ auto-converge
    def dirty_period(self, dirty_bytes: int, xfer_bytes: int) -> None:
        """A >= 1 s dirty-rate period closed: throttle if the program outruns the link twice running."""
        cfg = self._config()
        if not cfg.has("auto-converge"):
            return
        p = cfg.parameters
        threshold = xfer_bytes * p.throttle_trigger_threshold / 100
        if dirty_bytes <= threshold:
            return
        self._dirty_rate_high_cnt += 1
        if self._dirty_rate_high_cnt < 2:
            return
        self._dirty_rate_high_cnt = 0
        if self.throttle_percentage == 0:
            pct = p.cpu_throttle_initial
        else:
            pct = min(self.throttle_percentage + p.cpu_throttle_increment, p.max_cpu_throttle)
        self.throttle_percentage = pct
        self.max_throttle_percentage = max(self.max_throttle_percentage, pct)
        self.log.info("migration_throttle", percent=pct, dirty_bytes=dirty_bytes, xfer_bytes=xfer_bytes)
        self._set_throttle(pct)

    def reset_throttle(self) -> None:
        """The migration ended: the live throttle returns to 0 (the maximum stays in the stats)."""
        self.throttle_percentage = 0
