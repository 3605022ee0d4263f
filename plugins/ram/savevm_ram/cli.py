"""The RAM plugin's ``savevm`` subcommands (contributed through ``savevm_cli_commands``).

``savevm demo`` needs RAM blocks, so it lives with the RAM section rather
than in the core distribution's CLI: installing the core alone gives a
``savevm`` without it, and a clear hint, instead of an import error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import attrs

from savevm.cli import build_config, common_options
from savevm.cli.plot import require_matplotlib, write_plot
from savevm.cli.progress import human, print_table, watch
from savevm.errors import ConfigError, MigrationError
from savevm.migration import Migration
from savevm.plugins import PluginHost
from savevm_ram.demo import DemoProgram


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``savevm demo``."""
    d = subparsers.add_parser("demo", help="live-migrate a synthetic workload between two local processes")
    d.add_argument("--size", default="256M", help="total RAM (K/M/G suffixes), default 256M")
    d.add_argument("--blocks", type=int, default=2, help="number of RAM blocks, default 2")
    d.add_argument("--fill", choices=("random", "text", "zero"), default="random", help="initial content")
    d.add_argument("--dirty-rate", default=None,
                   help="bytes/s of pages the workload rewrites (0 = none; default 20M, for sparse 'max': as fast "
                        "as it can)")
    d.add_argument("--working-set", default=None, metavar="SIZE",
                   help="the part of RAM the workload rewrites, from its start (default: all of it)")
    d.add_argument("--dirty-pattern", choices=("sparse", "pages"), default="pages",
                   help="pages: a 256-byte stretch in random pages (default); sparse: a few bytes in every page "
                        "of the working set, pass after pass")
    d.add_argument("--capability", action="append", metavar="NAME", help="xbzrle, compress, auto-converge, ...")
    d.add_argument("--set", action="append", metavar="PARAM=VALUE", help="QEMU parameter (repeatable)")
    d.add_argument("--uri", default="tcp:127.0.0.1:0", help="tcp:HOST:PORT or unix:PATH")
    d.add_argument("--config", help=argparse.SUPPRESS)
    d.add_argument("--dirty-tracking", choices=("tracked", "compare"), default="tracked",
                   help="how the source finds dirty pages")
    d.add_argument("--corrupt-dest-page", type=int, default=None, help=argparse.SUPPRESS)
    d.add_argument("--timeout", type=float, default=600.0, help="give up (cancel) after this many seconds")
    d.add_argument("--mem-prealloc", action="store_true",
                   help="the destination faults its memory in while it waits (savevm incoming --mem-prealloc)")
    d.add_argument("--no-prefault", action="store_true",
                   help="the destination does not fault its memory in while it waits (savevm incoming --no-prefault)")
    d.add_argument("--plot", metavar="FILE.png",
                   help="draw the per-iteration records (pending, sent by kind, downtime, throttle) into a PNG "
                        "(needs matplotlib: pip install 'savevm[plot]')")
    common_options(d)
    d.set_defaults(func=cmd_demo)


def _workload(prog: DemoProgram) -> str:
    """What the demo's workload does, in a few words for the opening line."""
    rate = "as fast as it can" if prog.rate is None else f"{human(prog.rate)}/s"
    where = "" if prog.working_set == prog.ram.total_bytes else f" of a {human(prog.working_set)} working set"
    return f"{prog.dirty_pattern} {rate}{where}"


def _registry(cfg: Any) -> Any:
    return PluginHost(cfg).new_registry()


