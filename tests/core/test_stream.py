"""Whole streams: layout byte by byte, round trips, and every loader error with its offset."""

from __future__ import annotations

import json
import struct

import attrs
import pytest
from hypothesis import given, settings

from savevm import restore, snapshot
from savevm.channels.memory import MemoryChannel
from savevm.config import MigrationConfig
from savevm.errors import (
    BadMagicError,
    ConfigurationMismatchError,
    CorruptStreamError,
    FooterMismatchError,
    MigrationError,
    StreamError,
    TrailingDataError,
    TruncatedStreamError,
    UnknownSectionError,
    VersionMismatchError,
)
from savevm.load import StreamLoader, load_stream
from savevm.qemufile import QEMUFile
from savevm.registry import SectionRegistry
from savevm.save import StreamWriter, save_stream
from tests.core.samples import (
    ChunkedLive,
    Counter,
    be32,
    counter_bytes,
    footer,
    header,
    part_end,
    start_full,
    vmdesc,
)
from tests.core.strategies import live_payloads

START, PART, END, FULL = 1, 2, 3, 4

COUNTER_VMDESC = (
    b'{"page_size": 4096, "devices": [{"name": "counter", "instance_id": 0, "vmsd_name": "counter", '
    b'"version": 3, "fields": [{"name": "value", "type": "uint32", "size": 4}, '
    b'{"name": "flags", "type": "uint8", "size": 1}], "subsections": [{"vmsd_name": "counter/hi", '
    b'"version": 1, "fields": [{"name": "hi", "type": "uint64", "size": 8}]}]}]}'
)


def source(data: bytes = b"L" * 1000, chunk: int = 300, counter: Counter | None = None,
           config: MigrationConfig | None = None) -> tuple[SectionRegistry, ChunkedLive]:
    reg = SectionRegistry(config)
    live = ChunkedLive(data, chunk)
    reg.register_live("blob", 0, 2, live)  # section id 0
    reg.register_device("counter", 0, counter if counter is not None else Counter(5, 1, 7))  # id 1
    return reg, live


def destination(config: MigrationConfig | None = None) -> tuple[SectionRegistry, ChunkedLive, Counter]:
    reg = SectionRegistry(config)
    live = ChunkedLive()
    dev = Counter(value=111, flags=22, hi=33)
    reg.register_live("blob", 0, 2, live)
    reg.register_device("counter", 0, dev)
    return reg, live, dev


def save_bytes(reg: SectionRegistry, config: MigrationConfig | None = None) -> bytes:
    ch = MemoryChannel()
    save_stream(QEMUFile(ch, writable=True), reg, config)
    return ch.getvalue()


def load_bytes(data: bytes, reg: SectionRegistry, **kw):  # noqa: ANN003, ANN201
    return load_stream(QEMUFile(MemoryChannel(data)), reg, **kw)


# ---------------------------------------------------------------- layout


def test_header_bytes() -> None:
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    StreamWriter(f, SectionRegistry()).header()
    f.flush()
    assert ch.getvalue() == bytes.fromhex("5145564d 00000003 07 00000006") + b"savevm"


def test_whole_stream_byte_layout() -> None:
    reg, live = source(b"".join(bytes([i]) * 300 for i in range(3)) + b"\x09" * 100, chunk=300)
    data = save_bytes(reg)
    assert live.iterations == 4, "three unfinished passes, then one that reports done"
    chunks = [bytes([0]) * 300, bytes([1]) * 300, bytes([2]) * 300, b"\x09" * 100]
    expected = (
        b"QEVM" + be32(3) + b"\x07" + be32(6) + b"savevm"
        # START: 01 be32(id) u8 len "blob" be32(instance) be32(version), payload, footer 7e be32(id)
        + b"\x01" + be32(1) + b"\x04blob" + be32(0) + be32(2) + be32(1000) + b"\x7e" + be32(1)
        # PART: 02 be32(id) payload footer
        + b"".join(b"\x02" + be32(1) + be32(len(c)) + c + b"\x7e" + be32(1) for c in chunks)
        # END with nothing left
        + b"\x03" + be32(1) + be32(0) + b"\x7e" + be32(1)
        # FULL: the device, its subsection, footer
        + b"\x04" + be32(2) + b"\x07counter" + be32(0) + be32(3)
        + be32(5) + b"\x01" + b"\x05\x0acounter/hi" + be32(1) + struct.pack(">Q", 7)
        + b"\x7e" + be32(2)
        + b"\x00"
        + b"\x06" + be32(len(COUNTER_VMDESC)) + COUNTER_VMDESC
    )
    assert data == expected
    # the helpers the error tests use agree with the layout above
    assert data.startswith(header() + start_full(START, 1, "blob", 0, 2))
    assert data.endswith(start_full(FULL, 2, "counter", 0, 3) + counter_bytes(5, 1, 7) + footer(2)
                         + b"\x00" + vmdesc(COUNTER_VMDESC))


