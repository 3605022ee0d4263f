"""QEMUFile over MemoryChannel: puts, gets, accounting, zero copy, sticky errors, bounds."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savevm.channels.memory import MemoryChannel
from savevm.errors import ChannelError, CorruptStreamError, TruncatedStreamError
from savevm.qemufile import ASYNC_COPY_THRESHOLD, READ_STAGE_BYTES, QEMUFile
from tests.core.strategies import op_size, qemufile_ops


def writer() -> tuple[MemoryChannel, QEMUFile]:
    ch = MemoryChannel()
    return ch, QEMUFile(ch, writable=True)


def reader(data: bytes) -> QEMUFile:
    return QEMUFile(MemoryChannel(data))


class TrickleChannel(MemoryChannel):
    """Hands out at most ``step`` bytes per read, like a slow socket."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__(data)
        self.step = step

    def readinto(self, buf: memoryview) -> int:
        return super().readinto(buf[: self.step])


# ---------------------------------------------------------------- puts and gets


def test_scalar_wire_bytes() -> None:
    ch, f = writer()
    f.put_byte(0xAB)
    f.put_be16(0x0102)
    f.put_be32(0x03040506)
    f.put_be64(0x0708090A0B0C0D0E)
    f.put_counted_string("ram")
    f.put_buffer(b"xyz")
    f.flush()
    assert ch.getvalue() == bytes.fromhex("ab 0102 03040506 0708090a0b0c0d0e 03") + b"ram" + b"xyz"


def test_scalars_are_masked_to_width() -> None:
    ch, f = writer()
    f.put_byte(0x1FF)
    f.put_be16(-1)
    f.put_be32(1 << 32 | 7)
    f.flush()
    assert ch.getvalue() == b"\xff" + b"\xff\xff" + b"\x00\x00\x00\x07"


def test_get_scalars_and_counted_string() -> None:
    f = reader(bytes.fromhex("ab 0102 03040506 0708090a0b0c0d0e 03") + b"ram" + b"xyz")
    assert f.get_byte() == 0xAB
    assert f.get_be16() == 0x0102
    assert f.get_be32() == 0x03040506
    assert f.get_be64() == 0x0708090A0B0C0D0E
    assert f.get_counted_string() == "ram"
    assert f.get_bytes(3, limit=3) == b"xyz"
    assert f.pos == 1 + 2 + 4 + 8 + 4 + 3
    assert f.at_eof()


def test_counted_string_too_long_is_refused() -> None:
    _, f = writer()
    with pytest.raises(ValueError):
        f.put_counted_string("x" * 256)
    f.put_counted_string("x" * 255)
    assert f.pos == 256


def test_counted_string_not_utf8_is_corrupt() -> None:
    f = reader(b"\x02\xff\xfe")
    with pytest.raises(CorruptStreamError) as ei:
        f.get_counted_string()
    assert ei.value.offset == 0


def test_peek_byte_does_not_consume() -> None:
    f = reader(b"\x05\x06")
    assert f.peek_byte() == 5
    assert f.pos == 0
    assert f.get_byte() == 5
    assert f.get_byte() == 6
    assert f.peek_byte() is None


@settings(max_examples=150, deadline=None)
@given(ops=qemufile_ops(), step=st.sampled_from([1, 7, 512, 1 << 20]))
def test_random_op_sequence_round_trip(ops: list, step: int) -> None:
    ch, f = writer()
    expected_pos = 0
    for kind, value in ops:
        if kind == "byte":
            f.put_byte(value)
        elif kind == "be16":
            f.put_be16(value)
        elif kind == "be32":
            f.put_be32(value)
        elif kind == "be64":
            f.put_be64(value)
        elif kind == "str":
            f.put_counted_string(value)
        elif kind == "buf":
            f.put_buffer(value)
        elif kind == "async":
            f.put_buffer_async(bytearray(value))
        else:
            f.put_iovecs([memoryview(b) for b in value], sum(len(b) for b in value))
        expected_pos += op_size(kind, value)
        assert f.pos == expected_pos
    f.flush()
    data = ch.getvalue()
    assert len(data) == expected_pos == f.pos

    r = QEMUFile(TrickleChannel(data, step))
    pos = 0
    for kind, value in ops:
        if kind == "byte":
            assert r.get_byte() == value
        elif kind == "be16":
            assert r.get_be16() == value
        elif kind == "be32":
            assert r.get_be32() == value
        elif kind == "be64":
            assert r.get_be64() == value
        elif kind == "str":
            assert r.get_counted_string() == value
        elif kind == "iov":
            joined = b"".join(value)
            assert r.get_bytes(len(joined), limit=len(joined)) == joined
        else:
            assert r.get_bytes(len(value), limit=len(value)) == value
        pos += op_size(kind, value)
        assert r.pos == pos
    assert r.at_eof()


