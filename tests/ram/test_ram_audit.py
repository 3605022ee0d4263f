"""The tracker audit checks at most every AUDIT_INTERVAL seconds, and misses nothing between checks."""

from __future__ import annotations

import numpy as np
import pytest

import savevm_ram.dirty as dirty
from savevm_ram import RAMBlock, RAMList
from savevm_ram.dirty import DirtyBitmap, UntrackedWriteError

P = 4096


def _bitmap(monkeypatch: pytest.MonkeyPatch, pages: int = 256) -> tuple[RAMBlock, DirtyBitmap, list[int]]:
    block = RAMBlock("ram0", np.zeros(pages * P, np.uint8))
    bm = DirtyBitmap(RAMList([block]))
    bm.start()
    checks: list[int] = []
    orig = dirty.TrackerAudit.check

    def counting(self: dirty.TrackerAudit, logged: np.ndarray, *, final: bool = False) -> None:
        checks.append(int(logged.sum()))
        orig(self, logged, final=final)

    monkeypatch.setattr(dirty.TrackerAudit, "check", counting)
    return block, bm, checks


def test_syncs_between_checks_fold_their_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirty, "AUDIT_INTERVAL", 3600.0)  # only the first and the final sync check
    block, bm, checks = _bitmap(monkeypatch)
    bm.sync()
    assert len(checks) == 1
    sampled = int(bm._audits["ram0"].pages[0])
    block.write(sampled * P + 7, b"\x01")  # a tracked write, logged at the next sync
    bm.sync()
    bm.sync()
    assert len(checks) == 1  # within the interval: no check
    bm.sync(final=True)
    assert checks[1:] == [1]  # the final check saw the folded log: the write was tracked


def test_an_untracked_write_between_checks_is_still_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirty, "AUDIT_INTERVAL", 3600.0)
    block, bm, checks = _bitmap(monkeypatch)
    bm.sync()
    sampled = int(bm._audits["ram0"].pages[0])
    block.host[sampled * P + 7] = 1  # written around the tracker
    bm.sync()  # no check yet
    with pytest.raises(UntrackedWriteError, match="without being marked dirty"):
        bm.sync(final=True)


def test_checks_come_back_after_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirty, "AUDIT_INTERVAL", 0.0)  # every sync checks, as before
    block, bm, checks = _bitmap(monkeypatch)
    for _ in range(3):
        bm.sync()
    assert len(checks) == 3
