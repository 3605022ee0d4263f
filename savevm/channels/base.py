"""The Channel protocol: the one thing a transport has to provide.

A channel moves bytes in one direction at a time; it knows nothing about the
stream format.  QEMUFile does the buffering, so a channel only needs a
vectored write, a ``readinto`` and ``close``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


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

    def connect(self, address: str) -> Channel:
        """Open the outgoing channel for ``scheme:address``."""
        ...

    def listen(self, address: str) -> Listener:
        """Prepare the incoming side for ``scheme:address``."""
        ...


def nbytes(buf: Buffer) -> int:
    """Length in bytes of any buffer (memoryviews of non-byte formats included)."""
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)
