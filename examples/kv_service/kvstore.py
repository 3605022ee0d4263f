"""The key-value table: a flat hash table in one RAM block, its metadata in a vmstate device.

Why this shape: live migration moves *memory* while the program runs, by
resending what changed.  A Python ``dict`` is not memory savevm can track
(its objects live all over the heap), so the service keeps its data the
way a database keeps pages: fixed-size slots in one flat buffer.  Every
write touches one 256-byte slot and marks that page dirty, so an
iteration resends only the pages written since the last one.  What is not
a flat buffer -- how many slots there are, how many are used, the write
counter -- is a small device section (``kv-meta``) sent once, while the
program is paused.

Slot layout (256 bytes): ``u8 used``, ``u8 key length``, ``be16 value
length``, 60 bytes of key, 192 bytes of value.  Open addressing with
linear probing on ``crc32(key)``.
"""

from __future__ import annotations

import threading
import zlib

import attrs
import numpy as np

import savevm_ram
from savevm import vmstate as vs

SLOT = 256
KEY_MAX = 60
VALUE_MAX = 192
_KEY_AT = 4
_VALUE_AT = _KEY_AT + KEY_MAX


@vs.vmsd("kv-meta", version_id=1, minimum_version_id=1)
@attrs.define
class KVMeta:
    """What is not in the table: its geometry and counters (sent at the pause, like a device)."""

    slots: int = vs.field(vs.uint32, default=0)
    used: int = vs.field(vs.uint32, default=0)
    #: acknowledged writes since the service first started (it travels with the data)
    writes: int = vs.field(vs.uint64, default=0)


class TableFull(Exception):
    """No free slot left for a new key."""


class KVTable:
    """The table over a RAM block; every method is safe from many threads (one lock)."""

    def __init__(self, slots: int) -> None:
        if slots < 1 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two, got {slots}")
        self.mem = np.zeros(slots * SLOT, dtype=np.uint8)
        self.block = savevm_ram.RAMBlock("kv.table", self.mem)
        self.meta = KVMeta(slots=slots)
        self.lock = threading.Lock()

    def register(self, registry: object) -> None:
        """The table as RAM, the metadata as a device."""
        savevm_ram.register_ram(registry, savevm_ram.RAMList([self.block]))
        registry.register_device("kv-meta", 0, self.meta)  # type: ignore[attr-defined]

    def _find(self, key: bytes) -> tuple[int, bool]:
        """(slot, found): the key's slot, or the first free slot on its probe path."""
        n = self.meta.slots
        i = zlib.crc32(key) & (n - 1)
        mem = self.mem
        for _ in range(n):
            base = i * SLOT
            if mem[base] == 0:
                return i, False
            klen = int(mem[base + 1])
            if klen == len(key) and mem[base + _KEY_AT : base + _KEY_AT + klen].tobytes() == key:
                return i, True
            i = (i + 1) & (n - 1)
        raise TableFull(f"all {n} slots are used")

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or None."""
        with self.lock:
            i, found = self._find(key)
            if not found:
                return None
            base = i * SLOT
            vlen = int(self.mem[base + 2]) << 8 | int(self.mem[base + 3])
            return self.mem[base + _VALUE_AT : base + _VALUE_AT + vlen].tobytes()

    def set(self, key: bytes, value: bytes) -> int:
        """Store ``key`` = ``value``; returns the write's sequence number."""
        if not 0 < len(key) <= KEY_MAX or len(value) > VALUE_MAX:
            raise ValueError(f"key must be 1..{KEY_MAX} bytes and value at most {VALUE_MAX}")
        slot = bytearray(SLOT)
        slot[0] = 1
        slot[1] = len(key)
        slot[2:4] = len(value).to_bytes(2, "big")
        slot[_KEY_AT : _KEY_AT + len(key)] = key
        slot[_VALUE_AT : _VALUE_AT + len(value)] = value
        with self.lock:
            i, found = self._find(key)
            self.block.write(i * SLOT, slot)  # copies and marks the page dirty
            if not found:
                self.meta.used += 1
            self.meta.writes += 1
            return self.meta.writes
