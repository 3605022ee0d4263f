"""``savevm analyze``: every option, checked against an independent parse and against hostile input."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savevm
import savevm_ram
from savevm.channels import MemoryChannel
from savevm.cli import main
from savevm.cli.analyze import StreamSource, analyze
from savevm.qemufile import QEMUFile
from savevm.save import save_stream
from savevm.vmdesc import read_vmdesc
from tests.cli import streams
from tests.cli.streams import PAGE, sd

KIND_NAMES = {"zero": "ZERO", "normal": "PAGE", "xbzrle": "XBZRLE", "compressed": "COMPRESS_PAGE"}


def _json(capsys: pytest.CaptureFixture[str], *argv: str, rc: int = 0) -> Any:
    assert main(["analyze", *argv]) == rc
    return json.loads(capsys.readouterr().out)


def _run(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "savevm.cli", *args], capture_output=True, text=True,
                          timeout=120, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    d = tmp_path_factory.mktemp("streams")
    return {"plain": (d / "plain.qevm", streams.plain(d / "plain.qevm")),
            "codecs": (d / "codecs.qevm", streams.with_codecs(d / "codecs.qevm"))}


# ---------------------------------------------------------------- the summary, against streamdump
@pytest.mark.parametrize("name", ["plain", "codecs"])
def test_summary_agrees_with_an_independent_parse(name: str, files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = files[name]
    data = path.read_bytes()
    dump = sd.parse_stream(data)
    rep = _json(capsys, str(path), "--json")
    assert rep["status"] == "ok" and rep["bytes"] == len(data)
    assert [(s["type"], s["section_id"], s["idstr"], s["instance_id"], s["version_id"], s["offset"])
            for s in rep["sections"]] == [(s.type_name, s.section_id, s.idstr, s.instance_id, s.version_id, s.offset)
                                          for s in dump.sections]
    # a section runs from its type byte through its footer: header + data + 5
    for s, d in zip(rep["sections"], dump.sections):
        assert s["size"] == d.data_offset - d.offset + d.data_length + 5
    assert [(b["idstr"], b["used_length"]) for b in rep["ram"]["blocks"]] == dump.ram_blocks
    assert rep["ram"]["total"] == dump.ram_total
    for kind, flag in KIND_NAMES.items():
        assert rep["ram"]["records"][kind] == {"count": dump.ram_flag_counts[flag],
                                               "bytes": dump.ram_kind_bytes[flag]}, kind
    assert rep["ram"]["block_names"] == {"count": dump.ram_name_count, "bytes": dump.ram_name_bytes}
    assert rep["ram"]["zero"] == dump.ram_flag_counts["ZERO"] and rep["ram"]["normal"] == dump.ram_flag_counts["PAGE"]
    assert rep["vmdesc"] and rep["vmdesc_offset"] == dump.vmdesc_offset
    assert rep["vmdesc_bytes"] == len(data) - dump.vmdesc_offset - 5
    if name == "codecs":
        assert rep["ram"]["records"]["xbzrle"]["count"] > 0 and rep["ram"]["records"]["compressed"]["count"] > 0


def test_savevm_codec_records_are_counted(tmp_path: Path) -> None:
    from tests.ram.test_ram_ext_codec import FillPlugin, _memory

    src = _memory(1)
    plug = FillPlugin()
    host = savevm.PluginHost()
    host.register(plug, name="fill")
    reg = host.new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("m", src)]))
    ch = MemoryChannel()
    f = QEMUFile(ch, writable=True)
    save_stream(f, reg)
    f.flush()
    path = tmp_path / "fill.qevm"
    path.write_bytes(ch.getvalue())
    reader = savevm.PluginHost()
    reader.register(FillPlugin(), name="fill")
    with StreamSource(str(path)) as s:
        rep = analyze(s, plugins=reader).report
    assert rep["status"] == "ok"
    n = plug.codecs[-1].encoded
    assert rep["ram"]["records"]["savevm-codec"] == {"count": n, "bytes": n * (8 + 1 + 1)}  # header, id, fill
    assert rep["ram"]["encoded"] == n
    # without the plugin: refused at setup, by name, with the offset
    with StreamSource(str(path)) as s:
        rep = analyze(s).report
    assert rep["status"] == "error" and "'fill'" in rep["error"] and rep["offset"] is not None


# ---------------------------------------------------------------- --dump-devices / --dump-vmdesc
def test_dump_devices_decodes_the_device(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = files["plain"]
    assert main(["analyze", str(path), "--dump-devices"]) == 0
    (dev,) = json.loads(capsys.readouterr().out)
    assert (dev["name"], dev["instance_id"], dev["version_id"], dev["vmsd_name"]) == (
        "demo-device", 0, 2, "demo-device")
    values = {f["name"]: f["value"] for f in dev["fields"]}
    assert values == {"counter": 5, "seed": 0xABCDEF, "label_len": 4, "label": b"demo".hex(),
                      "regs": [1, 2, 3, 4, 5, 6, 7, 8], "throttle": 0}
    (sub,) = dev["subsections"]
    assert sub["vmsd_name"] == "demo-device/stats" and sub["fields"][0]["value"] == 3
    # its size is the FULL section's data exactly, as the independent parser walked it
    (full,) = sd.parse_stream(path.read_bytes()).full_sections()
    assert (dev["offset"], dev["size"]) == (full.data_offset, full.data_length)
    assert [f["offset"] for f in dev["fields"]][:3] == [full.data_offset, full.data_offset + 8, full.data_offset + 12]


def test_dump_vmdesc_and_json_holding_both(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = files["plain"]
    assert main(["analyze", str(path), "--dump-vmdesc"]) == 0
    assert json.loads(capsys.readouterr().out) == read_vmdesc(path)
    rep = _json(capsys, str(path), "--json", "--dump-vmdesc", "--dump-devices")
    assert rep["vmdesc_json"] == read_vmdesc(path) and rep["devices"][0]["name"] == "demo-device"
    assert rep["sections"][-1]["how"] == "decoded (vmdesc)"
    # two documents on stdout would be one too many
    assert main(["analyze", str(path), "--dump-vmdesc", "--dump-devices"]) == 2
    assert "needs --json" in capsys.readouterr().err


def test_dump_vmdesc_without_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bare.mig"
    streams.hand_made(p, {"pc.ram": 4 * PAGE}, {("pc.ram", 0): b"\x01" * PAGE})
    assert main(["analyze", str(p), "--dump-vmdesc"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and "has no vmdesc" in cap.err


def test_device_sizes_must_add_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = struct.pack(">IH", 7, 9)
    desc = {"page_size": PAGE, "devices": [{"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1,
                                            "fields": [{"name": "a", "type": "uint32", "size": 4},
                                                       {"name": "b", "type": "uint16", "size": 2}]}]}
    p = tmp_path / "dev.mig"
    data = streams.hand_made(p, {"pc.ram": PAGE}, {}, devices=streams.full_section(5, "dev", 0, 1, body), vmdesc=desc)
    dev_at = data.index(body)
    rep = _json(capsys, str(p), "--json", "--dump-devices")
    assert rep["status"] == "ok" and [f["value"] for f in rep["devices"][0]["fields"]] == [7, 9]
    # the vmdesc says one byte less than the section holds: the footer is not where it must be
    desc["devices"][0]["fields"][1]["size"] = 1
    streams.hand_made(p, {"pc.ram": PAGE}, {}, devices=streams.full_section(5, "dev", 0, 1, body), vmdesc=desc)
    for argv in (["--json"], ["--json", "--dump-devices"]):
        rep = _json(capsys, str(p), *argv, rc=1)
        assert rep["status"] == "error" and "missing section footer for 'dev'" in rep["error"]
        assert rep["offset"] == dev_at + 5
    # one byte more: the footer is read as data, and the next byte is not a footer either
    desc["devices"][0]["fields"][1]["size"] = 3
    streams.hand_made(p, {"pc.ram": PAGE}, {}, devices=streams.full_section(5, "dev", 0, 1, body), vmdesc=desc)
    rep = _json(capsys, str(p), "--json", "--dump-devices", rc=1)
    assert "footer" in rep["error"] and rep["offset"] == dev_at + 7
    # a struct whose described size disagrees with its fields
    desc["devices"][0]["fields"] = [{"name": "s", "type": "struct", "size": 5, "struct": {
        "vmsd_name": "s", "version": 1, "fields": [{"name": "a", "type": "uint32", "size": 4},
                                                   {"name": "b", "type": "uint16", "size": 2}]}}]
    streams.hand_made(p, {"pc.ram": PAGE}, {}, devices=streams.full_section(5, "dev", 0, 1, body), vmdesc=desc)
    rep = _json(capsys, str(p), "--json", "--dump-devices", rc=1)
    assert "dev.s is 5 bytes, but the fields and subsections it describes take 6" in rep["error"]
    assert rep["offset"] == dev_at


def test_device_without_a_description(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "dev.mig"
    streams.hand_made(p, {"pc.ram": PAGE}, {}, devices=streams.full_section(5, "dev", 0, 1, b"\x01\x02"))
    rep = _json(capsys, str(p), "--json", rc=1)
    assert "'dev' instance 0: the stream has no vmdesc" in rep["error"]
    streams.hand_made(p, {"pc.ram": PAGE}, {}, devices=streams.full_section(5, "dev", 0, 1, b"\x01\x02"),
                      vmdesc={"page_size": PAGE, "devices": []})
    rep = _json(capsys, str(p), "--json", rc=1)
    assert "does not describe it in its vmdesc" in rep["error"]


# ---------------------------------------------------------------- --extract-ram
def test_extract_ram_writes_what_the_loader_holds(files: Any, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("plain", "codecs"):
        path, blocks = files[name]
        out = tmp_path / name
        rep = _json(capsys, str(path), "--json", "--extract-ram", str(out))
        assert rep["status"] == "ok"
        assert [x["idstr"] for x in rep["extracted"]["files"]] == list(blocks)
        for idstr, mem in blocks.items():
            f = out / idstr
            assert f.read_bytes() == mem.tobytes(), (name, idstr)
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
    # zero pages are holes: the all-zero vga block takes no disk space
    assert (tmp_path / "plain" / "vga").stat().st_blocks * 512 < 8 * PAGE


def test_extract_ram_makes_folders_and_keeps_names_inside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.mig"
    blocks = {"/rom@etc/acpi/tables": PAGE, "pc.ram": 2 * PAGE, "/rom@etc/acpi/rsdp": PAGE}
    streams.hand_made(p, blocks, {("/rom@etc/acpi/rsdp", 0): b"R" * PAGE, ("pc.ram", PAGE): b"P" * PAGE})
    out = tmp_path / "out"
    rep = _json(capsys, str(p), "--json", "--extract-ram", str(out))
    assert rep["status"] == "ok"
    assert (out / "rom@etc" / "acpi" / "rsdp").read_bytes() == b"R" * PAGE
    assert (out / "pc.ram").read_bytes() == bytes(PAGE) + b"P" * PAGE
    assert stat.S_IMODE((out / "rom@etc").stat().st_mode) == 0o700
    # a second extraction into the same folder refuses to overwrite
    rep = _json(capsys, str(p), "--json", "--extract-ram", str(out), rc=1)
    assert "File exists" in rep["error"]


@pytest.mark.parametrize("idstr", ["../escaped", "a/../../escaped", "/..", "a/./b", "x\x00y", "/", "//"])
def test_extract_ram_refuses_names_that_leave_the_folder(idstr: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.mig"
    streams.hand_made(p, {"ok": PAGE, idstr: PAGE}, {(idstr, 0): b"E" * PAGE})
    out = tmp_path / "deep" / "out"
    rep = _json(capsys, str(p), "--json", "--extract-ram", str(out), rc=1)
    assert rep["status"] == "error" and repr(idstr) in rep["error"]
    assert list(out.iterdir()) == [], "names are checked before anything is written"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["deep", "s.mig"]
    assert sorted(x.name for x in (tmp_path / "deep").iterdir()) == ["out"]


def test_extract_ram_never_follows_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.mig"
    streams.hand_made(p, {"/rom@etc/x": PAGE, "pc.ram": PAGE}, {("/rom@etc/x", 0): b"X" * PAGE})
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "rom@etc").symlink_to(outside)  # a folder on the way is a symlink
    rep = _json(capsys, str(p), "--json", "--extract-ram", str(out), rc=1)
    assert "a symlink is in the way" in rep["error"] and list(outside.iterdir()) == []
    (out / "rom@etc").unlink()
    (out / "pc.ram").symlink_to(outside / "victim")  # the file itself is a symlink
    rep = _json(capsys, str(p), "--json", "--extract-ram", str(out), rc=1)
    assert "pc.ram" in rep["error"] and not (outside / "victim").exists()


# ---------------------------------------------------------------- stdin, pipes
def test_stdin_pipe_and_redirect(files: Any) -> None:
    path, _ = files["codecs"]
    want = _run("analyze", str(path), "--json")
    assert want.returncode == 0
    ref = json.loads(want.stdout)
    data = path.read_bytes()
    piped = subprocess.run([sys.executable, "-m", "savevm.cli", "analyze", "-", "--json", "--dump-devices"],
                           input=data, capture_output=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    got = json.loads(piped.stdout)
    assert got["file"] == "-" and got["devices"][0]["name"] == "demo-device"
    for key in ("ram", "vmdesc_offset", "bytes"):
        assert got[key] == ref[key], key
    assert [{**s, "how": ""} for s in got["sections"]] == [{**s, "how": ""} for s in ref["sections"]]
    with open(path, "rb") as fh:
        redirected = subprocess.run([sys.executable, "-m", "savevm.cli", "analyze", "-", "--json"], stdin=fh,
                                    capture_output=True, timeout=120)
    assert redirected.returncode == 0 and json.loads(redirected.stdout)["ram"] == ref["ram"]


def test_broken_pipe_is_quiet(files: Any) -> None:
    path, _ = files["plain"]
    proc = subprocess.Popen([sys.executable, "-m", "savevm.cli", "analyze", str(path), "--dump-devices"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as `| head -1` does
    err = proc.stderr.read().decode()
    rc = proc.wait(60)
    assert "Traceback" not in err and "Error" not in err, err
    assert rc in (0, 141)


def test_damaged_stream_text_mode_exit_and_reason(files: Any, tmp_path: Path) -> None:
    path, _ = files["plain"]
    cut = tmp_path / "cut.qevm"
    cut.write_bytes(path.read_bytes()[:5000])
    r = _run("analyze", str(cut))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "status       error" in r.stdout and "stream ended" in r.stdout
    assert "offset       " in r.stdout and "stream ended" in r.stderr


# ---------------------------------------------------------------- bounded memory on hostile input
def _hostile(tmp_path: Path, data: bytes) -> dict[str, Any]:
    p = tmp_path / "h.mig"
    p.write_bytes(data)
    r = _run("analyze", str(p), "--json", "--dump-devices", "--extract-ram", str(tmp_path / "x"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr
    rep: dict[str, Any] = json.loads(r.stdout)
    assert rep["status"] == "error" and rep["error"] and rep["error"] in r.stderr
    return rep


def test_an_exabyte_block_is_refused_before_allocation(tmp_path: Path) -> None:
    eib = 1 << 60
    data = streams.hand_made(tmp_path / "h.mig", {"pc.ram": eib}, {})
    rep = _hostile(tmp_path, data)
    assert "over the limit" in rep["error"] and "--max-ram" in rep["error"]
    assert rep["offset"] == data.index(b"\x06pc.ram")


def test_max_ram_is_the_limit(files: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path, blocks = files["plain"]
    need = sum(m.nbytes for m in blocks.values())
    rep = _json(capsys, str(path), "--json", "--max-ram", str(need - PAGE), rc=1)
    assert "over the limit of" in rep["error"] and rep["max_ram"] == need - PAGE
    assert _json(capsys, str(path), "--json", "--max-ram", str(need))["status"] == "ok"


def test_huge_length_fields(tmp_path: Path) -> None:
    # machine name length 0xffffffff
    rep = _hostile(tmp_path, struct.pack(">II", 0x5145564D, 3) + b"\x07" + b"\xff\xff\xff\xff" + b"x" * 64)
    assert "machine name length 4294967295" in rep["error"] and rep["offset"] == 9
    # a vmdesc that claims 0xffffffff bytes (truncated: not found at the end, then refused by the loader)
    base = streams.hand_made(tmp_path / "h.mig", {"pc.ram": PAGE}, {})
    rep = _hostile(tmp_path, base + b"\x06\xff\xff\xff\xff{}")
    assert "vmdesc length 4294967295 exceeds" in rep["error"] and rep["offset"] == len(base) + 1
    # a device field (a "vbuffer") the vmdesc says is 4 GiB
    desc = {"page_size": PAGE, "devices": [{"name": "dev", "instance_id": 0, "fields": [
        {"name": "len", "type": "uint32", "size": 4}, {"name": "buf", "type": "buffer", "size": 0xFFFFFFFF}]}]}
    data = streams.hand_made(tmp_path / "h.mig", {"pc.ram": PAGE}, {},
                             devices=streams.full_section(5, "dev", 0, 1, b"\xff\xff\xff\xff" + b"z" * 100),
                             vmdesc=desc)
    rep = _hostile(tmp_path, data)
    assert "stream ended" in rep["error"]
    # a compressed page claiming 0xffffffff bytes
    w = sd.StreamWriter().header().configuration("m").section_header(sd.SECTION_START, 2, "ram", 0, 4)
    w.ram_mem_size({"pc.ram": PAGE}).raw(struct.pack(">Q", 0x100) + b"\x06pc.ram\xff\xff\xff\xff")
    rep = _hostile(tmp_path, w.bytes())
    assert "exceeds compressBound" in rep["error"]


_BASE: dict[str, bytes] = {}


def _codec_stream() -> bytes:
    if "codecs" not in _BASE:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "c.qevm"
            streams.with_codecs(p)
            _BASE["codecs"] = p.read_bytes()
    return _BASE["codecs"]


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    data = bytearray(_codec_stream())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "be32"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        else:  # a length-like field turned huge
            data[i : i + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00"]))
        if not data:
            break
    return bytes(data)


@given(damaged())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
def test_damaged_streams_never_traceback(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "d.qevm"
    p.write_bytes(data)
    out = tmp_path / "x"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["analyze", str(p), "--json", "--dump-devices", "--dump-vmdesc", "--extract-ram", str(out),
                   "--max-ram", "64M"])
    rep = json.loads(buf.getvalue())
    assert rc in (0, 1)
    assert (rc == 0) == (rep["status"] == "ok")
    if rc == 1:
        assert rep["error"]
    if out.exists():
        for f in out.rglob("*"):
            f.unlink() if f.is_file() else None
        for d in sorted(out.rglob("*"), reverse=True):
            d.rmdir()
        os.rmdir(out)


@given(st.recursive(st.none() | st.booleans() | st.integers(-2, 2**64) | st.text(max_size=6),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(
                        st.sampled_from(["name", "instance_id", "fields", "type", "size", "array_len", "struct",
                                         "subsections", "vmsd_name", "version", "devices", "index"]), c, max_size=5),
                    max_leaves=25))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
def test_hostile_vmdesc_never_tracebacks(tmp_path: Path, devices: Any) -> None:
    desc = {"page_size": PAGE, "devices": [{"name": "dev", "instance_id": 0, "fields": devices}]
            if not isinstance(devices, dict) else devices}
    p = tmp_path / "v.mig"
    streams.hand_made(p, {"pc.ram": PAGE}, {}, devices=streams.full_section(5, "dev", 0, 1, bytes(range(40))),
                      vmdesc=desc)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["analyze", str(p), "--json", "--dump-devices"])
    assert rc in (0, 1) and json.loads(buf.getvalue())["status"] in ("ok", "error")


def test_dump_vmdesc_does_not_need_a_loadable_body(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    desc = {"page_size": PAGE, "devices": []}
    p = tmp_path / "eib.mig"
    streams.hand_made(p, {"pc.ram": 1 << 60}, {}, vmdesc=desc)
    assert main(["analyze", str(p), "--dump-vmdesc"]) == 0
    assert json.loads(capsys.readouterr().out) == desc
    # the summary of the same stream refuses the block, with the reason
    rep = _json(capsys, str(p), "--json", "--dump-vmdesc", rc=1)
    assert "over the limit" in rep["error"] and rep["vmdesc_json"] == desc


def test_commands_are_listed_in_stream_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.mig"
    data = streams.hand_made(p, {"pc.ram": PAGE}, {("pc.ram", 0): b"c" * PAGE})
    cfg_end = 8 + 1 + 4 + len("pc-q35-7.2")
    cmds = b"\x08\x00\x01\x00\x00" + b"\x08\x00\x02\x00\x04\x00\x00\x00\x01"  # OPEN_RETURN_PATH, PING(1)
    p.write_bytes(data[:cfg_end] + cmds + data[cfg_end:])
    dump = sd.parse_stream(p.read_bytes())
    rep = _json(capsys, str(p), "--json")
    assert [(c["command"], c["offset"], c["size"], c["data"]) for c in rep["commands"]] == [
        ("OPEN_RETURN_PATH", cfg_end, 5, ""), ("PING", cfg_end + 5, 9, "00000001")]
    assert [(1, b""), (2, b"\x00\x00\x00\x01")] == dump.commands
    assert rep["sections"][0]["offset"] == cfg_end + 14
    assert main(["analyze", str(p)]) == 0
    table = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")
             and not ln.startswith(" " * 13)]
    assert [r[1] for r in table[1:4]] == ["CMD", "CMD", "START"]


def test_inputs_that_are_not_regular_files(files: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import threading

    assert main(["analyze", str(tmp_path)]) == 2
    assert "it is a directory" in capsys.readouterr().err
    path, _ = files["plain"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as fh:
            fh.write(path.read_bytes())

    t = threading.Thread(target=feed)
    t.start()
    rep = _json(capsys, str(fifo), "--json", "--dump-devices")
    t.join(30)
    assert rep["status"] == "ok" and rep["bytes"] == path.stat().st_size and rep["devices"][0]["name"] == "demo-device"
