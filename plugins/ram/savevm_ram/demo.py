"""The demo program: RAM blocks plus a device, rewritten at a steady rate.

``savevm demo`` migrates it between two processes; ``savevm migrate
--guest savevm_ram.demo:DemoProgram`` and ``savevm incoming ... --guest
savevm_ram.demo:DemoProgram --guest-arg role=destination`` do the same by
hand.  The workload rewrites only the first ``working_set`` bytes of RAM
(all of it by default), in one of two patterns:

* ``pages``: ``dirty_rate / 4096`` random pages of the working set per
  second, a 256-byte stretch in each (so XBZRLE has something to win);
* ``sparse``: a few bytes (:data:`SPARSE_BYTES`) in every page of the
  working set, page after page, as fast as it can (``dirty_rate`` ``max``,
  its default: the whole working set once per tick) or at ``dirty_rate /
  4096`` pages per second.  This is the guest QEMU's stop rule cannot
  migrate: every page is always dirty, yet each costs a few dozen bytes
  as an XBZRLE delta.

It honours pause and throttle the way a vCPU does under QEMU.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any

import attrs
import numpy as np

from savevm import vmstate as vs
from savevm.config import parse_size
from savevm.errors import ConfigError

#: Bytes rewritten inside each dirtied page.
STRETCH = 256
TICK = 0.01
#: ``sparse``: bytes rewritten in each page, and where in the page (one fixed spot, so an XBZRLE
#: delta stays this small however many passes happened since the page was last sent)
SPARSE_BYTES = 8
SPARSE_OFFSET = 1024
DIRTY_PATTERNS = ("pages", "sparse")


@vs.vmsd("demo-device", version_id=2, minimum_version_id=1,
         subsections=[vs.Subsection("demo-device/stats", needed=lambda d: d.writes > 0)])
@attrs.define
class DemoDevice:
    """A small device: counters, a label, registers, and a subsection."""

    counter: int = vs.field(vs.uint64, default=0)
    seed: int = vs.field(vs.uint32, default=0)
    label_len: int = vs.field(vs.uint8, default=4)
    label: bytes = vs.field(vs.vbuffer("label_len", max_len=255), default=b"demo")
    regs: list[int] = vs.field(vs.array(vs.uint32, 8), factory=lambda: [0] * 8)
    throttle: int = vs.field(vs.uint8, default=0, version_id=2)
    writes: int = vs.field(vs.uint64, default=0, subsection="demo-device/stats")

    def digest(self) -> str:
        """A checksum of the migrated fields."""
        return hashlib.sha256(repr(attrs.astuple(self)).encode()).hexdigest()


def _rss() -> int:
    """Resident bytes of this process (Linux), 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: bytes of text generated per seed; larger memories repeat it, shifted
TEXT_POOL = 16 << 20
#: distinct words, and how often a token is a number or ends a sentence (and a line)
TEXT_WORDS = 400
TEXT_NUMBERS = 0.06
TEXT_SENTENCE_END = 0.08


def english_like_text(seed: int, nbytes: int) -> np.ndarray:
    """``nbytes`` of text shaped like English, as uint8: deterministic from ``seed``, vectorised.

    A few hundred made-up words (letters drawn with English-like
    frequencies) used with a Zipf distribution, numbers among them, capitals
    after each full stop and a line per sentence: many distinct lines, so a
    4 KiB page shrinks about as much as prose does.  zlib level 1 takes it to
    about 0.42 of its size, per page (``benchmarks/bench_compress.py``), where
    a repeated sentence would shrink 30-fold and measure nothing.  Built by
    one numpy gather from a token table, about 0.1 s per 16 MiB.
    """
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    lp = 1.0 / np.arange(1, 27) ** 0.9
    lp /= lp.sum()
    words: list[bytes] = []
    seen: set[bytes] = set()
    while len(words) < TEXT_WORDS:
        w = rng.choice(letters, int(rng.integers(2, 11)), p=lp).tobytes()
        if w not in seen:
            seen.add(w)
            words.append(w)
    nums = [str(int(x)).encode() for x in rng.integers(0, 1_000_000, 4096)]
    # token ids: word, word + full stop and newline, capitalised word, capitalised + stop, number
    table = ([w + b" " for w in words] + [w + b".\n" for w in words] + [w.capitalize() + b" " for w in words]
             + [w.capitalize() + b".\n" for w in words] + [n + b" " for n in nums])
    lens = np.array([len(t) for t in table], dtype=np.int64)
    starts = np.cumsum(lens) - lens
    tab = np.frombuffer(b"".join(table), dtype=np.uint8)
    m = nbytes // 5 + 64  # tokens average more than 5 bytes: enough for nbytes
    zipf = 1.0 / np.arange(1, TEXT_WORDS + 1)
    seq = rng.choice(TEXT_WORDS, m, p=zipf / zipf.sum())
    end = rng.random(m) < TEXT_SENTENCE_END
    cap = np.concatenate([[True], end[:-1]])
    seq += TEXT_WORDS * (end.astype(np.int64) + 2 * cap)
    num = (rng.random(m) < TEXT_NUMBERS) & ~end & ~cap
    seq[num] = 4 * TEXT_WORDS + rng.integers(0, len(nums), int(num.sum()))
    ln = lens[seq]
    total = min(int(ln.sum()), nbytes)
    idx = np.arange(total, dtype=np.int64) + np.repeat(starts[seq] - (np.cumsum(ln) - ln), ln)[:total]
    return tab[idx]


