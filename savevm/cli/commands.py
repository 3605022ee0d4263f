"""The CLI commands, each a function of parsed arguments returning an exit code."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from savevm.cli import build_config, load_program
from savevm.cli.progress import cancelled_line, human, print_table, report, watch, watch_incoming
from savevm.errors import ConfigError, MigrationError
from savevm.migration import Incoming, Migration, MigrationState
from savevm.plugins import PluginHost


def _registry(cfg: Any) -> Any:
    return PluginHost(cfg).new_registry()


def _wait(mig: Any) -> Any:
    """Wait for a migration to end; a Ctrl-C meanwhile cancels it and still waits for the ending."""
    try:
        return mig.wait()
    except KeyboardInterrupt:
        mig.cancel()
        return mig.wait()


def _finish(side: str, args: argparse.Namespace, stats: dict[str, Any], guest: dict[str, Any] | None,
            title: str, st: Any, *, interrupted: bool) -> int:
    """Print the final report (JSON or table, plus the Ctrl-C line) and choose the exit code."""
    out = report(side, stats, guest)
    if interrupted:
        out["status"] = "cancelled" if out["status"] in ("failed", "cancelled", "cancelling") else out["status"]
        print(cancelled_line(out), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out), flush=True)
    elif st is not None and not interrupted:
        print_table(st, title)
    if interrupted:
        return 130
    return 0 if out["status"] == "completed" else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    """``savevm migrate URI --guest MOD:CALLABLE``."""
    cfg = build_config(args)
    reg = _registry(cfg)
    prog = load_program(args.guest, args.guest_arg)
    prog.register(reg)
    mig = Migration(reg, args.uri, guest=prog, config=cfg)
    interrupted = False
    try:
        if hasattr(prog, "start"):
            prog.start()
        mig.start()
        total = sum(getattr(getattr(e.handlers, "ram", None), "total_bytes", 0) for e in reg.live())
        try:
            watch(mig.query, mig.finished, total=total, quiet=args.json)
        except KeyboardInterrupt:
            interrupted = True
            mig.cancel()
        st = _wait(mig)
    finally:
        if hasattr(prog, "stop"):
            prog.stop()
    guest = prog.report() if hasattr(prog, "report") and st.status == "completed" else None
    return _finish("source", args, st.as_qmp(), guest, "savevm migrate", st, interrupted=interrupted)


def cmd_incoming(args: argparse.Namespace) -> int:
    """``savevm incoming URI --guest MOD:CALLABLE [--qmp ADDR [--run]]``."""
    cfg = build_config(args)
    if args.uri == "defer" and not args.qmp:
        raise ConfigError("incoming", "'defer' waits for the QMP command migrate-incoming: give --qmp unix:PATH")
    if args.run and not args.qmp:
        raise ConfigError("--run", "keeping the program running needs a QMP monitor to stop it: give --qmp")
    vmdesc = _read_vmdesc_arg(args.vmdesc) if args.vmdesc else None
    prog = load_program(args.guest, args.guest_arg)
    if args.qmp:
        return _incoming_with_monitor(args, cfg, prog, vmdesc)
    reg = _registry(cfg)
    prog.register(reg)
    inc = Incoming(reg, args.uri, guest=prog, config=cfg)
    inc.accept_timeout = args.timeout
    inc.vmdesc = vmdesc
    uri = inc.listen()
    if args.print_uri:
        print(uri, flush=True)
    elif not args.json:
        print(f"savevm: waiting for a migration on {uri}", file=sys.stderr, flush=True)
    inc.start()
    interrupted = False
    try:
        watch_incoming(inc.query, inc.finished, quiet=args.json)
    except KeyboardInterrupt:
        interrupted = True
        inc.cancel()
    st = _wait(inc)
    guest = prog.report() if hasattr(prog, "report") and st.status == "completed" else None
    return _finish("destination", args, st.as_qmp(), guest, "savevm incoming", st, interrupted=interrupted)


def _incoming_with_monitor(args: argparse.Namespace, cfg: Any, prog: Any, vmdesc: dict[str, Any] | None) -> int:
    """The destination under a QMP monitor: load (now or at migrate-incoming), then exit or keep running."""
    from savevm.qmp import serve

    server = serve(prog, args.qmp, config=cfg, incoming="defer")
    mon = server.monitor
    interrupted = False
    try:
        if args.run and hasattr(prog, "start"):
            prog.start()  # paused: it must not touch migrated state before the load resumes it
        if args.uri != "defer":
            started = mon.start_incoming(args.uri, accept_timeout=args.timeout, vmdesc=vmdesc)
            if args.print_uri:
                print(started.uri, flush=True)
        elif args.print_uri:
            print("defer", flush=True)
        if not args.json:
            where = ("QMP migrate-incoming" if args.uri == "defer"
                     else f"a migration on {mon.incoming.uri if mon.incoming else args.uri}")
            print(f"savevm: waiting for {where}; QMP monitor on {server.address}", file=sys.stderr, flush=True)
        try:
            while not mon.quit_requested.is_set():
                if mon.incoming is not None and mon.incoming.finished():
                    break
                time.sleep(0.05)
            loaded = mon.incoming
            if loaded is not None and loaded.finished() and loaded.state.value == "completed" and args.run:
                if not args.json:
                    print(f"savevm: loaded; {args.guest} runs here. QMP 'quit' ends it", file=sys.stderr,
                          flush=True)
                while not server.wait_quit(0.2):
                    pass
        except KeyboardInterrupt:
            interrupted = True
            if mon.incoming is not None and not mon.incoming.finished():
                mon.incoming.cancel()
                mon.incoming.wait(10)
    finally:
        if hasattr(prog, "stop") and args.run:
            prog.stop()
        server.close()
    st = mon.incoming.query() if mon.incoming is not None else None
    stats = st.as_qmp() if st is not None else {"status": "none", "runstate": mon.runstate}
    guest = prog.report() if hasattr(prog, "report") and stats["status"] == "completed" else None
    return _finish("destination", args, stats, guest, "savevm incoming", st, interrupted=interrupted)


def cmd_run(args: argparse.Namespace) -> int:
    """``savevm run --guest MOD:CALLABLE --qmp ADDR``: a running program that QMP can migrate, stop, resume."""
    from savevm.qmp import serve

    cfg = build_config(args)
    prog = load_program(args.guest, args.guest_arg)
    server = serve(prog, args.qmp, config=cfg)
    mon = server.monitor
    interrupted = False
    announced: set[int] = set()
    try:
        if hasattr(prog, "start"):
            prog.start()
        if not args.json:
            print(f"savevm: {args.guest} is running; QMP monitor on {server.address}", file=sys.stderr, flush=True)
        try:
            while not server.wait_quit(0.1):
                m = mon.migration
                if m is not None and m.finished() and id(m) not in announced and not args.json:
                    announced.add(id(m))
                    st = m.query()
                    print(f"savevm: migration to {m.uri} {st.status}" +
                          (f" (downtime {st.downtime} ms; the program stays paused: QMP 'cont' resumes it)"
                           if st.status == "completed" else f": {st.error_desc}"), file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            interrupted = True
            m = mon.migration
            if m is not None and m.is_running():
                m.cancel()
                _wait(m)
    finally:
        if hasattr(prog, "stop"):
            prog.stop()
        server.close()
    final = mon.migration.query() if mon.migration is not None else None
    stats = final.as_qmp() if final is not None else {"status": "none", "runstate": mon.runstate}
    if not interrupted and not args.json and final is None:
        print(f"savevm: quit ({mon.runstate}, no migration)", file=sys.stderr)
        return 0
    rc = _finish("source", args, stats, None, "savevm run", final, interrupted=interrupted)
    return rc if interrupted or final is None else 0


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


__all__ = ["MigrationState", "cmd_analyze", "cmd_bench", "cmd_incoming", "cmd_migrate", "cmd_run"]
