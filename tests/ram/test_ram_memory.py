"""Fresh destination memory: zero pages that allocate nothing, mem-prealloc, owned blocks."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import savevm
from savevm.channels import memory_pipe
from savevm.config import MigrationConfig
from savevm_ram import RAMBlock, RAMList, register_ram
from savevm_ram.memory import populate

P = 4096
MIB = 1 << 20
HAVE_PAGEMAP = Path("/proc/self/pagemap").exists()


def resident(host: np.ndarray) -> int:
    """Resident bytes of exactly ``host``'s pages (present bits from /proc/self/pagemap).

    Per page, not per mapping: the kernel merges neighbouring mappings with the
    same flags (another test's block, not yet collected), and their resident
    memory must not count here.  (smaps' Rss, per mapping, did count it.)
    """
    page = mmap.PAGESIZE
    lo = host.ctypes.data // page
    hi = (host.ctypes.data + host.nbytes + page - 1) // page
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(lo * 8)
        raw = fh.read((hi - lo) * 8)
    entries = np.frombuffer(raw, dtype="<u8")
    # present (bit 63) and exclusively mapped (bit 56): a page read but never written maps the
    # kernel's shared zero page, which is present but not ours
    ours = (entries >> np.uint64(63)) & (entries >> np.uint64(56)) & np.uint64(1)
    return int(np.count_nonzero(ours)) * page


def transfer(src: RAMList, dst: RAMList, config: MigrationConfig | None = None) -> None:
    """save_stream of ``src`` -> load_stream into ``dst`` through an in-memory stream."""
    cfg = config or MigrationConfig()
    out = savevm.SectionRegistry(cfg)
    register_ram(out, src)
    wch, rch = memory_pipe(max_buffered=256 << 20)
    f = savevm.QEMUFile(wch, writable=True)
    savevm.save_stream(f, out)
    f.close()
    inc = savevm.SectionRegistry(cfg)
    register_ram(inc, dst)
    savevm.load_stream(savevm.QEMUFile(rch), inc)


def test_zero_pages_overwrite_stale_data() -> None:
    """A zero record still clears a page that holds something (fast and general path alike)."""
    src = np.zeros(300 * P, dtype=np.uint8)
    src[5 * P] = 1  # breaks the zero run: the next zero record starts a new fast run
    dst = np.random.default_rng(3).integers(1, 256, 300 * P, dtype=np.uint8)
    transfer(RAMList([RAMBlock("m", src)]), RAMList([RAMBlock("m", dst)]))
    assert np.array_equal(src, dst)


def test_zero_pages_scattered_overwrite_stale_data() -> None:
    """Zero records for scattered pages (not one contiguous run) clear exactly those pages."""
    src = np.zeros(2048 * P, dtype=np.uint8).reshape(-1, P)
    src[::3, 7] = 9  # every third page non-zero: zero records come in runs of two
    dst = np.full_like(src, 0xAA)
    transfer(RAMList([RAMBlock("m", src.reshape(-1))]), RAMList([RAMBlock("m", dst.reshape(-1))]))
    assert np.array_equal(src, dst)


@pytest.mark.skipif(not HAVE_PAGEMAP, reason="needs /proc/self/pagemap (Linux) to see what is resident")
def test_zero_pages_into_fresh_memory_allocate_nothing() -> None:
    """QEMU's is_zero_range check: zero pages loaded into untouched memory leave it untouched."""
    size = 64 * MIB
    src = np.zeros(size, dtype=np.uint8)
    src[size // 2 : size // 2 + P] = 7  # one real page, so the block is not entirely skipped
    dst = RAMBlock.allocate("m", size)
    assert resident(dst.host) == 0
    transfer(RAMList([RAMBlock("m", src)]), RAMList([dst]))
    assert np.array_equal(src, dst.host)
    assert resident(dst.host) <= 4 * MIB  # the one written page (a huge page at most), not 64 MiB


def test_allocated_block_is_zero_and_owned() -> None:
    b = RAMBlock.allocate("a", 10 * P, used_length=8 * P)
    assert b.owned and b.max_length == 10 * P and b.used_length == 8 * P
    assert not b.host.any()
    assert not RAMBlock("b", bytearray(P)).owned


def test_replace_memory_keeps_the_bytes() -> None:
    b = RAMBlock.allocate("a", 64 * P)
    b.host[3 * P + 5] = 1
    b.host[40 * P] = 2
    new = bytearray(64 * P)
    b.replace_memory(new)
    assert new[3 * P + 5] == 1 and new[40 * P] == 2
    b.write(0, b"x")
    assert new[0] == ord("x")


def test_replace_memory_refused_for_program_memory_and_small_buffers() -> None:
    with pytest.raises(savevm.RegistrationError, match="only a block the RAM plugin allocated"):
        RAMBlock("a", bytearray(P)).replace_memory(bytearray(P))
    with pytest.raises(savevm.RegistrationError, match="must be writable and hold"):
        RAMBlock.allocate("a", 2 * P).replace_memory(bytearray(P))
    with pytest.raises(savevm.RegistrationError, match="read-only"):
        RAMBlock.allocate("a", P).replace_memory(bytes(P))


@pytest.mark.skipif(not HAVE_PAGEMAP, reason="needs /proc/self/pagemap (Linux) to see what is resident")
def test_mem_prealloc_faults_in_without_changing_bytes() -> None:
    b = RAMBlock.allocate("a", 16 * MIB)
    b.host[P + 1] = 5
    ram = RAMList([b], mem_prealloc=True)
    assert ram.wait_prealloc(30)
    assert resident(b.host) >= 16 * MIB
    assert b.host[P + 1] == 5 and int(np.count_nonzero(b.host)) == 1


@pytest.mark.skipif(not HAVE_PAGEMAP, reason="needs /proc/self/pagemap (Linux) to see what is resident")
def test_mem_prealloc_from_config_and_for_blocks_added_later() -> None:
    ram = RAMList([RAMBlock.allocate("a", 4 * MIB)])
    reg = savevm.SectionRegistry(MigrationConfig(mem_prealloc=True))
    register_ram(reg, ram)
    late = ram.add(RAMBlock.allocate("b", 2 * MIB))
    assert ram.wait_prealloc(30)
    assert resident(ram.find("a").host) >= 4 * MIB  # type: ignore[union-attr]
    assert resident(late.host) >= 2 * MIB


@pytest.mark.skipif(not HAVE_PAGEMAP, reason="needs /proc/self/pagemap (Linux) to see what is resident")
def test_mem_prealloc_on_an_empty_list_covers_blocks_added_later() -> None:
    ram = RAMList(mem_prealloc=True)
    b = ram.add(RAMBlock.allocate("a", 2 * MIB))
    assert ram.wait_prealloc(30)
    assert resident(b.host) >= 2 * MIB


def test_mem_prealloc_load_is_correct() -> None:
    """A load may run while prealloc still faults pages in: populate never changes a byte."""
    src = np.random.default_rng(5).integers(0, 256, 32 * MIB, dtype=np.uint8)
    dst = RAMList([RAMBlock.allocate("m", 32 * MIB)], mem_prealloc=True)
    transfer(RAMList([RAMBlock("m", src)]), dst)
    assert np.array_equal(src, dst[0].host)


def test_populate_reports_what_it_did() -> None:
    b = RAMBlock.allocate("a", 4 * MIB)
    assert populate(b.host, 0, 4 * MIB) in (True, False)  # False only on kernels without the advice
    assert populate(b.host, 0, 0) is False
    assert not b.host.any()


def test_mem_prealloc_config_key_and_cli_flag() -> None:
    from savevm.cli import build_config, make_parser

    assert MigrationConfig.from_dict({"mem-prealloc": True}).mem_prealloc
    assert MigrationConfig().as_dict()["mem-prealloc"] is False
    args = make_parser().parse_args(["incoming", "tcp:127.0.0.1:0", "--guest", "m:f", "--mem-prealloc"])
    assert build_config(args).mem_prealloc
    args = make_parser().parse_args(["incoming", "tcp:127.0.0.1:0", "--guest", "m:f"])
    assert not build_config(args).mem_prealloc


@given(kinds=st.lists(st.sampled_from(["zero", "first", "last", "middle", "full"]), min_size=1, max_size=40),
       byte=st.integers(1, 255))
@settings(max_examples=60, deadline=None)
def test_zero_pages_matches_a_byte_by_byte_check(kinds: list[str], byte: int) -> None:
    """The vectorised zero check (all-zero fast path, first-word filter) agrees with the obvious one."""
    from savevm_ram.pipeline import zero_pages

    data = np.zeros((len(kinds), P), dtype=np.uint8)
    for i, k in enumerate(kinds):
        if k == "first":
            data[i, 0] = byte
        elif k == "last":
            data[i, -1] = byte  # first word zero: only the full check sees it
        elif k == "middle":
            data[i, P // 2 + 3] = byte
        elif k == "full":
            data[i] = byte
    assert zero_pages(data).tolist() == [not row.any() for row in data]


# ---------------------------------------------------------------- prefault while waiting


def test_discard_makes_a_private_range_zero_and_releases_it() -> None:
    from savevm_ram.memory import discard

    b = RAMBlock.allocate("a", 8 * MIB)
    b.host[:] = 0x5A
    assert discard(b.host, 2 * MIB, 4 * MIB)
    assert not b.host[2 * MIB : 6 * MIB].any()
    assert (b.host[: 2 * MIB] == 0x5A).all() and (b.host[6 * MIB :] == 0x5A).all()
    if HAVE_PAGEMAP:
        assert resident(b.host) <= 4 * MIB + 64 * 1024
    assert discard(b.host, 0, 0) is False
    assert discard(b.host, 1, 10)  # nothing whole inside: nothing to do, nothing changed
    assert b.host[1] == 0x5A


@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_zero_runs_into_a_discardable_block_equal_the_source(data: st.DataObject) -> None:
    """Zero runs of any length and alignment over stale data: whole huge pages are discarded, the
    edges scanned and written, and the result is exactly the source, byte for byte."""
    pages = 2048  # 8 MiB: several huge pages
    lo = data.draw(st.integers(0, pages - 1), label="first zero page")
    hi = data.draw(st.integers(lo + 1, pages), label="end of the zero run")
    src = np.full((pages, P), 3, dtype=np.uint8)
    src[lo:hi] = 0
    dst = RAMBlock.allocate("m", pages * P)
    assert dst.discardable
    dst.host.reshape(pages, P)[:, ::512] = 0xEE  # stale data everywhere
    transfer(RAMList([RAMBlock("m", src.reshape(-1))]), RAMList([dst]))
    assert np.array_equal(src.reshape(-1), dst.host)


@pytest.mark.skipif(not HAVE_PAGEMAP, reason="needs /proc/self/pagemap (Linux) to see what is resident")
def test_prefault_while_waiting_then_zero_pages_give_the_memory_back() -> None:
    size = 32 * MIB
    dst = RAMList([RAMBlock.allocate("m", size)])
    assert dst.prefault_while_waiting()
    assert dst._waiting is not None and dst._waiting.wait(30)
    if dst._waiting.faulted:  # kernels without MADV_POPULATE_WRITE fault nothing ahead
        assert resident(dst[0].host) >= size - 4 * MIB
    src = np.zeros(size, dtype=np.uint8)
    src[size // 2 : size // 2 + P] = 7
    transfer(RAMList([RAMBlock("m", src)]), dst)
    assert np.array_equal(src, dst[0].host)
    assert resident(dst[0].host) <= 4 * MIB  # the one real page's huge page, not 32 MiB


def test_prefault_while_waiting_stops_at_the_first_zero_page_only() -> None:
    dst = RAMList([RAMBlock.allocate("m", 64 * MIB)])
    assert dst.prefault_while_waiting()
    w = dst._waiting
    assert w is not None
    # data pages: the prefault keeps running ahead of the load (populate never changes a byte)
    src = np.random.default_rng(9).integers(1, 256, 64 * MIB, dtype=np.uint8)
    transfer(RAMList([RAMBlock("m", src)]), dst)
    assert np.array_equal(src, dst[0].host)
    assert not dst._waiting_stopped
    # a zero page: from here on faulting in would only fault in what zero pages give back
    src[: 8 * MIB] = 0
    transfer(RAMList([RAMBlock("m", src)]), dst)
    assert np.array_equal(src, dst[0].host)
    assert dst._waiting_stopped and w.wait(5)
    dst.stop_waiting()  # once: a second call changes nothing


def test_prefault_while_waiting_is_only_for_memory_it_may_give_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import savevm_ram.block as block_mod

    # a program's own buffer: never touched, never discarded
    assert not RAMList([RAMBlock("m", np.zeros(4 * MIB, dtype=np.uint8))]).prefault_while_waiting()
    # mem-prealloc already faults (and keeps) everything
    keep = RAMList([RAMBlock.allocate("m", 4 * MIB)], mem_prealloc=True)
    assert not keep.prefault_while_waiting() and not keep.zero_by_discard
    # more than half of what the machine has available: skipped rather than pushing it into swap
    monkeypatch.setattr(block_mod, "mem_available", lambda: 6 * MIB)
    assert not RAMList([RAMBlock.allocate("m", 4 * MIB)]).prefault_while_waiting()
    monkeypatch.setattr(block_mod, "mem_available", lambda: 16 * MIB)
    ok = RAMList([RAMBlock.allocate("m", 4 * MIB)])
    assert ok.prefault_while_waiting() and ok.zero_by_discard
    assert not ok.prefault_while_waiting()  # once


def test_prefault_config_key_and_incoming_default(tmp_path: Path) -> None:
    from savevm.cli import build_config, make_parser

    assert MigrationConfig().prefault_while_waiting is None
    assert "prefault-while-waiting" not in MigrationConfig().as_dict()
    assert MigrationConfig.from_dict({"prefault-while-waiting": False}).prefault_while_waiting is False
    p = make_parser()
    assert build_config(p.parse_args(["incoming", "tcp:127.0.0.1:0", "--guest", "m:f"])).prefault_while_waiting
    off = p.parse_args(["incoming", "tcp:127.0.0.1:0", "--guest", "m:f", "--no-prefault"])
    assert build_config(off).prefault_while_waiting is False
    toml = tmp_path / "c.toml"
    toml.write_text("prefault-while-waiting = false\n")
    from_file = p.parse_args(["incoming", "tcp:127.0.0.1:0", "--guest", "m:f", "--config", str(toml)])
    assert build_config(from_file).prefault_while_waiting is False
    # the source side is never asked to prefault
    assert build_config(p.parse_args(["migrate", "tcp:127.0.0.1:1", "--guest", "m:f"])).prefault_while_waiting is None


def test_register_ram_starts_prefault_while_waiting_from_config() -> None:
    ram = RAMList([RAMBlock.allocate("m", 4 * MIB)])
    register_ram(savevm.SectionRegistry(MigrationConfig(prefault_while_waiting=True)), ram)
    assert ram._waiting is not None
    ram.stop_waiting()
    idle = RAMList([RAMBlock.allocate("m", 4 * MIB)])
    register_ram(savevm.SectionRegistry(MigrationConfig()), idle)
    assert idle._waiting is None


@given(data=st.data())
@settings(max_examples=25, deadline=None)
def test_discarding_zero_spans_across_iterations_matches_the_source(data: st.DataObject) -> None:
    """Several passes that turn pages into zeros and back, through rate-limited chunks (runs cut
    anywhere), into a prefaulted discardable block: the destination ends equal to the source."""
    from savevm.save import StreamWriter

    pages = 1536  # 6 MiB: three huge pages, and edges inside them
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    mem = np.zeros((pages, P), dtype=np.uint8)
    live = data.draw(st.lists(st.tuples(st.integers(0, pages - 1), st.integers(1, 700)), max_size=6), label="data")
    for lo, n in live:
        mem[lo : lo + n, ::97] = rng.integers(1, 256, (min(n, pages - lo), len(range(0, P, 97))), dtype=np.uint8)
    src_block = RAMBlock("m", mem.reshape(-1))
    reg = savevm.SectionRegistry(MigrationConfig())
    register_ram(reg, RAMList([src_block]))
    ch, rch = memory_pipe(max_buffered=256 << 20)
    f = savevm.QEMUFile(ch, writable=True, rate_limit=data.draw(st.sampled_from([0, 300_000, 1 << 20])))
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    passes = data.draw(st.lists(st.tuples(st.integers(0, pages - 1), st.integers(1, 900), st.booleans()),
                                max_size=4), label="passes")
    for lo, n, zero in [*passes, (0, 0, False)]:
        for _ in range(200):
            f.reset_rate_limit()
            if w.iterate():
                break
        hi = min(pages, lo + n)
        if hi > lo:
            shape = (hi - lo, P)
            body = np.zeros(shape, dtype=np.uint8) if zero else rng.integers(1, 256, shape, dtype=np.uint8)
            src_block.write(lo * P, body.reshape(-1))
        w.pending(1 << 40)
    f.set_rate_limit(0)
    w.complete_precopy()
    w.cleanup()
    f.close()
    dst = RAMList([RAMBlock.allocate("m", pages * P)])
    dst[0].host.reshape(pages, P)[:, ::1024] = 0x77  # stale bytes the stream must clear or overwrite
    dst.prefault_while_waiting()  # where populate is missing it does not start; discards happen either way
    inc = savevm.SectionRegistry(MigrationConfig())
    register_ram(inc, dst)
    savevm.load_stream(savevm.QEMUFile(rch), inc)
    assert np.array_equal(dst[0].host, mem.reshape(-1))
