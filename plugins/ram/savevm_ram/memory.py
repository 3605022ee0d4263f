"""Fresh memory for RAM blocks: how it is allocated and when it is faulted in.

Memory that was never written costs nothing until its first write, and then
costs a page fault per page: on the virtual machines this project is measured
on, about 3-10 µs per 4 KiB page (1-2.6 s per GiB), but one fault per 2 MiB
when the memory is backed by transparent huge pages (0.15-0.7 s per GiB,
mostly the kernel zeroing the page).  A destination that loads 1 GiB into
fresh memory pays that inside the migration, on top of the copy.  So:

* :func:`allocate` gives the RAM plugin's own blocks (``RAMList(auto_create=
  True)``, the demo program) an anonymous private mapping advised
  ``MADV_HUGEPAGE``: huge-page faults, and untouched pages stay unallocated
  (a zero page that is not written costs nothing: see the loader).
* :func:`populate` faults a range in with ``MADV_POPULATE_WRITE`` (Linux 5.14):
  the kernel allocates the pages without changing a byte, so it is safe while
  another thread writes the same memory, and ctypes releases the GIL for it.
* :class:`Prefaulter` runs populate in a background thread, in two modes:
  ``mem-prealloc`` (QEMU's ``-mem-prealloc``) faults every block in and keeps
  it resident; *prefault while waiting* (``savevm incoming``'s default)
  starts while the destination waits for its source, runs on into a stream
  of data, stops at the first zero page, and gives back what zero pages land
  on (:func:`discard`), so a destination that receives zero pages still ends
  small.  (Faulting ahead of the loader in a second thread that starts only
  with the load was measured too: on two shared cores it won nothing and
  sometimes lost.  The head start while waiting is what pays.)
* :func:`discard` (``MADV_DONTNEED``) turns a range of an anonymous private
  mapping back into untouched zero memory: for ZERO records that is both the
  cheapest way to write them and the way to release what was faulted in.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from savevm.logging import get_logger

log = get_logger("savevm.ram")

#: Linux madvise advice values (not all Pythons name them)
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
#: one populate call at most this long, so a stop request is seen soon
POPULATE_STEP = 32 << 20


class _Libc:
    """madvise through ctypes: it releases the GIL, mmap.madvise does not."""

    def __init__(self) -> None:
        self.madvise: Any = None
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            fn = lib.madvise
        except (OSError, AttributeError, TypeError):
            return
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        self.madvise = fn


@functools.cache
def _libc() -> _Libc:
    """The C library's madvise, looked up once per process (a handle, never changed)."""
    return _Libc()


