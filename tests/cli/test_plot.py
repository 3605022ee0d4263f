"""``--plot``: the per-iteration records drawn into a PNG (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from savevm.cli.plot import PLOT_HINT, plot_records, require_matplotlib
from savevm.convergence import IterationRecord
from savevm.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records() -> list[IterationRecord]:
    out = []
    for i in range(1, 121):
        bulk = i <= 80
        out.append(IterationRecord(
            iteration=i, time_ms=i * 100, stage="iterate",
            pages={"normal": 1600} if bulk else {"xbzrle": 12_000, "zero": 10},
            bytes={"normal": 1600 * 4104} if bulk else {"xbzrle": 264_000, "zero": 90},
            pending_ram=(512 << 20) - i * (6 << 20) if bulk else 128 << 20,
            pending_wire=(512 << 20) - i * (6 << 20) if bulk else 720_000 - i * 10,
            estimate="wire", in_flight=30_000, threshold=20 << 20 if bulk else 600_000,
            downtime_limit=300 if i < 100 else 400, bandwidth=64 << 20 if bulk else 3_000_000,
            expected_downtime=8000 if bulk else 320, dirty_rate=0 if bulk else 300 << 20,
            throttle=0 if i < 110 else 20, syncs=1 if bulk else i - 79, stalls=0 if i < 105 else 1))
    out.append(IterationRecord(
        iteration=121, time_ms=12_300, stage="complete", pages={"xbzrle": 32_768}, bytes={"xbzrle": 720_000},
        pending_ram=128 << 20, pending_wire=600_000, estimate="wire", in_flight=0, threshold=600_000,
        downtime_limit=400, bandwidth=3_000_000, expected_downtime=290, dirty_rate=300 << 20, throttle=20,
        syncs=42, stalls=1, downtime=281))
    return out


def test_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed (pip install 'savevm[plot]')")
    out = plot_records(_records(), tmp_path / "conv.png", title="test",
                       summary={"status": "completed", "total-time": 12_300, "downtime": 281})
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 50_000  # four panels of lines, not an empty canvas


def test_plot_without_records_says_so(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed (pip install 'savevm[plot]')")
    with pytest.raises(ConfigError, match="nothing to draw"):
        plot_records([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_the_hint_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ConfigError) as exc:
        require_matplotlib()
    assert "pip install 'savevm[plot]'" in str(exc.value) and PLOT_HINT in str(exc.value)
    with pytest.raises(ConfigError, match="savevm\\[plot\\]"):
        plot_records(_records(), tmp_path / "x.png")
