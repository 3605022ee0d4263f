"""TLS for migration channels, with QEMU's parameter names and credential layout.

``tls-creds`` names a directory laid out as QEMU's ``tls-creds-x509`` object
expects it: ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem`` for
the destination (the TLS server), ``client-cert.pem`` and ``client-key.pem``
for the source (the TLS client).  Verification is on by default, both ways:
the source checks the destination's certificate against ``ca-cert.pem`` and
the name in ``tls-hostname`` (or the URI's host), the destination requires
a client certificate from the same CA, and ``tls-authz`` (a semicolon-
separated list of distinguished names such as ``CN=src.example,O=Example``
or bare common names) narrows who may migrate in.

One channel is read by one thread and written by another (the return path
runs beside the stream), and OpenSSL objects must not be used by two threads
at once.  So the TLS state is an in-memory ``ssl.SSLObject`` behind a lock,
held only for the (fast) encrypt and decrypt steps; socket I/O happens
outside it, and a second lock keeps encrypted records in order on the wire.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from savevm.channels.base import Buffer
from savevm.errors import ChannelError, ConfigError
from savevm.logging import get_logger

if TYPE_CHECKING:
    from savevm.config import MigrationConfig

log = get_logger("savevm.tls")

#: plaintext handed to the TLS layer per step (records are at most 16 KiB)
_CHUNK = 256 << 10


def _creds_file(directory: str, name: str, required: bool = True) -> str:
    """A credentials file in the ``tls-creds`` directory ("" when optional and absent)."""
    path = os.path.join(directory, name)
    if os.path.exists(path):
        return path
    if required:
        raise ConfigError("tls-creds", f"{path} is missing (the directory must hold what QEMU's "
                                       "tls-creds-x509 expects: ca-cert.pem, server-cert.pem, server-key.pem, "
                                       "client-cert.pem, client-key.pem)")
    return ""


def client_context(creds: str) -> ssl.SSLContext:
    """The source's context: verify the destination against the CA; present our client certificate."""
    ca = _creds_file(creds, "ca-cert.pem", True)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    cert = _creds_file(creds, "client-cert.pem", False)
    if cert:
        ctx.load_cert_chain(cert, _creds_file(creds, "client-key.pem", True))
    return ctx


def server_context(creds: str) -> ssl.SSLContext:
    """The destination's context: our certificate; a client certificate from the CA is required."""
    ca = _creds_file(creds, "ca-cert.pem", True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    ctx.load_cert_chain(_creds_file(creds, "server-cert.pem", True), _creds_file(creds, "server-key.pem", True))
    ctx.verify_mode = ssl.CERT_REQUIRED
    # no TLS 1.3 session tickets: a QEMU source without a return path never reads them, and
    # closing with them unread makes its kernel reset the connection before we read its last bytes
    ctx.num_tickets = 0
    return ctx


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "stateOrProvinceName": "ST", "localityName": "L", "emailAddress": "emailAddress"}


def _dn(cert: dict[str, Any]) -> tuple[str, str]:
    """(distinguished name as ``CN=...,O=...``, common name) of a peer certificate from getpeercert()."""
    rdns = [(k, v) for rdn in cert.get("subject", ()) for k, v in rdn]
    dn = ",".join(f"{_SHORT.get(k, k)}={v}" for k, v in reversed(rdns))
    cn = next((v for k, v in rdns if k == "commonName"), "")
    return dn, cn


class TLSSocket:
    """The socket face of a :class:`TLSChannel` (``recv``, ``sendall``, timeouts), for the return path."""

    def __init__(self, ch: TLSChannel) -> None:
        self._ch = ch

    def recv(self, n: int) -> bytes:
        """Up to ``n`` decrypted bytes; b"" at the end."""
        buf = bytearray(n)
        got = self._ch.readinto(memoryview(buf))
        return bytes(buf[:got])

    def sendall(self, data: Buffer) -> None:
        """Encrypt and send everything."""
        self._ch.writev([data])

    def settimeout(self, t: float | None) -> None:
        """The raw socket's timeout: no progress for this long raises TimeoutError."""
        self._ch.raw.settimeout(t)

    def shutdown(self, how: int) -> None:
        """Shut the raw socket down (unblocks a reader on another thread)."""
        self._ch.raw.shutdown(how)