def test_round_trip_memory_channel() -> None:
    payload = bytes(range(256)) * 4
    reg, src_live = source(payload, chunk=100)
    ch = MemoryChannel()
    w = StreamWriter(QEMUFile(ch, writable=True), reg)
    w.header()
    w.setup()
    passes = 1
    while not w.iterate():
        passes += 1
    assert passes == src_live.iterations == 11
    assert w.pending(0) == 0
    w.complete_precopy()
    data = ch.getvalue()

    dst, live, dev = destination()
    res = StreamLoader(QEMUFile(MemoryChannel(data)), dst).load()
    assert live.received == payload
    assert live.calls[0] == "load_setup" and live.calls[-1] == "load_cleanup"
    assert live.calls.count("load_state v2") == 1 + 11 + 1  # START, PARTs, END
    assert (dev.value, dev.flags, dev.hi) == (5, 1, 7)
    assert res.machine == "savevm"
    assert res.sections == [("blob", 0, 2), ("counter", 0, 3)]
    assert res.vmdesc == w.vmdesc == json.loads(COUNTER_VMDESC)
    assert res.bytes_read == len(data)


@settings(max_examples=40, deadline=None)
@given(payload=live_payloads())
def test_round_trip_any_payload(payload: bytes) -> None:
    reg, _ = source(payload, chunk=700, counter=Counter(len(payload), 0, 0))
    dst, live, dev = destination()
    load_bytes(save_bytes(reg), dst)
    assert live.received == payload
    assert (dev.value, dev.flags, dev.hi) == (len(payload), 0, 33), "hi not sent: destination keeps it"


