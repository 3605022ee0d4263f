"""The ``savevm`` command: migrate, incoming, analyze, rewrite, bench, and what plugins add (demo).

Output: a live progress bar on a terminal (plain lines in a pipe), a stats
table at the end, or with ``--json`` one JSON object shaped like QMP
``query-migrate`` on stdout.  Logs go to stderr through structlog
(``--log-format json|console``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
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


def installed_capabilities() -> frozenset[str]:
    """Capability names the installed plugins add (a third-party codec's switch), so the CLI accepts them."""
    from savevm.plugins import PluginHost

    return PluginHost().plugin_capabilities()


def build_config(args: argparse.Namespace) -> MigrationConfig:
    """Config file, then --capability, then --set (later wins)."""
    declared = installed_capabilities()
    cfg = (MigrationConfig.from_toml(args.config, plugin_capabilities=declared) if getattr(args, "config", None)
           else MigrationConfig(plugin_capabilities=declared))
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
    if hasattr(args, "no_prefault"):  # savevm incoming: on unless the flag or the config file says off
        from attrs import evolve

        on = not args.no_prefault and cfg.prefault_while_waiting is not False
        cfg = evolve(cfg, prefault_while_waiting=on)
    return cfg


def load_program(spec: str, guest_args: list[str]) -> Any:
    """``module:callable`` + ``key=value`` args -> the program object.

    The module is imported with the current directory first on the path,
    as ``python -m`` does, so ``--guest service:KVService`` finds
    ``./service.py`` without installing it.
    """
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ConfigError("--guest", f"expected MODULE:CALLABLE, got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        factory = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("--guest", f"cannot load {spec!r}: {exc}") from exc
    if not callable(factory):
        raise ConfigError("--guest", f"{spec!r} is not callable")
    kwargs = dict(_kv(a, "--guest-arg") for a in guest_args)
    kwargs = {k.replace("-", "_"): v for k, v in kwargs.items()}
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: let the call say
        sig = None
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as exc:
            takes = [n for n, p in sig.parameters.items()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            raise ConfigError("--guest-arg", f"{spec} does not accept these arguments ({exc}); it takes: "
                                             f"{', '.join(takes) or 'no arguments'}") from None
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
    from savevm import __version__

    ap = _Parser(prog="savevm", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"savevm {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("migrate", help="migrate a program's state to URI")
    m.add_argument("uri", help="tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD, fd:N")
    m.add_argument("--guest", required=True, help="MODULE:CALLABLE returning the program")
    m.add_argument("--guest-arg", action="append", default=[], metavar="KEY=VALUE")
    m.add_argument("--plot", metavar="FILE.png",
                   help="draw the per-iteration records (pending, sent by kind, downtime, throttle) into a PNG "
                        "(needs matplotlib: pip install 'savevm[plot]')")
    migration_options(m)
    common_options(m)
    m.set_defaults(func=_run("cmd_migrate"))

    r = sub.add_parser("run", help="run a program under a QMP monitor, ready to be live-migrated")
    r.add_argument("--guest", required=True, help="MODULE:CALLABLE returning the program")
    r.add_argument("--guest-arg", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--qmp", required=True, metavar="unix:PATH|tcp:HOST:PORT",
                   help="where the QMP monitor listens (migrate, query-migrate, cont, quit, ...)")
    migration_options(r)
    common_options(r)
    r.set_defaults(func=_run("cmd_run"))

    i = sub.add_parser("incoming", help="wait for one migration on URI and load it")
    i.add_argument("uri", help="the URI to listen on, or 'defer' to wait for QMP migrate-incoming (needs --qmp)")
    i.add_argument("--guest", required=True, help="MODULE:CALLABLE returning the program")
    i.add_argument("--guest-arg", action="append", default=[], metavar="KEY=VALUE")
    i.add_argument("--print-uri", action="store_true", help="print the listening URI as the first stdout line")
    i.add_argument("--skip-unknown-devices", action="store_true",
                   help="skip device sections the program does not model (e.g. a QEMU's CPUs), sized from the "
                        "vmdesc the source sends after its stream (QemuGuest does this by itself)")
    i.add_argument("--vmdesc", metavar="FILE",
                   help="fallback for sources that send no vmdesc: a stream file (or vmdesc JSON) from the same "
                        "kind of source, whose sizes are used to skip device sections this side does not model")
    i.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for a source to connect (default: no limit); once connected, silence is "
                        "bounded by the x-stall-timeout parameter (--set x-stall-timeout=MS, default 30000)")
    i.add_argument("--qmp", metavar="unix:PATH|tcp:HOST:PORT", help="serve a QMP monitor while loading")
    i.add_argument("--run", action="store_true",
                   help="keep the program running after the load (and the QMP monitor up) until QMP quit")
    i.add_argument("--mem-prealloc", action="store_true",
                   help="fault the program's memory in while waiting for the source (QEMU's -mem-prealloc): "
                        "a faster load, but all of it resident even where only zero pages arrive")
    i.add_argument("--no-prefault", action="store_true",
                   help="do not fault the program's memory in while waiting (by default it is, where it fits in "
                        "half the available memory; the first zero page stops it and zero pages give it back)")
    migration_options(i)
    common_options(i)
    i.set_defaults(func=_run("cmd_incoming"))

    b = sub.add_parser("bench", help="measure the hot paths on this machine (rows from every installed plugin)")
    b.add_argument("--size", default="256M", help="bytes of RAM to push through (default 256M)")
    b.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported")
    common_options(b)
    b.set_defaults(func=_run("cmd_bench"))

    a = sub.add_parser("analyze", help="describe a migration stream file (ours or QEMU's): sections, RAM, devices")
    a.add_argument("file", metavar="STREAM", help="the stream file, or - for stdin")
    a.add_argument("--machine", help="expected machine name (default: the stream's own)")
    a.add_argument("--dump-devices", action="store_true",
                   help="print the device sections decoded field by field through the stream's vmdesc, as JSON")
    a.add_argument("--dump-vmdesc", action="store_true", help="print the stream's vmdesc JSON")
    a.add_argument("--extract-ram", metavar="DIR",
                   help="write each RAM block to DIR/<idstr> (folders for idstrs with '/'), as a destination loads it")
    a.add_argument("--max-ram", metavar="SIZE",
                   help="RAM the stream's blocks may take, e.g. 64G (default: the memory available here)")
    common_options(a)
    a.set_defaults(func=_run("cmd_analyze"))

    r = sub.add_parser("rewrite", help="write REF's stream with RAM blocks replaced by files")
    r.add_argument("ref", metavar="REF", help="the reference stream: configuration, block list, devices")
    r.add_argument("out", metavar="OUT", help="the stream to write (via OUT.part, renamed when complete)")
    r.add_argument("--ram", action="append", default=[], metavar="BLOCK=FILE",
                   help="replace RAMBlock BLOCK by FILE, exactly the block's length (repeatable)")
    r.add_argument("--ram-only", action="store_true", help="leave REF's device sections out")
    r.add_argument("--max-ram", metavar="SIZE", help="RAM REF's blocks may take (default: the memory available here)")
    common_options(r)
    r.set_defaults(func=_run("cmd_rewrite"))

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
    try:
        configure_logging(args.log_format, args.log_level)
        rc: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return rc
    except BrokenPipeError:
        # `savevm analyze X | head`: the reader has gone; end quietly, as a program killed by SIGPIPE
        _detach_stdout()
        return 128 + 13
    except MigrationError as exc:
        if getattr(args, "json", False):
            from savevm.cli.progress import report

            print(json.dumps(report(getattr(args, "command", "source"), {"status": "failed",
                                                                         "error-desc": str(exc)})))
        print(f"savevm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # interrupted before any migration started (the commands report a cancelled migration themselves)
        print("savevm: interrupted: status cancelled (no migration had started)", file=sys.stderr)
        return 130
    except OSError as exc:  # a missing or unreadable file named on the command line
        print(f"savevm: error: {exc}", file=sys.stderr)
        return 2


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
