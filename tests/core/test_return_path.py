"""The return path's framing and negotiation, and a destination that says nothing unasked."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

import savevm
import savevm_ram
from savevm.channels.sockets import SocketChannel
from savevm.errors import CorruptStreamError
from savevm.migration import Incoming
from savevm.return_path import (
    NEGOTIATE_PING,
    NEGOTIATE_PONG,
    QEMU_MAX_LEN,
    DestReturnPath,
    RPMessage,
    SourceReturnPath,
    check_message,
    frame,
)


def test_frame_is_be16_type_be16_length_body() -> None:
    assert frame(RPMessage.SHUT, b"\x00\x00\x00\x01") == b"\x00\x01\x00\x04\x00\x00\x00\x01"
    assert frame(RPMessage.PONG, struct.pack(">I", 7)) == bytes.fromhex("0002000400000007")


@pytest.mark.parametrize("kind,length,ext,ok", [
    (1, 4, False, True), (2, 4, False, True), (1, 5, False, False), (0, 0, False, False),
    (7, 0, False, False), (RPMessage.LOADED, 10, False, False), (RPMessage.LOADED, 10, True, True),
    (RPMessage.GO, 16, True, True), (RPMessage.GO, 0, True, False), (3, QEMU_MAX_LEN + 1, False, False),
])
def test_check_message(kind: int, length: int, ext: bool, ok: bool) -> None:
    if ok:
        check_message(kind, length, extensions=ext)
    else:
        with pytest.raises(CorruptStreamError):
            check_message(kind, length, extensions=ext)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_no_type_outside_the_table_passes(kind: int, length: int) -> None:
    known = {int(t) for t in RPMessage} - {0}
    try:
        t = check_message(kind, length, extensions=True)
    except CorruptStreamError:
        return
    assert int(t) in known


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def test_negotiation_tells_savevm_from_qemu() -> None:
    # a savevm destination answers the negotiation PING with its own PONG ...
    a, b = _pair()
    d = DestReturnPath(b)
    d.on_open()
    d.on_ping(NEGOTIATE_PING)
    assert d.negotiated
    cancel = threading.Event()
    src = SourceReturnPath(a, cancel)
    src.start()
    assert src.wait(lambda: src.savevm_peer is not None, 5) and src.savevm_peer is True
    # ... and only then sends savevm's own messages
    assert d.send(RPMessage.LOADED, b"{}")
    assert src.wait(lambda: src.loaded is not None, 5)
    a.close(), b.close()
    # a QEMU echoes the value: the source sees a QEMU peer and never expects extensions
    a, b = _pair()
    b.sendall(frame(RPMessage.PONG, struct.pack(">I", NEGOTIATE_PING)))
    src = SourceReturnPath(a, threading.Event())
    src.start()
    assert src.wait(lambda: src.savevm_peer is not None, 5) and src.savevm_peer is False
    b.sendall(frame(RPMessage.LOADED, b"{}"))  # from a QEMU this would be garbage: refused
    src.join(5)
    assert src.closed and isinstance(src.error, CorruptStreamError)
    a.close(), b.close()
    assert NEGOTIATE_PONG != NEGOTIATE_PING


def test_an_unopened_return_path_sends_nothing() -> None:
    a, b = _pair()
    d = DestReturnPath(b)
    assert not d.send(RPMessage.SHUT, b"\x00" * 4)
    d.on_open()
    assert not d.send(RPMessage.LOADED, b"{}")  # not negotiated: a QEMU source would reject it
    assert d.send(RPMessage.SHUT, b"\x00" * 4)
    a.close(), b.close()


def test_destination_writes_nothing_to_a_source_that_opened_no_return_path() -> None:
    """A QEMU source without return-path never reads its socket; bytes left there unread make its
    kernel reset the connection when QEMU closes it, and the reset could cut off the last bytes of
    the stream (the cause of a rare 'connection reset' in a live QEMU -> savevm test)."""
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", bytearray(64 * 4096))]))
    ch = savevm.channels.MemoryChannel()
    savevm.save_stream(savevm.QEMUFile(ch, writable=True), reg)  # a stream with no OPEN_RETURN_PATH
    a, b = _pair()
    dreg = savevm.SectionRegistry()
    savevm_ram.register_ram(dreg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", bytearray(64 * 4096))]))
    inc = Incoming(dreg, channel=SocketChannel(b, "test"))
    inc.start()
    a.sendall(ch.getvalue())
    a.shutdown(socket.SHUT_WR)
    assert inc.wait(10).status == "completed"
    a.settimeout(5)
    assert a.recv(100) == b""  # EOF: not one byte came back
    a.close()


def test_closing_under_a_half_read_message_after_the_migration_ended_is_no_error() -> None:
    """The migration closes its socket once it is over; a message cut by that close is not a fault.

    (A completed migration logged ``source_return_path_thread_error`` when the
    close came between a SHUT's header and its body.)
    """
    a, b = _pair()
    src = SourceReturnPath(a, threading.Event())
    src.start()
    b.sendall(frame(RPMessage.SHUT, struct.pack(">I", 0))[:4])  # the header only
    assert not src.wait(lambda: src.shut is not None, 0.2)
    src.stopping = True
    a.shutdown(socket.SHUT_RDWR)
    src.join(5)
    assert src.closed and src.error is None
    a.close(), b.close()
    # before the migration is over, the same cut is a fault
    a, b = _pair()
    src = SourceReturnPath(a, threading.Event())
    src.start()
    b.sendall(frame(RPMessage.SHUT, struct.pack(">I", 0))[:4])
    b.close()
    src.join(5)
    assert isinstance(src.error, CorruptStreamError)
    a.close()
