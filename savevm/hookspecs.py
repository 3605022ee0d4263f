"""Every hook of the savevm core.

Plugins implement these with ``@savevm.hookimpl``.  A plugin that offers
hooks of its own (the RAM plugin does) adds its spec module from
:func:`savevm_addhooks`, the way pytest plugins add hooks.

The core never calls ``pm.hook`` directly: it goes through the facade in
:mod:`savevm.plugins`, which knows which hooks have implementations.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from savevm.channels.base import Transport
    from savevm.config import MigrationConfig
    from savevm.migration import MigrationBase
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
    plugin registered later still sees it).

    :param pluginmanager: the host's plugin manager; call
        ``pluginmanager.add_hookspecs(module)``.
    :return: nothing.
    """


@hookspec
def savevm_configure(config: MigrationConfig, options: Mapping[str, Any]) -> None:
    """Tell a plugin the migration config and its own option table.

    Called on both sides, once per plugin, when a
    :class:`~savevm.plugins.PluginHost` is built, when a plugin is
    registered later, and whenever the config changes (a parameter set
    while migrating).  Each plugin is called on its own, with its own table.

    :param config: the current config.
    :param options: ``config.plugins.options[<plugin name>]`` (the
        ``[plugins.NAME]`` TOML table), empty if absent.
    :return: nothing.
    """


@hookspec
def savevm_migration_capabilities() -> list[str] | None:
    """Name the migration capabilities a plugin adds (a third-party page codec's on/off switch).

    Called once per :class:`~savevm.plugins.PluginHost`, on both sides, when
    it is built.  The names become valid wherever QEMU's capabilities are:
    ``--capability NAME``, ``[capabilities] NAME = true`` in TOML and QMP's
    ``migrate-set-capabilities``; ``config.has(NAME)`` then says whether the
    operator turned it on.  A name may not shadow one of QEMU's.

    :return: capability names (lower-case, hyphenated, like QEMU's), or None.
    """


# ---------------------------------------------------------------------------
# transports
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def savevm_get_transport(scheme: str, config: MigrationConfig) -> Transport | None:
    """Return the :class:`~savevm.channels.base.Transport` for a URI scheme.

    Called on both sides when a URI is opened (``tcp``, ``unix``, ``file``,
    ``exec``, ``fd`` are built in).  Stops at the first non-None result, so
    a plugin can also override a built-in scheme.

    :param scheme: the scheme to carry (after ``[transports]`` routing).
    :param config: the current config.
    :return: a transport, or None for schemes you do not handle.
    """


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------


@hookspec
def savevm_register_sections(registry: SectionRegistry, config: MigrationConfig) -> None:
    """Register plugin-owned sections into a new registry.

    Called on both sides when :meth:`savevm.plugins.PluginHost.new_registry`
    builds the registry of one migration, before user sections are added.

    :param registry: the new registry.
    :param config: the current config.
    :return: nothing.
    """


# ---------------------------------------------------------------------------
# migration lifecycle (QEMU's migration notifiers)
# ---------------------------------------------------------------------------


@hookspec
def savevm_migration_state_changed(migration: MigrationBase, old: str, new: str) -> None:
    """A migration moved from state ``old`` to ``new`` (QEMU migration notifier).

    Called on the side the object belongs to (``Migration`` on the source,
    ``Incoming`` on the destination), from the thread that made the
    transition, after the state is set.  Must not block.

    :param migration: the migration object (``.side`` says which).
    :param old: the previous state (QEMU's MigrationStatus names).
    :param new: the new state.
    :return: nothing.
    """


@hookspec
def savevm_query_migrate(migration: MigrationBase, info: dict[str, Any]) -> None:
    """Add keys to a ``query-migrate``-shaped stats dict before it is returned.

    Called on the source whenever stats are taken.

    :param migration: the migration being queried.
    :param info: the stats dict; mutate it in place.
    :return: nothing.
    """


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


@hookspec
def savevm_cli_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add subcommands to the ``savevm`` command (as datasette plugins add theirs).

    Called once when the CLI builds its argument parser, with every
    installed plugin loaded.  A command's parser must set
    ``func=callable(args) -> int`` with ``set_defaults``; the callable
    returns the exit code.

    :param subparsers: the ``savevm`` parser's subcommand group.
    :return: nothing.
    """


@hookspec
def savevm_bench(size: int, runs: int) -> list[dict[str, Any]] | None:
    """Contribute rows to ``savevm bench`` (hot-path figures beside same-run baselines).

    Called once by ``savevm bench``; every plugin's rows are shown, in
    plugin order.

    :param size: bytes of RAM (or data) each figure should push through.
    :param runs: repetitions per figure; report the median.
    :return: rows of ``{"what", "seconds", "GB/s", "baseline", "baseline GB/s", "ratio"}``, or None;
        a row with ``"headline": True`` (what a user's migration gets) is listed before all others.
    """
