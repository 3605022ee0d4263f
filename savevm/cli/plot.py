"""``--plot FILE.png``: a migration's per-iteration records drawn over time.

matplotlib is an optional extra (``pip install 'savevm[plot]'``): it is
imported only here, inside the functions, so a ``savevm`` without it runs
everything else and ``--plot`` says what to install before any migration
starts (:func:`require_matplotlib`).

Four panels share the time axis, so a reader sees why a migration did or did
not converge: what is pending (QEMU's dirty bytes beside the expected wire
bytes, against the threshold), what was sent by kind, the expected downtime
against the limit (with the ramp's steps and the measured pause), and how
fast the program dirtied memory and how hard it was throttled.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from savevm.convergence import IterationRecord
from savevm.errors import ConfigError

#: What ``--plot`` says when matplotlib is missing.
PLOT_HINT = "--plot needs matplotlib, an optional extra: pip install 'savevm[plot]' (or pip install matplotlib)"

_MIB = 1 << 20
#: Colours by kind of page record (others get the cycle's next colour).
_KIND_COLOURS = {"xbzrle": "tab:green", "normal": "tab:red", "zero": "tab:gray", "compress": "tab:purple",
                 "transport": "tab:brown"}


def require_matplotlib() -> None:
    """Fail early, with the install hint, when matplotlib is not importable."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot", PLOT_HINT) from None