# ---------------------------------------------------------------- zero copy


def test_put_buffer_async_does_not_copy_large_buffers() -> None:
    ch, f = writer()
    src = bytearray(b"a" * 4096)
    f.put_be32(1)
    f.put_buffer_async(src)
    src[:4] = b"ZZZZ"  # the queued view must see this: nothing was copied
    f.flush()
    assert ch.getvalue() == b"\x00\x00\x00\x01" + b"ZZZZ" + b"a" * 4092


def test_put_buffer_async_copies_small_buffers() -> None:
    ch, f = writer()
    src = bytearray(b"a" * ASYNC_COPY_THRESHOLD)
    f.put_buffer_async(src)
    src[:4] = b"ZZZZ"
    f.flush()
    assert ch.getvalue() == b"a" * ASYNC_COPY_THRESHOLD


def test_put_buffer_copies() -> None:
    ch, f = writer()
    src = bytearray(b"a" * 4096)
    f.put_buffer(src)
    src[:4] = b"ZZZZ"
    f.flush()
    assert ch.getvalue() == b"a" * 4096


def test_put_iovecs_zero_copy_and_order() -> None:
    ch, f = writer()
    pages = [bytearray([i]) * 1024 for i in range(3)]
    f.put_byte(0xEE)
    f.put_iovecs([b"H0", pages[0], b"H1", pages[1], b"H2", pages[2]], 6 + 3 * 1024)
    f.put_byte(0xFF)
    pages[1][0] = 0x77
    assert f.pos == 1 + 6 + 3 * 1024 + 1
    f.flush()
    assert ch.getvalue() == (b"\xee" + b"H0" + pages[0] + b"H1" + pages[1] + b"H2" + pages[2] + b"\xff")
    assert ch.getvalue()[1 + 2 + 1024 + 2] == 0x77


def test_async_memoryview_of_wider_items() -> None:
    import array

    ch, f = writer()
    words = array.array("I", range(256))  # 1 KiB, format "I"
    f.put_buffer_async(memoryview(words))
    assert f.pos == 1024
    f.flush()
    assert ch.getvalue() == words.tobytes()


def test_pos_counts_pending_and_flushed_bytes() -> None:
    ch, f = writer()
    f.put_be64(1)
    assert f.pos == 8 and ch.getvalue() == b""
    f.flush()
    assert f.pos == 8 and len(ch.getvalue()) == 8
    f.put_buffer_async(bytes(10_000))
    assert f.pos == 10_008
    f.close()
    assert len(ch.getvalue()) == 10_008


def test_large_puts_flush_on_their_own() -> None:
    ch, f = writer()
    for _ in range(5):
        f.put_buffer_async(bytes(1 << 20))
    # 4 MiB queued triggers a flush without being asked
    assert len(ch.getvalue()) >= 4 << 20
    assert f.pos == 5 << 20


# ---------------------------------------------------------------- sticky error


class FailingChannel(MemoryChannel):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def writev(self, bufs):  # noqa: ANN001, ANN201
        self.writes += 1
        raise OSError(errno.EPIPE, "Broken pipe")


def test_sticky_error_keeps_first_and_skips_later_flushes() -> None:
    ch = FailingChannel()
    f = QEMUFile(ch, writable=True)
    f.put_be32(1)
    f.flush()
    assert ch.writes == 1
    err = f.get_error()
    assert isinstance(err, ChannelError)
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.EPIPE
    f.set_error(RuntimeError("second"))
    assert f.get_error() is err
    f.put_buffer_async(bytes(4096))
    f.flush()
    f.flush()
    assert ch.writes == 1, "flush after an error must not touch the channel"
    assert f.rate_limit_exceeded(), "an errored file reports rate-limited so loops stop"
    with pytest.raises(ChannelError) as ei:
        f.check_error()
    assert ei.value is err
    assert isinstance(ei.value.__cause__, OSError)
    with pytest.raises(ChannelError):
        f.close()