class TLSChannel:
    """A TLS session over a connected socket, safe for one reader and one writer thread."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, *, server: bool, hostname: str | None,
                 name: str) -> None:
        self.raw = raw
        self.name = name
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server,
                                 server_hostname=None if server else hostname)
        self._ssl_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._closed = False
        self._eof = False
        self.sock = TLSSocket(self)
        self._handshake()

    # ------------------------------------------------------------ plumbing
    def _flush(self) -> None:
        """Send what the TLS layer produced; callers hold the send lock."""
        with self._ssl_lock:
            out = self._out.read()
        if out:
            self.raw.sendall(out)

    def _feed(self) -> bool:
        """One raw read into the TLS layer; False at the peer's end of stream."""
        data = self.raw.recv(1 << 16)
        with self._ssl_lock:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()
        return bool(data)

    def _handshake(self) -> None:
        while True:
            try:
                with self._ssl_lock:
                    self._obj.do_handshake()
                with self._send_lock:
                    self._flush()
                return
            except ssl.SSLWantReadError:
                with self._send_lock:
                    self._flush()
                if not self._feed():
                    raise ChannelError(
                        f"{self.name}: the peer closed the connection during the TLS handshake") from None
            except ssl.SSLError as exc:
                try:
                    with self._send_lock:
                        self._flush()  # the alert tells the peer why
                except OSError:
                    pass
                raise ChannelError(f"{self.name}: TLS handshake failed: {exc.reason or exc}") from exc

    def peer_identity(self) -> tuple[str, str]:
        """(distinguished name, common name) of the peer's verified certificate."""
        cert = self._obj.getpeercert()
        return _dn(cert) if cert else ("", "")

    # ------------------------------------------------------------ Channel
    def writev(self, bufs: Sequence[Buffer]) -> int:
        """Encrypt and send every buffer, in order."""
        total = 0
        with self._send_lock:
            for b in bufs:
                mv = memoryview(b).cast("B")
                for i in range(0, mv.nbytes, _CHUNK):
                    part = mv[i : i + _CHUNK]
                    with self._ssl_lock:
                        self._obj.write(part)
                        out = self._out.read()
                    self.raw.sendall(out)
                    total += part.nbytes
        return total

    def readinto(self, buf: memoryview) -> int:
        """Decrypt at most ``len(buf)`` bytes into ``buf``; 0 at the end of the stream."""
        n = buf.nbytes
        while True:
            if self._eof:
                return 0
            try:
                with self._ssl_lock:
                    data = self._obj.read(n)
                if not data:
                    self._eof = True
                    return 0
                buf[: len(data)] = data
                return len(data)
            except ssl.SSLWantReadError:
                if not self._feed():
                    with self._ssl_lock:
                        try:
                            self._obj.read(1)
                        except (ssl.SSLError, ssl.SSLEOFError):
                            pass
                    self._eof = True
                    return 0
            except ssl.SSLZeroReturnError:
                self._eof = True
                return 0
            except ssl.SSLError as exc:
                raise ChannelError(f"{self.name}: TLS error: {exc.reason or exc}") from exc

    def shutdown(self) -> None:
        """Unblock a reader or writer on another thread (cancel)."""
        try:
            self.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Say close_notify when possible, then close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._send_lock.acquire(timeout=1):
                try:
                    with self._ssl_lock:
                        self._obj.unwrap()
                except (ssl.SSLError, OSError, ValueError):
                    pass
                try:
                    self._flush()
                except OSError:
                    pass
                finally:
                    self._send_lock.release()
        finally:
            try:
                self.raw.close()
            except OSError:
                pass


def _raw_socket(ch: Any, timeout: float) -> socket.socket:
    sock = getattr(ch, "sock", None)
    if not isinstance(sock, socket.socket) or getattr(ch, "rdma", False):
        raise ConfigError("tls-creds", f"TLS needs a tcp or unix channel, not {getattr(ch, 'name', ch)}")
    sock.settimeout(timeout)  # a stalled handshake is bounded like any other silence
    return sock


def wrap_client(ch: Any, config: MigrationConfig, uri_host: str | None) -> TLSChannel:
    """The source's channel, wrapped in TLS when ``tls-creds`` is set."""
    creds = config.parameters.tls_creds
    sock = _raw_socket(ch, config.parameters.x_stall_timeout / 1000)
    hostname = config.parameters.tls_hostname or uri_host
    if not hostname:
        raise ConfigError("tls-hostname", "a unix: URI has no host name to check the certificate against: set "
                                          "tls-hostname")
    try:
        tls = TLSChannel(sock, client_context(creds), server=False, hostname=hostname, name=ch.name)
    except BaseException:
        sock.close()
        raise
    log.info("migration_tls_outgoing", peer=tls.peer_identity()[0])
    return tls


def wrap_server(ch: Any, config: MigrationConfig) -> TLSChannel:
    """The destination's channel, wrapped in TLS; the client's identity checked against ``tls-authz``."""
    creds = config.parameters.tls_creds
    sock = _raw_socket(ch, config.parameters.x_stall_timeout / 1000)
    try:
        tls = TLSChannel(sock, server_context(creds), server=True, hostname=None, name=ch.name)
    except BaseException:
        sock.close()
        raise
    dn, cn = tls.peer_identity()
    allowed = [a.strip() for a in config.parameters.tls_authz.split(";") if a.strip()]
    if allowed and dn not in allowed and cn not in allowed:
        tls.close()
        raise ChannelError(f"TLS client {dn!r} is not allowed by tls-authz ({', '.join(allowed)})")
    log.info("migration_tls_incoming", peer=dn)
    return tls


__all__ = ["TLSChannel", "TLSSocket", "client_context", "server_context", "wrap_client", "wrap_server"]
