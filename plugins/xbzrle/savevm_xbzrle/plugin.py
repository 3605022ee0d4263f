"""The XBZRLE plugin's pluggy face: one page codec for the RAM plugin, and its bench rows."""

from __future__ import annotations

from typing import Any

from savevm.config import MigrationConfig
from savevm.hookspecs import hookimpl
from savevm_ram.codecs import PageCodec
from savevm_xbzrle.encoder import XbzrleCodec


@hookimpl
def ram_page_codecs(config: MigrationConfig) -> list[PageCodec]:
    """A fresh XBZRLE codec (source: used only with capability ``xbzrle``)."""
    return [XbzrleCodec()]


@hookimpl
def savevm_bench(size: int, runs: int) -> list[dict[str, Any]]:
    """Codec throughput beside a numpy compare of the same pages."""
    from savevm_xbzrle.bench import bench_rows

    return bench_rows(size, runs)
