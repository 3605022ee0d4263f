"""In-process channels: a byte sink and a blocking pipe between threads.

Used by tests, by ``savevm.snapshot`` into memory, and by anyone who wants
to migrate between two objects of one process.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

from savevm.channels.base import Buffer, nbytes


class MemoryChannel:
    """A channel over an in-memory byte buffer.

    Writes append; reads consume from the front.  With ``blocking=True``
    reads wait for a writer on another thread until :meth:`close_write`,
    which makes a pair of these a pipe (see :func:`memory_pipe`).
    """

    name = "memory"

    def __init__(self, data: bytes = b"", *, blocking: bool = False, max_buffered: int = 64 << 20) -> None:
        self._chunks: deque[bytes] = deque([bytes(data)] if data else [])
        self._head = 0  # offset into _chunks[0]
        self._size = len(data)
        self._blocking = blocking
        self._write_closed = not blocking
        self._closed = False
        self._cond = threading.Condition()
        self._max = max_buffered
        self._log: bytearray | None = bytearray(data) if not blocking else None

    def getvalue(self) -> bytes:
        """Everything ever written (non-blocking channels only)."""
        if self._log is None:
            raise ValueError("getvalue() is only kept for non-blocking memory channels")
        return bytes(self._log)

    def writev(self, bufs: Sequence[Buffer]) -> int:
        total = 0
        data = b"".join(bufs)
        total = len(data)
        with self._cond:
            if self._closed:
                raise BrokenPipeError("memory channel closed")
            while self._blocking and self._size > self._max and not self._closed:
                self._cond.wait()
            if self._closed:
                raise BrokenPipeError("memory channel closed")
            self._chunks.append(data)
            self._size += total
            if self._log is not None:
                self._log += data
            self._cond.notify_all()
        return total

    def write(self, data: Buffer) -> int:
        return self.writev([data])

    def readinto(self, buf: memoryview) -> int:
        want = nbytes(buf)
        with self._cond:
            while self._size == 0:
                if self._write_closed or self._closed:
                    return 0
                self._cond.wait()
            got = 0
            while got < want and self._chunks:
                chunk = self._chunks[0]
                take = min(want - got, len(chunk) - self._head)
                buf[got : got + take] = chunk[self._head : self._head + take]
                got += take
                self._head += take
                if self._head == len(chunk):
                    self._chunks.popleft()
                    self._head = 0
            self._size -= got
            self._cond.notify_all()
            return got

    def close_write(self) -> None:
        """Signal end of stream to a blocked reader."""
        with self._cond:
            self._write_closed = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._write_closed = True
            self._cond.notify_all()


class _PipeEnd:
    """One end of a :func:`memory_pipe`: writer closes only the write side."""

    name = "memory-pipe"

    def __init__(self, ch: MemoryChannel, writer: bool) -> None:
        self._ch = ch
        self._writer = writer

    def writev(self, bufs: Sequence[Buffer]) -> int:
        return self._ch.writev(bufs)

    def readinto(self, buf: memoryview) -> int:
        return self._ch.readinto(buf)

    def close(self) -> None:
        if self._writer:
            self._ch.close_write()
        else:
            self._ch.close()


def memory_pipe(max_buffered: int = 64 << 20) -> tuple[_PipeEnd, _PipeEnd]:
    """A (writer, reader) pair of channels joined in memory, for two threads."""
    ch = MemoryChannel(blocking=True, max_buffered=max_buffered)
    return _PipeEnd(ch, True), _PipeEnd(ch, False)
