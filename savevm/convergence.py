"""When a live migration stops iterating, and how it makes a busy program converge.

QEMU measures the bandwidth over windows of at least 100 ms
(``migration_update_counters``), allows ``threshold = bandwidth ×
downtime-limit`` bytes to be left for the pause, and iterates while more is
pending.  Two blind spots of QEMU's rule are closed here:

* **What is pending costs wire bytes, not RAM bytes.**  QEMU counts dirty
  pages × 4 KiB even when each will travel as a 20-byte XBZRLE delta, so a
  program that rewrites a few bytes of many pages never converges although
  the pause would be short.  Live sections report what their pending state
  is expected to cost on the wire
  (:meth:`~savevm.handlers.SaveVMHandlers.save_live_pending_wire`, measured
  from the last iterations), and with ``x-pending-estimate=wire`` (the
  default) that figure decides; ``qemu`` restores QEMU's rule.  Both are
  kept in :class:`Pending` and reported.
* **What is in flight is pending too.**  Bytes that left the source but sit
  in socket buffers or in the destination's queue are not pending to QEMU,
  yet the pause lasts until the destination has loaded them.  A savevm
  destination reports what it has loaded (PROGRESS over the return path),
  so here they count, and the rate that matters is the slower of the
  source's sending and the destination's loading.  And the source does not
  run more than two chunks ahead of a slower destination
  (:meth:`Convergence.pace`): a backlog queued in socket buffers only makes
  the pause longer, and the stop rule rightly never pauses on top of one.
* **The pause begins with a sync.**  Before the last pages go, the dirty
  state is synced once more (and, for RAM, the tracker audited); the stop
  rule budgets as long as the longest of the last syncs took, so the threshold is
  ``rate × (limit − sync time)`` and the expected downtime
  ``max(sync time, in flight / rate) + pending / rate`` (the destination
  loads what is in flight while the source syncs).  The sending rate is the
  slower of the last two windows, so one fast window does not start a
  pause that the next would have shown too long.

And three controls for a migration that still does not converge:

* **auto-converge** (QEMU's ``migration_trigger_throttle``): when the
  program dirties memory faster than half of what is sent in two
  consecutive >= 1 s periods, throttle it, 20% first and 10% more each time;
* **a downtime ramp** (``x-downtime-ramp``): the limit starts low and rises
  step by step while the migration keeps iterating;
* **stall detection**: after ``x-stall-iterations`` passes over dirty memory
  in a row without the pending wire bytes falling ``x-stall-reduction``
  percent below the best so far, log ``migration_stalled`` and apply
  ``x-stall-policy`` (``throttle``: auto-converge even if the capability is
  off; ``fail``: the migration fails and the source keeps running;
  ``continue``).  Passes (a section went through everything that was dirty,
  then synced), not loop iterations, are compared: within a pass what is
  pending only falls as pages go out, and rises again at the next sync, so
  only the level each pass ends on says whether the program is being caught
  up with.

:class:`Convergence` holds that policy and its figures for one migration, so
the migration thread only asks "iterate again?" and reports what it sent;
it also keeps the canonical per-iteration records (:class:`IterationRecord`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from savevm.errors import MigrationStalled
from savevm.qemufile import BUFFER_DELAY

if TYPE_CHECKING:
    from savevm.config import MigrationConfig

#: Records kept per migration (about 10 per second while iterating); the oldest go first beyond this.
MAX_RECORDS = 50_000

#: Pacing: the source keeps at most this many of its last chunks in flight (the destination reports
#: PROGRESS per loaded chunk, at most every 20 ms, so one report may be missed) ...
PACE_CHUNKS = 2
#: ... but never holds back below this many bytes, nor waits longer than PACE_MAX_WAIT per iteration
#: (a silent peer is x-stall-timeout's business).
PACE_MIN_BYTES = 256 << 10
PACE_MAX_WAIT = 0.5

#: A destination whose last PROGRESS report is older than this (seconds) is not waited for.
PROGRESS_FRESH = 0.25

#: The latest PROGRESS as the return path keeps it: (stream bytes loaded, pages, load ns, time received).
Progress = tuple[int, int, int, float]

class ProgressSource(Protocol):
    """What pacing needs of the return path: the latest PROGRESS, and a wait for a condition on it."""

    progress: Progress | None

    def wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Block until ``ready()`` or ``timeout`` seconds; return ``ready()``."""
        ...


#: How long the loop idles when nothing is pending but the destination is still loading a backlog
#: that would not fit in the pause.
DRAIN_WAIT = 0.01

