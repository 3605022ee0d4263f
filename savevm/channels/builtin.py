"""The built-in transports, registered as a plugin like any third-party one."""

from __future__ import annotations

from savevm.channels.fd import ExecTransport, FdTransport, FileTransport
from savevm.channels.sockets import TcpTransport, UnixTransport
from savevm.config import MigrationConfig
from savevm.hookspecs import hookimpl

TRANSPORTS = {t.scheme: t for t in (TcpTransport(), UnixTransport(), FileTransport(), FdTransport(), ExecTransport())}


@hookimpl(trylast=True)
def savevm_get_transport(scheme: str, config: MigrationConfig) -> object | None:
    """Built-in schemes; tried last so plugins can replace them."""
    return TRANSPORTS.get(scheme)