def test_check_error_wraps_foreign_exceptions() -> None:
    _, f = writer()
    f.check_error()  # nothing recorded: no raise
    cause = OSError(errno.ECONNRESET, "reset")
    f.set_error(cause)
    with pytest.raises(ChannelError) as ei:
        f.check_error()
    assert ei.value.__cause__ is cause


def test_read_error_becomes_channel_error() -> None:
    class Broken(MemoryChannel):
        def readinto(self, buf):  # noqa: ANN001, ANN201
            raise OSError(errno.ECONNRESET, "reset")

    f = QEMUFile(Broken())
    with pytest.raises(ChannelError) as ei:
        f.get_be32()
    assert isinstance(ei.value.__cause__, OSError)
    with pytest.raises(ChannelError):  # sticky on the read side too
        f.get_byte()


# ---------------------------------------------------------------- bounded and truncated reads


def test_get_bytes_over_limit_raises_before_allocating() -> None:
    f = reader(b"\x00" * 16)
    f.get_byte()
    with pytest.raises(CorruptStreamError) as ei:
        f.get_bytes(1 << 60, limit=4096)  # allocating this would be a MemoryError
    assert ei.value.offset == 1
    with pytest.raises(CorruptStreamError):
        f.get_bytes(-1, limit=4096)
    assert f.pos == 1, "a refused length consumes nothing"


@pytest.mark.parametrize("getter,size", [("get_byte", 1), ("get_be16", 2), ("get_be32", 4), ("get_be64", 8)])
def test_truncated_scalar_reports_offset(getter: str, size: int) -> None:
    f = reader(b"\x01\x02\x03" + b"\x00" * (size - 1))
    f.get_bytes(3, limit=3)
    with pytest.raises(TruncatedStreamError) as ei:
        getattr(f, getter)()
    assert ei.value.offset == 3


def test_truncated_buffer_reports_offset() -> None:
    f = reader(b"\x00" * 10 + b"x" * 100)
    f.get_bytes(10, limit=10)
    with pytest.raises(TruncatedStreamError) as ei:
        f.get_bytes(200, limit=1000)
    assert ei.value.offset == 10


def test_truncated_large_buffer_reports_offset() -> None:
    n = READ_STAGE_BYTES  # takes the direct-read path
    f = reader(b"h" + b"x" * (n - 1000))
    f.get_byte()
    with pytest.raises(TruncatedStreamError) as ei:
        f.get_bytes(n, limit=n)
    assert ei.value.offset is not None and 1 <= ei.value.offset <= n - 999


class RecordingChannel(MemoryChannel):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.targets: list[object] = []

    def readinto(self, buf: memoryview) -> int:
        self.targets.append(buf.obj)
        return super().readinto(buf)


def test_large_get_buffer_into_reads_straight_into_destination() -> None:
    big = bytes(range(256)) * (3 * READ_STAGE_BYTES // 256)
    data = b"\x00\x00\x00\x07" + big + b"\xaa"
    ch = RecordingChannel(data)
    f = QEMUFile(ch)
    assert f.get_be32() == 7  # stages the first READ_STAGE_BYTES
    dest = bytearray(len(big))
    f.get_buffer_into(memoryview(dest))
    assert dest == big
    assert any(t is dest for t in ch.targets), "the remainder must be read into dest, not via the stage"
    assert f.pos == 4 + len(big)
    assert f.get_byte() == 0xAA
    assert f.at_eof()


def test_skip_and_batch_parsing_helpers() -> None:
    f = reader(b"abcdefgh" + bytes(READ_STAGE_BYTES) + b"Z")
    assert f.fill(4) >= 4
    assert bytes(f.buffered()[:4]) == b"abcd"
    f.consume(4)
    assert f.pos == 4
    with pytest.raises(ValueError):
        f.consume(len(f.buffered()) + 1)
    f.skip(4 + READ_STAGE_BYTES)
    assert f.get_byte() == ord("Z")
    assert f.at_eof()
