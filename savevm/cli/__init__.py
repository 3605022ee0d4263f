"""The ``savevm`` command: migrate, incoming, demo, analyze.

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
from typing import Any

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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the final stats as one JSON object")
    p.add_argument("--log-format", choices=("console", "json"), default="console")
    p.add_argument("--log-level", default="warning", help="debug, info, warning (default), error")


def _migration_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (capabilities, parameters, plugins)")
    p.add_argument("--set", action="append", metavar="PARAM=VALUE",
                   help="QEMU migration parameter, e.g. max-bandwidth=1G (repeatable)")
    p.add_argument("--capability", action="append", metavar="NAME",
                   help="turn on a capability: xbzrle, compress, auto-converge, ... (repeatable)")
    p.add_argument("--machine", help="machine name in the configuration section (default: savevm)")


def make_parser() -> argparse.ArgumentParser:
    """The argument parser (public so tests and docs can inspect it)."""
    ap = argparse.ArgumentParser(prog="savevm", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="migrate a program's state to URI")
    m.add_argument("uri", help="tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD, fd:N")
    m.add_argument("--guest", required=True, help="MODULE:CALLABLE returning the program")
    m.add_argument("--guest-arg", action="append", default=[], metavar="KEY=VALUE")
    _migration_opts(m)
    _common(m)

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
    _migration_opts(i)
    _common(i)

    d = sub.add_parser("demo", help="live-migrate a synthetic workload between two local processes")
    d.add_argument("--size", default="256M", help="total RAM (K/M/G suffixes), default 256M")
    d.add_argument("--blocks", type=int, default=2, help="number of RAM blocks, default 2")
    d.add_argument("--fill", choices=("random", "text", "zero"), default="random", help="initial content")
    d.add_argument("--dirty-rate", default="20M", help="bytes/s of pages the workload rewrites (0 = none)")
    d.add_argument("--capability", action="append", metavar="NAME", help="xbzrle, compress, auto-converge, ...")
    d.add_argument("--set", action="append", metavar="PARAM=VALUE", help="QEMU parameter (repeatable)")
    d.add_argument("--uri", default="tcp:127.0.0.1:0", help="tcp:HOST:PORT or unix:PATH")
    d.add_argument("--config", help=argparse.SUPPRESS)
    d.add_argument("--dirty-tracking", choices=("tracked", "compare"), default="tracked",
                   help="how the source finds dirty pages")
    d.add_argument("--corrupt-dest-page", type=int, default=None, help=argparse.SUPPRESS)
    d.add_argument("--timeout", type=float, default=600.0, help="give up (cancel) after this many seconds")
    _common(d)

    b = sub.add_parser("bench", help="measure the hot paths on this machine (in-process, with baselines)")
    b.add_argument("--size", default="256M", help="bytes of RAM to push through (default 256M)")
    b.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported")
    _common(b)

    a = sub.add_parser("analyze", help="describe a migration stream file (ours or QEMU's)")
    a.add_argument("file")
    a.add_argument("--machine", help="expected machine name (default: the stream's own)")
    _common(a)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``savevm`` console script."""
    args = make_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        if args.command == "migrate":
            from savevm.cli.commands import cmd_migrate

            return cmd_migrate(args)
        if args.command == "incoming":
            from savevm.cli.commands import cmd_incoming

            return cmd_incoming(args)
        if args.command == "demo":
            from savevm.cli.commands import cmd_demo

            return cmd_demo(args)
        if args.command == "bench":
            from savevm.cli.commands import cmd_bench

            return cmd_bench(args)
        if args.command == "analyze":
            from savevm.cli.commands import cmd_analyze

            return cmd_analyze(args)
    except MigrationError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"status": "failed", "error-desc": str(exc)}))
        print(f"savevm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("savevm: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
