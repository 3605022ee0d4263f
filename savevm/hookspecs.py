"""Every hook of the savevm core.

Plugins implement these with ``@savevm.hookimpl``.  A plugin that offers
hooks of its own (the RAM plugin does) adds its spec module from
:func:`savevm_addhooks`, the way pytest plugins add hooks.

The core never calls ``pm.hook`` directly: it goes through the facade in
:mod:`savevm.plugins`, which knows which hooks have implementations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from savevm.channels.base import Transport
    from savevm.config import MigrationConfig
    from savevm.registry import SectionRegistry

hookspec = pluggy.HookspecMarker("savevm")
hookimpl = pluggy.HookimplMarker("savevm")


# ---------------------------------------------------------------------------
# registration time
# ---------------------------------------------------------------------------


@hookspec(historic=True)
def savevm_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Add hook specifications a plugin offers to other plugins.

    Called once, on both sides, when a plugin is registered (historic: a
    plugin registered later still sees it).  Implementations call
    ``pluginmanager.add_hookspecs(module)``.  Returns nothing.
    """


@hookspec
def savevm_configure(config: MigrationConfig, options: dict[str, Any]) -> None:
    """Tell a plugin the migration config and its own option table.

    Called on both sides when a :class:`~savevm.plugins.PluginHost` is built
    or reconfigured.  ``options`` is ``config.plugins.options[<plugin>]``
    for the plugin's short name (empty if absent).  Returns nothing.
    """


# ---------------------------------------------------------------------------
# transports
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def savevm_get_transport(scheme: str, config: MigrationConfig) -> Transport | None:
    """Return the :class:`~savevm.channels.base.Transport` for a URI scheme.

    Called on both sides when a URI is opened (``tcp``, ``unix``, ``file``,
    ``exec``, ``fd`` are built in).  Stops at the first non-None result, so
    a plugin can also override a built-in scheme; return None for schemes
    you do not handle.
    """


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------


@hookspec
def savevm_register_sections(registry: SectionRegistry, config: MigrationConfig) -> None:
    """Register plugin-owned sections into a new registry.

    Called on both sides when :meth:`savevm.plugins.PluginHost.new_registry`
    builds the registry of one migration, before user sections are added.
    Returns nothing.
    """


# ---------------------------------------------------------------------------
# migration lifecycle (QEMU's migration notifiers)
# ---------------------------------------------------------------------------


@hookspec
def savevm_migration_state_changed(migration: Any, old: str, new: str) -> None:
    """A migration moved from state ``old`` to ``new`` (QEMU migration notifier).

    Called on the side the object belongs to (``Migration`` on the source,
    ``Incoming`` on the destination), from the thread that made the
    transition, after the state is set.  Must not block.  Returns nothing.
    """


@hookspec
def savevm_query_migrate(migration: Any, info: dict[str, Any]) -> None:
    """Add keys to a ``query-migrate``-shaped stats dict before it is returned.

    Called on the source whenever stats are taken.  Mutate ``info`` in
    place; returns nothing.
    """
