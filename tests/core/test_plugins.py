"""PluginHost: built-ins, entry points, blocking, unknown hooks, and one test per core hook."""

from __future__ import annotations

import importlib
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from savevm import hookimpl, hookspec
from savevm.channels import listen, memory_pipe, open_channel
from savevm.config import MigrationConfig, PluginSettings
from savevm.errors import ConfigError, PluginError, URIError
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile
from savevm.registry import SectionRegistry
from tests.core.samples import ChunkedLive

BUILTIN = "savevm.channels.builtin"

FAKEPLUG_SOURCE = '''
from savevm import hookimpl

CONFIGURED = []


@hookimpl
def savevm_configure(config, options):
    CONFIGURED.append((config, dict(options)))
'''


@pytest.fixture
def install_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Install a fake distribution on sys.path with a ``savevm`` entry point."""
    made: list[str] = []

    def install(ep_name: str, module: str, source: str) -> types.ModuleType | None:
        dist = tmp_path / f"{ep_name}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {ep_name}\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text(f"[savevm]\n{ep_name} = {module}\n")
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        made.append(module)
        importlib.invalidate_caches()
        return None

    monkeypatch.syspath_prepend(str(tmp_path))
    yield install
    for m in made:
        sys.modules.pop(m, None)


def fresh_config(**plugins: Any) -> MigrationConfig:
    return MigrationConfig(plugins=PluginSettings(**plugins))


# ---------------------------------------------------------------- host


def test_builtins_registered() -> None:
    host = PluginHost(load_entrypoints=False)
    assert BUILTIN in host.names()
    assert host.has_impl("savevm_get_transport")
    assert not host.has_impl("savevm_query_migrate")
    assert host.get_transport("tcp").scheme == "tcp"


def test_builtin_can_be_blocked() -> None:
    host = PluginHost(fresh_config(disable=(BUILTIN,)), load_entrypoints=False)
    assert BUILTIN not in host.names()
    with pytest.raises(URIError):
        host.get_transport("tcp")


def test_entry_point_plugin_loaded(install_dist) -> None:  # noqa: ANN001
    install_dist("fakeplug", "fakeplug_mod", FAKEPLUG_SOURCE)
    host = PluginHost()
    assert "fakeplug" in host.names()
    mod = host.pm.get_plugin("fakeplug")
    assert mod is sys.modules["fakeplug_mod"]
    assert len(mod.CONFIGURED) == 1
    # the distribution is known to pluggy, as for any installed plugin
    dist = host.distribution("fakeplug")
    assert dist is not None and dist.metadata["Name"] == "fakeplug"


def test_entry_point_plugin_blocked_by_config(install_dist) -> None:  # noqa: ANN001
    install_dist("fakeplug", "fakeplug_mod", FAKEPLUG_SOURCE)
    host = PluginHost(fresh_config(disable=("fakeplug",)))
    assert "fakeplug" not in host.names()
    assert host.pm.is_blocked("fakeplug")
    assert "fakeplug_mod" not in sys.modules, "a blocked plugin is not even imported"


def test_entry_point_plugin_blocked_by_env(install_dist, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    install_dist("fakeplug", "fakeplug_mod", FAKEPLUG_SOURCE)
    monkeypatch.setenv("SAVEVM_DISABLE_PLUGINS", "other, fakeplug")
    host = PluginHost()
    assert "fakeplug" not in host.names()
    assert host.pm.is_blocked("fakeplug") and host.pm.is_blocked("other")


def test_entry_point_allow_list(install_dist) -> None:  # noqa: ANN001
    install_dist("fakeplug", "fakeplug_mod", FAKEPLUG_SOURCE)
    install_dist("otherplug", "otherplug_mod", FAKEPLUG_SOURCE)
    host = PluginHost(fresh_config(enable=("otherplug",)))
    assert "otherplug" in host.names()
    assert "fakeplug" not in host.names()
    assert BUILTIN in host.names(), "the allow-list is about installed plugins, not built-ins"


def test_entry_point_that_fails_to_import(install_dist) -> None:  # noqa: ANN001
    install_dist("brokenplug", "brokenplug_mod", "raise ImportError('missing dependency')\n")
    with pytest.raises(PluginError, match="brokenplug"):
        PluginHost()


UNKNOWN_HOOK_SOURCE = '''
from savevm import hookimpl


@hookimpl
def savevm_nonexistent(x):
    return x
'''


def test_unknown_hook_from_entry_point(install_dist) -> None:  # noqa: ANN001
    install_dist("typoplug", "typoplug_mod", UNKNOWN_HOOK_SOURCE)
    with pytest.raises(PluginError, match="savevm_nonexistent"):
        PluginHost()


class UnknownHook:
    @hookimpl
    def savevm_nonexistent(self, x: int) -> int:
        return x


def test_unknown_hook_from_extra_or_register() -> None:
    with pytest.raises(PluginError, match="savevm_nonexistent"):
        PluginHost(load_entrypoints=False, extra=[UnknownHook()])
    host = PluginHost(load_entrypoints=False)
    plugin = UnknownHook()
    with pytest.raises(PluginError, match="savevm_nonexistent"):
        host.register(plugin, name="typo")
    assert not host.pm.is_registered(plugin), "a rejected plugin does not stay half-registered"


def test_hook_trace_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from structlog.testing import capture_logs

    monkeypatch.setenv("SAVEVM_TRACE_HOOKS", "1")
    with capture_logs() as logs:
        host = PluginHost(load_entrypoints=False)
        host.get_transport("tcp")
    assert any(e["event"] == "hook_trace" and "savevm_get_transport" in e["msg"] for e in logs)


# ---------------------------------------------------------------- one test per hook


class Configurable:
    def __init__(self) -> None:
        self.calls: list[tuple[MigrationConfig, dict[str, Any]]] = []

    @hookimpl
    def savevm_configure(self, config: MigrationConfig, options: dict[str, Any]) -> None:
        self.calls.append((config, options))


def test_hook_savevm_configure(install_dist) -> None:  # noqa: ANN001
    install_dist("fakeplug", "fakeplug_mod", FAKEPLUG_SOURCE)
    cfg = fresh_config(options={"fakeplug": {"level": 3, "mode": "fast"}})
    host = PluginHost(cfg)
    mod = sys.modules["fakeplug_mod"]
    assert mod.CONFIGURED == [(cfg, {"level": 3, "mode": "fast"})]
    # reconfiguring pushes the new config and the new table
    cfg2 = fresh_config(options={"fakeplug": {"level": 9}})
    host.configure(cfg2)
    assert mod.CONFIGURED[-1] == (cfg2, {"level": 9})

    # a plugin object registered later is configured once, by its name
    obj = Configurable()
    host.register(obj, name="myplug")
    assert obj.calls == [(cfg2, {})]
    extra = Configurable()
    PluginHost(fresh_config(options={"xbzrle": {"a": 1}}), load_entrypoints=False, extra=[extra])
    assert len(extra.calls) == 1


class LoopTransport:
    """An in-memory transport named ``loop:NAME``."""

    scheme = "loop"

    def __init__(self) -> None:
        self.pipes: dict[str, tuple[Any, Any]] = {}

    def connect(self, address: str) -> Any:
        return self.pipes[address][0]

    def listen(self, address: str) -> Any:
        self.pipes[address] = memory_pipe()
        pipes = self.pipes

        class _Listener:
            uri = f"loop:{address}"

            def accept(self, timeout: float | None = None) -> Any:
                return pipes[address][1]

            def close(self) -> None:
                pass

        return _Listener()


class LoopPlugin:
    def __init__(self) -> None:
        self.transport = LoopTransport()
        self.asked: list[str] = []

    @hookimpl
    def savevm_get_transport(self, scheme: str, config: MigrationConfig) -> Any:
        self.asked.append(scheme)
        return self.transport if scheme == "loop" else None


def test_hook_savevm_get_transport() -> None:
    plugin = LoopPlugin()
    host = PluginHost(load_entrypoints=False, extra=[plugin])
    lst = listen("loop:a", host)
    assert lst.uri == "loop:a"
    out = QEMUFile(open_channel("loop:a", host), writable=True)
    out.put_counted_string("through a plugin transport")
    out.close()
    f = QEMUFile(lst.accept())
    assert f.get_counted_string() == "through a plugin transport"
    assert plugin.asked == ["loop", "loop"]
    # other schemes still reach the built-ins, which are tried last
    assert host.get_transport("tcp").scheme == "tcp"

    class Override:
        @hookimpl
        def savevm_get_transport(self, scheme: str, config: MigrationConfig) -> Any:
            return plugin.transport if scheme == "tcp" else None

    host.register(Override())
    assert host.get_transport("tcp") is plugin.transport


class Sections:
    @hookimpl
    def savevm_register_sections(self, registry: SectionRegistry, config: MigrationConfig) -> None:
        registry.register_live("plugin-live", 0, 1, ChunkedLive(b"x" * 10))


def test_hook_savevm_register_sections() -> None:
    host = PluginHost(load_entrypoints=False, extra=[Sections()])
    reg = host.new_registry()
    assert [e.idstr for e in reg] == ["plugin-live"]
    assert reg.plugins is host and reg.config is host.config
    reg.register_live("user", 0, 1, ChunkedLive())
    assert [e.section_id for e in reg] == [1, 2], "plugin sections come before user sections"


class StateWatcher:
    def __init__(self) -> None:
        self.seen: list[tuple[Any, str, str]] = []

    @hookimpl
    def savevm_migration_state_changed(self, migration: Any, old: str, new: str) -> None:
        self.seen.append((migration, old, new))


def test_hook_savevm_migration_state_changed() -> None:
    w = StateWatcher()
    host = PluginHost(load_entrypoints=False, extra=[w])
    mig = object()
    host.state_changed(mig, "none", "setup")
    host.state_changed(mig, "setup", "active")
    assert w.seen == [(mig, "none", "setup"), (mig, "setup", "active")]
    # without implementations it is a no-op
    PluginHost(load_entrypoints=False).state_changed(mig, "active", "completed")


class StatsAdder:
    @hookimpl
    def savevm_query_migrate(self, migration: Any, info: dict[str, Any]) -> None:
        info["myplug"] = {"pages": 3, "status_seen": info.get("status")}


def test_hook_savevm_query_migrate() -> None:
    host = PluginHost(load_entrypoints=False, extra=[StatsAdder()])
    info: dict[str, Any] = {"status": "active"}
    host.query_migrate(object(), info)
    assert info == {"status": "active", "myplug": {"pages": 3, "status_seen": "active"}}


class DeclaresCapability:
    def __init__(self, *names: str) -> None:
        self.names = list(names)

    @hookimpl
    def savevm_migration_capabilities(self) -> list[str]:
        return self.names


def test_hook_savevm_migration_capabilities() -> None:
    host = PluginHost(load_entrypoints=False, extra=[DeclaresCapability("toy-codec")])
    assert host.plugin_capabilities() == {"toy-codec"}
    # the host's config accepts it now; QEMU's names keep their rules; a typo is still an error
    cfg = host.config.set_capability("toy-codec")
    assert cfg.has("toy-codec") and not cfg.has("xbzrle")
    with pytest.raises(ConfigError, match="did you mean toy-codec"):
        host.config.set_capability("toy-codek")
    with pytest.raises(ConfigError, match="installed plugins add: toy-codec"):
        host.config.set_capability("zstd")
    # turned on, but no loaded plugin offers it (e.g. the plugin was disabled)
    with pytest.raises(ConfigError, match="no loaded plugin offers it"):
        PluginHost(cfg, load_entrypoints=False)
    PluginHost(cfg, load_entrypoints=False, extra=[DeclaresCapability("toy-codec")])
    # a plugin may not redefine one of QEMU's capabilities
    with pytest.raises(PluginError, match="QEMU's own"):
        PluginHost(load_entrypoints=False, extra=[DeclaresCapability("xbzrle")])
    # TOML and the CLI accept declared names
    from_toml = MigrationConfig.from_dict({"capabilities": {"toy-codec": True}}, plugin_capabilities={"toy-codec"})
    assert from_toml.has("toy-codec")
    with pytest.raises(ConfigError, match="toy-codec"):
        MigrationConfig.from_dict({"capabilities": {"toy-codec": True}})


def test_unknown_plugin_table_is_an_error_naming_the_known_plugins() -> None:
    cfg = MigrationConfig.from_dict({"plugins": {"xbzlre": {"level": 1}}})
    with pytest.raises(ConfigError) as err:
        PluginHost(cfg)
    msg = str(err.value)
    assert "plugins.xbzlre" in msg and "no plugin named 'xbzlre'" in msg
    assert "xbzrle" in msg and "ram" in msg and "rdma_stub" in msg
    # every alias of a real plugin is accepted, and so is a table for a disabled plugin
    for name in ("xbzrle", "ram", "rdma_stub"):
        PluginHost(MigrationConfig.from_dict({"plugins": {name: {}}}))
    PluginHost(MigrationConfig.from_dict({"plugins": {"disable": ["xbzrle"], "xbzrle": {}}}))


# a plugin with hooks of its own, as the RAM plugin has
class ExtraSpecs:
    @hookspec(firstresult=True)
    def myplug_choose(self, n: int) -> int | None:
        """Pick a number."""


class AddsHooks:
    def __init__(self) -> None:
        self.called_with: list[Any] = []

    @hookimpl
    def savevm_addhooks(self, pluginmanager: Any) -> None:
        self.called_with.append(pluginmanager)
        pluginmanager.add_hookspecs(ExtraSpecs)


class UsesExtraHook:
    @hookimpl
    def myplug_choose(self, n: int) -> int:
        return n * 2


def test_hook_savevm_addhooks() -> None:
    adder = AddsHooks()
    # the user of the new hook is registered first: check_pending runs after everyone is in
    host = PluginHost(load_entrypoints=False, extra=[UsesExtraHook(), adder])
    assert adder.called_with == [host.pm]
    assert host.has_impl("myplug_choose")
    assert host.hook("myplug_choose")(n=21) == 42
    with pytest.raises(PluginError):
        host.hook("no_such_hook")
    # without the spec-adding plugin the same hook is unknown
    with pytest.raises(PluginError, match="myplug_choose"):
        PluginHost(load_entrypoints=False, extra=[UsesExtraHook()])


class AddsCommand:
    """A plugin adding a ``savevm hello`` subcommand."""

    @hookimpl
    def savevm_cli_commands(self, subparsers: Any) -> None:
        p = subparsers.add_parser("hello", help="say hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: 7 if args.name == "savevm" else 0)


def test_hook_savevm_cli_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from savevm.cli import main, make_parser

    host = PluginHost(load_entrypoints=False, extra=[AddsCommand()])
    parser = make_parser(host)
    args = parser.parse_args(["hello", "--name", "savevm"])
    assert args.func(args) == 7
    # the installed RAM plugin contributes `demo` through the same hook
    assert "demo" in make_parser().format_help()
    # without it, `savevm demo` names what to install instead of a bare "invalid choice"
    with pytest.raises(SystemExit) as ei:
        make_parser(PluginHost(load_entrypoints=False)).parse_args(["demo"])
    assert ei.value.code == 2
    assert "install savevm-ram" in capsys.readouterr().err
    assert main(["bench", "--size", "0"]) == 2  # a core command still works (and refuses a 0 size clearly)


class BenchRows:
    @hookimpl
    def savevm_bench(self, size: int, runs: int) -> list[dict[str, Any]]:
        return [{"what": f"fake {size}x{runs}", "seconds": 1.0, "GB/s": size / 1e9, "baseline": "none",
                 "baseline GB/s": 1.0, "ratio": 1.0}]


def test_hook_savevm_bench() -> None:
    host = PluginHost(load_entrypoints=False, extra=[BenchRows()])
    assert [r["what"] for r in host.bench_rows(4096, 2)] == ["fake 4096x2"]
    # the installed plugins contribute RAM and XBZRLE rows, in registration order
    rows = PluginHost().bench_rows(1 << 20, 1)
    whats = [r["what"] for r in rows]
    assert any(w.startswith("RAM bulk stage") for w in whats)
    assert any(w.startswith("XBZRLE encode") for w in whats)
    assert all(r["seconds"] > 0 and r["ratio"] > 0 for r in rows)
