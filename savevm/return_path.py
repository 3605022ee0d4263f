"""The return path: messages from the destination back to the source, QEMU 7.2's framing.

A source that can receive on its channel (a socket) sends ``OPEN_RETURN_PATH``
and a ``PING`` right after the stream header; the destination answers on the
same connection with messages of ``be16 type | be16 length | body``: ``PONG``
for each ``PING``, and ``SHUT`` (be32 status, 0 = loaded) when it is done.
That is all a QEMU peer ever sees.

savevm peers say more, but only after both sides know the other is savevm,
so a QEMU never reads a message type it does not know:

* the source's first ``PING`` carries :data:`NEGOTIATE_PING`; a QEMU
  destination echoes it, a savevm destination answers :data:`NEGOTIATE_PONG`
  instead.  Only a destination that saw :data:`NEGOTIATE_PING` sends
  extension messages, and only a source that saw :data:`NEGOTIATE_PONG`
  sends them forward.
* destination → source: ``PROGRESS`` (what it has loaded, so the source
  can count what is in flight), ``LOADED`` (the whole stream is read and
  checked; it waits for the go, carrying its digests), ``RESUMED`` (it runs
  the program), ``REFUSED`` (why it rejected the stream);
* source → destination, after the stream's end, in the same framing: ``GO``
  (take over; it echoes the nonce of this destination's LOADED, so a
  replayed recording cannot start a program) or ``ABORT`` (do not).

That exchange is the two-phase handover: the destination never runs the
program before the source said go, and the source never resumes its own
copy after it said go.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from savevm.errors import ChannelError, CorruptStreamError
from savevm.logging import get_logger

log = get_logger("savevm.return_path")

_HDR = struct.Struct(">HH")

#: The value of the source's first PING that asks "are you savevm?" ("svm" + protocol 1).
NEGOTIATE_PING: Final = 0x73766D01
#: A savevm destination's PONG to :data:`NEGOTIATE_PING` (a QEMU echoes the PING value instead).
NEGOTIATE_PONG: Final = 0x01766D73
#: LOADED carries a fresh random nonce and GO must echo it: a recorded stream replayed to a
#: destination cannot make it run (its GO answers another destination's LOADED).
NONCE_LEN: Final = 16
#: QEMU's source rejects longer return-path messages.
QEMU_MAX_LEN: Final = 512
#: savevm's own messages may use the whole be16 length.
MAX_LEN: Final = 0xFFFF


class RPMessage(enum.IntEnum):
    """Return-path message types (QEMU 7.2's MIG_RP_MSG_*, then savevm's extensions)."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    # savevm extensions, destination -> source, only after negotiation
    PROGRESS = 0x7301
    LOADED = 0x7302
    RESUMED = 0x7303
    REFUSED = 0x7304
    EXTENSION = 0x7305
    # savevm extensions, source -> destination after the stream, only after negotiation
    GO = 0x7381
    ABORT = 0x7382


#: Fixed body lengths where the type defines one (-1: variable).
FIXED_LEN: Final = {RPMessage.SHUT: 4, RPMessage.PONG: 4, RPMessage.REQ_PAGES: 12, RPMessage.RESUME_ACK: 4,
                    RPMessage.PROGRESS: 24, RPMessage.RESUMED: 0, RPMessage.GO: NONCE_LEN}
QEMU_TYPES: Final = frozenset(range(1, 7))


def frame(kind: RPMessage | int, body: bytes = b"") -> bytes:
    """One message: be16 type, be16 length, body."""
    if len(body) > MAX_LEN:
        raise ValueError(f"return-path message body of {len(body)} bytes exceeds {MAX_LEN}")
    return _HDR.pack(int(kind), len(body)) + body


def check_message(kind: int, body_len: int, *, extensions: bool, offset: int | None = None) -> RPMessage:
    """Validate a message header: known type (extensions only if negotiated) and its length."""
    try:
        t = RPMessage(kind)
    except ValueError:
        t = RPMessage.INVALID
    if t == RPMessage.INVALID or (t not in QEMU_TYPES and not extensions):
        raise CorruptStreamError(f"return path: invalid message 0x{kind:04x} length 0x{body_len:04x}", offset)
    want = FIXED_LEN.get(t)
    if want is not None and body_len != want:
        raise CorruptStreamError(
            f"return path: {t.name} has length {body_len}, expected {want}", offset)
    if t in QEMU_TYPES and body_len > QEMU_MAX_LEN:
        raise CorruptStreamError(f"return path: {t.name} length {body_len} exceeds {QEMU_MAX_LEN}", offset)
    return t