#: Syncs whose longest duration is budgeted for the pause's own (some syncs do more work than others, e.g.
#: the RAM section's tracker audit, and the final one always does).
SYNC_HISTORY = 16


@attrs.frozen
class Pending:
    """What the live sections still have to send, two ways.

    ``ram`` is QEMU's figure (dirty pages × page size: what ``ram.remaining``
    reports); ``wire`` is what those pages are expected to cost on the wire.
    ``estimate`` says which one the stop rule uses (``x-pending-estimate``).
    """

    ram: int
    wire: int
    estimate: str = "wire"

    @property
    def decisive(self) -> int:
        """The figure the stop rule compares with the threshold."""
        return self.ram if self.estimate == "qemu" else self.wire

    def __bool__(self) -> bool:
        return bool(self.ram or self.wire)


@attrs.frozen
class IterationRecord:
    """The canonical record of one iteration of the migration loop (or of the final pass).

    Emitted as the ``migration_iteration`` event and kept in
    :attr:`savevm.migration.Migration.records`.  Sizes are bytes, rates
    bytes per second, times milliseconds.
    """

    #: 1, 2, ... for iterations; the last record (``stage == "complete"``) follows the last iteration
    iteration: int
    #: ms since the migration started
    time_ms: int
    #: "iterate" while the program runs, "complete" for the final pass with the program paused
    stage: str
    #: pages sent in this iteration, by kind (``zero``, ``normal``, a codec's name, ``transport``)
    pages: Mapping[str, int]
    #: bytes those pages cost on the wire, by kind
    bytes: Mapping[str, int]
    #: what was pending before the iteration: QEMU's dirty bytes, and the expected wire bytes
    pending_ram: int
    pending_wire: int
    #: the figure that decided (``x-pending-estimate``)
    estimate: str
    #: bytes sent but not yet loaded by the destination
    in_flight: int
    #: bytes allowed for the pause (bandwidth × downtime limit)
    threshold: int
    #: the downtime limit in force (``downtime-limit``, or the ramp's current step)
    downtime_limit: int
    #: the rate the pause will move data at (the slower of sending and the destination's loading)
    bandwidth: int
    #: ms the pause would take if it started now
    expected_downtime: int | None
    #: bytes of memory the program dirtied per second (last >= 1 s period)
    dirty_rate: int
    #: percent of CPU taken from the program by auto-converge
    throttle: int
    #: dirty-state syncs so far
    syncs: int
    #: passes over dirty memory completed so far (the bulk copy is the first)
    passes: int = 0
    #: times the migration was found stalled so far
    stalls: int = 0
    #: measured pause (``complete`` record only)
    downtime: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-ready), keys as the attribute names."""
        d = attrs.asdict(self)
        d["pages"] = dict(self.pages)
        d["bytes"] = dict(self.bytes)
        return d


class Convergence:
    """Bandwidth windows, the stop threshold, the ramp, stall detection and auto-converge (source side)."""

    def __init__(self, config: Callable[[], MigrationConfig], set_throttle: Callable[[int], None],
                 log: Any, clock: Callable[[], float] = time.monotonic) -> None:
        #: the migration's current config (parameters change while it runs)
        self._config = config
        #: monotonic seconds (a test may drive its own clock)
        self._clock = clock
        self._set_throttle = set_throttle
        self.log = log
        #: bytes per ms over the last window
        self.bandwidth = 0.0
        #: bytes per ms the source sends as the stop rule counts it: the slower of the last two windows
        self.send_rate = 0.0
        #: bytes that may be left for the pause (0 until the first window closes, as in QEMU)
        self.threshold_size = 0
        #: ms the pause would take if it started now
        self.expected_downtime: int | None = None
        self.mbps = 0.0
        self.throttle_percentage = 0
        #: the highest throttle applied (the live value returns to 0 at the end)
        self.max_throttle_percentage = 0
        self._dirty_rate_high_cnt = 0
        self._t0 = self._clock()
        self._window_start = self._t0
        self._window_bytes = 0
        #: bytes sent but not yet loaded by the destination (0 without its PROGRESS)
        self.in_flight = 0
        #: the destination's load rate, bytes per ms (None until two PROGRESS reports)
        self.dest_rate: float | None = None
        self._last_progress: tuple[int, float] | None = None
        self._paced_pos = 0
        #: the expected downtime (ms) when the source decided to stop, for the final stats
        self.expected_downtime_at_stop: int | None = None
        #: what was pending at the last decision
        self.last_pending = Pending(0, 0)
        #: bytes of memory dirtied per second over the last >= 1 s period
        self.dirty_rate = 0
        self._last_period_at = self._t0
        # passes over dirty memory, the downtime ramp and stall detection
        #: dirty-state syncs so far (the setup's first one included)
        self.syncs = 0
        #: passes over dirty memory completed (the bulk copy is the first)
        self.passes = 0
        #: ms a sync takes (the longest of the last :data:`SYNC_HISTORY`): the pause starts with one more
        self.sync_ms = 0.0
        self._sync_times: collections.deque[float] = collections.deque(maxlen=SYNC_HISTORY)
        self._checked_passes = 0
        self._ramp_clock: float | None = None
        #: the downtime limit last used for the threshold (ms)
        self.downtime_limit_ms = self._config().parameters.downtime_limit
        #: raises the ramp has made so far
        self.ramp_steps = 0
        self._best_wire: int | None = None
        self._stall_streak = 0
        #: times the migration was found stalled
        self.stalls = 0
        #: auto-converge runs although the capability is off (x-stall-policy=throttle fired)
        self.auto_converge_forced = False
        #: the canonical per-iteration records
        self.records: collections.deque[IterationRecord] = collections.deque(maxlen=MAX_RECORDS)
        self._sent_before: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------ the stop rule
    def start(self, stream_pos: int, started_at: float | None = None) -> None:
        """The first window begins (after setup); records count time from ``started_at`` (monotonic)."""
        if started_at is not None:
            self._t0 = started_at
        self._window_start = self._clock()
        self._window_bytes = stream_pos
        self._last_period_at = self._window_start
        self.downtime_limit_ms = self.downtime_limit()

    def should_iterate(self, pending: Pending | int) -> bool:
        """Iterate again while what is pending, in flight included, does not fit in the threshold.

        Raises :class:`~savevm.errors.MigrationStalled` when the migration
        stalled and ``x-stall-policy`` is ``fail``.
        """
        if isinstance(pending, int):
            pending = Pending(pending, pending, "qemu")
        self.last_pending = pending
        if self.passes != self._checked_passes:
            self._checked_passes = self.passes
            self._new_pass(pending)
        rate = self._effective_rate()
        carried = self._carried(rate)
        total = pending.decisive + carried
        go_on = total >= self.threshold_size if pending else (carried >= max(self.threshold_size, 1)
                                                              and self._destination_loading())
        if go_on and not pending:
            # nothing left to send, but the destination is still far behind: pausing now would make the
            # program wait for that backlog; let it drain (briefly: the next sync may find new dirt)
            time.sleep(DRAIN_WAIT)
        elif not go_on:
            self.expected_downtime_at_stop = (int(self.sync_ms + total / rate) if rate > 0
                                              else self.expected_downtime)
        return go_on

    def _destination_loading(self) -> bool:
        """Did a PROGRESS report come lately?  Waiting on a destination that went silent only delays the
        failure its silence will cause (``x-stall-timeout`` fires on a write that blocks)."""
        last = self._last_progress
        return last is not None and self._clock() - last[1] < PROGRESS_FRESH

    def _carried(self, rate: float) -> int:
        """In-flight bytes the destination will still be loading when the pause's sync is over.

        It loads while the source syncs, so the pause takes
        ``max(sync, in flight / rate) + pending / rate``: what is in flight
        counts only beyond what the sync's time drains.
        """
        return max(0, self.in_flight - int(rate * self.sync_ms))

    def _effective_rate(self) -> float:
        """Bytes per ms the pause will move: the slower of sending and the destination's loading."""
        if self.dest_rate is not None and self.dest_rate > 0:
            return min(self.send_rate, self.dest_rate) if self.send_rate > 0 else self.dest_rate
        return self.send_rate

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

    def pace(self, stream_pos: int, rp: ProgressSource) -> None:
        """Hold back while more than :data:`PACE_CHUNKS` chunks are in flight.

        A destination that loads slower than the source sends (XBZRLE
        records are cheap to write and dear to apply one at a time) would
        otherwise collect a backlog of megabytes in socket buffers, which
        the pause would have to wait for, so the stop rule would never
        pause.  Pages kept back are sent later and fresher instead.  ``rp``
        is the return path (its latest PROGRESS, and its wait).
        """
        chunk = stream_pos - self._paced_pos
        self._paced_pos = stream_pos
        if self.dest_rate is None or not self._destination_loading():
            return  # no PROGRESS from this destination (a QEMU), or none lately: nothing to pace on
        bound = max(PACE_CHUNKS * chunk, PACE_MIN_BYTES)
        if self.in_flight <= bound:
            return
        target = stream_pos - bound

        def caught_up() -> bool:
            p = rp.progress
            return p is not None and p[0] >= target

        last = self._last_progress
        fresh_until = (last[1] if last is not None else self._clock()) + PROGRESS_FRESH
        # a report per loaded chunk: when none comes for PROGRESS_FRESH, stop waiting (and pacing)
        rp.wait(caught_up, min(PACE_MAX_WAIT, max(fresh_until - self._clock(), 0.0) + 0.01))
        p = rp.progress
        if p is not None:
            self.destination_progress(stream_pos, p[0], p[3])

    def update(self, stream_pos: int, pending: Pending | int) -> None:
        """Once per loop, after the rate-limit wait: close the window if 100 ms have passed.

        Waiting out the window first matters: counting after the next iterate
        measured up to two budgets per 100 ms, which doubled the bandwidth and
        the threshold and started completion with too much pending.
        """
        if isinstance(pending, int):
            pending = Pending(pending, pending, "qemu")
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < BUFFER_DELAY:
            return
        sent = stream_pos - self._window_bytes
        last, self.bandwidth = self.bandwidth, sent / (elapsed * 1000)
        # the slower of the last two windows: stopping on the one window that happened to run fast would
        # start a pause the next would have shown too long, and a drop (the bulk copy ending) counts at once
        self.send_rate = min(last, self.bandwidth) if last > 0 else self.bandwidth
        rate = self._effective_rate()
        self.downtime_limit_ms = self.downtime_limit(now)
        # at least one byte: with 0, nothing would ever re-sync, so a pass that ran dry would read as
        # "nothing pending" and start the pause with everything dirtied since
        self.threshold_size = max(int(rate * max(self.downtime_limit_ms - self.sync_ms, 0)), 1)
        self.mbps = sent * 8 / elapsed / 1e6
        if rate > 0:
            self.expected_downtime = int(self.sync_ms + (pending.decisive + self._carried(rate)) / rate)
        self.log.debug("migrate_transferred", bytes=sent, ms=round(elapsed * 1000, 1),
                       bandwidth=round(self.bandwidth, 1), dest_rate=self.dest_rate, in_flight=self.in_flight,
                       threshold=self.threshold_size, expected_downtime=self.expected_downtime)
        self._window_start = now
        self._window_bytes = stream_pos

    # ------------------------------------------------------------ passes: ramp and stalls
    def on_sync(self, seconds: float = 0.0, pass_done: bool = True) -> None:
        """A live section synced its dirty state in ``seconds``; ``pass_done``: a pass over dirty memory ended.

        The first pass is the bulk copy; the downtime ramp's clock starts
        when it ends, since until every page has gone once nothing says the
        migration fails to converge.
        """
        self.syncs += 1
        self._sync_times.append(seconds * 1000)
        self.sync_ms = max(self._sync_times)
        if pass_done:
            self.passes += 1
            if self._ramp_clock is None:
                self._ramp_clock = self._clock()

    def downtime_limit(self, now: float | None = None) -> int:
        """The downtime limit in force (ms): ``downtime-limit``, or the ramp's step when one is set.

        Logs ``migration_downtime_ramp`` when the ramp has just raised it.
        """
        p = self._config().parameters
        ramp = p.downtime_ramp
        if ramp is None:
            return int(p.downtime_limit)
        if self._ramp_clock is None:
            return ramp.start
        elapsed_ms = ((self._clock() if now is None else now) - self._ramp_clock) * 1000
        steps = int(elapsed_ms // ramp.interval)
        limit = ramp.limit_after(elapsed_ms)
        if steps > self.ramp_steps and limit != self.downtime_limit_ms:
            self.ramp_steps = steps
            self.log.info("migration_downtime_ramp", old=self.downtime_limit_ms, new=limit, step=steps,
                          ceiling=ramp.ceiling, interval=ramp.interval)
        return limit

    def _new_pass(self, pending: Pending) -> None:
        """A sync just found ``pending``: did the last passes make progress?"""
        p = self._config().parameters
        wire = pending.wire
        best = self._best_wire
        if best is None or wire <= best * (100 - p.x_stall_reduction) / 100:
            self._best_wire = wire
            self._stall_streak = 0
            return
        self._stall_streak += 1
        if self._stall_streak < p.x_stall_iterations:
            return
        self._stall_streak = 0
        self.stalls += 1
        policy = p.x_stall_policy
        extra: dict[str, Any] = {}
        if self.throttle_percentage and self.throttle_percentage >= p.max_cpu_throttle:
            # nothing left for auto-converge to do: say what the user can change, once per stall
            extra["hint"] = (f"the program is throttled to its ceiling (max-cpu-throttle {p.max_cpu_throttle}%) and "
                             "still dirties memory faster than the link drains it: raise max-bandwidth or "
                             "downtime-limit, set x-downtime-ramp, or x-stall-policy=fail to give up")
        self.log.warning("migration_stalled", passes=p.x_stall_iterations, pending_wire=wire, best_wire=best,
                         reduction=p.x_stall_reduction, policy=policy, passes_done=self.passes, syncs=self.syncs,
                         stalls=self.stalls, throttle=self.throttle_percentage, **extra)
        if policy == "fail":
            raise MigrationStalled(
                f"migration stalled: {p.x_stall_iterations} passes over dirty memory in a row without the "
                f"pending wire bytes falling {p.x_stall_reduction}% below {best} (now {wire}); "
                "x-stall-policy=fail: the source keeps running")
        if policy == "throttle" and not self.auto_converge_forced:
            self.auto_converge_forced = True
            self.log.info("migration_stall_auto_converge", reason="x-stall-policy=throttle")

    # ------------------------------------------------------------ records
    def record(self, iteration: int, sent_by_kind: Mapping[str, tuple[int, int]], *, stage: str = "iterate",
               downtime: int | None = None) -> IterationRecord:
        """The canonical record of the iteration just done; logged as ``migration_iteration`` and kept.

        ``sent_by_kind`` is cumulative (what the sections report); the
        record holds this iteration's share.
        """
        pages: dict[str, int] = {}
        nbytes: dict[str, int] = {}
        for kind, (n, b) in sent_by_kind.items():
            n0, b0 = self._sent_before.get(kind, (0, 0))
            if n - n0 or b - b0:
                pages[kind] = n - n0
                nbytes[kind] = b - b0
        self._sent_before = dict(sent_by_kind)
        pend = self.last_pending
        # the record of the pause carries the prediction the stop was made on (what stats report), not
        # the last window's: that one priced what was pending before the final iteration's sends
        expected = (self.expected_downtime_at_stop if downtime is not None and self.expected_downtime_at_stop
                    is not None else self.expected_downtime)
        rec = IterationRecord(
            iteration=iteration, time_ms=int((self._clock() - self._t0) * 1000), stage=stage,
            pages=pages, bytes=nbytes, pending_ram=pend.ram, pending_wire=pend.wire, estimate=pend.estimate,
            in_flight=self.in_flight, threshold=self.threshold_size, downtime_limit=self.downtime_limit_ms,
            bandwidth=int(self._effective_rate() * 1000), expected_downtime=expected,
            dirty_rate=self.dirty_rate, throttle=self.throttle_percentage, syncs=self.syncs, passes=self.passes,
            stalls=self.stalls,
            downtime=downtime)
        self.records.append(rec)
        self.log.info("migration_iteration", **rec.as_dict())
        return rec

    # ------------------------------------------------------------ auto-converge
    def dirty_period(self, dirty_bytes: int, xfer_bytes: int) -> None:
        """A >= 1 s dirty-rate period closed: throttle if the program outruns the link twice running."""
        now = self._clock()
        if now > self._last_period_at:
            self.dirty_rate = int(dirty_bytes / (now - self._last_period_at))
        self._last_period_at = now
        cfg = self._config()
        if not (cfg.has("auto-converge") or self.auto_converge_forced):
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

    def query(self) -> dict[str, Any]:
        """The ``convergence`` member of query-migrate (savevm's own)."""
        pend = self.last_pending
        p = self._config().parameters
        out: dict[str, Any] = {
            "pending-estimate": p.x_pending_estimate,
            "pending-bytes": pend.ram,
            "pending-wire-bytes": pend.wire,
            "threshold-bytes": self.threshold_size,
            "downtime-limit": self.downtime_limit_ms,
            "dirty-syncs": self.syncs,
            "passes": self.passes,
            "stalls": self.stalls,
            "auto-converge-forced": self.auto_converge_forced,
        }
        ramp = p.downtime_ramp
        if ramp is not None:
            out["downtime-ramp"] = {"schedule": str(ramp), "limit": self.downtime_limit_ms, "steps": self.ramp_steps}
        return out
