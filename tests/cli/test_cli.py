"""The savevm command line: analyze, errors, config handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import savevm
import savevm_ram
from savevm.cli import main
from savevm_ram.demo import DemoDevice


def _snapshot(path: Path) -> np.ndarray:
    mem = np.frombuffer(np.random.default_rng(9).bytes(64 * 4096), dtype=np.uint8).copy()
    mem[: 16 * 4096] = 0
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", mem),
                                                     savevm_ram.RAMBlock("vga", bytearray(8 * 4096))]))
    reg.register_device("demo-device", 0, DemoDevice(counter=5))
    savevm.snapshot(path, reg)
    return mem


def test_analyze_our_stream(tmp_path: Path, capsys: object) -> None:
    p = tmp_path / "s.qevm"
    _snapshot(p)
    assert main(["analyze", str(p), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert rep["status"] == "ok" and rep["machine"] == "savevm" and rep["vmdesc"]
    assert [b["idstr"] for b in rep["ram"]["blocks"]] == ["pc.ram", "vga"]
    assert rep["ram"]["zero"] == 16 + 8 and rep["ram"]["normal"] == 48
    kinds = {(s["idstr"], s["how"]) for s in rep["sections"]}
    assert ("ram", "loaded") in kinds and ("demo-device", "skipped (vmdesc)") in kinds


def test_analyze_reports_corruption_with_offset(tmp_path: Path, capsys: object) -> None:
    p = tmp_path / "s.qevm"
    _snapshot(p)
    data = bytearray(p.read_bytes())
    cut = tmp_path / "cut.qevm"
    cut.write_bytes(bytes(data[: len(data) // 2]))
    assert main(["analyze", str(cut), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert rep["status"] == "error" and rep["offset"] is not None and "stream ended" in rep["error"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "savevm.cli", *args], capture_output=True, text=True, timeout=60)


def test_bad_inputs_give_clear_errors() -> None:
    r = _run("migrate", "bogus:x", "--guest", "savevm_ram.demo:DemoProgram", "--guest-arg", "size=1M")
    assert r.returncode == 2 and "no transport for scheme 'bogus'" in r.stderr
    r = _run("demo", "--size", "1M", "--set", "max-bandwith=1G")
    assert r.returncode == 2 and "max-bandwith" in r.stderr and "did you mean max-bandwidth" in r.stderr
    r = _run("demo", "--size", "1M", "--set", "xbzrle-cache-size=5000", "--json")
    assert r.returncode == 2
    assert json.loads(r.stdout)["status"] == "failed" and "nearest valid sizes" in r.stderr
    r = _run("demo", "--size", "1M", "--capability", "postcopy-ram")
    assert r.returncode == 2 and "does not implement" in r.stderr
    r = _run("migrate", "tcp:127.0.0.1:1", "--guest", "nomodule:nothing")
    assert r.returncode == 2 and "--guest" in r.stderr
    r = _run("demo", "--size", "1M", "--uri", "file:/tmp/x")
    assert r.returncode == 2 and "tcp:HOST:PORT or unix:PATH" in r.stderr


def test_config_file_and_set_order(tmp_path: Path) -> None:
    from savevm.cli import build_config, make_parser

    cfg_file = tmp_path / "m.toml"
    cfg_file.write_text('machine = "pc-q35-7.2"\n[capabilities]\nxbzrle = true\n'
                        '[parameters]\nmax-bandwidth = "1G"\ndowntime-limit = 100\n')
    args = make_parser().parse_args(["migrate", "tcp:h:1", "--guest", "m:f", "--config", str(cfg_file),
                                     "--set", "downtime-limit=50", "--capability", "auto-converge"])
    cfg = build_config(args)
    assert cfg.machine == "pc-q35-7.2"
    assert cfg.has("xbzrle") and cfg.has("auto-converge")
    assert cfg.param("max-bandwidth") == 1 << 30 and cfg.param("downtime-limit") == 50


def test_bench_command(capsys: object) -> None:
    assert main(["bench", "--size", "4M", "--runs", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    whats = [r["what"] for r in rep["rows"]]
    assert any("random pages" in w for w in whats) and any("XBZRLE decode" in w for w in whats)
    assert all(r["GB/s"] > 0 and r["baseline GB/s"] > 0 for r in rep["rows"])


def test_vmdesc_arg_reads_json_or_stream(tmp_path: Path) -> None:
    from savevm.cli.commands import _read_vmdesc_arg
    from savevm.errors import ConfigError

    stream = tmp_path / "s.qevm"
    _snapshot(stream)
    desc = _read_vmdesc_arg(str(stream))
    assert [d["name"] for d in desc["devices"]] == ["demo-device"]
    js = tmp_path / "d.json"
    js.write_text(json.dumps(desc))
    assert _read_vmdesc_arg(str(js)) == desc
    for bad in (b"{not json", b"[1]"):
        js.write_bytes(bad)
        with pytest.raises(ConfigError, match="--vmdesc"):
            _read_vmdesc_arg(str(js))
    js.write_bytes(b"not a stream")
    with pytest.raises(ConfigError, match="holds no vmdesc"):
        _read_vmdesc_arg(str(js))


def test_analyze_text_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.qevm"
    _snapshot(p)
    assert main(["analyze", str(p)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"== {p} ==" and lines[1].split() == ["machine", "savevm"]
    assert lines[2].split() == ["bytes", str(p.stat().st_size)]
    assert lines[3].split() == ["status", "ok"]
    table = [ln.split() for ln in lines if ln.startswith("  ") and not ln.startswith(" " * 13)]
    assert table[0] == ["offset", "type", "id", "idstr", "inst", "ver", "bytes", "how"]
    rows = table[1:]
    assert [(r[1], r[3]) for r in rows] == [("START", "ram"), ("PART", "ram"), ("END", "ram"),
                                            ("FULL", "demo-device")]
    assert rows[0][0] == "19" and rows[0][7:] == ["loaded"] and rows[-1][7:] == ["skipped", "(vmdesc)"]
    # the sections tile the stream from the end of the header to EOF
    assert all(int(a[0]) + int(a[6]) == int(b[0]) for a, b in zip(rows, rows[1:]))
    assert [ln.split()[2] for ln in lines if ln.startswith("ram block")] == ["pc.ram", "vga"]
    records = {ln.split()[-3]: ln.split()[-2:] for ln in lines if ln.startswith(" " * 13)}
    assert records["zero"] == ["24", str(24 * 9)] and records["normal"] == ["48", str(48 * 4104)]
    assert records["xbzrle"] == ["0", "0"]


def test_analyze_text_output_names_the_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.qevm"
    _snapshot(p)
    data = bytearray(p.read_bytes())
    data[19] = 0x09  # the START's type byte
    p.write_bytes(bytes(data))
    assert main(["analyze", str(p)]) == 1
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert lines[3].split() == ["status", "error"]
    assert lines[4].startswith("error        unknown section type 0x09")
    assert lines[5].split() == ["offset", "19", "(0x13)"]
    assert "unknown section type 0x09" in cap.err and "offset 19" in cap.err


def test_analyze_takes_the_machine_from_the_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.qevm"
    reg = savevm.SectionRegistry(savevm.MigrationConfig(machine="pc-q35-7.2"))
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", bytearray(4 * 4096))]))
    savevm.snapshot(p, reg)
    assert main(["analyze", str(p), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["status"] == "ok" and rep["machine"] == "pc-q35-7.2"
    # asked for another machine: the loader's own check, at the name's offset
    assert main(["analyze", str(p), "--json", "--machine", "pc-i440fx-7.2"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["status"] == "error" and "machine type mismatch" in rep["error"] and rep["offset"] == 9
    assert rep["machine"] == "pc-q35-7.2"


def test_analyze_lists_blocks_in_stream_order(tmp_path: Path) -> None:
    from savevm.cli.analyze import analyze_file

    # "grows" comes first in the stream (QEMU orders by max_length) but is the smaller
    # block once loaded: a RAMList would list it last
    grows = savevm_ram.RAMBlock("grows", bytearray(16 * 4096), used_length=2 * 4096, resizable=True)
    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("fixed", bytearray(8 * 4096)), grows]))
    p = tmp_path / "s.qevm"
    savevm.snapshot(p, reg)
    rep = analyze_file(str(p))
    assert rep["status"] == "ok"
    assert [(b["idstr"], b["used_length"]) for b in rep["ram"]["blocks"]] == [("grows", 2 * 4096), ("fixed", 8 * 4096)]


def test_analyze_without_the_ram_plugin(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with_ram = tmp_path / "ram.qevm"
    _snapshot(with_ram)
    no_ram = tmp_path / "dev.qevm"
    reg = savevm.SectionRegistry()
    reg.register_device("demo-device", 0, DemoDevice(counter=5))
    savevm.snapshot(no_ram, reg)
    monkeypatch.setitem(sys.modules, "savevm_ram", None)  # `import savevm_ram` now fails
    assert main(["analyze", str(with_ram)]) == 2
    err = capsys.readouterr().err
    assert "the RAM plugin (savevm-ram) is needed to analyze RAM sections: pip install -e plugins/ram" in err
    assert "Traceback" not in err
    assert main(["analyze", str(no_ram), "--json"]) == 0, "no RAM section: no plugin needed"
    rep = json.loads(capsys.readouterr().out)
    assert rep["status"] == "ok"
    assert {k: rep["ram"][k] for k in ("blocks", "zero", "normal", "encoded")} == {
        "blocks": [], "zero": 0, "normal": 0, "encoded": 0}
    assert all(v == {"count": 0, "bytes": 0} for v in rep["ram"]["records"].values())


def test_analyze_reports_what_is_not_a_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"not a migration stream at all")
    assert main(["analyze", str(p), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["status"] == "error" and "magic" in rep["error"] and rep["offset"] == 0
    assert main(["analyze", str(tmp_path / "missing.qevm")]) == 2
    assert "cannot open" in capsys.readouterr().err


def test_qemu_guest_dump_dir_keeps_names_inside(tmp_path: Path) -> None:
    from savevm.cli.blockfiles import UnsafeBlockName
    from savevm.cli.qemu_guest import QemuGuest

    g = QemuGuest(dump_dir=str(tmp_path / "out"))
    g.ram.create("/rom@etc/ok", 4096)
    g.ram.create("../escaped", 4096)
    with pytest.raises(UnsafeBlockName, match="would leave the folder"):
        g.resume()
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()
    g = QemuGuest(dump_dir=str(tmp_path / "out"))
    g.ram.create("/rom@etc/ok", 4096).write(0, b"ok")
    g.resume()
    assert (tmp_path / "out" / "rom@etc" / "ok").read_bytes() == b"ok" + bytes(4094)


def test_version_and_python_dash_m() -> None:
    from savevm import __version__

    for cmd in ([sys.executable, "-m", "savevm", "--version"], [sys.executable, "-m", "savevm.cli", "--version"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == f"savevm {__version__}"


def test_guest_is_imported_from_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "myprog.py").write_text(
        "import numpy as np, savevm_ram\n"
        "class Prog:\n"
        "    def __init__(self, pages='4'):\n"
        "        self.mem = np.full(int(pages) * 4096, 7, dtype=np.uint8)\n"
        "    def register(self, reg):\n"
        "        savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock('m', self.mem)]))\n"
        "    def pause(self): pass\n"
        "    def resume(self): pass\n"
        "    def set_throttle(self, p): pass\n")
    out = tmp_path / "state.mig"
    r = subprocess.run([sys.executable, "-m", "savevm", "migrate", f"file:{out}", "--guest", "myprog:Prog",
                        "--guest-arg", "pages=8", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "completed" and out.exists()
    r = subprocess.run([sys.executable, "-m", "savevm", "migrate", f"file:{out}", "--guest", "myprog:Prog",
                        "--guest-arg", "page=8"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--guest-arg: myprog:Prog does not accept these arguments" in r.stderr and "it takes: pages" in r.stderr


def test_user_errors_never_show_a_traceback(tmp_path: Path) -> None:
    cases = [
        (("analyze", str(tmp_path / "missing.mig")), "missing.mig"),
        (("migrate", "file:/tmp/x", "--guest", "savevm_ram.demo:DemoProgram", "--config",
          str(tmp_path / "none.toml")), "cannot read config file"),
        (("incoming", "defer", "--guest", "savevm_ram.demo:DemoProgram"), "give --qmp"),
        (("run", "--guest", "savevm_ram.demo:DemoProgram", "--guest-arg", "size=1M", "--qmp", "tcp:localhost"),
         "tcp:HOST:PORT"),
    ]
    for args, expected in cases:
        r = subprocess.run([sys.executable, "-m", "savevm", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert expected in r.stderr, (args, r.stderr)


def test_demo_without_a_port_gives_one_clear_error() -> None:
    r = subprocess.run([sys.executable, "-m", "savevm", "demo", "--uri", "tcp:localhost", "--size", "1M"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["savevm: error: 'tcp:localhost': expected tcp:HOST:PORT (HOST may be "
                                             "empty: all interfaces) with a port 0-65535"]


def test_a_closed_pipe_is_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "s.mig"
    _snapshot(path)
    p = subprocess.Popen([sys.executable, "-m", "savevm", "analyze", str(path), "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    p.stdout.close()  # the reader is gone before the command writes (`savevm analyze ... | head -0`)
    err = p.stderr.read() if p.stderr is not None else ""
    p.wait(60)
    assert p.returncode == 141 and "Traceback" not in err, err


def test_failure_json_has_the_report_shape() -> None:
    from savevm.cli.progress import REPORT_KEYS

    r = subprocess.run([sys.executable, "-m", "savevm", "migrate", "bogus:x", "--guest", "savevm_ram.demo:DemoProgram",
                        "--guest-arg", "size=1M", "--json"], capture_output=True, text=True, timeout=60)
    rep = json.loads(r.stdout)
    assert tuple(rep)[: len(REPORT_KEYS)] == REPORT_KEYS and rep["side"] == "source" and rep["status"] == "failed"
