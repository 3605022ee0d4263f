"""``savevm rewrite REF OUT --ram BLOCK=FILE``: REF's stream, blocks replaced, written safely."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import savevm
import savevm_ram
from savevm.cli import main
from savevm.vmdesc import read_vmdesc
from savevm_ram.demo import DemoDevice
from tests.cli import streams
from tests.cli.streams import PAGE, sd


@pytest.fixture()
def ref(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    p = tmp_path / "ref.qevm"
    return p, streams.with_codecs(p)


def _restore(path: Path, blocks: dict[str, int]) -> tuple[dict[str, bytes], DemoDevice]:
    """Load ``path`` with savevm's own loader into fresh blocks and a fresh device."""
    bufs = {name: bytearray(n) for name, n in blocks.items()}
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock(n, b) for n, b in bufs.items()]))
    dev = DemoDevice()
    reg.register_device("demo-device", 0, dev)
    savevm.restore(path, reg)
    return {n: bytes(b) for n, b in bufs.items()}, dev


def test_rewrite_replaces_one_block_and_keeps_the_rest(ref: Any, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path, blocks = ref
    new = np.frombuffer(np.random.default_rng(5).bytes(blocks["a"].nbytes), dtype=np.uint8).copy()
    new[PAGE : 3 * PAGE] = 0  # zero pages go out as ZERO records
    src = tmp_path / "a.bin"
    src.write_bytes(new.tobytes())
    out = tmp_path / "out.qevm"
    assert main(["rewrite", str(path), str(out), "--ram", f"a={src}", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["device_sections"] == 1 and summary["zero"] + summary["normal"] == (new.nbytes
                                                                                      + blocks["b"].nbytes) // PAGE
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and not Path(str(out) + ".part").exists()
    mem, dev = _restore(out, {n: m.nbytes for n, m in blocks.items()})
    assert mem["a"] == new.tobytes() and mem["b"] == blocks["b"].tobytes()
    assert dev.counter == 3 and dev.writes == 2  # the device came through

    ref_dump, out_dump = sd.parse_stream(path.read_bytes()), sd.parse_stream(out.read_bytes())
    assert out_dump.machine == ref_dump.machine and out_dump.ram_blocks == ref_dump.ram_blocks
    assert out_dump.configuration_raw == ref_dump.configuration_raw
    # the device section byte for byte, and the vmdesc too
    (rf,), (of,) = ref_dump.full_sections(), out_dump.full_sections()
    ref_bytes, out_bytes = path.read_bytes(), out.read_bytes()
    assert out_bytes[of.offset : of.data_offset + of.data_length + 5] == \
        ref_bytes[rf.offset : rf.data_offset + rf.data_length + 5]
    assert out_bytes[out_dump.vmdesc_offset :] == ref_bytes[ref_dump.vmdesc_offset :]
    # one image: every page once, as ZERO or PAGE, no codec records; the same RAM section id
    assert out_dump.ram_flag_counts["ZERO"] + out_dump.ram_flag_counts["PAGE"] == sum(
        n for _, n in out_dump.ram_blocks) // PAGE
    assert out_dump.ram_name_count == len(out_dump.ram_blocks)
    assert {s.section_id for s in out_dump.sections if s.idstr == "ram"} == \
        {s.section_id for s in ref_dump.sections if s.idstr == "ram"}
    assert [s.type_name for s in out_dump.sections] == ["START", "PART", "END", "FULL"]


def test_rewrite_without_replacements_normalises(ref: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, blocks = ref
    out = tmp_path / "same.qevm"
    assert main(["rewrite", str(path), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    mem, _ = _restore(out, {n: m.nbytes for n, m in blocks.items()})
    assert mem == {n: m.tobytes() for n, m in blocks.items()}


def test_ram_only_leaves_the_devices_out(ref: Any, tmp_path: Path) -> None:
    path, blocks = ref
    out = tmp_path / "ramonly.qevm"
    assert main(["rewrite", str(path), str(out), "--ram-only"]) == 0
    dump = sd.parse_stream(out.read_bytes())
    assert dump.full_sections() == [] and read_vmdesc(out) == {"page_size": PAGE, "devices": []}
    bufs = {n: bytearray(m.nbytes) for n, m in blocks.items()}
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock(n, b) for n, b in bufs.items()]))
    savevm.restore(out, reg)
    assert {n: bytes(b) for n, b in bufs.items()} == {n: m.tobytes() for n, m in blocks.items()}


def test_rewrite_refuses_what_does_not_fit(ref: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, blocks = ref
    short = tmp_path / "short.bin"
    short.write_bytes(bytes(blocks["a"].nbytes - 1))
    out = tmp_path / "out.qevm"
    cases = {
        ("--ram", f"a={short}"): f"is {blocks['a'].nbytes - 1} bytes, RAMBlock 'a' is {blocks['a'].nbytes} bytes",
        ("--ram", f"zz={short}"): "REF has no RAMBlock 'zz' (its blocks: 'a', 'b')",
        ("--ram", "a"): "expected BLOCK=FILE",
        ("--ram", f"a={tmp_path / 'missing'}"): "cannot read",
        ("--ram", f"a={short}", "--ram", f"a={short}"): "given twice",
    }
    for argv, msg in cases.items():
        assert main(["rewrite", str(path), str(out), *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv
        assert not out.exists() and not Path(str(out) + ".part").exists()
    damaged = tmp_path / "damaged.qevm"
    damaged.write_bytes(path.read_bytes()[:3000])
    assert main(["rewrite", str(damaged), str(out)]) == 2
    assert "cannot be rewritten: stream ended" in capsys.readouterr().err


def test_rewrite_writes_safely(ref: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = ref
    out = tmp_path / "out.qevm"
    part = Path(str(out) + ".part")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    part.symlink_to(victim)  # a planted symlink where the .part goes is not followed
    assert main(["rewrite", str(path), str(out)]) == 2
    assert ".part' exists" in capsys.readouterr().err and victim.read_bytes() == b"keep" and not out.exists()
    part.unlink()
    out.write_bytes(b"old")
    # a failure half-way leaves OUT as it was and no .part behind
    from savevm_ram import image

    def boom(*a: Any, **kw: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image, "put_block_pages", boom)
    assert main(["rewrite", str(path), str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == b"old" and not part.exists()
    monkeypatch.undo()
    assert main(["rewrite", str(path), str(out)]) == 0
    assert out.read_bytes()[:4] == b"QEVM"


def test_rewrite_keeps_a_qemu_like_block_order(tmp_path: Path) -> None:
    """REF's block list order is kept, whatever the sizes (QEMU orders by max_length, not used length)."""
    p = tmp_path / "ref.mig"
    blocks = {"pc.ram": 4 * PAGE, "/rom@etc/acpi/tables": PAGE, "pc.bios": 2 * PAGE}
    streams.hand_made(p, blocks, {("pc.bios", PAGE): b"B" * PAGE})
    f = tmp_path / "ram.bin"
    f.write_bytes(b"R" * 4 * PAGE)
    out = tmp_path / "out.mig"
    assert main(["rewrite", str(p), str(out), "--ram", f"pc.ram={f}"]) == 0
    dump = sd.parse_stream(out.read_bytes(), keep_pages=True)
    assert dump.ram_blocks == list(blocks.items())
    assert dump.pages[("pc.bios", PAGE)] == b"B" * PAGE and dump.pages[("pc.ram", 3 * PAGE)] == b"R" * PAGE
    assert dump.vmdesc is None and dump.machine == "pc-q35-7.2"  # REF had none, and no devices
    assert os.path.getsize(out) == len(out.read_bytes())


def test_rewrite_drops_commands(tmp_path: Path) -> None:
    p = tmp_path / "ref.mig"
    data = streams.hand_made(p, {"pc.ram": PAGE}, {("pc.ram", 0): b"c" * PAGE})
    cfg_end = 8 + 1 + 4 + len("pc-q35-7.2")
    p.write_bytes(data[:cfg_end] + b"\x08\x00\x01\x00\x00" + data[cfg_end:])  # OPEN_RETURN_PATH
    out = tmp_path / "out.mig"
    assert main(["rewrite", str(p), str(out)]) == 0
    dump = sd.parse_stream(out.read_bytes(), keep_pages=True)
    assert dump.commands == [] and dump.pages[("pc.ram", 0)] == b"c" * PAGE
