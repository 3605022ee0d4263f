"""Progress display and the final stats table.

A rich live bar on a terminal; on a pipe, one plain line per second so logs
and CI output stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from savevm.stats import MigrationStats


def human(n: float | int | None, unit: str = "B") -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    v = float(n)
    for u in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(v) < 1024 or u == "Ti":
            return f"{v:.1f} {u}{unit}" if u else f"{int(v)} {unit}"
        v /= 1024
    return f"{v:.1f} {unit}"


def _line(st: MigrationStats) -> str:
    ram = st.ram or {}
    return (f"[{st.status}] iter {st.iterations or 0}  transferred {human(ram.get('transferred'))}  "
            f"remaining {human(ram.get('remaining'))}  dirty {ram.get('dirty-pages-rate', 0)} pages/s  "
            f"{ram.get('mbps', 0):.1f} Mbps  throttle {st.cpu_throttle_percentage or 0}%")


def watch(query: Callable[[], MigrationStats], done: Callable[[], bool], *, total: int,
          quiet: bool = False, interval: float = 0.2) -> None:
    """Show progress until ``done()``."""
    if quiet:
        while not done():
            time.sleep(interval)
        return
    if sys.stderr.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.fields[status]:>9}"), BarColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                      transient=False, console=_console()) as prog:
            task = prog.add_task("migrate", total=max(total, 1), status="setup", info="")
            while not done():
                st = query()
                ram = st.ram or {}
                rem = ram.get("remaining", total)
                prog.update(task, completed=max(total - rem, 0), status=st.status,
                            info=(f"it {st.iterations or 0} | sent {human(ram.get('transferred'))} | "
                                  f"left {human(rem)} | dirty {ram.get('dirty-pages-rate', 0)} p/s | "
                                  f"{ram.get('mbps', 0):.0f} Mbps | thr {st.cpu_throttle_percentage or 0}%"))
                time.sleep(interval)
            st = query()
            prog.update(task, completed=total, status=st.status, info=f"{st.status}")
        return
    last = 0.0
    while not done():
        now = time.monotonic()
        if now - last >= 1.0:
            print(_line(query()), file=sys.stderr, flush=True)
            last = now
        time.sleep(interval)


def watch_incoming(query: Callable[[], MigrationStats], done: Callable[[], bool], *, quiet: bool = False,
                   interval: float = 0.2) -> None:
    """Destination progress: bytes received and pages loaded, once a second."""
    last = 0.0
    while not done():
        now = time.monotonic()
        if not quiet and now - last >= 1.0:
            st = query()
            ram = st.ram or {}
            if st.status != "none":
                print(f"[{st.status}] received {human(st.stream_bytes)}  page records {ram.get('loaded-pages', 0)}"
                      f" (RAM of {ram.get('total', 0) // 4096} pages)", file=sys.stderr, flush=True)
            last = now
        time.sleep(interval)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def print_table(st: MigrationStats, title: str = "migration", extra: dict[str, Any] | None = None) -> None:
    """The final stats as a table (rich on a terminal, aligned text otherwise)."""
    rows: list[tuple[str, str]] = [("status", st.status)]
    if st.total_time is not None:
        rows.append(("total time", f"{st.total_time} ms"))
    if st.setup_time is not None:
        rows.append(("setup time", f"{st.setup_time} ms"))
    if st.downtime is not None:
        rows.append(("downtime", f"{st.downtime} ms"))
    if st.iterations is not None:
        rows.append(("iterations", str(st.iterations)))
    if st.cpu_throttle_percentage:
        rows.append(("cpu throttle", f"{st.cpu_throttle_percentage}%"))
    if st.extra.get("cpu-throttle-percentage-max"):
        rows.append(("cpu throttle (max)", f"{st.extra['cpu-throttle-percentage-max']}%"))
    ram = st.ram or {}
    for k in ("total", "transferred", "normal-bytes"):
        if k in ram:
            rows.append((f"ram {k}", f"{human(ram[k])} ({ram[k]})"))
    for k in ("duplicate", "normal", "dirty-sync-count", "dirty-pages-rate", "pages-per-second", "mbps"):
        if k in ram:
            rows.append((f"ram {k}", str(ram[k])))
    for k, v in (st.xbzrle_cache or {}).items():
        rows.append((f"xbzrle {k}", str(v)))
    for k, v in (st.compression or {}).items():
        rows.append((f"compression {k}", str(v)))
    if st.error_desc:
        rows.append(("error", st.error_desc))
    for k, v in (extra or {}).items():
        rows.append((k, str(v)))
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, show_header=False)
        t.add_column("key", style="bold")
        t.add_column("value")
        for k, v in rows:
            t.add_row(k, v)
        Console().print(t)
    else:
        w = max(len(k) for k, _ in rows)
        print(f"== {title} ==")
        for k, v in rows:
            print(f"{k:<{w}}  {v}")


#: The keys every ``--json`` object has, source and destination alike, in this order (null when
#: a key means nothing on that side, e.g. ``downtime`` on the destination); whatever else the
#: stats hold (``xbzrle-cache``, a codec's key, ``iterations``, ...) follows.
REPORT_KEYS = ("side", "status", "runstate", "transport", "total-time", "setup-time", "downtime",
               "stream-bytes", "ram", "error-desc")


def report(side: str, stats: dict[str, Any], guest: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``--json`` object, the same shape on both sides: :data:`REPORT_KEYS` first, always present."""
    side = {"migrate": "source", "run": "source", "incoming": "destination"}.get(side, side)
    out: dict[str, Any] = {k: stats.get(k) for k in REPORT_KEYS}
    out["side"] = side
    out.update({k: v for k, v in stats.items() if k not in out})
    if guest is not None:
        out["guest"] = guest
    return out


def cancelled_line(stats: dict[str, Any]) -> str:
    """The one line Ctrl-C leaves on stderr: what was cancelled and how far it had got."""
    ram = stats.get("ram") or {}
    sent = ram.get("transferred", stats.get("stream-bytes"))
    return (f"savevm: interrupted: status {stats.get('status')}, total-time {stats.get('total-time') or 0} ms, "
            f"{human(sent or 0)} sent/received, runstate {stats.get('runstate', '-')}")
