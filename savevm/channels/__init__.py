"""Byte transports and QEMU-style migration URIs.

``open_channel("tcp:127.0.0.1:4444")`` connects (source side);
``listen("tcp:127.0.0.1:0")`` prepares the destination and tells the real
address in ``.uri``.  Schemes come from the ``savevm_get_transport`` hook,
so a plugin adds one by implementing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from savevm.channels.base import Channel, Listener, Transport
from savevm.channels.fd import FdChannel, split_uri
from savevm.channels.memory import MemoryChannel, memory_pipe
from savevm.channels.sockets import SocketChannel

if TYPE_CHECKING:
    from savevm.plugins import PluginHost


def _host(plugins: PluginHost | None) -> PluginHost:
    if plugins is None:
        from savevm.plugins import PluginHost

        plugins = PluginHost()
    return plugins


def open_channel(uri: str, plugins: PluginHost | None = None) -> Channel:
    """Open the outgoing channel for a migration URI."""
    scheme, address = split_uri(uri)
    return _host(plugins).get_transport(scheme).connect(address)


def listen(uri: str, plugins: PluginHost | None = None) -> Listener:
    """Prepare the incoming side for a migration URI."""
    scheme, address = split_uri(uri)
    return _host(plugins).get_transport(scheme).listen(address)


__all__ = [
    "Channel", "FdChannel", "Listener", "MemoryChannel", "SocketChannel", "Transport",
    "listen", "memory_pipe", "open_channel", "split_uri",
]
