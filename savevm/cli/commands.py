"""The CLI commands, each a function of parsed arguments returning an exit code."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from savevm.cli import build_config, load_program
from savevm.cli.plot import require_matplotlib, write_plot
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
    if args.plot:
        require_matplotlib()  # before anything moves
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
    if args.plot:
        write_plot(mig.records, args.plot, "savevm migrate", st.as_qmp())
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
    inc.skip_unknown_devices = bool(args.skip_unknown_devices or getattr(prog, "skip_unknown_devices", False))
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
    """``savevm analyze STREAM``: sections, RAM, devices, vmdesc and RAM blocks of a stream file.

    Exactly one document goes to stdout: the JSON summary (``--json``, which
    then also holds ``devices`` and ``vmdesc_json`` when those are asked
    for), or the device dump, or the vmdesc, or the text summary.  A damaged
    stream exits 1, with its reason and offset on stderr as well.
    """
    from savevm.cli.analyze import StreamSource, analyze, text_report
    from savevm.cli.blockfiles import BlockDir, block_path_parts
    from savevm.config import parse_size

    if args.dump_devices and args.dump_vmdesc and not args.json:
        raise ConfigError("--dump-vmdesc", "together with --dump-devices it needs --json (one JSON document "
                                           "holds both)")
    max_ram = parse_size(args.max_ram, "--max-ram") if args.max_ram else None
    if args.dump_vmdesc and not (args.json or args.dump_devices or args.extract_ram):
        return _dump_vmdesc_only(args.file)
    bdir = BlockDir(args.extract_ram) if args.extract_ram else None
    try:
        with StreamSource(args.file) as src:
            an = analyze(src, machine=args.machine, dump_devices=args.dump_devices, max_ram=max_ram)
        rep = an.report
        if bdir is not None and an.ok:
            files = []
            try:
                for b in an.blocks:  # every name is checked before anything is written
                    block_path_parts(b.idstr)
                for b in an.blocks:
                    path = bdir.write_block(b.idstr, b.host[: b.used_length])
                    files.append({"idstr": b.idstr, "path": path, "bytes": b.used_length})
            except MigrationError as exc:
                rep.update(status="error", error=str(exc), offset=None)
            rep["extracted"] = {"dir": args.extract_ram, "files": files}
    finally:
        if bdir is not None:
            bdir.close()
    vmdesc = an.vmdesc_at[1] if an.vmdesc_at is not None else None
    ok = an.ok
    if args.json:
        if args.dump_vmdesc:
            rep["vmdesc_json"] = vmdesc
        print(json.dumps(rep))
    elif args.dump_devices:
        print(json.dumps(rep["devices"], indent=2))
    elif args.dump_vmdesc:  # with --extract-ram
        if vmdesc is None:
            print(f"savevm: analyze: {args.file} has no vmdesc", file=sys.stderr)
            ok = False
        else:
            print(json.dumps(vmdesc, indent=2))
    else:
        print("\n".join(text_report(rep)))
    if rep["status"] != "ok":
        print(f"savevm: analyze: {rep['error']}", file=sys.stderr)
    return 0 if ok and rep["status"] == "ok" else 1


def _dump_vmdesc_only(path: str) -> int:
    """``--dump-vmdesc`` alone: the vmdesc, found from the end of the file; the rest is not loaded.

    The description is what a tool reads before walking a stream, so it is
    printed even when the stream's body would not load (an exabyte block,
    a damaged page); the summary is the place to find out about those.
    """
    from savevm.cli.analyze import StreamSource
    from savevm.vmdesc import locate_vmdesc

    with StreamSource(path) as src:
        try:
            found = locate_vmdesc(src.file)
        except MigrationError as exc:
            print(f"savevm: analyze: {exc}", file=sys.stderr)
            return 1
    if found is None:
        print(f"savevm: analyze: {path} has no vmdesc (the stream ends without one, or is cut short)",
              file=sys.stderr)
        return 1
    print(json.dumps(found[1], indent=2))
    return 0


def cmd_rewrite(args: argparse.Namespace) -> int:
    """``savevm rewrite REF OUT --ram BLOCK=FILE``: REF's stream with RAM blocks replaced."""
    from savevm.cli.rewrite import parse_ram_specs, rewrite
    from savevm.config import parse_size

    max_ram = parse_size(args.max_ram, "--max-ram") if args.max_ram else None
    out = rewrite(args.ref, args.out, parse_ram_specs(args.ram), ram_only=args.ram_only, max_ram=max_ram)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"wrote {out['out']}: {out['bytes']} bytes, machine {out['machine']}, "
              f"{out['normal']} normal and {out['zero']} zero pages, {out['device_sections']} device sections")
        for b in out["blocks"]:
            print(f"  {b['idstr']:<30} {b['used_length']:>12}  from {b['from']}")
    return 0


__all__ = ["MigrationState", "cmd_analyze", "cmd_bench", "cmd_incoming", "cmd_migrate", "cmd_rewrite", "cmd_run"]
