"""File-descriptor transports: ``fd:N``, ``file:PATH`` and ``exec:CMD``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

from savevm.channels.base import Buffer, writev_all
from savevm.errors import ChannelError, URIError
from savevm.files import create_private_temp


class FdChannel:
    """A channel over an open file descriptor (pipe, file, character device)."""

    def __init__(self, fd: int, name: str, *, owned: bool = True) -> None:
        self.fd = fd
        self.name = name
        self._owned = owned
        self._closed = False

    def writev(self, bufs: Sequence[Buffer]) -> int:
        return writev_all(lambda iov: os.writev(self.fd, iov), bufs)

    def readinto(self, buf: memoryview) -> int:
        return os.readv(self.fd, [buf])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._owned:
                os.close(self.fd)


class _OnceListener:
    """Incoming side of a transport that has exactly one channel (file, fd, exec)."""

    def __init__(self, uri: str, opener) -> None:  # noqa: ANN001 - callable returning a channel
        self.uri = uri
        self._opener = opener
        self._used = False

    def accept(self, timeout: float | None = None):  # noqa: ANN201
        if self._used:
            raise ChannelError(f"{self.uri} yields only one incoming stream")
        self._used = True
        return self._opener()

    def close(self) -> None:
        self._used = True


class FileTransport:
    """``file:PATH``: outgoing creates/truncates, incoming reads.

    The outgoing side writes a new 0600 file with an unpredictable name next
    to PATH (``.NAME.<random>.part``, created with O_EXCL so no planted symlink
    is followed) and renames it over PATH on close, so a failed migration
    never leaves a truncated file where a good one was.
    """

    scheme = "file"
    address_kind = "path"

    def connect(self, address: str) -> FdChannel:
        if not address:
            raise URIError("file:", "expected file:PATH")
        if address.startswith("/dev/"):
            try:
                fd = os.open(address, os.O_WRONLY)
            except OSError as exc:
                raise ChannelError(f"cannot open file:{address}: {exc}") from exc
            return FdChannel(fd, f"file:{address}")
        fd, tmp = create_private_temp(address)
        return _AtomicFileChannel(fd, f"file:{address}", tmp, address)

    def listen(self, address: str) -> _OnceListener:
        if not address:
            raise URIError("file:", "expected file:PATH")

        def opener() -> FdChannel:
            try:
                fd = os.open(address, os.O_RDONLY)
            except OSError as exc:
                raise ChannelError(f"cannot open file:{address}: {exc}") from exc
            return FdChannel(fd, f"file:{address}")

        return _OnceListener(f"file:{address}", opener)


class _AtomicFileChannel(FdChannel):
    def __init__(self, fd: int, name: str, tmp: str, final: str) -> None:
        super().__init__(fd, name)
        self._tmp = tmp
        self._final = final
        self.failed = False

    def abort(self) -> None:
        """Drop the partial file (called when the migration failed)."""
        self.failed = True
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        if self.failed:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
        else:
            os.replace(self._tmp, self._final)


class FdTransport:
    """``fd:N``: an already open descriptor inherited from the caller."""

    scheme = "fd"
    address_kind = "fd"

    def _fd(self, address: str) -> int:
        if not address.isdigit():
            raise URIError(f"fd:{address}", "expected fd:N with N a file descriptor number")
        fd = int(address)
        try:
            os.fstat(fd)
        except OSError as exc:
            raise ChannelError(f"fd:{fd} is not an open descriptor: {exc}") from exc
        return fd

    def connect(self, address: str) -> FdChannel:
        return FdChannel(self._fd(address), f"fd:{address}")

    def listen(self, address: str) -> _OnceListener:
        fd = self._fd(address)
        return _OnceListener(f"fd:{address}", lambda: FdChannel(fd, f"fd:{address}"))


class ExecChannel(FdChannel):
    """A pipe to or from a shell command; close waits for it and checks its exit."""

    def __init__(self, proc: subprocess.Popen, fd: int, name: str) -> None:
        super().__init__(fd, name)
        self.proc = proc

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        rc = self.proc.wait()
        if rc != 0:
            raise ChannelError(f"{self.name}: command exited with status {rc}")


class ExecTransport:
    """``exec:CMD``: outgoing writes to CMD's stdin, incoming reads its stdout."""

    scheme = "exec"
    address_kind = "command"

    def connect(self, address: str) -> ExecChannel:
        if not address.strip():
            raise URIError("exec:", "expected exec:COMMAND")
        proc = subprocess.Popen(["/bin/sh", "-c", address], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        fd = os.dup(proc.stdin.fileno())
        proc.stdin.close()
        return ExecChannel(proc, fd, f"exec:{address}")

    def listen(self, address: str) -> _OnceListener:
        if not address.strip():
            raise URIError("exec:", "expected exec:COMMAND")

        def opener() -> ExecChannel:
            proc = subprocess.Popen(["/bin/sh", "-c", address], stdout=subprocess.PIPE)
            assert proc.stdout is not None
            fd = os.dup(proc.stdout.fileno())
            proc.stdout.close()
            return ExecChannel(proc, fd, f"exec:{address}")

        return _OnceListener(f"exec:{address}", opener)


def split_uri(uri: str) -> tuple[str, str]:
    """``scheme:rest`` -> (scheme, rest); raises URIError."""
    scheme, sep, rest = uri.partition(":")
    if not sep or not scheme or not scheme.replace("-", "").replace("_", "").isalnum():
        raise URIError(uri, "expected SCHEME:ADDRESS, e.g. tcp:127.0.0.1:4444, unix:/path, file:/path")
    return scheme, rest


__all__ = ["ExecTransport", "FdChannel", "FdTransport", "FileTransport", "split_uri"]