def encode_progress(stream_bytes: int, pages: int, load_ns: int) -> bytes:
    """PROGRESS body: stream bytes consumed, pages loaded, nanoseconds spent loading them."""
    return struct.pack(">QQQ", stream_bytes, pages, load_ns)


def decode_progress(body: bytes) -> tuple[int, int, int]:
    """(stream bytes, pages, load ns) of a PROGRESS body."""
    a, b, c = struct.unpack(">QQQ", body)
    return a, b, c


def encode_json(obj: Any) -> bytes:
    """A JSON body (LOADED, EXTENSION); bounded by the be16 length."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_json(body: bytes, what: str) -> dict[str, Any]:
    """A JSON object body, or a clear error (the body came from the peer)."""
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise CorruptStreamError(f"return path: {what} body is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise CorruptStreamError(f"return path: {what} body is not a JSON object")
    return obj


# ---------------------------------------------------------------------------
# source side
# ---------------------------------------------------------------------------


class SourceReturnPath:
    """The source's end: a thread reading the destination's messages off the socket.

    Everything the migration thread waits for (negotiation, LOADED, RESUMED,
    SHUT, the connection closing) is an event here with a bounded wait, and
    cancel interrupts every wait.
    """

    def __init__(self, sock: socket.socket, cancel: threading.Event) -> None:
        self.sock = sock
        self._cancel = cancel
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        #: None until the first PONG: True for a savevm peer, False for a QEMU
        self.savevm_peer: bool | None = None
        self.loaded: dict[str, Any] | None = None
        self.resumed = False
        self.refused: str | None = None
        self.shut: int | None = None
        self.closed = False
        self.error: Exception | None = None
        #: (stream bytes, pages, load ns, monotonic time received) of the latest PROGRESS
        self.progress: tuple[int, int, int, float] | None = None
        self.last_message = time.monotonic()
        #: the migration is over and closes the socket: errors from here on are the close
        self.stopping = False
        #: extension messages by their "kind" field, for plugins (e.g. an RDMA-style transport)
        self._extensions: dict[str, list[dict[str, Any]]] = {}

    def start(self) -> None:
        """Begin reading (after OPEN_RETURN_PATH and the negotiation PING were sent)."""
        self._thread = threading.Thread(target=self._run, name="savevm-return-path", daemon=True)
        self._thread.start()

    def _ending(self) -> bool:
        """The migration is over or cancelled: a socket closed under a read is its own doing."""
        return self.stopping or self._cancel.is_set()

    def _recv_exact(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                # the socket's timeout bounds the stream's writes; silence here is normal
                if self._cancel.is_set():
                    return None
                continue
            except OSError as exc:
                if self._ending():
                    return None
                raise ChannelError(f"return path: receive failed: {exc}") from exc
            if not chunk:
                if buf and not self._ending():
                    raise CorruptStreamError(f"return path: connection closed inside a message ({len(buf)} of {n})")
                return None
            buf += chunk
        return bytes(buf)

    def _run(self) -> None:
        try:
            while True:
                hdr = self._recv_exact(4)
                if hdr is None:
                    break
                kind, n = _HDR.unpack(hdr)
                t = check_message(kind, n, extensions=bool(self.savevm_peer))
                body = self._recv_exact(n) if n else b""
                if body is None:
                    if self._ending():
                        break  # the migration closed the socket under a message it no longer waits for
                    raise CorruptStreamError(f"return path: connection closed inside {t.name}")
                self._dispatch(t, body)
                if t == RPMessage.SHUT:
                    break  # "no more messages follow"
        except Exception as exc:  # recorded; the migration thread decides what it means
            with self._cond:
                self.error = exc
            log.warning("source_return_path_thread_error", error=str(exc))
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def _dispatch(self, t: RPMessage, body: bytes) -> None:
        with self._cond:
            self.last_message = time.monotonic()
            if t == RPMessage.PONG:
                (v,) = struct.unpack(">I", body)
                if self.savevm_peer is None:
                    self.savevm_peer = v == NEGOTIATE_PONG
                    log.info("source_return_path_negotiated", savevm_peer=self.savevm_peer)
                log.debug("source_return_path_thread_pong", value=v)
            elif t == RPMessage.SHUT:
                (self.shut,) = struct.unpack(">I", body)
                log.info("source_return_path_thread_shut", status=self.shut)
            elif t == RPMessage.PROGRESS:
                self.progress = (*decode_progress(body), time.monotonic())
            elif t == RPMessage.LOADED:
                self.loaded = decode_json(body, "LOADED")
            elif t == RPMessage.RESUMED:
                self.resumed = True
            elif t == RPMessage.REFUSED:
                self.refused = body.decode(errors="replace")
            elif t == RPMessage.EXTENSION:
                msg = decode_json(body, "EXTENSION")
                self._extensions.setdefault(str(msg.get("kind")), []).append(msg)
            else:
                raise CorruptStreamError(f"return path: unexpected {t.name} in precopy (postcopy is not supported)")
            self._cond.notify_all()

    def wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``ready()`` (checked under the lock), the path closes, cancel, or ``timeout`` s.

        Returns ``ready()`` at the end, so a caller tells "it happened" from
        "it closed / timed out" without a race.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not ready():
                if self.closed or self._cancel.is_set():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
            return ready()

    def take_extension(self, kind: str, timeout: float) -> dict[str, Any] | None:
        """The next EXTENSION message of ``kind`` (e.g. a transport's registration reply)."""
        got = self.wait(lambda: bool(self._extensions.get(kind)), timeout)
        if not got:
            return None
        with self._cond:
            return self._extensions[kind].pop(0)

    def join(self, timeout: float = 1.0) -> None:
        """Wait briefly for the reader thread after the socket was shut down."""
        if self._thread is not None:
            self._thread.join(timeout)


# ---------------------------------------------------------------------------
# destination side
# ---------------------------------------------------------------------------


class DestReturnPath:
    """The destination's end: sends QEMU's messages, and savevm's once the source asked for them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self.open = False
        #: the source speaks savevm's extensions (it sent NEGOTIATE_PING)
        self.negotiated = False
        self.shut_sent = False
        self.failed = False
        self._last_progress = 0.0

    def send(self, kind: RPMessage, body: bytes = b"") -> bool:
        """Send one message; False (logged) if the source is gone or the path is not open."""
        if not self.open or self.failed:
            return False
        if kind not in QEMU_TYPES and not self.negotiated:
            return False  # a QEMU source would reject the type
        try:
            with self._lock:
                self.sock.sendall(frame(kind, body))
        except OSError as exc:
            self.failed = True
            log.warning("destination_return_path_send_failed", type=kind.name, error=str(exc))
            return False
        return True

    def on_open(self) -> None:
        """OPEN_RETURN_PATH: the source listens from now on."""
        self.open = True
        log.debug("loadvm_process_command", cmd="OPEN_RETURN_PATH")

    def on_ping(self, value: int) -> None:
        """PING: answer PONG; the negotiation value is answered with savevm's own."""
        if value == NEGOTIATE_PING and not self.negotiated:
            self.negotiated = True
            self.send(RPMessage.PONG, struct.pack(">I", NEGOTIATE_PONG))
            log.info("destination_return_path_negotiated")
            return
        self.send(RPMessage.PONG, struct.pack(">I", value))

    def progress(self, stream_bytes: int, pages: int, load_ns: int) -> None:
        """PROGRESS (savevm peers only, at most every 20 ms): what is loaded, so the source counts
        what is still in flight and how fast this side drains it."""
        now = time.monotonic()
        if not self.negotiated or now - self._last_progress < 0.02:
            return
        self._last_progress = now
        self.send(RPMessage.PROGRESS, encode_progress(stream_bytes, pages, load_ns))

    def shut(self, status: int) -> None:
        """SHUT (once): 0 when loaded, 1 on failure; no message follows it."""
        if self.shut_sent:
            return
        self.send(RPMessage.SHUT, struct.pack(">I", status))
        self.shut_sent = True


__all__ = [
    "MAX_LEN", "NEGOTIATE_PING", "NEGOTIATE_PONG", "QEMU_MAX_LEN", "DestReturnPath", "RPMessage",
    "SourceReturnPath", "check_message", "decode_json", "decode_progress", "encode_json", "encode_progress",
    "frame",
]
