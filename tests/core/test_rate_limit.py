"""QEMUFile rate limiting: a byte budget per 100 ms window (docs/qemu-compatibility.md, Convergence)."""

from __future__ import annotations

import time

import pytest

from savevm.channels.memory import MemoryChannel
from savevm.qemufile import BUFFER_DELAY, QEMUFile

CHUNK = bytes(64 << 10)


class CountingSink(MemoryChannel):
    """A memory channel that counts bytes instead of keeping them (cheap for 50 MB/s)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def writev(self, bufs):  # noqa: ANN001, ANN201
        n = sum(memoryview(b).nbytes for b in bufs)
        self.count += n
        return n


def run(f: QEMUFile, seconds: float, marks: list[tuple[float, int]], sent: list[int]) -> None:
    """The iteration loop: fill until rate limited, wait out the window, repeat."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if f.rate_limit_exceeded():
            f.rate_limit_wait()
            marks.append((time.monotonic(), sent[0]))
        f.put_buffer_async(CHUNK)
        sent[0] += len(CHUNK)


def steady_rate(marks: list[tuple[float, int]]) -> float:
    """Bytes per second between the first and the last window boundary."""
    (t_a, b_a), (t_b, b_b) = marks[0], marks[-1]
    return (b_b - b_a) / (t_b - t_a)


def test_rate_limit_holds_bandwidth() -> None:
    limit = 50_000_000
    start = time.monotonic()
    f = QEMUFile(CountingSink(), writable=True, rate_limit=limit)
    assert f.rate_limit_max == limit // 10
    marks: list[tuple[float, int]] = []
    sent = [0]
    run(f, 1.0 - (time.monotonic() - start), marks, sent)
    f.flush()
    assert f.channel.count == sent[0]
    # over the whole second: within 10% of the limit
    assert 0.9 * limit <= sent[0] <= 1.1 * limit, sent[0]
    # and window to window (the limiter's own rate, independent of where the second ends)
    assert len(marks) >= 5
    assert 0.9 * limit <= steady_rate(marks) <= 1.1 * limit, steady_rate(marks)


def test_rate_limit_change_takes_effect_mid_run() -> None:
    fast, slow = 50_000_000, 20_000_000
    f = QEMUFile(CountingSink(), writable=True, rate_limit=fast)
    sent = [0]
    first: list[tuple[float, int]] = []
    run(f, 0.55, first, sent)
    f.set_rate_limit(slow)
    second: list[tuple[float, int]] = []
    run(f, 0.55, second, sent)
    assert len(first) >= 4 and len(second) >= 4
    assert 0.9 * fast <= steady_rate(first) <= 1.1 * fast, steady_rate(first)
    # skip the window that was running when the limit changed
    assert 0.9 * slow <= steady_rate(second[1:]) <= 1.1 * slow, steady_rate(second[1:])


def test_limit_zero_is_unlimited() -> None:
    f = QEMUFile(CountingSink(), writable=True, rate_limit=1_000_000)
    f.set_rate_limit(0)
    assert f.rate_limit_max == 0
    t0 = time.monotonic()
    for _ in range(2000):  # 128 MiB, far beyond any window budget
        assert not f.rate_limit_exceeded()
        f.put_buffer_async(CHUNK)
    assert f.rate_limit_wait() == 0.0
    assert time.monotonic() - t0 < BUFFER_DELAY * 10
    assert f.rate_limit_used >= 2000 * len(CHUNK)


def test_rate_limit_budget_and_reset() -> None:
    f = QEMUFile(CountingSink(), writable=True, rate_limit=10_000)  # 1000 bytes per window
    assert f.rate_limit_max == 1000
    f.put_buffer(bytes(1000))
    assert not f.rate_limit_exceeded(), "exceeded means strictly over the budget, as in QEMU"
    f.put_byte(0)
    assert f.rate_limit_exceeded()
    f.reset_rate_limit()
    assert f.rate_limit_used == 0 and not f.rate_limit_exceeded()
    f.account(5000)  # bytes sent outside the stream count too
    assert f.rate_limit_exceeded()
    slept = f.rate_limit_wait()
    assert 0 < slept <= BUFFER_DELAY
    assert f.rate_limit_used == 0


def test_negative_limit_refused() -> None:
    f = QEMUFile(CountingSink(), writable=True)
    with pytest.raises(ValueError):
        f.set_rate_limit(-1)
