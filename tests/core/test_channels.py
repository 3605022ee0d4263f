"""Channels over real loopback sockets, pipes, files and subprocesses; URI parsing."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savevm.channels import listen, memory_pipe, open_channel, split_uri
from savevm.channels.base import IOV_MAX, Channel, Listener, writev_all
from savevm.errors import ChannelError, URIError
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile

PAYLOAD = bytes(range(256)) * (8 << 12)  # 8 MiB, not all zeros
assert len(PAYLOAD) == 8 << 20


@pytest.fixture(scope="module")
def host() -> PluginHost:
    return PluginHost(load_entrypoints=False)


def send_stream(ch: Channel, payload: bytes) -> None:
    """be64 length + payload through QEMUFile, zero-copy, then close."""
    f = QEMUFile(ch, writable=True)
    f.put_be64(len(payload))
    view = memoryview(payload)
    for off in range(0, len(payload), 1 << 20):
        f.put_buffer_async(view[off:off + (1 << 20)])
    f.close()


def receive_stream(ch: Channel) -> bytes:
    f = QEMUFile(ch)
    n = f.get_be64()
    out = bytearray(n)
    f.get_buffer_into(memoryview(out))
    assert f.at_eof()
    f.close()
    return bytes(out)


def in_thread(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:  # handed back to the test thread
            errors.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, errors


def transfer(lst: Listener, connect: Callable[[], Channel]) -> bytes:
    t, errors = in_thread(lambda: send_stream(connect(), PAYLOAD))
    ch = lst.accept(timeout=20)
    got = receive_stream(ch)
    t.join(20)
    assert not t.is_alive()
    assert not errors, errors
    return got


# ---------------------------------------------------------------- transports


def test_tcp_loopback_8mib(host: PluginHost) -> None:
    lst = listen("tcp:127.0.0.1:0", host)
    try:
        scheme, _, port = lst.uri.rpartition(":")
        assert scheme == "tcp:127.0.0.1" and int(port) != 0, lst.uri
        assert transfer(lst, lambda: open_channel(lst.uri, host)) == PAYLOAD
    finally:
        lst.close()


def test_unix_socket_8mib(host: PluginHost, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "mig.sock"
    lst = listen(f"unix:{path}", host)
    try:
        assert lst.uri == f"unix:{path}"
        assert transfer(lst, lambda: open_channel(f"unix:{path}", host)) == PAYLOAD
    finally:
        lst.close()
    assert not path.exists(), "the listener removes its socket file"


def test_file_write_then_read_back(host: PluginHost, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "state.bin"
    ch = open_channel(f"file:{path}", host)
    assert not path.exists(), "written next to the final name until closed"
    send_stream(ch, PAYLOAD)
    assert path.exists() and not (tmp_path / "state.bin.part").exists()
    lst = listen(f"file:{path}", host)
    assert receive_stream(lst.accept()) == PAYLOAD
    with pytest.raises(ChannelError):
        lst.accept()  # one stream per file listener


def test_file_abort_leaves_no_file(host: PluginHost, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "new.bin"
    ch = open_channel(f"file:{path}", host)
    ch.writev([b"partial"])
    ch.abort()
    assert os.listdir(tmp_path) == []


def test_file_abort_keeps_existing_file(host: PluginHost, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "good.bin"
    path.write_bytes(b"GOOD SNAPSHOT")
    ch = open_channel(f"file:{path}", host)
    f = QEMUFile(ch, writable=True)
    f.put_buffer(b"half a new snapshot")
    f.flush()
    ch.abort()
    assert path.read_bytes() == b"GOOD SNAPSHOT"
    assert os.listdir(tmp_path) == ["good.bin"]


def test_file_write_error_does_not_clobber(host: PluginHost, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "good.bin"
    path.write_bytes(b"GOOD SNAPSHOT")
    ch = open_channel(f"file:{path}", host)

    def disk_full(bufs):  # noqa: ANN001, ANN202
        raise OSError(28, "No space left on device")

    ch.writev = disk_full
    f = QEMUFile(ch, writable=True)
    f.put_buffer_async(bytes(1 << 20))
    with pytest.raises(ChannelError, match="No space"):
        f.close()
    assert path.read_bytes() == b"GOOD SNAPSHOT"
    assert os.listdir(tmp_path) == ["good.bin"]


def test_file_missing_for_reading(host: PluginHost, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ChannelError):
        listen(f"file:{tmp_path / 'absent'}", host).accept()


def test_exec_out_and_in(host: PluginHost, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "via-cat.bin"
    send_stream(open_channel(f"exec:cat > {path}", host), PAYLOAD)
    assert path.stat().st_size == 8 + len(PAYLOAD)
    assert receive_stream(listen(f"exec:cat {path}", host).accept()) == PAYLOAD


def test_exec_outgoing_nonzero_exit(host: PluginHost) -> None:
    ch = open_channel("exec:cat > /dev/null; exit 3", host)
    f = QEMUFile(ch, writable=True)
    f.put_buffer(b"data")
    with pytest.raises(ChannelError, match="status 3"):
        f.close()


def test_exec_incoming_nonzero_exit(host: PluginHost) -> None:
    ch = listen("exec:printf abc; exit 4", host).accept()
    f = QEMUFile(ch)
    assert f.get_bytes(3, limit=3) == b"abc"
    assert f.at_eof()
    with pytest.raises(ChannelError, match="status 4"):
        ch.close()


def test_fd_pipe(host: PluginHost) -> None:
    r, w = os.pipe()
    lst = listen(f"fd:{r}", host)
    assert transfer(lst, lambda: open_channel(f"fd:{w}", host)) == PAYLOAD
    for fd in (r, w):  # both ends were closed by their channels
        with pytest.raises(OSError):
            os.fstat(fd)


def test_fd_not_open(host: PluginHost) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ChannelError):
        open_channel(f"fd:{w}", host)


def test_memory_pipe_between_threads() -> None:
    wr, rd = memory_pipe(max_buffered=256 << 10)  # small: the writer must wait for the reader
    t, errors = in_thread(lambda: send_stream(wr, PAYLOAD))
    assert receive_stream(rd) == PAYLOAD
    t.join(20)
    assert not errors, errors


def test_memory_pipe_reader_close_fails_writer() -> None:
    wr, rd = memory_pipe(max_buffered=64 << 10)
    f = QEMUFile(wr, writable=True)
    f.put_buffer_async(bytes(1 << 20))
    f.flush()  # fills the pipe beyond max_buffered; nobody reads
    done = threading.Event()

    def second_flush() -> None:
        f.put_buffer_async(bytes(1 << 20))
        f.flush()  # blocks until the reader closes, then fails
        done.set()

    t, errors = in_thread(second_flush)
    rd.close()
    t.join(20)
    assert done.is_set() and not errors
    with pytest.raises(ChannelError):
        f.check_error()


def test_default_plugin_host_is_used_without_one(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "x.bin"
    send_stream(open_channel(f"file:{path}"), b"hello")
    assert receive_stream(listen(f"file:{path}").accept()) == b"hello"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("uri", ["nonsense", "", ":x", "tcp:host", "tcp:h:99999", "tcp:h:port",
                                 "unix:", "file:", "exec:", "exec:   ", "fd:abc", "fd:", "bogus:x"])
def test_bad_uri(host: PluginHost, uri: str) -> None:
    with pytest.raises(URIError):
        open_channel(uri, host)
    with pytest.raises(URIError):
        listen(uri, host)


def test_unknown_scheme_names_no_transport(host: PluginHost) -> None:
    with pytest.raises(URIError, match="no transport") as ei:
        open_channel("bogus:x", host)
    assert "bogus" in str(ei.value)


def test_split_uri() -> None:
    assert split_uri("tcp:127.0.0.1:4444") == ("tcp", "127.0.0.1:4444")
    assert split_uri("exec:cat > /tmp/a:b") == ("exec", "cat > /tmp/a:b")
    with pytest.raises(URIError):
        split_uri("no-colon")


def test_connect_refused(host: PluginHost) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ChannelError, match=str(port)):
        open_channel(f"tcp:127.0.0.1:{port}", host)


def test_unix_connect_missing(host: PluginHost, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ChannelError):
        open_channel(f"unix:{tmp_path / 'nobody'}", host)


def test_accept_timeout(host: PluginHost) -> None:
    lst = listen("tcp:127.0.0.1:0", host)
    try:
        with pytest.raises(ChannelError, match="within"):
            lst.accept(timeout=0.05)
    finally:
        lst.close()


def test_listen_on_busy_port(host: PluginHost) -> None:
    lst = listen("tcp:127.0.0.1:0", host)
    try:
        with pytest.raises(ChannelError):
            listen(lst.uri, host)
    finally:
        lst.close()


# ---------------------------------------------------------------- the one writev loop


class ShortWriter:
    """A vectored send that writes only what ``plan`` allows per call, recording what it got."""

    def __init__(self, plan: Callable[[list[memoryview]], int]) -> None:
        self.plan = plan
        self.out = bytearray()
        self.calls: list[int] = []

    def __call__(self, iov: list[memoryview]) -> int:
        assert len(iov) <= IOV_MAX, "never more than IOV_MAX buffers per call"
        assert all(isinstance(b, memoryview) and b.format == "B" for b in iov)
        self.calls.append(len(iov))
        want = sum(b.nbytes for b in iov)
        n = min(self.plan(iov), want)
        joined = b"".join(iov)
        self.out += joined[:n]
        return n


def _bufs(sizes: list[int]) -> list[bytes]:
    out, k = [], 0
    for s in sizes:
        out.append(bytes((k + j) % 251 for j in range(s)))
        k += s
    return out


def _first_boundary(iov: list[memoryview]) -> int:
    """Write whole buffers only: exactly up to the end of the first non-empty one."""
    return next((b.nbytes for b in iov if b.nbytes), 0)


@pytest.mark.parametrize("name,plan", [
    ("one byte", lambda iov: 1),
    ("three bytes", lambda iov: 3),
    ("exactly one buffer", _first_boundary),
    ("one byte short of a buffer", lambda iov: max(1, _first_boundary(iov) - 1)),
    ("one byte past a buffer", lambda iov: _first_boundary(iov) + 1),
    ("everything", lambda iov: 1 << 40),
])
@pytest.mark.parametrize("sizes", [
    [5], [1, 2, 3], [0, 4, 0, 0, 7, 0], [0], [], [10] * (IOV_MAX + 7), [1] * (3 * IOV_MAX + 1),
])
def test_writev_all_delivers_every_byte_in_order(name: str, plan: Callable[[list[memoryview]], int],
                                                 sizes: list[int]) -> None:
    if sum(sizes) > 5000 and name in ("one byte", "three bytes"):
        sizes = [1] * (IOV_MAX + 3)  # still more than IOV_MAX buffers, fewer calls
    bufs = _bufs(sizes)
    w = ShortWriter(plan)
    assert writev_all(w, bufs) == sum(sizes)
    assert bytes(w.out) == b"".join(bufs)
    if sum(sizes) == 0:
        assert w.calls == [], "nothing to write: no call at all"
    if len(sizes) > IOV_MAX and name == "everything":
        assert max(w.calls) == IOV_MAX


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), max_size=60), cuts=st.lists(st.integers(1, 90), min_size=1))
def test_writev_all_any_short_writes(sizes: list[int], cuts: list[int]) -> None:
    bufs = _bufs(sizes)
    it = iter(cuts * (sum(sizes) + 1))
    w = ShortWriter(lambda iov: next(it))
    assert writev_all(w, [memoryview(b) for b in bufs]) == sum(sizes)
    assert bytes(w.out) == b"".join(bufs)


def test_writev_all_non_byte_views_and_bad_sends() -> None:
    import array

    words = array.array("I", [0x01020304, 0x05060708])
    w = ShortWriter(lambda iov: 3)
    assert writev_all(w, [memoryview(words), b"xy"]) == 10
    assert bytes(w.out) == words.tobytes() + b"xy"
    with pytest.raises(ChannelError, match="no progress"):
        writev_all(lambda iov: 0, [b"abc"])
    with pytest.raises(ChannelError, match="more than it was given"):
        writev_all(lambda iov: 4, [b"abc"])
