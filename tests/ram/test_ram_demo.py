"""The demo program's workloads: the working set and the two dirty patterns."""

from __future__ import annotations

import time

import numpy as np
import pytest

from savevm.errors import ConfigError
from savevm_ram.demo import SPARSE_BYTES, SPARSE_OFFSET, DemoProgram

P = 4096


def _logs(prog: DemoProgram) -> list[np.ndarray]:
    return [b._take_log()[: b.pages] for b in prog.ram]


def test_working_set_defaults_to_all_and_is_checked() -> None:
    prog = DemoProgram(size="1M", blocks=2, fill="zero")
    assert prog.working_set == 1 << 20 and prog.dirty_pattern == "pages" and prog.rate == 20 << 20
    assert DemoProgram(size="1M", fill="zero", working_set="256K").working_set == 256 << 10
    for bad in ("2M", "100", "0"):
        with pytest.raises(ConfigError, match="--working-set"):
            DemoProgram(size="1M", fill="zero", working_set=bad)
    with pytest.raises(ConfigError, match="--dirty-pattern"):
        DemoProgram(size="1M", fill="zero", dirty_pattern="random")
    with pytest.raises(ConfigError, match="needs --dirty-pattern sparse"):
        DemoProgram(size="1M", fill="zero", dirty_rate="max")
    sparse = DemoProgram(size="1M", fill="zero", dirty_pattern="sparse")
    assert sparse.rate is None  # as fast as it can
    assert DemoProgram(size="1M", fill="zero", dirty_pattern="sparse", dirty_rate="4M").rate == 4 << 20


def test_sparse_pass_rewrites_a_few_bytes_of_every_working_set_page() -> None:
    """1 MiB in two blocks of 512 KiB, working set 768 KiB: all of block 0 and half of block 1."""
    prog = DemoProgram(size="1M", blocks=2, fill="random", working_set="768K", dirty_pattern="sparse")
    for b in prog.ram:
        b._start_log()
    before = [b.host.copy() for b in prog.ram]
    ws = 768 * 1024 // P
    cursor = prog._sparse(0, ws)
    assert cursor == 0  # a whole pass wraps around
    logs = _logs(prog)
    assert logs[0].all() and logs[1][:64].all() and not logs[1][64:].any()
    for b, old in zip(prog.ram, before):
        diff = (b.host != old).reshape(-1, P)
        changed_pages = diff.any(axis=1)
        assert diff[:, :SPARSE_OFFSET].sum() == 0 and diff[:, SPARSE_OFFSET + SPARSE_BYTES :].sum() == 0
        assert diff.sum(axis=1).max() <= SPARSE_BYTES
        assert changed_pages.sum() == (b.pages if b.idstr == "demo.ram0" else 64)
    # a partial pass continues where the last one stopped, across the block boundary
    assert prog._sparse(100, 50) == 150
    logs = _logs(prog)
    assert logs[0][100:128].all() and logs[1][:22].all() and logs[0].sum() + logs[1].sum() == 50


def test_pages_pattern_stays_in_the_working_set() -> None:
    prog = DemoProgram(size="1M", blocks=1, fill="zero", working_set="64K", dirty_rate="100M")
    for b in prog.ram:
        b._start_log()
    prog.start()
    try:
        deadline = time.monotonic() + 10
        while prog.pages_dirtied < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        prog.stop()
    (log,) = _logs(prog)
    assert prog.pages_dirtied >= 200
    assert log[:16].any() and not log[16:].any()
