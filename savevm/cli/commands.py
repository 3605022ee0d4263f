"""The CLI commands, each a function of parsed arguments returning an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from savevm.cli import build_config, load_program
from savevm.cli.progress import human, print_table, watch, watch_incoming
from savevm.errors import ConfigError, MigrationError
from savevm.migration import Incoming, Migration, MigrationState
from savevm.plugins import PluginHost


def _registry(cfg: Any) -> Any:
    return PluginHost(cfg).new_registry()


def cmd_migrate(args: argparse.Namespace) -> int:
    """``savevm migrate URI --guest MOD:CALLABLE``."""
    cfg = build_config(args)
    reg = _registry(cfg)
    prog = load_program(args.guest, args.guest_arg)
    prog.register(reg)
    if hasattr(prog, "start"):
        prog.start()
    mig = Migration(reg, args.uri, guest=prog, config=cfg)
    mig.start()
    total = sum(getattr(getattr(e.handlers, "ram", None), "total_bytes", 0) for e in reg.live())
    try:
        watch(mig.query, mig.finished, total=total, quiet=args.json)
    except KeyboardInterrupt:
        mig.cancel()
    st = mig.wait()
    if hasattr(prog, "stop"):
        prog.stop()
    out = st.as_qmp()
    if hasattr(prog, "report") and st.status == "completed":
        out["guest"] = prog.report()
    if args.json:
        print(json.dumps(out))
    else:
        print_table(st, "savevm migrate")
    return 0 if st.status == "completed" else 1


def cmd_incoming(args: argparse.Namespace) -> int:
    """``savevm incoming URI --guest MOD:CALLABLE``."""
    cfg = build_config(args)
    reg = _registry(cfg)
    prog = load_program(args.guest, args.guest_arg)
    prog.register(reg)
    inc = Incoming(reg, args.uri, guest=prog, config=cfg)
    inc.accept_timeout = args.timeout
    if args.vmdesc:
        inc.vmdesc = _read_vmdesc_arg(args.vmdesc)
    inc.skip_unknown_devices = bool(args.skip_unknown_devices or getattr(prog, "skip_unknown_devices", False))
    uri = inc.listen()
    if args.print_uri:
        print(uri, flush=True)
    elif not args.json:
        print(f"savevm: waiting for a migration on {uri}", file=sys.stderr, flush=True)
    inc.start()
    watch_incoming(inc.query, inc.finished, quiet=args.json)
    st = inc.wait()
    out = st.as_qmp()
    if hasattr(prog, "report") and st.status == "completed":
        out["guest"] = prog.report()
    if args.json:
        print(json.dumps(out), flush=True)
    else:
        print_table(st, "savevm incoming")
    return 0 if st.status == "completed" else 1


def _read_vmdesc_arg(path: str) -> dict[str, Any]:
    """``--vmdesc``: a JSON file, or a stream file whose trailing vmdesc is read."""
    from savevm.vmdesc import MAX_VMDESC, parse_vmdesc, read_vmdesc

    try:
        with open(path, "rb") as fh:
            head = fh.read(1)
            if head == b"{":
                # bounded like a vmdesc in a stream: one byte more than allowed is refused
                desc: dict[str, Any] | None = parse_vmdesc(head + fh.read(MAX_VMDESC), 0)
            else:
                desc = read_vmdesc(path)
    except (OSError, MigrationError) as exc:
        raise ConfigError("--vmdesc", f"cannot read {path!r}: {exc}") from exc
    if desc is None:
        raise ConfigError("--vmdesc", f"{path!r} holds no vmdesc (neither JSON nor a stream ending in one)")
    return desc


def cmd_bench(args: argparse.Namespace) -> int:
    """``savevm bench``: in-process hot-path figures from every installed plugin, with same-run baselines."""
    from savevm.config import parse_size

    size = parse_size(args.size, "--size") // 4096 * 4096
    if size <= 0 or args.runs < 1:
        raise ConfigError("--size", "need at least one page and one run")
    rows = PluginHost().bench_rows(size, args.runs)
    if not rows:
        raise MigrationError("no installed plugin offers benchmarks (install savevm-ram: pip install -e plugins/ram)")
    if args.json:
        print(json.dumps({"size": size, "runs": args.runs, "rows": rows}))
        return 0
    print(f"savevm bench: {human(size)}, median of {args.runs} runs")
    w = max(len(r["what"]) for r in rows)
    print(f"{'what':<{w}}  {'seconds':>8}  {'GB/s':>6}  {'baseline GB/s':>13}  ratio  baseline")
    for r in rows:
        print(f"{r['what']:<{w}}  {r['seconds']:8.3f}  {r['GB/s']:6.2f}  {r['baseline GB/s']:13.2f}  "
              f"{r['ratio']:5.2f}  {r['baseline']}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """``savevm analyze FILE``: sections, RAM blocks and page counts of a stream file."""
    from savevm.cli.analyze import analyze_file

    report = analyze_file(args.file, machine=args.machine)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"== {args.file} ==")
        print(f"machine      {report['machine']}")
        print(f"bytes        {report['bytes']}")
        for s in report["sections"]:
            print(f"section      {s['idstr']} instance {s['instance_id']} version {s['version_id']} ({s['how']})")
        for b in report["ram"]["blocks"]:
            print(f"ram block    {b['idstr']}  {human(b['used_length'])}  pages loaded {b['pages']}")
        print(f"ram records  zero {report['ram']['zero']}  normal {report['ram']['normal']}  "
              f"encoded (xbzrle/compressed) {report['ram']['encoded']}")
    return 0 if report["status"] == "ok" else 1


__all__ = ["MigrationState", "cmd_analyze", "cmd_bench", "cmd_incoming", "cmd_migrate"]
