"""Building the plugin manager, and the facade the rest of savevm calls.

The host recipe is pluggy's: a ``PluginManager("savevm")``, our hookspecs,
built-ins registered by name, installed plugins from the ``savevm``
entry-point group.  Plugins can be blocked by config or with the
``SAVEVM_DISABLE_PLUGINS`` environment variable (comma separated), and
``SAVEVM_TRACE_HOOKS=1`` logs every hook call.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from savevm import hookspecs
from savevm.config import KNOWN_CAPABILITIES, QEMU_CAPABILITIES, MigrationConfig
from savevm.errors import ConfigError, PluginError, URIError
from savevm.logging import get_logger

if TYPE_CHECKING:
    from savevm.channels.base import Transport
    from savevm.migration import MigrationBase
    from savevm.registry import SectionRegistry

log = get_logger("savevm.plugins")

ENTRY_POINT_GROUP = "savevm"
#: Built-in plugins, always registered unless blocked.
BUILTINS: tuple[str, ...] = ("savevm.channels.builtin",)


class PluginHost:
    """A configured plugin manager with typed calls for the core's hooks."""

    def __init__(
        self,
        config: MigrationConfig | None = None,
        *,
        load_entrypoints: bool = True,
        extra: Iterable[object] = (),
    ) -> None:
        self.config = config or MigrationConfig()
        self.pm = pluggy.PluginManager("savevm")
        self._dists: dict[str, importlib.metadata.Distribution] = {}
        self.pm.add_hookspecs(hookspecs)
        # Historic: every plugin registered from now on gets savevm_addhooks at
        # registration, so it can add its own hookspecs before check_pending.
        self.pm.hook.savevm_addhooks.call_historic(kwargs={"pluginmanager": self.pm})
        blocked = set(self.config.plugins.disable)
        env = os.environ.get("SAVEVM_DISABLE_PLUGINS", "")
        blocked |= {p.strip() for p in env.split(",") if p.strip()}
        allow = set(self.config.plugins.enable)
        for name in blocked:
            self.pm.set_blocked(name)
        for modname in BUILTINS:
            if modname in blocked:
                continue
            mod = importlib.import_module(modname)
            self.pm.register(mod, name=modname)
        if load_entrypoints:
            self._load_entrypoints(blocked, allow)
        for obj in extra:
            self.pm.register(obj)  # configured with everyone else below
        if os.environ.get("SAVEVM_TRACE_HOOKS"):
            self.pm.trace.root.setwriter(lambda msg: log.debug("hook_trace", msg=msg.rstrip()))
            self.pm.enable_tracing()
        self._check_pending()
        self._check_plugin_tables(blocked)
        declared = self.plugin_capabilities()
        if not declared <= self.config.plugin_capabilities:
            self.config = attrs.evolve(self.config,
                                       plugin_capabilities=self.config.plugin_capabilities | declared)
        orphans = {c for c in self.config.capabilities if c not in KNOWN_CAPABILITIES and c not in declared}
        if orphans:
            first = sorted(orphans)[0]
            raise ConfigError(first, f"capability {first!r} is turned on but no loaded plugin offers it "
                                     f"(plugin capabilities here: {', '.join(sorted(declared)) or 'none'})")
        self.configure(self.config)

    def plugin_capabilities(self) -> frozenset[str]:
        """The capability names registered plugins add (``savevm_migration_capabilities``)."""
        names: set[str] = set()
        for part in self.pm.hook.savevm_migration_capabilities():
            for n in part or ():
                if not isinstance(n, str) or not n:
                    raise PluginError(f"savevm_migration_capabilities returned {n!r}, not a capability name")
                if n in KNOWN_CAPABILITIES:
                    owner = "QEMU" if n in QEMU_CAPABILITIES else "savevm"
                    raise PluginError(f"a plugin declares capability {n!r}, which is {owner}'s own")
                names.add(n)
        return frozenset(names)

    def _check_plugin_tables(self, blocked: set[str]) -> None:
        """Every ``[plugins.NAME]`` table must name a plugin: a typo would otherwise be ignored silently."""
        tables = self.config.plugins.options
        if not tables:
            return
        known: set[str] = set(blocked)
        for name in [n for n, _ in self.pm.list_name_plugin()] + [
                ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]:
            known |= _plugin_aliases(name)
        for table in tables:
            if table not in known:
                shown = sorted(n for n in known if "." not in n and not n.isdigit() and not n.startswith("qmp-"))
                raise ConfigError(f"plugins.{table}", f"no plugin named {table!r} (known plugins: "
                                                      f"{', '.join(shown)})")

    def _check_pending(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"a plugin implements a hook nobody declared: {exc}") from exc

    def _load_entrypoints(self, blocked: set[str], allow: set[str]) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or (allow and ep.name not in allow):
                log.debug("plugin_skipped", plugin=ep.name)
                continue
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(f"cannot load plugin {ep.name!r} ({ep.value}): {exc}") from exc
            self.pm.register(plugin, name=ep.name)
            dist = getattr(ep, "dist", None)
            if dist is not None:
                self._dists[ep.name] = dist
            log.debug("plugin_loaded", plugin=ep.name)

    # ----------------------------------------------------------- management
    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register a plugin object or module (third-party code, tests)."""
        n = self.pm.register(plugin, name=name)
        try:
            self._check_pending()
        except PluginError:
            self.pm.unregister(plugin)
            raise
        if n is not None:
            self._configure_one(n, plugin, self.config)
        return n

    def distribution(self, name: str) -> importlib.metadata.Distribution | None:
        """The installed distribution a plugin loaded from an entry point came from."""
        return self._dists.get(name)

    def names(self) -> list[str]:
        """Names of the registered plugins."""
        return sorted(n for n, p in self.pm.list_name_plugin() if p is not None)

    def add_hookspecs(self, module: ModuleType | type) -> None:
        """Add a plugin's own hook specifications."""
        self.pm.add_hookspecs(module)

    def has_hookspecs(self, module: ModuleType | type) -> bool:
        """Are all of ``module``'s hooks already declared here (e.g. by its plugin's savevm_addhooks)?"""
        names = [n for n in dir(module) if hasattr(getattr(module, n), "savevm_spec")]
        return all(getattr(getattr(self.pm.hook, n, None), "spec", None) is not None for n in names)

    def has_impl(self, hook_name: str) -> bool:
        """Does any registered plugin implement ``hook_name``?

        Hot paths ask this once per iteration and skip empty hooks, since one
        pluggy call costs microseconds and a GiB has 262,144 pages.
        """
        caller = getattr(self.pm.hook, hook_name, None)
        return caller is not None and bool(caller.get_hookimpls())

    def hook(self, hook_name: str) -> pluggy.HookCaller:
        """The hook caller of a hook some plugin declared (``savevm_addhooks``), by name."""
        caller = getattr(self.pm.hook, hook_name, None)
        if caller is None:
            raise PluginError(f"no hook named {hook_name!r} (is the plugin that declares it installed?)")
        return caller

    def configure(self, config: MigrationConfig) -> None:
        """Push a (new) config to every plugin."""
        self.config = config
        for name, plugin in self.pm.list_name_plugin():
            if plugin is not None:
                self._configure_one(name, plugin, config)

    def _configure_one(self, name: str, plugin: object, config: MigrationConfig) -> None:
        """``savevm_configure`` for one plugin, with its own option table.

        Through a pluggy subset caller holding only that plugin, so tracing
        and hook wrappers see the call like any other.
        """
        impls = self.pm.hook.savevm_configure.get_hookimpls()
        if not any(i.plugin is plugin for i in impls):
            return
        others = [i.plugin for i in impls if i.plugin is not plugin]
        caller = self.pm.subset_hook_caller("savevm_configure", remove_plugins=others)
        caller(config=config, options=dict(config.plugin_options(name)))

    # ----------------------------------------------------------- core hooks
    def get_transport(self, scheme: str) -> Transport:
        """The transport for ``scheme``; URIError if no plugin offers it.

        ``config.transports`` may route a scheme to another transport (e.g.
        ``tcp`` to ``rdma``), so changing transport needs no code change.
        """
        carrier = self.config.transports.get(scheme, scheme)
        t: Transport | None = self.pm.hook.savevm_get_transport(scheme=carrier, config=self.config)
        if t is not None and carrier != scheme:
            own: Transport | None = self.pm.hook.savevm_get_transport(scheme=scheme, config=self.config)
            if own is not None:
                k_own, k_t = getattr(own, "address_kind", None), getattr(t, "address_kind", None)
                if k_own is None or k_own != k_t:
                    # e.g. tcp = "exec" would run tcp:HOST:PORT addresses as shell commands
                    raise ConfigError("transports", f"cannot route {scheme}: URIs over {carrier!r}: {scheme} "
                                                    f"addresses are {k_own or 'of unknown kind'}, {carrier} takes "
                                                    f"{k_t or 'an unknown kind'}")
        if t is None:
            via = f" (routed to {carrier!r} by the transports config)" if carrier != scheme else ""
            raise URIError(f"{scheme}:", f"no transport for scheme {scheme!r}{via} "
                                         "(built in: tcp, unix, file, exec, fd)")
        return t

    def register_sections(self, registry: SectionRegistry) -> None:
        """Let plugins add their sections to a registry."""
        self.pm.hook.savevm_register_sections(registry=registry, config=self.config)

    def state_changed(self, migration: MigrationBase, old: str, new: str) -> None:
        """Notify plugins of a migration state change."""
        if self.has_impl("savevm_migration_state_changed"):
            self.pm.hook.savevm_migration_state_changed(migration=migration, old=old, new=new)

    def query_migrate(self, migration: MigrationBase, info: dict[str, Any]) -> None:
        """Let plugins add to query-migrate stats."""
        if self.has_impl("savevm_query_migrate"):
            self.pm.hook.savevm_query_migrate(migration=migration, info=info)

    def bench_rows(self, size: int, runs: int) -> list[dict[str, Any]]:
        """Every plugin's ``savevm bench`` rows, in registration order, rows marked ``headline`` first."""
        rows: list[dict[str, Any]] = []
        for part in reversed(self.pm.hook.savevm_bench(size=size, runs=runs)):  # pluggy calls LIFO
            rows.extend(part or [])
        rows.sort(key=lambda r: not r.get("headline", False))  # stable: plugin order otherwise
        return rows

    def cli_commands(self, subparsers: argparse._SubParsersAction) -> None:
        """Let plugins add ``savevm`` subcommands."""
        self.pm.hook.savevm_cli_commands(subparsers=subparsers)

    def new_registry(self) -> SectionRegistry:
        """A registry for one migration, with plugin sections registered."""
        from savevm.registry import SectionRegistry

        reg = SectionRegistry(config=self.config, plugins=self)
        self.register_sections(reg)
        return reg


def _plugin_aliases(name: str) -> set[str]:
    """The names a ``[plugins.NAME]`` table may use for a plugin (as ``MigrationConfig.plugin_options`` finds it)."""
    short = name.rsplit(".", 1)[-1]
    out = {name, short, short.removeprefix("savevm_")}
    for part in name.split("."):
        if part.startswith("savevm_"):
            out |= {part, part.removeprefix("savevm_")}
    return out