def test_snapshot_restore_files(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "vm.state"
    reg, src_live = source()
    n = snapshot(path, reg)
    assert n == path.stat().st_size
    assert "save_cleanup" in src_live.calls
    dst, live, dev = destination()
    res = restore(path, dst)
    assert live.received == b"L" * 1000
    assert (dev.value, dev.flags, dev.hi) == (5, 1, 7)
    assert res.bytes_read == n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.state"]


def test_failed_snapshot_keeps_previous_file(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "vm.state"
    path.write_bytes(b"previous good snapshot")
    reg, _ = source(counter=Counter(value=1 << 40))  # does not fit uint32: the save fails
    with pytest.raises(MigrationError):
        snapshot(path, reg)
    assert path.read_bytes() == b"previous good snapshot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.state"]


def test_restore_missing_file(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(MigrationError):
        restore(tmp_path / "absent", SectionRegistry())


@pytest.mark.parametrize("changes", [
    {"send_configuration": False}, {"send_section_footer": False}, {"send_vmdesc": False},
    {"send_configuration": False, "send_section_footer": False, "send_vmdesc": False},
    {"machine": "pc-q35-7.2"},
])
def test_round_trip_migration_properties(changes: dict) -> None:
    cfg = attrs.evolve(MigrationConfig(), **changes)
    reg, _ = source(config=cfg)
    data = save_bytes(reg)
    if cfg.send_configuration:
        assert data[8:13] == b"\x07" + be32(len(cfg.machine))
    else:
        assert data[8] == START
    assert (b"\x7e" + be32(1) in data) == cfg.send_section_footer
    assert data.endswith(b"\x00") != cfg.send_vmdesc
    dst, live, dev = destination(cfg)
    load_bytes(data, dst)
    assert live.received == b"L" * 1000 and dev.value == 5


def test_rate_limited_save_still_completes() -> None:
    reg, live = source(b"x" * 50_000, chunk=5_000)
    f = QEMUFile(MemoryChannel(), writable=True, rate_limit=2_000_000)  # 200 KB per 100 ms window
    save_stream(f, reg)
    dst, got, _ = destination()
    load_bytes(f.channel.getvalue(), dst)
    assert got.received == b"x" * 50_000


# ---------------------------------------------------------------- loader errors


H = header()
S_DEV = start_full(FULL, 1, "counter", 0, 3)
BODY = counter_bytes(5, 1, 0)
DESC = vmdesc(b'{"page_size": 4096, "devices": []}')
VALID = H + S_DEV + BODY + footer(1) + b"\x00" + DESC


def device_only() -> tuple[SectionRegistry, Counter]:
    reg = SectionRegistry()
    dev = Counter(value=111, flags=22, hi=33)
    reg.register_device("counter", 0, dev)
    return reg, dev


def test_valid_hand_built_stream_loads() -> None:
    reg, dev = device_only()
    res = load_bytes(VALID, reg)
    assert (dev.value, dev.flags, dev.hi) == (5, 1, 33)
    assert res.bytes_read == len(VALID)


def with_device(idstr: str = "counter", instance: int = 0, version: int = 3) -> bytes:
    return H + start_full(FULL, 1, idstr, instance, version) + BODY + footer(1) + b"\x00"


VERSION_OFF = len(H) + 1 + 4 + 1 + len("counter") + 4

ERROR_CASES = {
    "bad magic": (b"QEVX" + VALID[4:], BadMagicError, 0),
    "version 2 (obsolete)": (b"QEVM" + be32(2) + VALID[8:], VersionMismatchError, 4),
    "version 4": (b"QEVM" + be32(4) + VALID[8:], VersionMismatchError, 4),
    "configuration missing": (b"QEVM" + be32(3) + S_DEV + BODY + footer(1) + b"\x00", CorruptStreamError, 8),
    "machine mismatch": (header("pc-q35-7.2") + VALID[len(H):], ConfigurationMismatchError, 9),
    "unknown idstr": (with_device(idstr="nosuch"), UnknownSectionError, len(H) + 5),
    "wrong instance": (with_device(instance=1), UnknownSectionError, len(H) + 5 + 1 + len("counter")),
    "part never started": (H + part_end(PART, 9) + be32(0) + footer(9), UnknownSectionError, len(H) + 1),
    "end never started": (H + part_end(END, 9) + be32(0) + footer(9), UnknownSectionError, len(H) + 1),
    "section version newer": (with_device(version=4), VersionMismatchError, VERSION_OFF),
    "device version below minimum": (with_device(version=1), VersionMismatchError, VERSION_OFF),
    "footer missing": (H + S_DEV + BODY + b"\x00", FooterMismatchError, len(H + S_DEV + BODY)),
    "footer id mismatch": (H + S_DEV + BODY + footer(2) + b"\x00", FooterMismatchError,
                           len(H + S_DEV + BODY) + 1),
    "unknown section type": (H + b"\x09" + VALID[len(H):], CorruptStreamError, len(H)),
    "subsection byte at top level": (H + b"\x05" + VALID[len(H):], CorruptStreamError, len(H)),
    "unknown byte after EOF": (VALID[:-len(DESC)] + b"\x42", TrailingDataError, len(VALID) - len(DESC)),
    "garbage after vmdesc": (VALID + b"junk", TrailingDataError, len(VALID)),
    "truncated in header": (VALID[:6], TruncatedStreamError, 4),
    "truncated in device": (H + S_DEV + BODY[:3], TruncatedStreamError, len(H + S_DEV)),
    "START for a device": (H + start_full(START, 1, "counter", 0, 3) + BODY + footer(1) + b"\x00",
                           CorruptStreamError, len(H)),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_loader_error(name: str) -> None:
    data, exc_type, offset = ERROR_CASES[name]
    reg, dev = device_only()
    with pytest.raises(StreamError) as ei:
        load_bytes(data, reg)
    assert type(ei.value) is exc_type, (type(ei.value), ei.value)
    assert ei.value.offset == offset, str(ei.value)
    assert f"offset {offset}" in str(ei.value)
    assert (dev.value, dev.flags, dev.hi) == (111, 22, 33), "a failed load commits nothing"


def test_loader_error_types_are_distinct() -> None:
    kinds = {BadMagicError, VersionMismatchError, CorruptStreamError, ConfigurationMismatchError,
             UnknownSectionError, FooterMismatchError, TrailingDataError, TruncatedStreamError}
    assert {t for _, t, _ in ERROR_CASES.values()} == kinds
    # a caller can tell them apart with except clauses in any order that respects subclassing
    for a in kinds:
        for b in kinds - {a}:
            assert a is not b


def test_obsolete_version_message() -> None:
    with pytest.raises(VersionMismatchError, match="obsolete"):
        load_bytes(ERROR_CASES["version 2 (obsolete)"][0], device_only()[0])


def test_full_for_a_live_section() -> None:
    reg = SectionRegistry()
    reg.register_live("blob", 0, 2, ChunkedLive())
    with pytest.raises(CorruptStreamError, match="live") as ei:
        load_bytes(H + start_full(FULL, 0, "blob", 0, 2) + be32(0) + footer(0) + b"\x00", reg)
    assert ei.value.offset == len(H)


def test_part_for_a_device_section() -> None:
    reg, _ = device_only()
    data = H + S_DEV + BODY + footer(1) + part_end(PART, 1) + footer(1) + b"\x00"
    with pytest.raises(CorruptStreamError) as ei:
        load_bytes(data, reg)
    assert ei.value.offset == len(H + S_DEV + BODY + footer(1))


def test_live_error_after_start_aborts_live_sections() -> None:
    reg, _ = source(b"abc" * 100, chunk=100)
    data = save_bytes(reg)
    dst, live, dev = destination()
    with pytest.raises(TrailingDataError):  # everything parsed, then one byte too many
        load_bytes(data + b"\x99", dst)
    assert "load_abort" in live.calls and live.calls[-1] == "load_cleanup"
    assert live.received is None
    assert (dev.value, dev.flags, dev.hi) == (111, 22, 33)


def test_vmdesc_errors() -> None:
    base = H + S_DEV + BODY + footer(1) + b"\x00"
    reg, _ = device_only()
    with pytest.raises(CorruptStreamError, match="JSON") as ei:
        load_bytes(base + vmdesc(b"{not json"), reg)
    assert ei.value.offset == len(base) + 5
    with pytest.raises(CorruptStreamError, match="vmdesc length") as ei:
        load_bytes(base + b"\x06" + be32(0xFFFFFFFF), reg)
    assert ei.value.offset == len(base) + 1


def test_trailing_data_allowed_when_not_required() -> None:
    reg, dev = device_only()
    res = load_bytes(VALID + b"more stream", reg, require_eof=False)
    assert dev.value == 5 and res.bytes_read == len(VALID)


def test_machine_name_length_bounded() -> None:
    with pytest.raises(CorruptStreamError) as ei:
        load_bytes(b"QEVM" + be32(3) + b"\x07" + be32(1 << 30), device_only()[0])
    assert ei.value.offset == 9


def cfg_sub(name: str, payload: bytes) -> bytes:
    n = name.encode()
    return b"\x05" + bytes([len(n)]) + n + be32(1) + payload


@pytest.mark.parametrize("sub,exc,ok", [
    (cfg_sub("configuration/target-page-bits", be32(12)), None, True),
    (cfg_sub("configuration/uuid", bytes(16)), None, True),
    (cfg_sub("configuration/target-page-bits", be32(16)), ConfigurationMismatchError, False),
    (cfg_sub("configuration/capabilities", be32(1) + b"\x0fx-ignore-shared"), ConfigurationMismatchError, False),
    (cfg_sub("configuration/capabilities", be32(1) + b"\x03abc"), ConfigurationMismatchError, False),
    (cfg_sub("configuration/capabilities", be32(1000)), CorruptStreamError, False),
    (cfg_sub("configuration/whatever", b""), UnknownSectionError, False),
])
def test_configuration_subsections(sub: bytes, exc: type | None, ok: bool) -> None:
    reg, dev = device_only()
    data = H + sub + VALID[len(H):]
    if ok:
        load_bytes(data, reg)
        assert dev.value == 5
    else:
        with pytest.raises(exc):
            load_bytes(data, reg)
        assert dev.value == 111


@pytest.mark.parametrize("cmd,ok", [
    (b"\x08" + struct.pack(">HH", 2, 4) + be32(1), True),  # PING
    (b"\x08" + struct.pack(">HH", 1, 0), True),  # OPEN_RETURN_PATH
    (b"\x08" + struct.pack(">HH", 2, 3) + b"abc", False),  # PING with the wrong length
    (b"\x08" + struct.pack(">HH", 0, 0), False),  # INVALID
    (b"\x08" + struct.pack(">HH", 99, 0), False),  # unknown
    (b"\x08" + struct.pack(">HH", 3, 0), False),  # POSTCOPY_ADVISE: not supported
])
def test_commands(cmd: bytes, ok: bool) -> None:
    reg, dev = device_only()
    data = H + cmd + VALID[len(H):]
    if ok:
        load_bytes(data, reg)
        assert dev.value == 5
    else:
        with pytest.raises(CorruptStreamError) as ei:
            load_bytes(data, reg)
        assert ei.value.offset == len(H)


# ---------------------------------------------------------------- truncation at every length


def test_every_truncation_is_a_stream_error() -> None:
    reg, _ = source(b"T" * 120, chunk=50, counter=Counter(9, 8, 7))
    data = save_bytes(reg)
    eof_end = len(data) - len(vmdesc(COUNTER_VMDESC))
    assert data[eof_end - 1] == 0
    for n in range(len(data)):
        dst, live, dev = destination()
        if n == eof_end:
            # a stream may end at EOF: the vmdesc is optional (suppress-vmdesc)
            load_bytes(data[:n], dst)
            assert live.received == b"T" * 120 and (dev.value, dev.flags, dev.hi) == (9, 8, 7)
            continue
        try:
            load_bytes(data[:n], dst)
        except StreamError as exc:
            if isinstance(exc, TruncatedStreamError):
                assert exc.offset is not None and exc.offset <= n
        else:
            pytest.fail(f"a stream cut at {n} of {len(data)} bytes loaded")
        assert (dev.value, dev.flags, dev.hi) == (111, 22, 33), f"cut at {n}: device state committed"
        assert live.received is None
    dst, live, dev = destination()
    load_bytes(data, dst)
    assert (dev.value, dev.flags, dev.hi) == (9, 8, 7)
