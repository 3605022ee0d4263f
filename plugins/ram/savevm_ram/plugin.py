"""The RAM plugin's pluggy face: its hookspecs, its zlib codec, its CLI command and bench rows."""

from __future__ import annotations

import argparse
from typing import Any

import pluggy

from savevm.config import MigrationConfig
from savevm.hookspecs import hookimpl
from savevm_ram import hookspecs
from savevm_ram.codecs import PageCodec
from savevm_ram.compress import CompressCodec


@hookimpl
def savevm_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Offer the ram_control_* and ram_page_codecs hooks to other plugins."""
    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def ram_page_codecs(config: MigrationConfig) -> list[PageCodec]:
    """The built-in zlib codec (used on the source only with capability ``compress``)."""
    return [CompressCodec()]


@hookimpl
def savevm_cli_commands(subparsers: argparse._SubParsersAction) -> None:
    """``savevm demo`` (imported only when the CLI builds its parser)."""
    from savevm_ram.cli import add_commands

    add_commands(subparsers)


@hookimpl
def savevm_bench(size: int, runs: int) -> list[dict[str, Any]]:
    """The RAM bulk stage to /dev/null beside a numpy copy."""
    from savevm_ram.bench import bench_rows

    return bench_rows(size, runs)