def cmd_demo(args: argparse.Namespace) -> int:
    """``savevm demo``: a destination process, this process as the source, and a check."""
    cfg = attrs.evolve(build_config(args), mem_prealloc=False, prefault_while_waiting=None)  # the destination's
    if args.plot:
        require_matplotlib()  # before two processes and a fill
    scheme, _, address = args.uri.partition(":")
    if scheme not in ("tcp", "unix"):
        raise ConfigError("--uri", "the demo runs both ends at once: use tcp:HOST:PORT or unix:PATH")
    if scheme == "tcp":
        from savevm.channels.sockets import parse_host_port

        parse_host_port(address)  # one clear error here, not one from each process
    elif not address:
        raise ConfigError("--uri", "expected unix:PATH")
    dest_cmd = [sys.executable, "-m", "savevm.cli", "incoming", args.uri, "--print-uri", "--json",
                "--guest", "savevm_ram.demo:DemoProgram", "--guest-arg", f"size={args.size}",
                "--guest-arg", f"blocks={args.blocks}", "--guest-arg", "role=destination",
                "--log-format", args.log_format, "--log-level", args.log_level, "--timeout", "600"]
    if args.mem_prealloc:
        dest_cmd.append("--mem-prealloc")
    if args.no_prefault:
        dest_cmd.append("--no-prefault")
    if args.corrupt_dest_page is not None:
        dest_cmd += ["--guest-arg", f"corrupt_page={args.corrupt_dest_page}"]
    # the destination starts first: while this process fills its memory, it is already waiting
    # (and faulting its own memory in), as a real destination waits for its source
    dest = subprocess.Popen(dest_cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        t_fill = time.monotonic()
        prog = DemoProgram(size=args.size, blocks=args.blocks, fill=args.fill, dirty_rate=args.dirty_rate,
                           role="source", dirty=args.dirty_tracking, working_set=args.working_set,
                           dirty_pattern=args.dirty_pattern)
        fill_s = time.monotonic() - t_fill
        assert dest.stdout is not None
        uri = dest.stdout.readline().strip()
        if not uri or uri.startswith("{"):
            dest.wait(30)
            why = json.loads(uri).get("error-desc") if uri.startswith("{") else None
            raise MigrationError(f"the destination process could not listen: {why}" if why else
                                 f"the destination process exited ({dest.returncode}) before listening")
        reg = _registry(cfg)
        prog.register(reg)
        prog.start()
        if not args.json:
            print(f"savevm demo: {human(prog.ram.total_bytes)} in {len(prog.ram)} blocks ({args.fill}, "
                  f"filled in {fill_s:.1f}s), dirtying {_workload(prog)}, "
                  f"destination pid {dest.pid} on {uri}", file=sys.stderr)
        time.sleep(0.2)  # let the workload run a little before migrating
        mig = Migration(reg, uri, guest=prog, config=cfg)
        mig.start()
        deadline = time.monotonic() + args.timeout
        timed_out = False

        def done() -> bool:
            nonlocal timed_out
            if time.monotonic() > deadline and mig.is_running():
                timed_out = True
                mig.cancel()
            return mig.finished()

        interrupted = False
        try:
            watch(mig.query, done, total=prog.ram.total_bytes, quiet=args.json)
        except KeyboardInterrupt:
            interrupted = True
            mig.cancel()
        st = mig.wait()
        if interrupted:
            from savevm.cli.progress import cancelled_line, report

            prog.stop()
            out = report("source", st.as_qmp())
            out["status"] = "cancelled" if st.status in ("failed", "cancelled") else st.status
            print(cancelled_line(out), file=sys.stderr, flush=True)
            if args.json:
                print(json.dumps(out), flush=True)
            return 130
        source_sums = prog.checksums() if st.status == "completed" else {}
        prog.stop()
        out_text, _ = dest.communicate(timeout=120)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    if args.plot:
        write_plot(mig.records, args.plot, "savevm demo", st.as_qmp())
    dest_report: dict[str, Any] = {}
    for line in out_text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                dest_report = json.loads(line)
            except ValueError:
                pass
    dest_sums = (dest_report.get("guest") or {}).get("checksums", {})
    verified = st.status == "completed" and bool(source_sums) and source_sums == dest_sums
    mismatched = sorted(k for k in source_sums if source_sums.get(k) != dest_sums.get(k))
    out = st.as_qmp()
    if timed_out and st.status == "cancelled":
        # the demo cancelled it, not the user: say which limit ran out
        out["error-desc"] = f"not completed within --timeout {args.timeout:g} s: cancelled"
    out["verified"] = verified
    out["destination-status"] = dest_report.get("status", "unknown")
    if mismatched:
        out["mismatched"] = mismatched
    if args.json:
        print(json.dumps(out))
    else:
        extra = {"destination": out["destination-status"],
                 "verified": "yes (checksums of every block and the device match)" if verified
                 else f"NO - mismatched: {', '.join(mismatched)}" if mismatched
                 else f"no (the migration {st.status}: nothing to compare)" if st.status != "completed"
                 else "NO - the destination reported no checksums"}
        shown = attrs.evolve(st, error_desc=out["error-desc"]) if out.get("error-desc") else st
        print_table(shown, "savevm demo", extra)
    return 0 if verified else 1
