"""The RAM plugin's rows of ``savevm bench``: the user's path first, then the best case.

The headline rows migrate the RAM section the way a user's migration runs it:
the source saves in this process, a second process (forked, over tcp loopback)
loads into a **fresh** block (``RAMBlock.allocate``, as ``savevm incoming``
with the demo program gets), so the load pays the first-touch page faults of
a real destination.  Beside them, in the same run, a plain ``sendall`` /
``recv_into`` copy of the same bytes between the same two processes into a
reused buffer (the ratio) and into a fresh one (named in the row).  Then the
best case (the destination block pre-touched) and the bulk stage to
/dev/null.  The full benchmarks (two CLI processes, tcp, rdma, compression)
are the scripts in ``benchmarks/``.  Every figure is a median.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from savevm.channels.fd import FdChannel
from savevm.channels.sockets import SocketChannel
from savevm.load import load_stream
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile
from savevm.save import save_stream
from savevm_ram import register_ram
from savevm_ram.block import RAMBlock, RAMList

CHUNK = 1 << 20


def _median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bulk_to_devnull(buf: np.ndarray) -> None:
    reg = PluginHost().new_registry()
    register_ram(reg, RAMList([RAMBlock("bench", buf)]))
    f = QEMUFile(FdChannel(os.open(os.devnull, os.O_WRONLY), "null"), writable=True)
    save_stream(f, reg)
    f.close()


def _resident(host: np.ndarray) -> int:
    """Resident bytes of the mapping holding ``host`` (0 where /proc is missing)."""
    addr = host.ctypes.data
    inside = False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "Rss:":
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _receive(sock: socket.socket, size: int, mode: str, touched: np.ndarray | None) -> tuple[int, int]:
    """Child side of one run: load (or plainly copy) into fresh or touched memory; (pages, resident growth)."""
    fresh = touched is None
    if mode == "savevm":
        block = RAMBlock.allocate("bench", size) if fresh else RAMBlock("bench", touched)
        before = _resident(block.host) if fresh else 0
        reg = PluginHost().new_registry()
        h = register_ram(reg, RAMList([block]))
        load_stream(QEMUFile(SocketChannel(sock, "bench")), reg)
        return h.counters.loaded_pages, (_resident(block.host) - before) if fresh else 0
    buf = np.empty(size, dtype=np.uint8) if fresh else touched
    assert buf is not None
    mv = buf.data
    got = 0
    while got < size:
        n = sock.recv_into(mv[got : got + CHUNK])
        if n == 0:
            break
        got += n
    return got // 4096, 0


def _child(addr: tuple[str, int], conn: Any, size: int) -> None:
    touched = np.zeros(size, dtype=np.uint8)
    touched.fill(0)  # the best case: faulted in before anything is timed
    while True:
        msg = conn.recv()
        if msg is None:
            return
        mode, fresh = msg
        with socket.create_connection(addr) as sock:
            _tune(sock)
            pages, grew = _receive(sock, size, mode, None if fresh else touched)
            sock.sendall(b"\x01")
        conn.send((pages, grew))


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)


class _Pair:
    """This process sends; a forked child receives over tcp loopback, one connection per run."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("fork")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(self.listener.getsockname(), child_conn, size), daemon=True)
        self.proc.start()
        self.size = size

    def run(self, src: np.ndarray, mode: str, fresh: bool) -> tuple[float, int, int]:
        """One transfer: (seconds to the child's ack, pages it loaded, its resident growth)."""
        self.conn.send((mode, fresh))
        sock, _ = self.listener.accept()
        with sock:
            _tune(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = time.perf_counter()
            if mode == "savevm":
                reg = PluginHost().new_registry()
                register_ram(reg, RAMList([RAMBlock("bench", src)]))
                f = QEMUFile(SocketChannel(sock, "bench"), writable=True)
                save_stream(f, reg)
                f.flush()
            else:
                mv = src.data
                for off in range(0, self.size, CHUNK):
                    sock.sendall(mv[off : off + CHUNK])
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)
            dt = time.perf_counter() - t
        pages, grew = self.conn.recv()
        return dt, pages, grew

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)
        self.listener.close()


def bench_rows(size: int, runs: int) -> list[dict[str, Any]]:
    """Rows of {what, seconds, GB/s, baseline, baseline GB/s, ratio}; the user's path first."""
    rows: list[dict[str, Any]] = []
    rand = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    zero = np.zeros(size, dtype=np.uint8)
    zero.fill(0)  # a source that has run: its zero pages are resident
    pair = _Pair(size)
    try:
        def med(src: np.ndarray, mode: str, fresh: bool) -> tuple[float, int]:
            res = [pair.run(src, mode, fresh) for _ in range(runs)]
            return statistics.median(r[0] for r in res), int(statistics.median(r[2] for r in res))

        copy_reused, _ = med(rand, "plain", False)
        copy_fresh, _ = med(rand, "plain", True)
        base = f"plain socket copy into a reused buffer (into a fresh one: {size / copy_fresh / 1e9:.2f} GB/s)"
        for name, src, fresh in (("random pages, fresh destination (user's path)", rand, True),
                                 ("all-zero RAM, fresh destination (user's path)", zero, True),
                                 ("random pages, best case (pre-touched)", rand, False)):
            s, grew = med(src, "savevm", fresh)
            what = f"RAM migration, {name}"
            if src is zero:
                what += f", destination resident +{grew / 2**20:.0f} MiB"
            rows.append({"what": what, "seconds": s, "GB/s": size / s / 1e9, "baseline": base,
                         "baseline GB/s": size / copy_reused / 1e9, "ratio": copy_reused / s,
                         "headline": fresh})
    finally:
        pair.close()
    scratch = np.empty_like(rand)
    copy_s = _median(lambda: np.copyto(scratch, rand), runs)
    for name, buf in (("RAM bulk stage, random pages -> /dev/null", rand),
                      ("RAM bulk stage, zero pages -> /dev/null", zero)):
        s = _median(functools.partial(_bulk_to_devnull, buf), runs)
        rows.append({"what": name, "seconds": s, "GB/s": size / s / 1e9,
                     "baseline": "numpy copy of the same bytes", "baseline GB/s": size / copy_s / 1e9,
                     "ratio": copy_s / s})
    return rows
