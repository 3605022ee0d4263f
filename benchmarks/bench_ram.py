"""Bulk-stage throughput of the RAM section against same-run plain-Python baselines.

Run: ``python benchmarks/bench_ram.py`` (``--size`` sets the RAM block, default 1G;
``--runs`` the timed repetitions, default 3, medians reported; ``--profile``
adds a cProfile of one tcp transfer of random pages, sender and receiver).

The headline (for tcp and unix) is the user's path: the receiving process loads into a
**fresh** block (``RAMBlock.allocate``, as ``savevm incoming`` with the demo program or an
auto-created block gets: nothing resident until written), allocated anew for every run, so
the load pays the first-touch page faults a real destination pays.  The second row of each
socket transport, labelled "best case (pre-touched)", loads into one block that was faulted
in before anything was timed.  ``benchmarks/bench_user_path.py`` runs the same transfer
through the CLI (two fresh ``savevm`` processes) and is the figure the README leads with.

What is timed: a complete ``save_stream`` of a registry that holds only the
``ram`` section over one RAMBlock of ``--size`` bytes (the bulk stage: every
page is dirty once; rate limit 0 = unlimited), either

* to ``/dev/null`` (an FdChannel), timed from the start of the save to its end;
* over tcp loopback or a unix socket to a second process that loads the stream
  with ``load_stream`` and then sends a 1-byte ack on the same socket.  The sender
  ``shutdown(SHUT_WR)``\\ s after the stream and waits for the ack; the time is from
  the start of the save to the ack received.

Baselines, measured in the same processes between the savevm runs: for sockets a
plain Python copy of ``--size`` bytes (1 MiB ``sendall`` -> ``recv_into``, same
shutdown/ack protocol, same socket options, since both use savevm's channels to
connect), into a fresh buffer (``np.empty`` per run) for the fresh rows and into a
reused, pre-touched one for the best case; the ratio is always against the copy into
the reused buffer.  For /dev/null ``os.write`` of 1 MiB chunks.  Throughput is GB/s of
*guest RAM* (``--size`` / median time), so the all-zero rows scan 1 GiB of RAM but move
only 9 bytes per page.

Every process allocates the memory it uses (fork context, buffers made in the
child).  The random-data transfer is verified once per destination kind: sha256 of the
receiver's block must equal the sender's.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import multiprocessing as mp
import os
import pstats
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
for _p in (_ROOT, _ROOT / "plugins" / "ram"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402

import savevm  # noqa: E402
import savevm_ram  # noqa: E402
from savevm.channels import FdChannel, listen, open_channel  # noqa: E402
from savevm.config import parse_size  # noqa: E402
from savevm.logging import configure_logging  # noqa: E402

CHUNK = 1 << 20
PAGE = 4096
#: Targets from the issue.
TARGET_TCP_RATIO = 0.70
TARGET_ZERO_GBPS = 5.0
TARGET_DEVNULL_RANDOM_GBPS = 1.0


# ----------------------------------------------------------------------------- set-up
def _registry(buf: Any) -> tuple[savevm.SectionRegistry, savevm_ram.RAMHandlers]:
    reg = savevm.SectionRegistry(savevm.MigrationConfig(machine="bench"))
    ram = savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", buf)])
    handlers = savevm_ram.register_ram(reg, ram)
    return reg, handlers


def _make_source(size: int, kind: str) -> np.ndarray:
    if kind == "zero":
        a = np.zeros(size, dtype=np.uint8)
        a.fill(0)  # touch every page, as a guest that has run would have
        return a
    words = np.random.default_rng(12345).integers(0, 2**64 - 1, size // 8, dtype=np.uint64,
                                                   endpoint=True)
    return words.view(np.uint8)


def _make_dest(size: int) -> np.ndarray:
    a = np.zeros(size, dtype=np.uint8)
    a.fill(0)  # pre-touch: fault every page in before anything is timed
    return a


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(memoryview(a)).hexdigest()


def _profile_text(prof: cProfile.Profile, limit: int = 14) -> str:
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("tottime").print_stats(limit)
    lines = out.getvalue().splitlines()
    # drop pstats' preamble up to the column header
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith("ncalls"):
            return "\n".join(lines[i:])
    return out.getvalue()


# ----------------------------------------------------------------------------- sender
def _sender(conn: Any, size: int, kind: str) -> None:
    configure_logging(level="warning")
    buf = _make_source(size, kind)
    reg, handlers = _registry(buf)
    mv = memoryview(buf)
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        cmd = msg[0]
        if cmd == "quit":
            return
        if cmd == "sha256":
            conn.send(("sha256", _sha(buf)))
        elif cmd == "devnull":
            mode = msg[1]
            fd = os.open("/dev/null", os.O_WRONLY)
            try:
                if mode == "savevm":
                    f = savevm.QEMUFile(FdChannel(fd, "file:/dev/null", owned=False), writable=True,
                                        rate_limit=0)
                    t0 = time.perf_counter()
                    savevm.save_stream(f, reg)
                    f.flush()
                    dt = time.perf_counter() - t0
                    stream = f.pos
                else:
                    t0 = time.perf_counter()
                    for off in range(0, size, CHUNK):
                        os.write(fd, mv[off : off + CHUNK])
                    dt = time.perf_counter() - t0
                    stream = size
            finally:
                os.close(fd)
            conn.send(("time", {"seconds": dt, "stream": stream}))
        elif cmd == "send":
            uri, mode, profile = msg[1], msg[2], msg[3]
            ch = open_channel(uri)
            sock = ch.sock
            prof = cProfile.Profile() if profile else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            if mode == "savevm":
                f = savevm.QEMUFile(ch, writable=True, rate_limit=0)
                savevm.save_stream(f, reg)
                f.flush()
                f.check_error()
                stream = f.pos
            else:
                for off in range(0, size, CHUNK):
                    sock.sendall(mv[off : off + CHUNK])
                stream = size
            t_sent = time.perf_counter()
            sock.shutdown(socket.SHUT_WR)
            ack = sock.recv(1)
            dt = time.perf_counter() - t0
            if prof:
                prof.disable()
            ch.close()
            if ack != b"\x01":
                raise SystemExit(f"sender: bad ack {ack!r}")
            conn.send(("time", {"seconds": dt, "send_seconds": t_sent - t0, "stream": stream,
                                "profile": _profile_text(prof) if prof else None,
                                "sent_pages": handlers.counters.normal + handlers.counters.duplicate}))
        else:
            raise SystemExit(f"sender: unknown command {cmd!r}")


# ----------------------------------------------------------------------------- receiver
def _receiver(conn: Any, size: int, tmpdir: str) -> None:
    configure_logging(level="warning")
    touched = _make_dest(size)
    buf = touched
    scratch = bytearray(CHUNK)
    conn.send(("ready", None))
    n_listen = 0
    while True:
        msg = conn.recv()
        cmd = msg[0]
        if cmd == "quit":
            return
        if cmd == "sha256":
            conn.send(("sha256", _sha(buf)))
        elif cmd == "clear":
            buf.fill(0)
            conn.send(("ok", None))
        elif cmd == "receive":
            transport, mode, profile, fresh = msg[1], msg[2], msg[3], msg[4]
            buf = touched
            if fresh and mode == "savevm":
                buf = savevm_ram.RAMBlock.allocate("pc.ram", size).host  # what a user's destination gets
            elif fresh:
                buf = np.empty(size, dtype=np.uint8)
            reg, handlers = _registry(buf)
            mv = memoryview(buf)
            n_listen += 1
            addr = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmpdir}/s{n_listen}.sock"
            lst = listen(addr)
            conn.send(("addr", lst.uri))
            ch = lst.accept(timeout=120)
            lst.close()
            sock = ch.sock
            prof = cProfile.Profile() if profile else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            if mode == "savevm":
                f = savevm.QEMUFile(ch)
                savevm.load_stream(f, reg)
                got = f.pos
            else:
                got = 0
                while True:
                    if got < size:
                        n = sock.recv_into(mv[got : got + CHUNK])
                    else:
                        n = sock.recv_into(scratch)
                    if n == 0:
                        break
                    got += n
            dt = time.perf_counter() - t0
            if prof:
                prof.disable()
            sock.sendall(b"\x01")
            ch.close()
            conn.send(("done", {"seconds": dt, "bytes": got,
                                "loaded_pages": handlers.counters.loaded_pages,
                                "profile": _profile_text(prof) if prof else None}))
        else:
            raise SystemExit(f"receiver: unknown command {cmd!r}")


# ----------------------------------------------------------------------------- driver
class Peer:
    """One child process and its command pipe."""

    def __init__(self, ctx: Any, target: Any, *args: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self.expect("ready")

    def expect(self, what: str, timeout: float = 300.0) -> Any:
        if not self.conn.poll(timeout):
            raise SystemExit(f"no {what!r} from pid {self.proc.pid} within {timeout}s")
        try:
            tag, val = self.conn.recv()
        except EOFError:
            raise SystemExit(f"pid {self.proc.pid} died (exit {self.proc.exitcode})") from None
        if tag != what:
            raise SystemExit(f"expected {what!r}, got {tag!r}")
        return val

    def ask(self, *msg: Any) -> None:
        self.conn.send(msg)

    def close(self) -> None:
        try:
            self.conn.send(("quit",))
        except OSError:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def socket_run(snd: Peer, rcv: Peer, transport: str, mode: str, profile: bool = False,
               fresh: bool = True) -> dict[str, Any]:
    rcv.ask("receive", transport, mode, profile, fresh)
    uri = rcv.expect("addr")
    snd.ask("send", uri, mode, profile)
    s = snd.expect("time")
    r = rcv.expect("done")
    return {"sender": s, "receiver": r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="RAM block size (e.g. 256M, 1G); default 1G")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per figure, medians reported (default 3)")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile one tcp transfer of random pages (sender and receiver)")
    ap.add_argument("--kinds", default="random,zero", help="comma list of random,zero")
    ap.add_argument("--transports", default="devnull,tcp,unix", help="comma list of devnull,tcp,unix")
    args = ap.parse_args()
    configure_logging(level="warning")
    size = parse_size(args.size)
    if size <= 0 or size % PAGE:
        raise SystemExit(f"--size must be a positive multiple of {PAGE}")
    runs = max(1, args.runs)
    kinds = [k for k in args.kinds.split(",") if k]
    transports = [t for t in args.transports.split(",") if t]
    if not set(kinds) <= {"random", "zero"} or not set(transports) <= {"devnull", "tcp", "unix"}:
        raise SystemExit("--kinds takes random,zero and --transports devnull,tcp,unix")
    gb = size / 1e9
    ctx = mp.get_context("fork")
    tmpdir = tempfile.mkdtemp(prefix="bench-ram-")
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    verdicts: list[str] = []
    t_start = time.perf_counter()
    print(f"savevm RAM bulk stage, {size / 2**30:g} GiB block, {os.cpu_count()} CPUs, "
          f"median of {runs} runs, Python {sys.version.split()[0]}", flush=True)
    load1 = os.getloadavg()[0]
    plugins = ", ".join(_registry(bytearray(PAGE))[0].plugins.names())
    print(f"plugins: {plugins}; load average {load1:.2f}"
          + (" (other work is competing for the CPUs: expect noisy figures)" if load1 > 0.5 else ""),
          flush=True)
    for kind in kinds:
        snd = Peer(ctx, _sender, size, kind)
        rcv = Peer(ctx, _receiver, size, tmpdir) if {"tcp", "unix"} & set(transports) else None
        try:
            for tr, fresh in [(t, f) for t in transports for f in ((None,) if t == "devnull" else (True, False))]:
                sv: list[float] = []
                base: list[float] = []
                base_fresh: list[float] = []
                extra: dict[str, list[float]] = {"load": [], "send": []}
                stream = 0
                for i in range(runs):
                    if tr == "devnull":
                        snd.ask("devnull", "savevm")
                        r = snd.expect("time")
                        sv.append(r["seconds"])
                        stream = r["stream"]
                        snd.ask("devnull", "baseline")
                        base.append(snd.expect("time")["seconds"])
                        continue
                    assert rcv is not None
                    r = socket_run(snd, rcv, tr, "savevm", fresh=bool(fresh))
                    sv.append(r["sender"]["seconds"])
                    extra["send"].append(r["sender"]["send_seconds"])
                    extra["load"].append(r["receiver"]["seconds"])
                    stream = r["sender"]["stream"]
                    if r["receiver"]["loaded_pages"] != size // PAGE:
                        raise SystemExit(f"{kind}/{tr}: receiver loaded {r['receiver']['loaded_pages']} pages, "
                                         f"expected {size // PAGE}")
                    if i == 0 and kind == "random" and tr == transports[-1]:
                        s1 = (snd.ask("sha256"), snd.expect("sha256"))[1]
                        s2 = (rcv.ask("sha256"), rcv.expect("sha256"))[1]
                        ok = s1 == s2
                        notes.append(f"correctness ({kind}, {tr}, {'fresh' if fresh else 'pre-touched'} "
                                     f"destination): sha256 sender {s1[:16]}... receiver {s2[:16]}... "
                                     f"{'MATCH' if ok else 'MISMATCH'}")
                        if not ok:
                            raise SystemExit(notes[-1])
                    for into_fresh, out in ((False, base), *(((True, base_fresh),) if fresh else ())):
                        r = socket_run(snd, rcv, tr, "baseline", fresh=into_fresh)
                        out.append(r["sender"]["seconds"])
                        if r["receiver"]["bytes"] != size:
                            raise SystemExit(f"baseline moved {r['receiver']['bytes']} bytes, expected {size}")
                m_sv, m_base = statistics.median(sv), statistics.median(base)
                g_sv, g_base = gb / m_sv, gb / m_base
                name = {"devnull": "file:/dev/null", "tcp": "tcp loopback", "unix": "unix socket"}[tr]
                dest = "" if fresh is None else ("fresh destination" if fresh else "best case (pre-touched)")
                bl = "os.write 1 MiB" if tr == "devnull" else "copy into reused buffer"
                detail = ""
                if extra["load"]:
                    detail = (f"send {statistics.median(extra['send']):.3f}s, "
                              f"load {statistics.median(extra['load']):.3f}s")
                if base_fresh:
                    detail += f"; copy into fresh buffer {gb / statistics.median(base_fresh):.2f} GB/s"
                rows.append((kind, name, dest, f"{m_sv:.3f}", f"{g_sv:.2f}", bl, f"{g_base:.2f}",
                             f"{g_sv / g_base:.2f}", f"{stream / 2**20:.1f}", detail))
                print("  measured:", " | ".join(rows[-1]), flush=True)
                if kind == "random" and tr in ("tcp", "unix") and fresh:
                    ok = g_sv / g_base >= TARGET_TCP_RATIO
                    target = f"target >= {TARGET_TCP_RATIO:.0%}" if tr == "tcp" else \
                        f"the {TARGET_TCP_RATIO:.0%} target is for tcp; shown for comparison"
                    verdicts.append(f"random over {name} into a fresh destination: {g_sv / g_base:.0%} of a plain "
                                    f"socket copy into a reused buffer ({target}) {'MET' if ok else 'MISSED'}")
                if kind == "zero" and fresh is not False:
                    ok = g_sv >= TARGET_ZERO_GBPS
                    verdicts.append(f"all-zero over {name}: {g_sv:.2f} GB/s of RAM scanned "
                                    f"(target >= {TARGET_ZERO_GBPS:g}) {'MET' if ok else 'MISSED'}")
                if kind == "random" and tr == "devnull":
                    ok = g_sv > TARGET_DEVNULL_RANDOM_GBPS
                    verdicts.append(f"random to /dev/null: {g_sv:.2f} GB/s (target > "
                                    f"{TARGET_DEVNULL_RANDOM_GBPS:g}) {'MET' if ok else 'MISSED'}")
            if args.profile and kind == "random" and rcv is not None:
                r = socket_run(snd, rcv, "tcp", "savevm", profile=True, fresh=True)
                notes.append("cProfile, sender (tcp, random, one run; cProfile slows the Python parts):\n"
                              + r["sender"]["profile"])
                notes.append("cProfile, receiver:\n" + r["receiver"]["profile"])
        finally:
            snd.close()
            if rcv is not None:
                rcv.close()
    shutil.rmtree(tmpdir, ignore_errors=True)
    hdr = ("data", "transport", "destination", "savevm s", "GB/s", "baseline", "base GB/s", "ratio", "stream MiB",
           "detail")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(hdr)]
    line = "  ".join(h.ljust(w) for h, w in zip(hdr, widths))
    print()
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print()
    print("GB/s = GB (1e9 bytes) of guest RAM per second; ratio = savevm GB/s / baseline GB/s.")
    print("socket rows: time from start of save to the receiver's ack (load included); detail = median")
    print("sender-side time until the stream was written, receiver-side load_stream time, and the same-run")
    print("plain copy into a freshly allocated buffer.  fresh destination = the user's path (headline).")
    for v in verdicts:
        print("target:", v)
    for n in notes:
        print(n)
    print(f"total bench time {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