def plot_records(records: Sequence[IterationRecord], path: str | Path, *, title: str = "savevm migration",
                 summary: dict[str, Any] | None = None) -> Path:
    """Draw ``records`` (:attr:`Migration.records`) into a PNG at ``path``; returns the path.

    ``summary`` is the final ``query-migrate`` dict (status, downtime,
    total-time): it goes into the title.  Uses matplotlib's object API
    (no pyplot), so it leaves no global state behind.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    out = Path(path)
    if not records:
        raise ConfigError("--plot", f"no iteration was recorded, nothing to draw into {out}")
    t = [r.time_ms / 1000 for r in records]
    fig = Figure(figsize=(13, 11), layout="constrained")
    FigureCanvasAgg(fig)
    ax_pend, ax_sent, ax_down, ax_dirty = fig.subplots(4, 1, sharex=True)

    # 1. what is pending, two ways, against the threshold
    ax_pend.plot(t, [max(r.pending_ram, 1) / _MIB for r in records], color="tab:red", lw=1.2,
                 label="pending: dirty RAM (QEMU's figure, ram.remaining)")
    ax_pend.plot(t, [max(r.pending_wire, 1) / _MIB for r in records], color="tab:green", lw=1.2,
                 label="pending: expected wire bytes")
    ax_pend.step(t, [max(r.threshold, 1) / _MIB for r in records], where="post", color="black", lw=1, ls="--",
                 label="threshold = rate × (limit − sync)")
    ax_pend.set_yscale("log")
    ax_pend.set_ylim(bottom=1 / 1024)  # 1 KiB: the threshold's 1-byte floor (nothing sent in a window) is off-scale
    ax_pend.set_ylabel("MiB (log)")
    estimate = records[-1].estimate
    ax_pend.set_title(f"What is left to send (the stop rule uses the {'wire' if estimate == 'wire' else 'RAM'} "
                      "figure)", fontsize=10, loc="left")
    _legend(ax_pend)

    # 2. what each iteration sent: pages per second by kind (stacked), wire bytes per second (log, twin axis)
    kinds = sorted({k for r in records for k in r.pages}, key=lambda k: (k not in _KIND_COLOURS, k))
    prev = 0.0
    dts = []
    for x in t:
        dts.append(max(x - prev, 1e-3))
        prev = x
    series = [[r.pages.get(k, 0) / 1000 / dt for r, dt in zip(records, dts)] for k in kinds]
    if kinds:
        ax_sent.stackplot(t, series, labels=[f"pages: {k}" for k in kinds], step="pre", alpha=0.6,
                          colors=[_KIND_COLOURS.get(k, f"C{i}") for i, k in enumerate(kinds)])
    ax_sent.set_ylabel("thousand pages/s")
    wire = ax_sent.twinx()
    wire.plot(t, [max(sum(r.bytes.values()) / dt, 1) / _MIB for r, dt in zip(records, dts)], color="black",
              lw=1, label="wire bytes sent")
    wire.plot(t, [max(r.bandwidth, 1) / _MIB for r in records], color="tab:blue", lw=1, ls="--",
              label="rate the pause would move (slower of sending and loading)")
    wire.set_yscale("log")
    wire.set_ylim(bottom=1 / 64)
    wire.set_ylabel("MiB/s (log)")
    h1, l1 = ax_sent.get_legend_handles_labels()
    h2, l2 = wire.get_legend_handles_labels()
    _legend(ax_sent, h1 + h2, l1 + l2, twin=True)
    ax_sent.set_title("Sent per iteration: pages by kind of record, and what they cost on the wire", fontsize=10,
                      loc="left")

    # 3. expected downtime against the limit (the ramp shows as steps)
    ax_down.plot(t, [r.expected_downtime if r.expected_downtime else float("nan") for r in records],
                 color="tab:blue", lw=1.2, label="expected downtime")
    ax_down.step(t, [r.downtime_limit for r in records], where="post", color="black", lw=1, ls="--",
                 label="downtime limit in force")
    done = [r for r in records if r.downtime is not None]
    if done:
        ax_down.plot([done[-1].time_ms / 1000], [done[-1].downtime], "o", color="tab:orange", ms=8,
                     label=f"measured downtime: {done[-1].downtime} ms")
    stalls = [r.time_ms / 1000 for a, r in zip(records, records[1:]) if r.stalls > a.stalls]
    for i, x in enumerate(stalls):
        for ax in (ax_pend, ax_down):
            ax.axvline(x, color="tab:purple", lw=0.8, ls=":", label="migration_stalled" if i == 0 and ax is ax_down
                       else None)
    ax_down.set_yscale("log")
    ax_down.set_ylabel("ms (log)")
    ax_down.set_title("Expected downtime against the limit", fontsize=10, loc="left")
    _legend(ax_down)

    # 4. the program: how fast it dirties memory, and the throttle
    ax_dirty.plot(t, [r.dirty_rate / _MIB for r in records], color="tab:red", lw=1.2,
                  label="memory dirtied (pages × 4 KiB per s)")
    ax_dirty.set_ylabel("MiB/s")
    ax_dirty.set_xlabel("seconds since the migration started")
    thr = ax_dirty.twinx()
    thr.step(t, [r.throttle for r in records], where="post", color="tab:orange", lw=1.2, label="CPU throttle")
    thr.set_ylim(0, 100)
    thr.set_ylabel("throttle %")
    lines = ax_dirty.get_legend_handles_labels()
    lines2 = thr.get_legend_handles_labels()
    _legend(ax_dirty, lines[0] + lines2[0], lines[1] + lines2[1], twin=True)
    ax_dirty.set_title("The program: dirty rate and auto-converge throttle", fontsize=10, loc="left")

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    for ax in (ax_pend, ax_down, wire):
        lo, hi = ax.get_ylim()
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if hi < lo * 1000 else (1.0,)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
    if done:
        # the switchover: the program was paused from here to the end
        pause = (done[-1].time_ms - (done[-1].downtime or 0)) / 1000
        for ax in (ax_pend, ax_sent, ax_down, ax_dirty):
            ax.axvline(pause, color="tab:orange", lw=1, alpha=0.7)
        ax_pend.annotate("pause", (pause, 1), xycoords=("data", "axes fraction"), xytext=(-4, -12),
                         textcoords="offset points", ha="right", fontsize=8, color="tab:orange")
    for ax in (ax_pend, ax_sent, ax_down, ax_dirty):
        ax.grid(True, alpha=0.3)
    fig.suptitle(_title(title, records, summary), fontsize=12)
    fig.savefig(out, dpi=110)
    return out


def _legend(ax: Any, handles: list[Any] | None = None, labels: list[str] | None = None, *,
            twin: bool = False) -> None:
    """Beside the panel, not over its lines (a twin axis's labels take the room just right of it)."""
    where = (1.09 if twin else 1.01, 1.0)
    if handles is None:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=where, borderaxespad=0)
    else:
        ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=where, borderaxespad=0)


def write_plot(records: Sequence[IterationRecord], path: str | Path, title: str,
               summary: dict[str, Any] | None) -> None:
    """The CLI's ``--plot``: draw, and say where on stderr (a failed drawing is reported, not raised)."""
    try:
        out = plot_records(records, path, title=title, summary=summary)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"savevm: --plot: {exc}", file=sys.stderr, flush=True)
        return
    print(f"savevm: plot of {len(records)} iterations written to {out}", file=sys.stderr, flush=True)


def _title(title: str, records: Sequence[IterationRecord], summary: dict[str, Any] | None) -> str:
    s = summary or {}
    status = s.get("status", records[-1].stage)
    parts = [f"{title}: {status}"]
    if s.get("total-time") is not None:
        parts.append(f"in {s['total-time'] / 1000:.1f} s")
    if s.get("downtime") is not None:
        parts.append(f"downtime {s['downtime']} ms (limit {records[-1].downtime_limit} ms)")
    parts.append(f"{records[-1].iteration} iterations, {records[-1].syncs} syncs, estimate {records[-1].estimate}")
    return ", ".join(parts)
