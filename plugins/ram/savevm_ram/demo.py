"""The demo program: RAM blocks plus a device, rewritten at a steady rate.

``savevm demo`` migrates it between two processes; ``savevm migrate
--guest savevm_ram.demo:DemoProgram`` and ``savevm incoming ... --guest
savevm_ram.demo:DemoProgram --guest-arg role=destination`` do the same by
hand.  The workload dirties ``dirty_rate / 4096`` pages per second, changing
a 256-byte stretch in each (so XBZRLE has something to win), and honours
pause and throttle the way a vCPU does under QEMU.
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
                 dirty_rate: str | int = "20M", seed: str | int = 1, role: str = "source",
                 corrupt_page: str | int | None = None, dirty: str = "tracked") -> None:
        import savevm_ram

        total = parse_size(size, "--size")
        nblocks = int(blocks)
        if nblocks < 1 or total < nblocks * 4096:
            raise ConfigError("--blocks", f"need 1..{max(total // 4096, 1)} blocks of at least one page")
        per = (total // nblocks) // 4096 * 4096
        self.role = role
        self.rate = parse_size(dirty_rate, "--dirty-rate")
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
        if self.role != "source" or self.rate <= 0 or self._thread is not None:
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
        pages_per_s = self.rate / 4096
        blocks = list(self.ram)
        credit = 0.0
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
            credit += (now - last) * pages_per_s * (100 - self._throttle) / 100
            last = now
            n = int(credit)
            if n:
                credit -= n
                for _ in range(n):
                    b = blocks[int(rng.integers(len(blocks)))]
                    page = int(rng.integers(b.pages))
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
