"""A cache smaller than the working set is named, once, with the size that would hold it."""

from __future__ import annotations

from typing import Any

import attrs
from structlog.testing import capture_logs

import savevm
import savevm_ram
from savevm_xbzrle.encoder import THRASH_PERIODS, XbzrleCodec


@attrs.define
class _State:
    """The part of RAMState the codec's period check reads."""

    config: savevm.MigrationConfig
    ram: savevm_ram.RAMList
    bulk_stage: bool = False
    sync_count: int = 1


def _codec(cache: str, ram_mib: int) -> tuple[XbzrleCodec, _State]:
    cfg = savevm.MigrationConfig().set_capability("xbzrle").set_parameter("xbzrle-cache-size", cache)
    blocks = savevm_ram.RAMList([savevm_ram.RAMBlock("ram0", bytearray(ram_mib << 20))])
    rs = _State(cfg, blocks)
    c = XbzrleCodec()
    c.save_setup(rs)  # type: ignore[arg-type]
    return c, rs


def _period(c: XbzrleCodec, rs: _State, hits: int, misses: int) -> None:
    c.stats.pages += hits
    c.stats.cache_miss += misses
    c.on_period(rs, hits + misses)  # type: ignore[arg-type]


def _warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "xbzrle_cache_thrashing"]


def test_half_missing_suggests_twice_the_cache_once() -> None:
    c, rs = _codec("1M", 8)
    with capture_logs() as logs:
        for _ in range(THRASH_PERIODS * 3):
            _period(c, rs, 256, 256)
    w = _warnings(logs)
    assert len(w) == 1
    assert w[0]["log_level"] == "warning"
    assert w[0]["cache_size"] == 1 << 20
    assert w[0]["suggested_cache_size"] == 2 << 20
    assert "xbzrle-cache-size=2M" in w[0]["hint"]


def test_suggestion_is_capped_by_ram() -> None:
    c, rs = _codec("1M", 2)
    with capture_logs() as logs:
        for _ in range(THRASH_PERIODS):
            _period(c, rs, 1, 99)
    assert _warnings(logs)[0]["suggested_cache_size"] == 2 << 20


def test_a_cold_first_pass_or_a_good_period_in_between_is_not_thrashing() -> None:
    c, rs = _codec("1M", 8)
    with capture_logs() as logs:
        for k in range(THRASH_PERIODS * 4):
            # misses for THRASH_PERIODS - 1 periods, then a period that hits: the streak restarts
            if k % THRASH_PERIODS == THRASH_PERIODS - 1:
                _period(c, rs, 500, 0)
            else:
                _period(c, rs, 0, 500)
    assert _warnings(logs) == []


def test_bulk_stage_never_counts() -> None:
    c, rs = _codec("1M", 8)
    rs.bulk_stage = True
    with capture_logs() as logs:
        for _ in range(THRASH_PERIODS * 2):
            _period(c, rs, 0, 500)
    assert _warnings(logs) == []