def allocate(length: int) -> tuple[mmap.mmap, np.ndarray]:
    """An anonymous private mapping of ``length`` bytes advised for huge pages, and a uint8 view of it.

    The mapping reads as zeros and holds no memory until written; the caller
    keeps the mmap object alive as long as the view is used.
    """
    m = mmap.mmap(-1, max(length, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError, AttributeError, ValueError):
        m.madvise(MADV_HUGEPAGE)
    return m, np.frombuffer(m, dtype=np.uint8)[:length]


def _address(host: np.ndarray) -> int:
    return int(host.ctypes.data)


def _advise(host: np.ndarray, start: int, length: int, advice: int) -> bool:
    """madvise ``host[start:start+length]``, page-aligned inward; True if done (or nothing whole inside)."""
    fn = _libc().madvise
    if fn is None or length <= 0:
        return False
    base = _address(host)
    lo = (base + start + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    hi = (base + start + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo:
        return True
    return bool(fn(lo, hi - lo, advice) == 0)


def populate(host: np.ndarray, start: int, length: int) -> bool:
    """Fault ``host[start:start+length]`` in for writing, without changing it.

    Returns False where the kernel cannot (no ``MADV_POPULATE_WRITE``: Linux
    < 5.14, or memory it refuses), so callers fall back to the copy faulting
    the pages itself.  Page-aligns the range inward to whole pages.
    """
    return _advise(host, start, length, MADV_POPULATE_WRITE)


def discard(host: np.ndarray, start: int, length: int) -> bool:
    """Make ``host[start:start+length]`` read as zero again and release its memory.

    Only for anonymous private mappings (:func:`allocate`): there
    ``MADV_DONTNEED`` drops the pages and the next read maps the shared zero
    page.  (On shared memory it would not zero anything, so callers check the
    block's ``discardable``.)  Page-aligns the range inward; False if the
    kernel refused, and then nothing may be assumed about the range.
    """
    return _advise(host, start, length, MADV_DONTNEED)


def _touch(host: np.ndarray, start: int, length: int) -> None:
    """Fault pages in by rewriting one byte of each (only safe while nobody else writes them)."""
    view = host[start : start + length]
    pages = view[: len(view) // mmap.PAGESIZE * mmap.PAGESIZE].reshape(-1, mmap.PAGESIZE)
    pages[:, 0] = pages[:, 0]


def map_shared(host: np.ndarray, start: int, length: int) -> None:
    """Map pages of a *shared* file mapping into this process by reading one byte of each.

    Memory another process already allocated in a shared file (a memfd)
    needs only page-table entries here.  A write fault installs one page per
    fault; a read fault maps the whole fault-around window (64 KiB by
    default), and on shmem, which needs no write notification, those entries
    are already writable, so later writes do not fault again.  Measured on
    1 GiB of another process's memfd: 0.06 s by reads against 0.28 s by
    ``MADV_POPULATE_WRITE`` and 0.45 s of faults inside the copy.  It
    changes nothing, so it may race with writers.
    """
    view = host[start : start + length]
    if len(view):
        int(view[:: mmap.PAGESIZE].max())


class Prefaulter:
    """A background thread that faults ranges of memory in, once, in order.

    ``exclusive`` is True when populate is unavailable and pages are faulted
    by rewriting a byte of each: then nothing else may write the memory
    until :meth:`wait` returns (the loader waits before its first record).
    ``shared``: the ranges are another process's shared memory, mapped here
    by reads (:func:`map_shared`), which never excludes writers.
    ``fallback``: where populate is unavailable, called once in the thread
    instead of touching the pages (for memory others may write meanwhile).
    """

    def __init__(self, jobs: list[tuple[np.ndarray, int, int]], name: str = "savevm-mem-prealloc",
                 step: int = POPULATE_STEP, *, shared: bool = False,
                 fallback: Callable[[], None] | None = None) -> None:
        self._jobs = jobs
        self._step = step
        self._shared = shared
        self._fallback = fallback
        self._stop = threading.Event()
        self._done = threading.Event()
        # probe once, before the thread runs: the loader decides from this whether to wait
        unsupported = bool(jobs) and not shared and not populate(jobs[0][0], jobs[0][1],
                                                                 min(jobs[0][2], mmap.PAGESIZE))
        self.exclusive = unsupported and fallback is None
        self._use_fallback = unsupported and fallback is not None
        #: bytes faulted in so far
        self.faulted = 0
        self.total = sum(n for _, _, n in jobs)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            if self._use_fallback:
                assert self._fallback is not None
                self._fallback()
                return
            for host, start, length in self._jobs:
                for a, n in steps(start, length, self._step):
                    if self._stop.is_set():
                        return
                    if self._shared:
                        map_shared(host, a, n)
                    elif self.exclusive:
                        _touch(host, a, n)
                    elif not populate(host, a, n):
                        continue  # memory the kernel will not populate: the load's copy faults it
                    self.faulted += n
            # the thread's name tells which memory (a block prefaulted while waiting, an rdma region, ...)
            log.info("ram_mem_prealloc_done", thread=self._thread.name, bytes=self.faulted,
                     populate=not self.exclusive, ms=round((time.monotonic() - t0) * 1000, 1))
        finally:
            self._jobs = []  # hold no memory alive: a block may have moved onto other memory since
            self._done.set()

    def done(self) -> bool:
        """Everything is faulted in (or the thread was stopped)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every range is faulted in (or ``timeout``); True if so."""
        return self._done.wait(timeout)

    def stop(self, wait: bool = True) -> None:
        """Stop after the step in progress; ``wait``: until the thread has ended."""
        self._stop.set()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()


def steps(start: int, length: int, step: int = POPULATE_STEP) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` steps of at most ``step`` bytes over a range (what stop checks fall between)."""
    end = start + length
    a = start
    while a < end:
        n = min(step, end - a)
        yield a, n
        a += n
