"""QEMUFile: the buffered, rate-limited byte stream every section writes to.

Modelled on QEMU's ``migration/qemu-file.c`` but with Python's trade-offs:

* Small puts (headers, be64 words) accumulate in a bytearray; large buffers
  handed to :meth:`QEMUFile.put_buffer_async` are queued as memoryviews and
  never copied.  :meth:`QEMUFile.flush` hands the whole queue to the channel
  in one vectored write (``sendmsg``/``writev``), so a run of pages costs one
  syscall per ~1000 iovecs instead of one per page.
* Reads go through a staging buffer filled with ``recv_into`` a few MiB at a
  time, so parsing a record header followed by a page is two slices of memory
  rather than two syscalls.  Every length that comes from the stream is
  checked by the caller's ``limit`` *before* anything is allocated.
* Errors are sticky: the first one wins, later calls do nothing and re-raise
  it, exactly as QEMU's ``qemu_file_set_error`` behaves, so a writer deep in
  a loop cannot forget to check.
* Rate limiting: a byte budget per 100 ms window derived from
  ``max-bandwidth``; :meth:`rate_limit_exceeded` tells the iteration loop to
  stop filling, :meth:`rate_limit_wait` sleeps out the window.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from savevm.errors import ChannelError, CorruptStreamError, MigrationError, TruncatedStreamError

if TYPE_CHECKING:
    from savevm.channels.base import Channel

#: QEMU's BUFFER_DELAY: the rate-limit window, in seconds.
BUFFER_DELAY = 0.1
#: Windows per second (XFER_LIMIT_RATIO).
XFER_LIMIT_RATIO = 10

#: Flush the write queue once this many bytes are pending.
WRITE_FLUSH_BYTES = 4 << 20
#: ... or once this many iovecs are queued (Linux IOV_MAX is 1024).
WRITE_FLUSH_IOVS = 1000
#: Small puts are copied into the queue, buffers above this are referenced.
ASYNC_COPY_THRESHOLD = 512
#: Size of the read staging buffer.
READ_STAGE_BYTES = 4 << 20

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def _read_failed(pos: int, exc: OSError) -> str:
    """The text of a failed read: a reset says what it means for a migration."""
    if isinstance(exc, ConnectionResetError):
        return (f"read failed at offset {pos}: the peer reset the connection (it exited or was killed, "
                f"or closed with bytes of ours unread) [{exc}]")
    return f"read failed at offset {pos}: {exc}"


class QEMUFile:
    """A one-direction stream over a :class:`~savevm.channels.base.Channel`.

    One object is either a writer or a reader (``QEMUFile(ch, writable=True)``
    or ``QEMUFile(ch)``), like QEMU's ``qemu_file_new_output/input``.
    """

    def __init__(self, channel: Channel, *, writable: bool = False, rate_limit: int = 0,
                 base_offset: int = 0) -> None:
        self.channel = channel
        #: stream offset of this file's first byte (a part of a stream read again from memory)
        self._base = base_offset
        self.writable = writable
        #: the migration's return path, when it has one (QEMU's qemu_file_get_return_path): a
        #: ``SourceReturnPath`` on the source's stream, a ``DestReturnPath`` on the destination's
        self.return_path: Any = None
        self._error: BaseException | None = None
        # -- write side
        self._small = bytearray()
        self._iov: list[memoryview | bytes | bytearray] = []
        self._pending = 0
        self._written = 0  # bytes handed to the channel
        # -- read side
        self._stage = bytearray(READ_STAGE_BYTES if not writable else 0)
        self._stage_mv = memoryview(self._stage)
        self._rpos = 0
        self._rend = 0
        self._consumed = 0  # bytes before _stage[0]
        self._eof = False
        # -- rate limiting (bytes per 100 ms window; 0 = unlimited)
        self._lock = threading.Lock()
        self._rate_limit_max = 0
        self._rate_limit_used = 0
        self._window_start = time.monotonic()
        self.set_rate_limit(rate_limit)

    # ------------------------------------------------------------ errors
    def set_error(self, exc: BaseException) -> None:
        """Record the first error; later ones are ignored (sticky error)."""
        if self._error is None:
            self._error = exc

    def get_error(self) -> BaseException | None:
        """The first error recorded, if any."""
        return self._error

    def check_error(self) -> None:
        """Re-raise the sticky error, if there is one."""
        if self._error is not None:
            if isinstance(self._error, MigrationError):
                raise self._error
            raise ChannelError(str(self._error)) from self._error

    # ------------------------------------------------------------ accounting
    @property
    def pos(self) -> int:
        """Bytes put (writer) or consumed (reader) so far: the stream offset."""
        if self.writable:
            return self._base + self._written + self._pending
        return self._base + self._consumed + self._rpos

    transferred = pos

    # ------------------------------------------------------------ rate limiting
    def set_rate_limit(self, bytes_per_second: int) -> None:
        """Set the budget from ``max-bandwidth`` (0 = unlimited); safe while running."""
        if bytes_per_second < 0:
            raise ValueError("rate limit must be >= 0")
        with self._lock:
            self._rate_limit_max = bytes_per_second // XFER_LIMIT_RATIO

    @property
    def rate_limit_max(self) -> int:
        """Bytes allowed per 100 ms window (0 = unlimited)."""
        return self._rate_limit_max

    @property
    def rate_limit_used(self) -> int:
        """Bytes accounted in the current window."""
        return self._rate_limit_used

    def rate_limit_exceeded(self) -> bool:
        """True when the writer should stop filling the stream for now.

        Mirrors ``qemu_file_rate_limit``: true on error, or when a limit is
        set and this window's budget is used up.
        """
        if self._error is not None:
            return True
        m = self._rate_limit_max
        return m > 0 and self._rate_limit_used > m

    def account(self, nbytes: int) -> None:
        """Count bytes sent outside this stream (e.g. an RDMA-style transport)."""
        self._rate_limit_used += nbytes

    def reset_rate_limit(self) -> None:
        """Start a new 100 ms window."""
        self._rate_limit_used = 0
        self._window_start = time.monotonic()

    def rate_limit_wait(self) -> float:
        """If the budget is used up, sleep until the window ends; then reset.

        Returns the time slept.  Used by loops that own the stream (the
        migration thread, snapshot); QEMU's ``migration_rate_limit``.
        """
        now = time.monotonic()
        elapsed = now - self._window_start
        slept = 0.0
        if self.rate_limit_exceeded() and self._error is None and elapsed < BUFFER_DELAY:
            self.flush()
            slept = BUFFER_DELAY - elapsed
            time.sleep(slept)
        if time.monotonic() - self._window_start >= BUFFER_DELAY:
            self.reset_rate_limit()
        return slept

    # ------------------------------------------------------------ writing
    def put_byte(self, v: int) -> None:
        """Put one unsigned byte."""
        self._small.append(v & 0xFF)
        self._pending += 1
        self._rate_limit_used += 1

    def put_be16(self, v: int) -> None:
        """Put a big-endian 16-bit unsigned integer."""
        self._small += _BE16.pack(v & 0xFFFF)
        self._pending += 2
        self._rate_limit_used += 2

    def put_be32(self, v: int) -> None:
        """Put a big-endian 32-bit unsigned integer."""
        self._small += _BE32.pack(v & 0xFFFFFFFF)
        self._pending += 4
        self._rate_limit_used += 4

    def put_be64(self, v: int) -> None:
        """Put a big-endian 64-bit unsigned integer."""
        self._small += _BE64.pack(v & 0xFFFFFFFFFFFFFFFF)
        self._pending += 8
        self._rate_limit_used += 8

    def put_counted_string(self, s: str | bytes) -> None:
        """Put ``u8 len`` + bytes (QEMU's qemu_put_counted_string)."""
        b = s.encode() if isinstance(s, str) else bytes(s)
        if len(b) > 255:
            raise ValueError(f"counted string longer than 255 bytes: {b[:32]!r}...")
        self.put_byte(len(b))
        self.put_buffer(b)

    def put_buffer(self, data: bytes | bytearray | memoryview) -> None:
        """Put bytes, copying them (safe when the caller reuses the buffer)."""
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._small += data
        self._pending += n
        self._rate_limit_used += n
        if self._pending >= WRITE_FLUSH_BYTES:
            self.flush()

    def put_buffer_async(self, data: memoryview | bytes | bytearray) -> None:
        """Queue a buffer without copying it; it must stay unchanged until flush.

        This is how pages leave RAM: the memoryview is sent straight from the
        program's memory by the next vectored write.
        """
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if n <= ASYNC_COPY_THRESHOLD:
            self._small += data
        else:
            if self._small:
                self._iov.append(self._small)
                self._small = bytearray()
            self._iov.append(data)
        self._pending += n
        self._rate_limit_used += n
        if self._pending >= WRITE_FLUSH_BYTES or len(self._iov) >= WRITE_FLUSH_IOVS:
            self.flush()

    def put_iovecs(self, bufs: Sequence[memoryview | bytes | bytearray], nbytes: int) -> None:
        """Queue many buffers at once (header, page, header, page...), zero-copy.

        ``nbytes`` is their total size, which the caller knows already.
        """
        if self._small:
            self._iov.append(self._small)
            self._small = bytearray()
        self._iov.extend(bufs)
        self._pending += nbytes
        self._rate_limit_used += nbytes
        if self._pending >= WRITE_FLUSH_BYTES or len(self._iov) >= WRITE_FLUSH_IOVS:
            self.flush()

    def flush(self) -> None:
        """Write everything queued; on failure the error becomes sticky."""
        if self._small:
            self._iov.append(self._small)
            self._small = bytearray()
        if not self._iov:
            return
        iov, self._iov = self._iov, []
        n, self._pending = self._pending, 0
        if self._error is not None:
            return
        try:
            self.channel.writev(iov)
        except (OSError, MigrationError) as exc:
            err = exc if isinstance(exc, MigrationError) else ChannelError(f"write failed: {exc}")
            if err is not exc:
                err.__cause__ = exc
            self.set_error(err)
            return
        self._written += n

    def close(self) -> None:
        """Flush (writer) and close the channel; raises the sticky error, if any."""
        try:
            if self.writable:
                self.flush()
        finally:
            # a failed stream must not be published as if it were complete
            # (file: renames its .part over the target on a plain close)
            abort = getattr(self.channel, "abort", None)
            if self._error is not None and abort is not None:
                abort()
            else:
                self.channel.close()
        self.check_error()

    # ------------------------------------------------------------ reading
    def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available in the stage, or raise."""
        avail = self._rend - self._rpos
        if avail >= need:
            return
        if self._error is not None:
            self.check_error()
        if need > len(self._stage):
            raise CorruptStreamError(f"record of {need} bytes exceeds the read buffer", self.pos)
        # slide the remainder to the front
        if self._rpos:
            self._stage_mv[:avail] = self._stage_mv[self._rpos : self._rend]
            self._consumed += self._rpos
            self._rpos, self._rend = 0, avail
        while self._rend < need:
            if self._eof:
                raise TruncatedStreamError(
                    f"stream ended: needed {need} bytes, {self._rend} available", self.pos
                )
            try:
                got = self.channel.readinto(self._stage_mv[self._rend :])
            except OSError as exc:
                err = ChannelError(_read_failed(self.pos, exc))
                err.__cause__ = exc
                self.set_error(err)
                raise err from exc
            if got == 0:
                self._eof = True
            self._rend += got

    def get_byte(self) -> int:
        """Read one unsigned byte."""
        if self._rend - self._rpos < 1:
            self._fill(1)
        v = self._stage[self._rpos]
        self._rpos += 1
        return v

    def peek_byte(self) -> int | None:
        """The next byte without consuming it, or None at end of stream."""
        if self._rend - self._rpos < 1:
            try:
                self._fill(1)
            except TruncatedStreamError:
                return None
        return self._stage[self._rpos]

    def get_be16(self) -> int:
        """Read a big-endian 16-bit unsigned integer."""
        if self._rend - self._rpos < 2:
            self._fill(2)
        (v,) = _BE16.unpack_from(self._stage, self._rpos)
        self._rpos += 2
        return v

    def get_be32(self) -> int:
        """Read a big-endian 32-bit unsigned integer."""
        if self._rend - self._rpos < 4:
            self._fill(4)
        (v,) = _BE32.unpack_from(self._stage, self._rpos)
        self._rpos += 4
        return v

    def get_be64(self) -> int:
        """Read a big-endian 64-bit unsigned integer."""
        if self._rend - self._rpos < 8:
            self._fill(8)
        (v,) = _BE64.unpack_from(self._stage, self._rpos)
        self._rpos += 8
        return v

    def get_bytes(self, n: int, *, limit: int) -> bytes:
        """Read exactly ``n`` bytes; ``n`` must not exceed ``limit``.

        ``limit`` is mandatory because ``n`` usually came from the stream:
        it is checked before any memory is allocated.
        """
        if n < 0 or n > limit:
            raise CorruptStreamError(f"length {n} out of range (0..{limit})", self.pos)
        out = bytearray(n)
        self.get_buffer_into(memoryview(out))
        return bytes(out)

    def get_counted_string(self) -> str:
        """Read ``u8 len`` + bytes and decode them as UTF-8 (QEMU idstrs are ASCII)."""
        start = self.pos
        n = self.get_byte()
        raw = self.get_bytes(n, limit=255)
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise CorruptStreamError(f"counted string is not UTF-8: {raw!r}", start) from exc

    def get_buffer_into(self, dest: memoryview) -> None:
        """Fill ``dest`` completely from the stream (copies from the stage,
        then reads large remainders straight into ``dest``)."""
        n = dest.nbytes
        start = self.pos
        if dest.format != "B" or dest.ndim != 1:
            dest = dest.cast("B")
        avail = self._rend - self._rpos
        if avail >= n:
            dest[:] = self._stage_mv[self._rpos : self._rpos + n]
            self._rpos += n
            return
        if n <= len(self._stage) // 2:
            self._fill(n)
            dest[:] = self._stage_mv[self._rpos : self._rpos + n]
            self._rpos += n
            return
        # large: drain the stage, then read directly
        dest[:avail] = self._stage_mv[self._rpos : self._rend]
        self._consumed += self._rend
        self._rpos = self._rend = 0
        got = avail
        while got < n:
            if self._eof:
                raise TruncatedStreamError(
                    f"stream ended: a {n}-byte read got {got} bytes", start)
            try:
                r = self.channel.readinto(dest[got:])
            except OSError as exc:
                err = ChannelError(_read_failed(self.pos, exc))
                self.set_error(err)
                raise err from exc
            if r == 0:
                self._eof = True
            got += r
            self._consumed += r

    def skip(self, n: int) -> None:
        """Consume and discard ``n`` bytes."""
        while n > 0:
            chunk = min(n, len(self._stage) // 2)
            self._fill(chunk)
            self._rpos += chunk
            n -= chunk

    def buffered(self) -> memoryview:
        """The bytes already staged and not yet consumed (for batch parsers).

        A batch parser may read records straight out of this view and then
        call :meth:`consume` with how many bytes it used.
        """
        return self._stage_mv[self._rpos : self._rend]

    def consume(self, n: int) -> None:
        """Mark ``n`` staged bytes as read (after parsing :meth:`buffered`)."""
        if n > self._rend - self._rpos:
            raise ValueError("consume past staged data")
        self._rpos += n

    def fill(self, need: int) -> int:
        """Try to stage at least ``need`` bytes; returns bytes staged (may be less at EOF)."""
        try:
            self._fill(min(need, len(self._stage)))
        except TruncatedStreamError:
            pass
        return self._rend - self._rpos

    def get_available(self, limit: int) -> bytes:
        """Up to ``limit`` bytes: what is staged, else one read from the channel; b"" at the end.

        For a reader that must not wait for more than the peer has sent (it
        decides by itself when it has enough).
        """
        if self._rend - self._rpos == 0:
            try:
                self._fill(1)
            except TruncatedStreamError:
                return b""
        n = min(limit, self._rend - self._rpos)
        out = bytes(self._stage_mv[self._rpos : self._rpos + n])
        self._rpos += n
        return out

    def at_eof(self) -> bool:
        """True if no byte is left to read."""
        return self.peek_byte() is None
