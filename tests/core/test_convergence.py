"""The stop rule and its controls (savevm.convergence): wire vs QEMU estimate, the downtime ramp,
stall detection and its policies, pacing, and the per-iteration records.

The Convergence object is driven directly here, on a clock of the test's
own, so nothing depends on how fast this machine is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import LogCapture

from savevm.config import DowntimeRamp, MigrationConfig, parse_downtime_ramp
from savevm.convergence import PACE_MAX_WAIT, Convergence, IterationRecord, Pending
from savevm.errors import ConfigError, MigrationStalled
from savevm.logging import get_logger


@pytest.fixture
def events() -> Iterator[LogCapture]:
    cap = LogCapture()
    old = structlog.get_config()
    structlog.configure(processors=[cap], wrapper_class=structlog.make_filtering_bound_logger(0))
    try:
        yield cap
    finally:
        structlog.configure(**old)


class Harness:
    """A Convergence with a config that can change and a throttle that is recorded."""

    def __init__(self, cfg: MigrationConfig | None = None) -> None:
        self.cfg = cfg or MigrationConfig()
        self.throttles: list[int] = []
        self.now = 1024.0  # binary fractions below (125 ms windows): exact arithmetic
        self.conv = Convergence(lambda: self.cfg, self.throttles.append, get_logger("savevm.test"),
                                clock=lambda: self.now)
        self.conv.start(0)

    def window(self, sent_bytes: int, ms: float, pending: Pending) -> None:
        """Close one bandwidth window in which ``sent_bytes`` went out over ``ms``."""
        self.now += ms / 1000
        self.conv.update(self.conv._window_bytes + sent_bytes, pending)

    def set(self, name: str, value: Any) -> None:
        self.cfg = self.cfg.set_parameter(name, value)


# ---------------------------------------------------------------- the estimate that decides
def test_pending_decisive_figure_follows_the_estimate() -> None:
    p = Pending(ram=128 << 20, wire=720_000, estimate="wire")
    assert p.decisive == 720_000
    assert Pending(128 << 20, 720_000, "qemu").decisive == 128 << 20
    assert not Pending(0, 0) and Pending(0, 1) and Pending(1, 0)


def test_wire_estimate_stops_where_qemu_keeps_iterating() -> None:
    """The measured case: 128 MiB dirty that costs 720 kB on the wire, 3.5 MB/s, 300 ms."""
    h = Harness()
    pending = Pending(ram=128 << 20, wire=720_000, estimate="wire")
    h.window(437_500, 125, pending)  # 3.5 MB/s -> threshold 1.05 MB
    assert h.conv.threshold_size == 1_050_000
    assert h.conv.should_iterate(pending) is False
    assert h.conv.expected_downtime_at_stop == 205  # 720 kB at 3.5 kB/ms
    qemu = Pending(ram=128 << 20, wire=720_000, estimate="qemu")
    assert h.conv.should_iterate(qemu) is True


def test_in_flight_and_the_sync_are_budgeted() -> None:
    h = Harness()
    pending = Pending(ram=1 << 20, wire=500_000)
    h.conv.on_sync(0.125)  # the pause will start with a 125 ms sync
    h.window(437_500, 125, pending)
    assert h.conv.threshold_size == 3500 * 175  # rate x (300 - 125) ms
    assert h.conv.expected_downtime == 125 + 500_000 // 3500
    assert h.conv.should_iterate(pending) is False
    # 300 kB not loaded yet: 125 ms of sync drain 437.5 kB of it, so it costs nothing
    h.conv.destination_progress(stream_pos=1_000_000, loaded_bytes=700_000, at=1.0)
    assert h.conv.in_flight == 300_000
    assert h.conv.should_iterate(pending) is False
    # 900 kB in flight: 462.5 kB of it is still loading when the sync is over, and that no longer fits
    h.conv.destination_progress(stream_pos=1_600_000, loaded_bytes=700_000, at=1.0)
    assert h.conv.should_iterate(pending) is True
    assert h.conv._carried(3500) == 462_500


def test_nothing_pending_waits_only_for_a_backlog_that_would_not_fit() -> None:
    h = Harness()
    h.window(437_500, 125, Pending(0, 0))  # 3500 bytes/ms, threshold 1.05 MB
    assert h.conv.should_iterate(Pending(0, 0)) is False  # nothing pending, nothing in flight: stop
    h.conv.destination_progress(stream_pos=3_000_000, loaded_bytes=1_000_000, at=h.now)  # 2 MB behind
    assert h.conv.should_iterate(Pending(0, 0)) is True  # pausing now would wait ~570 ms for it
    h.now += 1.0  # ... unless the destination has gone silent: then waiting only delays the failure
    assert h.conv.should_iterate(Pending(0, 0)) is False
    h.conv.destination_progress(stream_pos=3_000_000, loaded_bytes=2_500_000, at=h.now)
    assert h.conv.should_iterate(Pending(0, 0)) is False


def test_threshold_never_drops_to_zero() -> None:
    """With a threshold of 0 nothing would re-sync: a pass that ran dry would look like 'nothing pending'."""
    h = Harness()
    h.conv.on_sync(0.5)  # a sync longer than the whole limit
    h.window(437_500, 125, Pending(10, 10))
    assert h.conv.threshold_size == 1


def test_the_slower_of_the_last_two_windows_counts() -> None:
    h = Harness()
    pending = Pending(1 << 30, 1 << 30)
    h.window(437_500, 125, pending)  # 3500 bytes/ms
    h.window(875_000, 125, pending)  # one fast window: 7000
    assert h.conv.bandwidth == 7000 and h.conv.send_rate == 3500 and h.conv.threshold_size == 3500 * 300
    h.window(125_000, 125, pending)  # a drop counts at once
    assert h.conv.send_rate == 1000


def test_an_int_is_taken_as_qemus_figure() -> None:
    h = Harness()
    h.window(437_500, 125, 10)
    assert h.conv.should_iterate(2_000_000) is True
    assert h.conv.last_pending == Pending(2_000_000, 2_000_000, "qemu")


# ---------------------------------------------------------------- downtime ramp
def test_ramp_syntax() -> None:
    r = parse_downtime_ramp("300:100:2000:5000")
    assert r == DowntimeRamp(300, 100, 2000, 5000) and str(r) == "300:100:2000:5000"
    assert parse_downtime_ramp("") is None and parse_downtime_ramp("off") is None
    for bad, why in [("300:100:2000", "START:STEP:CEILING:INTERVAL"), ("a:b:c:d", "whole numbers"),
                     ("3000:100:2000:5000", "START"), ("300:0:2000:5000", "STEP"),
                     ("300:100:2000:50", "INTERVAL"), ("300:100:3000000:5000", "CEILING")]:
        with pytest.raises(ConfigError, match=why):
            parse_downtime_ramp(bad)
    with pytest.raises(ConfigError, match="x-downtime-ramp"):
        MigrationConfig().set_parameter("x-downtime-ramp", "1:2")
    cfg = MigrationConfig.from_dict({"parameters": {"x-downtime-ramp": "300:100:2000:5000"}})
    assert cfg.parameters.downtime_ramp == DowntimeRamp(300, 100, 2000, 5000)


@given(st.integers(0, 1000), st.integers(1, 500), st.integers(0, 5000), st.integers(100, 10_000),
       st.floats(0, 1e6))
def test_ramp_schedule_is_monotonic_and_capped(start: int, step: int, extra: int, interval: int,
                                               elapsed: float) -> None:
    r = DowntimeRamp(start, step, start + extra, interval)
    a, b = r.limit_after(elapsed), r.limit_after(elapsed + interval)
    assert start <= a <= b <= start + extra
    assert b == min(a + step, start + extra)
    assert r.limit_after(interval - 1) == start


def test_ramp_starts_after_the_first_full_pass_and_steps(events: LogCapture) -> None:
    h = Harness(MigrationConfig().set_parameter("x-downtime-ramp", "300:100:500:5000")
                .set_parameter("downtime-limit", 50))
    pending = Pending(64 << 20, 64 << 20)
    h.conv.on_sync(0.0, False)  # setup: every page dirty, no pass done yet
    h.now += 60  # a long bulk copy does not count
    h.window(1250, 125, pending)
    assert h.conv.downtime_limit_ms == 300  # the ramp's start replaces downtime-limit
    h.conv.on_sync(0.0, False)  # a sync in mid-pass (the bulk copy goes on)
    assert h.conv._ramp_clock is None
    h.conv.on_sync(0.0, True)  # the bulk copy is done: the clock starts
    h.now += 4.875
    h.window(1250, 125, pending)
    assert h.conv.downtime_limit_ms == 400
    assert h.conv.threshold_size == int(h.conv._effective_rate() * 400)
    h.now += 50.0
    h.window(1250, 125, pending)
    assert h.conv.downtime_limit_ms == 500  # the ceiling
    steps = [e for e in events.entries if e["event"] == "migration_downtime_ramp"]
    assert [(e["old"], e["new"]) for e in steps] == [(300, 400), (400, 500)]
    q = h.conv.query()
    assert q["downtime-ramp"] == {"schedule": "300:100:500:5000", "limit": 500, "steps": 11}
    assert q["downtime-limit"] == 500


def test_without_a_ramp_downtime_limit_holds_and_follows_changes() -> None:
    h = Harness()
    h.window(1250, 125, Pending(1, 1))
    assert h.conv.downtime_limit_ms == 300
    h.set("downtime-limit", 1000)
    h.window(1250, 125, Pending(1, 1))
    assert h.conv.threshold_size == 10 * 1000
    assert "downtime-ramp" not in h.conv.query()


# ---------------------------------------------------------------- stall detection
def _passes(h: Harness, wires: list[int]) -> None:
    for w in wires:
        h.conv.on_sync(0.0, False)  # syncs in mid-pass are not passes: they never count
        h.conv.should_iterate(Pending(64 << 20, 1))
        h.conv.on_sync(0.0, True)
        h.conv.should_iterate(Pending(64 << 20, w))


def test_progress_resets_the_count(events: LogCapture) -> None:
    h = Harness(MigrationConfig().set_parameter("x-stall-iterations", 3).set_parameter("x-stall-reduction", 10))
    # each pass 10 % below the best: progress every time, however long it goes on
    _passes(h, [1000, 900, 810, 729, 656, 590])
    # within a pass (no sync) what is pending may rise and fall freely
    for w in (5000, 100, 5000):
        h.conv.should_iterate(Pending(64 << 20, w))
    assert h.conv.stalls == 0
    assert not [e for e in events.entries if e["event"] == "migration_stalled"]


def test_stall_policy_continue_only_reports(events: LogCapture) -> None:
    h = Harness(MigrationConfig().set_parameter("x-stall-iterations", 3).set_parameter("x-stall-policy", "continue"))
    _passes(h, [1000, 950, 990, 1000])  # 3 passes in a row not 10 % below 1000
    assert h.conv.stalls == 1
    (ev,) = [e for e in events.entries if e["event"] == "migration_stalled"]
    assert ev["policy"] == "continue" and ev["pending_wire"] == 1000 and ev["best_wire"] == 1000
    assert ev["log_level"] == "warning"
    assert not h.conv.auto_converge_forced
    _passes(h, [1000, 1000, 1000])  # and again after another three
    assert h.conv.stalls == 2


def test_stall_policy_throttle_starts_auto_converge_without_the_capability(events: LogCapture) -> None:
    h = Harness(MigrationConfig().set_parameter("x-stall-iterations", 2))
    assert h.cfg.parameters.x_stall_policy == "throttle"  # the default
    assert not h.cfg.has("auto-converge")
    for _ in range(3):  # the program outruns the link: without the capability nothing happens
        h.conv.dirty_period(dirty_bytes=100 << 20, xfer_bytes=1 << 20)
    assert h.throttles == []
    _passes(h, [1000, 1000, 1000])
    assert h.conv.auto_converge_forced and h.conv.query()["auto-converge-forced"] is True
    for _ in range(4):
        h.conv.dirty_period(dirty_bytes=100 << 20, xfer_bytes=1 << 20)
    assert h.throttles == [20, 30]  # QEMU's rule from here: initial, then + increment every second period
    assert [e["event"] for e in events.entries if e["event"].startswith("migration_st")] == [
        "migration_stalled", "migration_stall_auto_converge"]


def test_a_stall_with_the_throttle_at_its_ceiling_says_what_to_change(events: LogCapture) -> None:
    h = Harness(MigrationConfig().set_parameter("x-stall-iterations", 2).set_parameter("max-cpu-throttle", 40))
    _passes(h, [1000, 1000, 1000])  # first stall: throttling has not started, nothing to advise yet
    for _ in range(8):
        h.conv.dirty_period(dirty_bytes=100 << 20, xfer_bytes=1 << 20)
    assert h.throttles[-1] == 40
    _passes(h, [1000, 1000])
    first, second = [e for e in events.entries if e["event"] == "migration_stalled"]
    assert "hint" not in first and first["throttle"] == 0
    assert second["throttle"] == 40
    assert "max-cpu-throttle 40%" in second["hint"] and "max-bandwidth" in second["hint"]


def test_stall_policy_fail_raises() -> None:
    h = Harness(MigrationConfig().set_parameter("x-stall-iterations", 2).set_parameter("x-stall-policy", "fail"))
    with pytest.raises(MigrationStalled, match="x-stall-policy=fail: the source keeps running") as exc:
        _passes(h, [1000, 2000, 1000])
    assert "2 passes" in str(exc.value)


def test_stall_parameters_are_validated() -> None:
    assert MigrationConfig().parameters.x_stall_iterations == 20
    for name, value in [("x-stall-policy", "pause"), ("x-stall-iterations", 0), ("x-stall-reduction", 101),
                        ("x-pending-estimate", "exact")]:
        with pytest.raises(ConfigError, match=name):
            MigrationConfig().set_parameter(name, value)


# ---------------------------------------------------------------- pacing
class _ReturnPath:
    """The return path as pacing sees it: the latest PROGRESS and a wait, during which the destination loads."""

    def __init__(self, loaded: int, at: float, loads_to: int | None = None) -> None:
        self.progress: tuple[int, int, int, float] | None = (loaded, 0, 0, at)
        self.loads_to = loads_to
        self.waits: list[float] = []

    def wait(self, ready: Any, timeout: float) -> bool:
        self.waits.append(timeout)
        assert not ready()
        if self.loads_to is not None and self.progress is not None:
            self.progress = (self.loads_to, 0, 0, self.progress[3])
        return bool(ready())


def test_pace_keeps_at_most_two_chunks_in_flight() -> None:
    h = Harness()
    t = h.now
    silent = _ReturnPath(0, t)
    silent.progress = None
    h.conv.pace(1_000_000, silent)  # no PROGRESS yet (a QEMU): nothing to pace on
    assert silent.waits == []
    h.conv.destination_progress(1_000_000, 0, at=t - 1.0)
    h.conv.destination_progress(1_000_000, 600_000, at=t - 0.1)
    rp = _ReturnPath(1_000_000, t, loads_to=1_600_000)
    for pos in (1_400_000, 1_800_000):  # chunks of 400 kB, up to two of them in flight: go on
        h.conv.destination_progress(pos, 1_000_000, at=t)
        h.conv.pace(pos, rp)
    assert rp.waits == []
    h.conv.destination_progress(2_200_000, 1_000_000, at=t)  # a third: 1.2 MB in flight
    h.conv.pace(2_200_000, rp)
    assert len(rp.waits) == 1 and rp.waits[0] <= PACE_MAX_WAIT  # held back until it had all but two chunks
    assert h.conv.in_flight == 600_000
    # a destination that went silent (no report for a while) is not waited for: its silence is a failure
    # x-stall-timeout will find, and waiting would only put it off
    h.now += 1.0
    h.conv.destination_progress(5_000_000, 1_600_000, at=t)
    h.conv.pace(5_000_000, rp)
    assert len(rp.waits) == 1


# ---------------------------------------------------------------- records
def test_records_hold_each_iterations_share(events: LogCapture) -> None:
    h = Harness()
    h.conv.on_sync(0.01)
    h.conv.should_iterate(Pending(64 << 20, 66 << 20))
    h.window(8_125_000, 125, Pending(64 << 20, 66 << 20))
    r1 = h.conv.record(1, {"normal": (1500, 1500 * 4104), "zero": (100, 900)})
    h.conv.should_iterate(Pending(60 << 20, 700_000))
    r2 = h.conv.record(2, {"normal": (1500, 1500 * 4104), "zero": (100, 900), "xbzrle": (3000, 66_000)})
    assert r1.pages == {"normal": 1500, "zero": 100} and r1.bytes == {"normal": 1500 * 4104, "zero": 900}
    assert r2.pages == {"xbzrle": 3000} and r2.bytes == {"xbzrle": 66_000}
    assert (r2.pending_ram, r2.pending_wire, r2.estimate) == (60 << 20, 700_000, "wire")
    assert r2.bandwidth == 65_000_000 and r2.downtime_limit == 300 and r2.syncs == 1 and r2.stage == "iterate"
    assert r2.expected_downtime == h.conv.expected_downtime
    h.conv.should_iterate(Pending(100_000, 100_000))  # small enough: the stop, with its own prediction
    assert h.conv.expected_downtime_at_stop is not None
    assert h.conv.expected_downtime_at_stop != h.conv.expected_downtime
    done = h.conv.record(3, {"xbzrle": (6000, 132_000)}, stage="complete", downtime=123)
    assert done.downtime == 123 and done.stage == "complete" and done.pages == {"xbzrle": 3000}
    assert done.expected_downtime == h.conv.expected_downtime_at_stop  # what the stats report beside downtime
    assert list(h.conv.records) == [r1, r2, done]
    logged = [e for e in events.entries if e["event"] == "migration_iteration"]
    assert [e["iteration"] for e in logged] == [1, 2, 3]
    assert logged[1]["pages"] == {"xbzrle": 3000} and logged[1]["pending_wire"] == 700_000
    d = r2.as_dict()
    assert IterationRecord(**d) == r2
