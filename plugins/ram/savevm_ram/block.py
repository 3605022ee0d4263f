"""RAMBlock and RAMList: named regions of migratable memory.

A block wraps any writable buffer-protocol object (bytearray, mmap, numpy
array, ``multiprocessing.shared_memory``) without copying it: pages are
read from and written to the program's own memory.  Offsets inside a block
are what the stream carries; ``RAMBlock.offset`` is the block's place in
one global address space (QEMU's ram_addr_t), which the XBZRLE cache keys
on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np

from savevm.errors import MigrationError, RegistrationError
from savevm.host import mem_available
from savevm.logging import get_logger
from savevm_ram.memory import Prefaulter
from savevm_ram.wire import PAGE_SIZE

log = get_logger("savevm.ram")

#: prefault-while-waiting populates this much per call, so it stops within ~10 ms of the first zero page
WAITING_STEP = 4 << 20

DirtyProvider = Literal["tracked", "compare"]


class RAMBlock:
    """One block of migratable memory (QEMU's RAMBlock).

    ``used_length`` is what migrates; ``max_length`` is how far the block may
    grow when a stream brings a larger size (only if ``resizable``).
    """

    def __init__(
        self,
        idstr: str,
        buffer: Any,
        *,
        used_length: int | None = None,
        max_length: int | None = None,
        page_size: int = PAGE_SIZE,
        dirty: DirtyProvider = "tracked",
        resizable: bool = False,
        on_resize: Callable[[RAMBlock, int], None] | None = None,
    ) -> None:
        if not idstr or len(idstr.encode()) > 255:
            raise RegistrationError(f"RAMBlock idstr must be 1..255 bytes, got {idstr!r}")
        if page_size != PAGE_SIZE:
            raise RegistrationError(f"{idstr}: only {PAGE_SIZE}-byte target pages are supported")
        # multiprocessing.shared_memory.SharedMemory exposes its memory as .buf
        raw = buffer.buf if isinstance(getattr(buffer, "buf", None), memoryview) else buffer
        try:
            mv = memoryview(raw)
        except TypeError as exc:
            raise RegistrationError(f"{idstr}: {type(buffer).__name__} does not expose a buffer") from exc
        if mv.readonly:
            raise RegistrationError(f"{idstr}: the buffer is read-only; a RAMBlock needs writable memory")
        if not mv.c_contiguous:
            raise RegistrationError(f"{idstr}: the buffer must be C-contiguous")
        mv = mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv
        self.buffer = buffer
        self.host = np.frombuffer(mv, dtype=np.uint8)
        self.mv = mv
        cap = len(self.host)
        self.max_length = cap if max_length is None else max_length
        self.used_length = self.max_length if used_length is None else used_length
        for name, v in (("used_length", self.used_length), ("max_length", self.max_length)):
            if v % PAGE_SIZE or v < 0:
                raise RegistrationError(f"{idstr}: {name} {v} is not a multiple of the {PAGE_SIZE}-byte page")
        if not 0 <= self.used_length <= self.max_length <= cap:
            raise RegistrationError(
                f"{idstr}: need used_length {self.used_length} <= max_length {self.max_length} "
                f"<= buffer size {cap}")
        if dirty not in ("tracked", "compare"):
            raise RegistrationError(f"{idstr}: dirty provider must be 'tracked' or 'compare', got {dirty!r}")
        self.idstr = idstr
        self.page_size = page_size
        self.dirty_provider: DirtyProvider = dirty
        self.resizable = resizable
        self.on_resize = on_resize
        #: global ram_addr_t of the block's first byte (set by RAMList)
        self.offset = 0
        #: the RAM plugin allocated this memory (:meth:`allocate`), nobody else holds it: a
        #: transport may give the block other memory before a load (``ram_block_memory``)
        self.owned = False
        #: the memory is an anonymous private mapping (:meth:`allocate`): a range can be made zero
        #: and released with MADV_DONTNEED (:func:`savevm_ram.memory.discard`)
        self.discardable = False
        # dirty log for the tracked provider: one byte per page
        self._log_lock = threading.Lock()
        self._dirty_log: np.ndarray | None = None

    @classmethod
    def allocate(cls, idstr: str, length: int, **kwargs: Any) -> RAMBlock:
        """A block over fresh memory the RAM plugin owns (zero, unallocated until written).

        The memory is an anonymous private mapping advised for transparent huge
        pages (see :mod:`savevm_ram.memory`): a first write faults 2 MiB at a
        time instead of 4 KiB, and pages that are never written (zero pages
        loaded into it) are never allocated.  Programs that read their memory
        through the block (``block.host``) rather than their own buffer let a
        transport replace it (:meth:`replace_memory`).
        """
        from savevm_ram.memory import allocate

        _, host = allocate(length)
        block = cls(idstr, host, **kwargs)
        block.owned = block.discardable = True
        return block

    def replace_memory(self, buffer: Any) -> None:
        """Move an owned block onto other memory (a transport's registered region), keeping its bytes.

        Only for blocks made by :meth:`allocate`: memory a program passed in is
        the program's, and it would keep using the old buffer.  Non-zero pages
        are copied over (fresh memory is all zero, so usually nothing is).
        """
        if not self.owned:
            raise RegistrationError(f"{self.idstr}: only a block the RAM plugin allocated can change memory")
        mv = memoryview(buffer).cast("B")
        if mv.readonly or len(mv) < self.max_length:
            raise RegistrationError(f"{self.idstr}: replacement memory must be writable and hold "
                                    f"{self.max_length} bytes, got {len(mv)}{' (read-only)' if mv.readonly else ''}")
        new = np.frombuffer(mv, dtype=np.uint8)
        if new.ctypes.data == self.host.ctypes.data:
            # the memory the block already lives on (offered early, then again with the stream)
            self.buffer, self.mv, self.host = buffer, mv, new
            return
        from savevm_ram.pipeline import zero_pages

        step = 1024
        old2d = self.host[: self.max_length].reshape(-1, PAGE_SIZE)
        new2d = new[: self.max_length].reshape(-1, PAGE_SIZE)
        for lo in range(0, len(old2d), step):
            nz = np.flatnonzero(~zero_pages(old2d[lo : lo + step]))
            if nz.size:
                new2d[lo + nz] = old2d[lo + nz]
        self.buffer = buffer
        self.mv = mv
        self.host = new
        self.discardable = False  # a transport's region may be shared: DONTNEED would not zero it

    # ------------------------------------------------------------------ info
    @property
    def pages(self) -> int:
        """Number of target pages in ``used_length``."""
        return self.used_length // PAGE_SIZE

    def page_view(self, first: int, count: int) -> np.ndarray:
        """Pages ``[first, first+count)`` as an (count, 4096) uint8 view (no copy)."""
        a = first * PAGE_SIZE
        return self.host[a : a + count * PAGE_SIZE].reshape(count, PAGE_SIZE)

    def __repr__(self) -> str:
        return f"RAMBlock({self.idstr!r}, used={self.used_length}, max={self.max_length})"

    # ------------------------------------------------------------------ writes
    def write(self, offset: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Write into the block and mark the touched pages dirty (tracked provider)."""
        # bytes, not elements: a uint32 array of 4 items writes 16 bytes
        n = data.nbytes if isinstance(data, (memoryview, np.ndarray)) else len(data)
        if offset < 0 or offset + n > self.used_length:
            raise MigrationError(f"{self.idstr}: write [{offset}, {offset + n}) outside used_length {self.used_length}")
        self.host[offset : offset + n] = np.frombuffer(data, dtype=np.uint8) if not isinstance(
            data, np.ndarray) else data.reshape(-1).view(np.uint8)
        self.mark_dirty(offset, n)

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record that ``[offset, offset+length)`` changed; safe from any thread."""
        if length <= 0:
            return
        log_ = self._dirty_log
        if log_ is None:
            return  # not migrating: nothing to record
        first = offset // PAGE_SIZE
        last = (offset + length - 1) // PAGE_SIZE
        with self._log_lock:
            log_[first : last + 1] = True

    # ------------------------------------------------------------------ dirty log
    def _start_log(self) -> None:
        with self._log_lock:
            self._dirty_log = np.zeros(self.max_length // PAGE_SIZE, dtype=np.bool_)

    def _take_log(self) -> np.ndarray:
        """Return the dirty pages since the last call and clear the log atomically."""
        with self._log_lock:
            assert self._dirty_log is not None
            out = self._dirty_log.copy()
            self._dirty_log[:] = False
        return out

    def _stop_log(self) -> None:
        with self._log_lock:
            self._dirty_log = None

    # ------------------------------------------------------------------ resize
    def resize(self, new_length: int) -> None:
        """Change ``used_length`` (QEMU's qemu_ram_resize), within ``max_length``."""
        if new_length == self.used_length:
            return
        if not self.resizable:
            raise MigrationError(
                f"RAMBlock {self.idstr!r}: length mismatch, stream has {new_length} bytes, "
                f"this side has {self.used_length} and the block is not resizable")
        if new_length % PAGE_SIZE or not 0 < new_length <= self.max_length:
            raise MigrationError(
                f"RAMBlock {self.idstr!r}: cannot resize to {new_length} (max_length {self.max_length}, "
                f"page {PAGE_SIZE})")
        old = self.used_length
        self.used_length = new_length
        log.info("qemu_ram_resize", block=self.idstr, old=old, new=new_length)
        if self.on_resize is not None:
            self.on_resize(self, new_length)


def machine_ram_limit() -> int:
    """The default bound on RAM a stream may make us create: three quarters of this machine's memory.

    A stream announcing more than the machine has cannot be received
    anyway; the bound turns such a stream (or a hostile one) into a clear
    error instead of an out-of-memory kill.  Callers may raise it.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 64 << 30
    return max(PAGE_SIZE, total * 3 // 4)


class RAMList:
    """The migratable blocks, in QEMU's order (largest ``max_length`` first)."""

    def __init__(self, blocks: list[RAMBlock] | None = None, *, auto_create: bool = False,
                 max_auto_bytes: int | None = None, mem_prealloc: bool = False) -> None:
        self._blocks: list[RAMBlock] = []
        #: QEMU's -mem-prealloc: fault every block's memory in, in the background, as soon as
        #: it is known (see :meth:`prealloc`), so a load copies into present memory
        self.mem_prealloc = mem_prealloc
        self._prefaulters: list[Prefaulter] = []
        self._prealloc_started = False
        #: the prefault that runs only while the destination waits (:meth:`prefault_while_waiting`)
        self._waiting: Prefaulter | None = None
        self._waiting_stopped = False
        #: bumped on every add/remove, like ram_list.version (hotplug)
        self.version = 0
        #: destination only: a block the stream announces but this side lacks is created
        #: (zeroed, lazily committed memory) instead of refused, up to ``max_auto_bytes`` in all
        self.auto_create = auto_create
        self.max_auto_bytes = machine_ram_limit() if max_auto_bytes is None else max_auto_bytes
        for b in blocks or []:
            self.add(b)
        if mem_prealloc:
            self.prealloc()

    # ------------------------------------------------------------------ mem-prealloc
    def prealloc(self, blocks: list[RAMBlock] | None = None) -> None:
        """Fault the blocks' memory in, in a background thread (QEMU's ``-mem-prealloc``).

        ``savevm incoming --mem-prealloc`` starts this when the program
        registers its RAM, before it listens: the faults (about 0.15-0.7 s per
        GiB here with huge pages, 1-2.6 s with 4 KiB pages) are taken while
        the destination waits for its source instead of inside the load.
        ``MADV_POPULATE_WRITE`` never changes a byte, so the load may start
        while this still runs; where the kernel lacks it, pages are touched
        instead and the load waits for that (:meth:`wait_prealloc`).
        """
        self.mem_prealloc = self._prealloc_started = True
        todo = list(self._blocks) if blocks is None else blocks
        jobs = [(b.host, 0, b.max_length) for b in todo]
        if jobs:
            log.info("ram_mem_prealloc", blocks=[b.idstr for b in todo], bytes=sum(n for *_, n in jobs))
            self._prefaulters.append(Prefaulter(jobs))

    def prefault_while_waiting(self) -> bool:
        """Fault the blocks in while the destination waits for its source, until zero pages come.

        ``savevm incoming`` does this by default: the seconds a destination
        spends waiting (the source starting, preparing its memory,
        connecting) are free, and a load into present memory runs at copy
        speed instead of paying a page fault per huge page.  Unlike
        :meth:`prealloc` it stops at the first ZERO record that lands on a
        block (:meth:`stop_waiting`, called by the loader), and ZERO records
        release their pages again (the loader :func:`discards
        <savevm_ram.memory.discard>` them), so a destination that receives
        mostly zero pages still ends small, while one that receives data
        keeps faulting ahead of it.  Only blocks the RAM plugin allocated
        (``discardable``), and only when they fit in half the memory the
        machine has available: a destination must not push the machine into
        swap for a speed-up.  True if it started.
        """
        if self.mem_prealloc or self._waiting is not None:
            return False
        todo = [b for b in self._blocks if b.discardable]
        total = sum(b.max_length for b in todo)
        avail = mem_available()
        if not todo or (avail is not None and total > avail // 2):
            log.info("ram_prefault_skipped", bytes=total, available=avail)
            return False
        log.info("ram_prefault_while_waiting", blocks=[b.idstr for b in todo], bytes=total)
        self._waiting = Prefaulter([(b.host, 0, b.max_length) for b in todo], name="savevm-prefault",
                                   step=WAITING_STEP)
        if self._waiting.exclusive:  # no MADV_POPULATE_WRITE: touching pages could race the loader
            self._waiting.stop()
            self._waiting = None
            return False
        return True

    def stop_waiting(self) -> None:
        """Zero pages are arriving: end the prefault (without waiting for its last step), once."""
        w = self._waiting
        if w is not None and not self._waiting_stopped:
            self._waiting_stopped = True
            w.stop(wait=False)
            log.info("ram_prefault_stopped", bytes=w.faulted, total=w.total, done=w.done())

    @property
    def zero_by_discard(self) -> bool:
        """ZERO records may release a discardable block's pages (not under mem-prealloc, which keeps them)."""
        return not self.mem_prealloc

    def wait_prealloc(self, timeout: float | None = None, *, only_exclusive: bool = False) -> bool:
        """Wait for :meth:`prealloc` to finish; ``only_exclusive``: only where the load may not overlap it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self._prefaulters:
            if only_exclusive and not p.exclusive:
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not p.wait(left):
                return False
        return True

    def add(self, block: RAMBlock) -> RAMBlock:
        """Add a block; names are unique."""
        if any(b.idstr == block.idstr for b in self._blocks):
            raise RegistrationError(f"RAMBlock {block.idstr!r} already exists")
        self._blocks.append(block)
        self._blocks.sort(key=lambda b: -b.max_length)  # stable: equal sizes keep insertion order
        self._relayout()
        self.version += 1
        if self.mem_prealloc and self._prealloc_started:
            self.prealloc([block])  # a block added after prealloc() started
        return block

    def remove(self, idstr: str) -> None:
        """Remove a block by name."""
        self._blocks = [b for b in self._blocks if b.idstr != idstr]
        self._relayout()
        self.version += 1

    def _relayout(self) -> None:
        off = 0
        for b in self._blocks:
            b.offset = off
            off += b.max_length

    def create(self, idstr: str, length: int) -> RAMBlock:
        """Make a zeroed block for a stream's block list (``auto_create``)."""
        if sum(b.max_length for b in self._blocks) + length > self.max_auto_bytes:
            raise MigrationError(f"RAMBlock {idstr!r}: {length} more bytes exceed max_auto_bytes "
                                 f"{self.max_auto_bytes}")
        log.info("ram_block_auto_create", block=idstr, length=length)
        return self.add(RAMBlock.allocate(idstr, max(length, PAGE_SIZE), used_length=length))

    def find(self, idstr: str) -> RAMBlock | None:
        """Block by name."""
        for b in self._blocks:
            if b.idstr == idstr:
                return b
        return None

    def __iter__(self) -> Iterator[RAMBlock]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, i: int) -> RAMBlock:
        return self._blocks[i]

    @property
    def total_bytes(self) -> int:
        """Sum of used_length (ram_bytes_total)."""
        return sum(b.used_length for b in self._blocks)
