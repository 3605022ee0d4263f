"""The receiver's floor: what it costs to land QEMU PAGE records in memory, three ways.

Run: ``python benchmarks/bench_receive.py`` (``--size`` default 1G, ``--runs`` default 3,
medians reported).

QEMU's stream puts an 8-byte header before every 4 KiB page, so a receiver cannot ``recv``
straight into guest memory without knowing each page's address first.  This script measures,
between two fresh processes over tcp loopback, the same stream of ``PAGE|CONTINUE`` records for
consecutive pages landed three ways (no savevm code involved: it prices the idea, not our loader):

* ``plain copy`` -- the baseline: the same bytes received into a reused 4 MiB buffer, no parsing;
* ``stage + copy`` -- what savevm's loader does: receive into a 4 MiB staging buffer, check the
  headers with numpy, copy the pages into the block (one extra copy per page);
* ``scatter`` -- speculative direct receive: ``recvmsg_into`` with 512 iovecs (header, page,
  header, page, ...) aimed at the pages the next 256 records should carry, checked afterwards;
  ``scatter + zero check`` adds the check that makes a wrong guess recoverable (the target pages
  must be zero before, so a wrong guess can be undone by zeroing them).

The block is populated before the timer starts (as ``savevm incoming`` does while it waits).
Measured here, 2 CPUs, 1 GiB, modes interleaved, medians of 5 (of 3 in the earlier set):
plain copy 0.425 s (0.435); stage + copy 0.486 s, 0.87 of the plain copy (0.519); scatter
0.552 s (0.453); scatter + zero check 0.610 s (0.667).  Landing pages directly does not pay
once it is safe: the kernel's per-iovec work, the Python that builds 512 iovecs and the zero
check cost what the copy saves, so savevm's loader keeps its stage.  (A stage receiver this
small reaches 0.84-0.87 of the plain copy; savevm's whole path reaches 0.69-0.80, so the rest
of the gap is elsewhere in the pipeline.)
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from savevm.config import parse_size  # noqa: E402

REC = 8 + 4096
PAGE_C = 0x08 | 0x20  # RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
BATCH = 1024  # records per send (one page-search batch)
SCATTER = 256  # records per recvmsg_into (512 iovecs, under IOV_MAX)
MODES = ("plain copy", "stage + copy", "scatter", "scatter + zero check")
MADV_POPULATE_WRITE = 23


def sender(port: int, size: int) -> None:
    """Send ``size`` bytes of pages as PAGE|CONTINUE records for consecutive pages, then wait for the ack."""
    pages = size // 4096
    s = socket.create_connection(("127.0.0.1", port))
    buf = np.empty((BATCH, REC), dtype=np.uint8)
    buf[:, 8:] = np.random.default_rng(1).integers(0, 256, (BATCH, 4096), dtype=np.uint8)
    for b in range(0, pages, BATCH):
        k = min(BATCH, pages - b)
        hdr = ((np.arange(b, b + k, dtype=np.uint64) << np.uint64(12)) | np.uint64(PAGE_C)).astype(">u8")
        buf[:k, :8] = hdr.view(np.uint8).reshape(k, 8)
        s.sendall(buf[:k].data)
    s.recv(1)
    s.close()


def _block(size: int) -> np.ndarray:
    """Anonymous memory, faulted in for writing before the timer (as a waiting destination does)."""
    block = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(block.ctypes.data), ctypes.c_size_t(size), MADV_POPULATE_WRITE) != 0:
        block[::4096] = 0  # no MADV_POPULATE_WRITE: touch every page instead
    return block


def _plain(c: socket.socket, size: int) -> None:
    buf = memoryview(bytearray(4 << 20))
    got = 0
    total = size // 4096 * REC
    while got < total:
        n = c.recv_into(buf)
        if not n:
            raise SystemExit("short stream")
        got += n


def _stage(c: socket.socket, block: np.ndarray) -> None:
    stage = bytearray(4 << 20)
    smv = memoryview(stage)
    pages2d = block.reshape(-1, 4096)
    pages = len(pages2d)
    rend = page = 0
    while page < pages:
        n = c.recv_into(smv[rend:])
        if not n:
            raise SystemExit("short stream")
        rend += n
        k = rend // REC
        if k:
            hdr = np.ndarray((k,), dtype=">u8", buffer=stage, offset=0, strides=(REC,))
            want = (np.arange(page, page + k, dtype=np.uint64) << np.uint64(12)) | np.uint64(PAGE_C)
            if not (hdr == want).all():
                raise SystemExit("unexpected record")
            pages2d[page : page + k] = np.ndarray((k, 4096), dtype=np.uint8, buffer=stage, offset=8,
                                                  strides=(REC, 1))
            page += k
            rest = rend - k * REC
            smv[:rest] = smv[k * REC : rend]
            rend = rest


def _scatter(c: socket.socket, block: np.ndarray, zero_check: bool) -> None:
    mv = block.data
    pages = len(block) // 4096
    hdrs = np.zeros((SCATTER, 8), dtype=np.uint8)
    hv = [hdrs[j].data for j in range(SCATTER)]
    page = 0
    while page < pages:
        k = min(SCATTER, pages - page)
        if zero_check and block[page * 4096 : (page + k) * 4096].view(np.uint64).any():
            raise SystemExit("target pages not zero")
        want = k * REC
        got = 0
        while got < want:  # resume mid-record where a read stopped
            j, off = divmod(got, REC)
            iov: list[memoryview] = []
            if off < 8:
                iov += [hv[j][off:], mv[(page + j) * 4096 : (page + j + 1) * 4096]]
            else:
                iov.append(mv[(page + j) * 4096 + off - 8 : (page + j + 1) * 4096])
            for jj in range(j + 1, k):
                iov += [hv[jj], mv[(page + jj) * 4096 : (page + jj + 1) * 4096]]
            n = c.recvmsg_into(iov)[0]
            if not n:
                raise SystemExit("short stream")
            got += n
        h = hdrs[:k].copy().view(">u8").ravel()
        want_h = (np.arange(page, page + k, dtype=np.uint64) << np.uint64(12)) | np.uint64(PAGE_C)
        if not (h == want_h).all():
            raise SystemExit("unexpected record")
        page += k


def receive(mode: str, size: int) -> float:
    """Seconds for the receiver to land ``size`` bytes of pages, ``mode`` being one of MODES."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    block = _block(size)
    snd = subprocess.Popen([sys.executable, __file__, "--send", str(ls.getsockname()[1]), "--size", str(size)])
    try:
        c, _ = ls.accept()
        t = time.perf_counter()
        if mode == "plain copy":
            _plain(c, size)
        elif mode == "stage + copy":
            _stage(c, block)
        else:
            _scatter(c, block, zero_check=mode.endswith("zero check"))
        dt = time.perf_counter() - t
        c.send(b"\x01")
        c.close()
        snd.wait(60)
    finally:
        if snd.poll() is None:
            snd.kill()
            snd.wait()
        ls.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--send", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = parse_size(args.size) // 4096 * 4096
    if args.send:
        sender(args.send, size)
        return
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.runs):  # interleaved, so a noisy minute hits every mode
        for m in MODES:
            times[m].append(receive(m, size))
    base = statistics.median(times["plain copy"])
    print(f"landing {size >> 20} MiB of PAGE records, two processes over tcp loopback, median of {args.runs}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"{'receiver':<22} {'seconds':>8} {'vs plain copy':>14}   runs")
    for m in MODES:
        med = statistics.median(times[m])
        print(f"{m:<22} {med:8.3f} {base / med:13.2f}x   {' '.join(f'{t:.3f}' for t in times[m])}")


if __name__ == "__main__":
    main()
