"""The ``savevm`` command: migrate, incoming, analyze, bench, and what plugins add (demo).

Output: a live progress bar on a terminal (plain lines in a pipe), a stats
table at the end, or with ``--json`` one JSON object shaped like QMP
``query-migrate`` on stdout.  Logs go to stderr through structlog
(``--log-format json|console``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, NoReturn

from savevm.config import MigrationConfig
from savevm.errors import ConfigError, MigrationError
from savevm.logging import configure_logging


def _kv(text: str, what: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise ConfigError(what, f"expected NAME=VALUE, got {text!r}")
    return k.strip(), v.strip()


def build_config(args: argparse.Namespace) -> MigrationConfig:
    """Config file, then --capability, then --set (later wins)."""
    cfg = MigrationConfig.from_toml(args.config) if getattr(args, "config", None) else MigrationConfig()
    for cap in getattr(args, "capability", None) or []:
        cfg = cfg.set_capability(cap, True)
    for item in getattr(args, "set", None) or []:
        k, v = _kv(item, "--set")
        cfg = cfg.set_parameter(k, v)
    if getattr(args, "machine", None):
        from attrs import evolve

        cfg = evolve(cfg, machine=args.machine)
    if getattr(args, "mem_prealloc", False):
        from attrs import evolve

        cfg = evolve(cfg, mem_prealloc=True)
    return cfg


def load_program(spec: str, guest_args: list[str]) -> Any:
    """``module:callable`` + ``key=value`` args -> the program object."""
    mod, sep, attr = spec.partition(":")
    if not sep:
        raise ConfigError("--guest", f"expected MODULE:CALLABLE, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("--guest", f"cannot load {spec!r}: {exc}") from exc
    kwargs = dict(_kv(a, "--guest-arg") for a in guest_args)
    kwargs = {k.replace("-", "_"): v for k, v in kwargs.items()}
    return factory(**kwargs)


def common_options(p: argparse.ArgumentParser) -> None:
    """Options every command takes (plugin commands too)."""
    p.add_argument("--json", action="store_true", help="print the final stats as one JSON object")
    p.add_argument("--log-format", choices=("console", "json"), default="console")
    p.add_argument("--log-level", default="warning", help="debug, info, warning (default), error")


def migration_options(p: argparse.ArgumentParser) -> None:
    """Options of commands that run a migration: config file, parameters, capabilities."""
    p.add_argument("--config", help="TOML config file (capabilities, parameters, plugins)")
    p.add_argument("--set", action="append", metavar="PARAM=VALUE",
                   help="QEMU migration parameter, e.g. max-bandwidth=1G (repeatable)")
    p.add_argument("--capability", action="append", metavar="NAME",
                   help="turn on a capability: xbzrle, compress, auto-converge, ... (repeatable)")
    p.add_argument("--machine", help="machine name in the configuration section (default: savevm)")


#: Commands that come from a plugin, and what to install when one is missing.
PLUGIN_COMMANDS = {"demo": "savevm-ram (pip install -e plugins/ram)"}


def _run(name: str) -> Any:
    """A lazily imported command function of savevm.cli.commands."""

    def call(args: argparse.Namespace) -> int:
        from savevm.cli import commands

        rc: int = getattr(commands, name)(args)
        return rc

    return call


def make_parser(plugins: Any = None) -> argparse.ArgumentParser:
    """The argument parser, with the commands installed plugins add (public so tests and docs can inspect it)."""
    ap = _Parser(prog="savevm", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("migrate", help="migrate a program's state to URI")
    m.add_argument("uri", help="tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD, fd:N")
    m.add_argument("--guest", required=True, help="MODULE:CALLABLE returning the program")
    m.add_argument("--guest-arg", action="append", default=[], metavar="KEY=VALUE")
    migration_options(m)
    common_options(m)
    m.set_defaults(func=_run("cmd_migrate"))

    i = sub.add_parser("incoming", help="wait for one migration on URI and load it")
    i.add_argument("uri")
    i.add_argument("--guest", required=True, help="MODULE:CALLABLE returning the program")
    i.add_argument("--guest-arg", action="append", default=[], metavar="KEY=VALUE")
    i.add_argument("--print-uri", action="store_true", help="print the listening URI as the first stdout line")
    i.add_argument("--vmdesc", metavar="FILE",
                   help="a stream file (or vmdesc JSON) from the same kind of source: device sections "
                        "this side does not model are skipped by their described size")
    i.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the source to connect, and the longest silence once connected")
    i.add_argument("--mem-prealloc", action="store_true",
                   help="fault the program's memory in while waiting for the source (QEMU's -mem-prealloc): "
                        "a faster load, but all of it resident even where only zero pages arrive")
    migration_options(i)
    common_options(i)
    i.set_defaults(func=_run("cmd_incoming"))

    b = sub.add_parser("bench", help="measure the hot paths on this machine (rows from every installed plugin)")
    b.add_argument("--size", default="256M", help="bytes of RAM to push through (default 256M)")
    b.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported")
    common_options(b)
    b.set_defaults(func=_run("cmd_bench"))

    a = sub.add_parser("analyze", help="describe a migration stream file (ours or QEMU's)")
    a.add_argument("file")
    a.add_argument("--machine", help="expected machine name (default: the stream's own)")
    common_options(a)
    a.set_defaults(func=_run("cmd_analyze"))

    if plugins is None:
        from savevm.plugins import PluginHost

        plugins = PluginHost()
    plugins.cli_commands(sub)
    return ap


class _Parser(argparse.ArgumentParser):
    """argparse, plus a hint when a command comes from a plugin that is not installed."""

    def error(self, message: str) -> NoReturn:
        for name, dist in PLUGIN_COMMANDS.items():
            if "invalid choice" in message and f"'{name}'" in message:
                message += f"\n'savevm {name}' comes from a plugin that is not installed: install {dist}"
        super().error(message)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``savevm`` console script."""
    try:
        parser = make_parser()
    except MigrationError as exc:  # a broken plugin: say which, not a traceback
        print(f"savevm: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        rc: int = args.func(args)
        return rc
    except MigrationError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"status": "failed", "error-desc": str(exc)}))
        print(f"savevm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("savevm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