def _fill(buf: np.ndarray, how: str, seed: int) -> None:
    if how == "zero":
        return
    if how == "random":
        rng = np.random.default_rng(seed)
        step = 64 << 20
        for a in range(0, len(buf), step):
            n = min(step, len(buf) - a)
            buf[a : a + n] = np.frombuffer(rng.bytes(n), dtype=np.uint8)
        return
    if how == "text":
        pool = english_like_text(seed, min(len(buf), TEXT_POOL))
        # the pool repeats, shifted by an odd number of bytes each time, so no two pages are equal
        # (pages are compressed one by one: only what is inside a page matters to the ratio)
        for k, a in enumerate(range(0, len(buf), len(pool))):
            n = min(len(pool), len(buf) - a)
            shift = (k * 7919) % len(pool)
            head = min(n, len(pool) - shift)
            buf[a : a + head] = pool[shift : shift + head]
            buf[a + head : a + n] = pool[: n - head]
        return
    raise ConfigError("--fill", f"expected random, text or zero, got {how!r}")


class DemoProgram:
    """The synthetic workload; ``role`` is ``source`` or ``destination``."""

    def __init__(self, size: str | int = "256M", blocks: str | int = 2, fill: str = "random",
                 dirty_rate: str | int | None = None, seed: str | int = 1, role: str = "source",
                 corrupt_page: str | int | None = None, dirty: str = "tracked",
                 working_set: str | int | None = None, dirty_pattern: str = "pages") -> None:
        import savevm_ram

        total = parse_size(size, "--size")
        nblocks = int(blocks)
        if nblocks < 1 or total < nblocks * 4096:
            raise ConfigError("--blocks", f"need 1..{max(total // 4096, 1)} blocks of at least one page")
        per = (total // nblocks) // 4096 * 4096
        self.role = role
        if dirty_pattern not in DIRTY_PATTERNS:
            raise ConfigError("--dirty-pattern", f"expected {' or '.join(DIRTY_PATTERNS)}, got {dirty_pattern!r}")
        self.dirty_pattern = dirty_pattern
        if dirty_rate is None:
            dirty_rate = "max" if dirty_pattern == "sparse" else "20M"
        #: bytes of pages dirtied per second; None: as fast as it can (sparse only)
        self.rate: int | None = None
        if str(dirty_rate).strip().lower() == "max":
            if dirty_pattern != "sparse":
                raise ConfigError("--dirty-rate", "'max' needs --dirty-pattern sparse; give a rate like 20M")
        else:
            self.rate = parse_size(dirty_rate, "--dirty-rate")
        self.working_set = per * nblocks if working_set in (None, "", "all") else parse_size(working_set,
                                                                                             "--working-set")
        if not 4096 <= self.working_set <= per * nblocks or self.working_set % 4096:
            raise ConfigError("--working-set", f"expected whole pages between 4K and the RAM size ({per * nblocks}), "
                                               f"got {self.working_set}")
        self.seed = int(seed)
        self.corrupt_page = None if corrupt_page in (None, "", "none") else int(corrupt_page)
        # memory the RAM plugin allocates (huge pages, nothing resident until written), read and
        # written through the blocks, so a transport may move a block onto its own memory
        self.ram = savevm_ram.RAMList(
            [savevm_ram.RAMBlock.allocate(f"demo.ram{i}", per, dirty=dirty) for i in range(nblocks)])  # type: ignore[arg-type]
        if role == "source":
            for i, b in enumerate(self.ram):
                _fill(b.host, fill, self.seed + i)
        #: resident memory once the blocks exist, so report() can say what loading them cost
        self.rss_start = _rss()
        self.device = DemoDevice(seed=self.seed, label=b"savevm-demo", label_len=11)
        self._paused = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._throttle = 0
        self._thread: threading.Thread | None = None
        self.pages_dirtied = 0
        self._writes = 0
        #: (block, first page, pages): the working set, the first working_set bytes in block order
        self._segments: list[tuple[Any, int, int]] = []
        left = self.working_set // 4096
        for blk in self.ram:
            take = min(left, blk.pages)
            if take:
                self._segments.append((blk, 0, take))
            left -= take

    @property
    def buffers(self) -> list[np.ndarray]:
        """The blocks' memory, in block order."""
        return [b.host for b in self.ram]

    # ------------------------------------------------------------ Program
    def register(self, registry: Any) -> None:
        import savevm_ram

        savevm_ram.register_ram(registry, self.ram)
        registry.register_device("demo-device", 0, self.device)

    def start(self) -> None:
        if self.role != "source" or self.rate == 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="demo-workload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._paused.clear()
        if self._thread is not None:
            self._thread.join()

    def pause(self) -> None:
        self._paused.set()
        self._idle.wait()

    def resume(self) -> None:
        self._paused.clear()
        if self.role == "destination" and self.corrupt_page is not None:
            # test hook: damage one page after the load, so verification must catch it
            blk = self.ram[0].host
            p = self.corrupt_page % (len(blk) // 4096)
            blk[p * 4096] ^= 0xFF

    def set_throttle(self, percent: int) -> None:
        # only the running workload writes the device (below): the migration resets the
        # throttle after completion, while the program stays paused, and a paused program
        # must not change migrated state (the destination would no longer match)
        self._throttle = max(0, min(99, int(percent)))

    # ------------------------------------------------------------ workload
    def _run(self) -> None:
        rng = np.random.default_rng(self.seed + 1000)
        ws_pages = self.working_set // 4096
        # pages per tick: the rate's share, or the whole working set when it runs as fast as it can
        per_tick = ws_pages if self.rate is None else self.rate / 4096 * TICK
        credit = 0.0
        cursor = 0
        last = time.monotonic()
        while not self._stop.is_set():
            if self._paused.is_set():
                self._idle.set()
                while self._paused.is_set() and not self._stop.is_set():
                    time.sleep(0.001)
                last = time.monotonic()
                continue
            self._idle.clear()
            if self._paused.is_set():
                self._idle.set()
                continue
            now = time.monotonic()
            credit += (now - last) / TICK * per_tick * (100 - self._throttle) / 100
            credit = min(credit, max(float(ws_pages), 1.0)) if self.rate is None else credit
            last = now
            n = int(credit)
            if n:
                credit -= n
                if self.dirty_pattern == "sparse":
                    cursor = self._sparse(cursor, n)
                else:
                    for _ in range(n):
                        b, page = self._ws_page(int(rng.integers(ws_pages)))
                        at = page * 4096 + int(rng.integers(0, 4096 - STRETCH))
                        b.write(at, rng.bytes(STRETCH))
                self.pages_dirtied += n
                d = self.device
                d.counter += 1
                d.writes += n
                d.regs[d.counter % 8] = (d.regs[d.counter % 8] + n) & 0xFFFFFFFF
                d.throttle = self._throttle
            self._idle.set()
            time.sleep(TICK)

    def _ws_page(self, k: int) -> tuple[Any, int]:
        """The block and page of the working set's ``k``-th page."""
        for b, first, count in self._segments:
            if k < count:
                return b, first + k
            k -= count
        raise IndexError(k)

    def _sparse(self, cursor: int, n: int) -> int:
        """Rewrite :data:`SPARSE_BYTES` in each of ``n`` working-set pages from ``cursor``; the next cursor.

        One numpy assignment per block segment (a new 8-byte value per
        pass, the same spot in every page), then one mark over the range,
        written before it is marked as the tracked provider expects.
        """
        ws_pages = self.working_set // 4096
        while n > 0:
            b, page = self._ws_page(cursor)
            seg_end = next(first + count for blk, first, count in self._segments if blk is b)
            take = min(n, seg_end - page)
            self._writes += 1
            value = np.frombuffer(((self._writes * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)).to_bytes(8, "little"),
                                  dtype=np.uint8)
            view = b.host[page * 4096 : (page + take) * 4096].reshape(take, 4096)
            view[:, SPARSE_OFFSET : SPARSE_OFFSET + SPARSE_BYTES] = value
            b.mark_dirty(page * 4096, take * 4096)
            n -= take
            cursor = (cursor + take) % ws_pages
        return cursor

    # ------------------------------------------------------------ verification
    def checksums(self) -> dict[str, str]:
        """sha256 of every block's used bytes and of the device state."""
        out = {b.idstr: hashlib.sha256(b.mv[: b.used_length]).hexdigest() for b in self.ram}
        out["demo-device"] = self.device.digest()
        return out

    def report(self) -> dict[str, Any]:
        # resident memory first: hashing reads every page, which maps untouched ones (shared zero page)
        growth = _rss() - self.rss_start
        return {"checksums": self.checksums(), "pages-dirtied": self.pages_dirtied,
                "device-counter": self.device.counter, "rss-growth-bytes": growth}
