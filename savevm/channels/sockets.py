"""tcp and unix socket transports (QEMU's ``tcp:HOST:PORT`` and ``unix:PATH``)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from savevm.channels.base import Buffer, writev_all
from savevm.errors import ChannelError, URIError

SOCK_BUF = 4 << 20
#: pending connections a listener queues (one is the migration; the others get refused)
LISTEN_BACKLOG = 8


class SocketChannel:
    """A connected stream socket; writes use ``sendmsg`` with many iovecs."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self._closed = False

    def writev(self, bufs: Sequence[Buffer]) -> int:
        return writev_all(self.sock.sendmsg, bufs)

    def readinto(self, buf: memoryview) -> int:
        return self.sock.recv_into(buf)

    def shutdown(self) -> None:
        """Unblock a reader or writer on another thread (used by cancel)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.sock.close()
            except OSError:
                pass


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass


def parse_host_port(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[V6]:PORT``; raises URIError.

    An empty host (``tcp::4444``) is kept empty: QEMU listens on every
    interface then, and connects to the local host.
    """
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise URIError(f"tcp:{address}", "expected tcp:HOST:PORT (HOST may be empty: all interfaces) with a "
                                         "port 0-65535")
    return host, int(port)


class SocketListener:
    """A listening socket; ``uri`` names the bound address (real port for :0)."""

    def __init__(self, sock: socket.socket, uri: str) -> None:
        self.sock = sock
        self.uri = uri
        self._cleanup_path: str | None = None

    def accept(self, timeout: float | None = None) -> SocketChannel:
        self.sock.settimeout(timeout)
        try:
            conn, peer = self.sock.accept()
        except TimeoutError as exc:
            raise ChannelError(f"no incoming connection on {self.uri} within {timeout}s") from exc
        except OSError as exc:
            raise ChannelError(f"accept on {self.uri} failed: {exc}") from exc
        conn.settimeout(None)
        _tune(conn)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return SocketChannel(conn, f"{self.uri} <- {peer!r}")

    def close(self) -> None:
        try:
            try:
                # wakes an accept() blocked in another thread (close alone does not, on Linux):
                # cancelling a destination that still waits for its source must not hang
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        finally:
            if self._cleanup_path:
                try:
                    os.unlink(self._cleanup_path)
                except OSError:
                    pass
                self._cleanup_path = None


class TcpTransport:
    """``tcp:HOST:PORT``."""

    scheme = "tcp"
    #: what an address of this scheme is: routing (``[transports]``) only maps like to like
    address_kind = "inet"

    def connect(self, address: str) -> SocketChannel:
        host, port = parse_host_port(address)
        try:
            sock = socket.create_connection((host or "localhost", port))
        except OSError as exc:
            raise ChannelError(f"cannot connect to tcp:{address}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _tune(sock)
        return SocketChannel(sock, f"tcp:{address}")

    def listen(self, address: str) -> SocketListener:
        host, port = parse_host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        dual = False
        if not host:  # tcp::PORT: every interface, as QEMU does: the user asked for it by name
            dual = socket.has_dualstack_ipv6()
            family, host = (socket.AF_INET6, "::") if dual else (socket.AF_INET, "0.0.0.0")  # nosec B104
        try:
            # a backlog above 1: connections beyond the migration's own are accepted to be
            # inspected, refused and logged (a multifd source, a second client)
            sock = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG, reuse_port=False,
                                        dualstack_ipv6=dual)
        except OSError as exc:
            raise ChannelError(f"cannot listen on tcp:{address}: {exc}") from exc
        _tune(sock)
        real_port = sock.getsockname()[1]
        h = f"[{host}]" if family == socket.AF_INET6 else host
        return SocketListener(sock, f"tcp:{h}:{real_port}")


class UnixTransport:
    """``unix:PATH``."""

    scheme = "unix"
    address_kind = "unix"

    def connect(self, address: str) -> SocketChannel:
        if not address:
            raise URIError("unix:", "expected unix:PATH")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            raise ChannelError(f"cannot connect to unix:{address}: {exc}") from exc
        _tune(sock)
        return SocketChannel(sock, f"unix:{address}")

    def listen(self, address: str) -> SocketListener:
        if not address:
            raise URIError("unix:", "expected unix:PATH")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ChannelError(f"cannot listen on unix:{address}: {exc}") from exc
        try:
            os.chmod(address, 0o600)  # only this user may hand us a stream
        except OSError:
            pass
        lst = SocketListener(sock, f"unix:{address}")
        lst._cleanup_path = address
        return lst
