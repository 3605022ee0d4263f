"""When a live migration stops iterating, and how it makes a busy program converge.

QEMU measures the bandwidth over windows of at least 100 ms
(``migration_update_counters``), allows ``threshold = bandwidth ×
downtime-limit`` bytes to be left for the pause, and iterates while more is
pending.  QEMU's blind spot: bytes that left the source but sit in socket
buffers or in the destination's queue are not pending to it, yet the pause
lasts until the destination has loaded them.  A savevm destination reports
what it has loaded (PROGRESS over the return path), so here what is in
flight counts as pending, and the rate that matters is the slower of the
source's sending and the destination's loading.  When the program dirties memory faster than half of what is sent
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
        #: bytes sent but not yet loaded by the destination (0 without its PROGRESS)
        self.in_flight = 0
        #: the destination's load rate, bytes per ms (None until two PROGRESS reports)
        self.dest_rate: float | None = None
        self._last_progress: tuple[int, float] | None = None
        #: the expected downtime (ms) when the source decided to stop, for the final stats
        self.expected_downtime_at_stop: int | None = None

    # ------------------------------------------------------------ the stop rule
    def start(self, stream_pos: int) -> None:
        """The first window begins (after setup)."""
        self._window_start = time.monotonic()
        self._window_bytes = stream_pos

    def should_iterate(self, pending: int) -> bool:
        """Iterate again while what is pending, in flight included, does not fit in the threshold."""
        total = pending + self.in_flight
        go_on = bool(pending) and total >= self.threshold_size
        if not go_on:
            rate = self._effective_rate()
            self.expected_downtime_at_stop = int(total / rate) if rate > 0 else self.expected_downtime
        return go_on

    def _effective_rate(self) -> float:
        """Bytes per ms the pause will move: the slower of sending and the destination's loading."""
        if self.dest_rate is not None and self.dest_rate > 0:
            return min(self.bandwidth, self.dest_rate) if self.bandwidth > 0 else self.dest_rate
        return self.bandwidth

    def destination_progress(self, stream_pos: int, loaded_bytes: int, at: float) -> None:
        """The destination's latest PROGRESS: what it had loaded at monotonic time ``at``.

        Its rate is measured only while it had data waiting (something was
        in flight), so an idle destination does not look slow.
        """
        self.in_flight = max(0, stream_pos - loaded_bytes)
        last = self._last_progress
        if last is not None and at > last[1] and loaded_bytes > last[0]:
            rate = (loaded_bytes - last[0]) / ((at - last[1]) * 1000)
            if self.in_flight > 0:
                self.dest_rate = rate if self.dest_rate is None else 0.5 * self.dest_rate + 0.5 * rate
        if last is None or at > last[1]:
            self._last_progress = (loaded_bytes, at)

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
        rate = self._effective_rate()
        self.threshold_size = int(rate * self._config().parameters.downtime_limit)
        self.mbps = sent * 8 / elapsed / 1e6
        if rate > 0:
            self.expected_downtime = int((pending + self.in_flight) / rate)
        self.log.debug("migrate_transferred", bytes=sent, ms=round(elapsed * 1000, 1),
                       bandwidth=round(self.bandwidth, 1), dest_rate=self.dest_rate, in_flight=self.in_flight,
                       threshold=self.threshold_size, expected_downtime=self.expected_downtime)
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
