"""The Channel protocol: the one thing a transport has to provide.

A channel moves bytes in one direction at a time; it knows nothing about the
stream format.  QEMUFile does the buffering, so a channel only needs a
vectored write, a ``readinto`` and ``close``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from savevm.errors import ChannelError

Buffer = bytes | bytearray | memoryview

#: Linux IOV_MAX: the most buffers one ``writev``/``sendmsg`` call accepts.
IOV_MAX = 1024


@runtime_checkable
class Channel(Protocol):
    """A byte transport (QEMU's QIOChannel, reduced to what migration needs)."""

    name: str

    def writev(self, bufs: Sequence[Buffer]) -> int:
        """Write every buffer completely, in order; return the bytes written."""
        ...

    def readinto(self, buf: memoryview) -> int:
        """Read at most ``len(buf)`` bytes into ``buf``; 0 means end of stream."""
        ...

    def close(self) -> None:
        """Release the transport; idempotent."""
        ...


@runtime_checkable
class Listener(Protocol):
    """The incoming side of a transport: yields one channel per migration."""

    uri: str

    def accept(self, timeout: float | None = None) -> Channel:
        """Wait for the source and return the channel to read from."""
        ...

    def close(self) -> None:
        """Stop listening; idempotent."""
        ...


@runtime_checkable
class Transport(Protocol):
    """A URI scheme: how to connect (source side) and listen (destination side)."""

    scheme: str
    #: what an address is ("inet", "unix", "path", "fd", "command"): ``[transports]`` routes a
    #: scheme only to a transport of the same kind
    address_kind: str

    def connect(self, address: str) -> Channel:
        """Open the outgoing channel for ``scheme:address``."""
        ...

    def listen(self, address: str) -> Listener:
        """Prepare the incoming side for ``scheme:address``."""
        ...


def nbytes(buf: Buffer) -> int:
    """Length in bytes of any buffer (memoryviews of non-byte formats included)."""
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def writev_all(send: Callable[[list[memoryview]], int], bufs: Sequence[Buffer]) -> int:
    """Write every byte of ``bufs``, in order, through a vectored ``send``; return the total.

    ``send`` is ``os.writev``/``socket.sendmsg`` bound to a descriptor: it
    takes at most :data:`IOV_MAX` buffers and may write fewer bytes than
    given (a full pipe or socket buffer, a signal).  Every transport needs
    the same bookkeeping to resume after a short write, so it lives here
    once.  A ``send`` that makes no progress, or claims more than it was
    given, raises :class:`~savevm.errors.ChannelError` rather than looping
    or skipping data.
    """
    pending = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
    pending = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in pending]
    total = 0
    i = 0
    while True:
        while i < len(pending) and pending[i].nbytes == 0:
            i += 1
        if i == len(pending):
            return total
        sent = send(pending[i : i + IOV_MAX])
        if sent <= 0:
            raise ChannelError(f"vectored write made no progress (returned {sent}) with bytes left to write")
        total += sent
        # advance over fully sent buffers; trim a partial one
        while sent > 0:
            if i == len(pending):
                raise ChannelError(f"vectored write reported {sent} bytes more than it was given")
            n = pending[i].nbytes
            if sent >= n:
                sent -= n
                i += 1
            else:
                pending[i] = pending[i][sent:]
                sent = 0
