"""The RAM plugin's pluggy face: its hookspecs, added to the host."""

from __future__ import annotations

import pluggy

from savevm.hookspecs import hookimpl
from savevm_ram import hookspecs


@hookimpl
def savevm_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Offer the ram_control_* and ram_page_codecs hooks to other plugins."""
    pluginmanager.add_hookspecs(hookspecs)
