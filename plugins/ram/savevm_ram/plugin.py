"""The RAM plugin's pluggy face: its hookspecs, added to the host."""

from __future__ import annotations

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
