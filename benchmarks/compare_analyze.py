"""``savevm analyze`` beside QEMU's scripts/analyze-migration.py, on the same streams.

    python benchmarks/compare_analyze.py --theirs PATH/TO/analyze-migration.py [--big 1G]

QEMU's script is not part of this repository: pass the path of a copy from
QEMU's source tree.  The streams are made on the spot: real QEMU 7.2 streams
(q35, i440fx, compressed pages), a savevm stream with XBZRLE pages, and
hand-made ones that each show one situation (a command record, a vmdesc
whose length ends in 0x7b, a long block name, a hostile block name, an
exabyte block, a truncated stream, no vmdesc).  For each stream and each
task (summary, vmdesc, device dump, RAM extraction) the table says whether
each tool did it (``ok``), failed with a message (``err``) or with a Python
traceback (``TB``), and what it said.  Extractions are compared file by
file with what a fresh QEMU loads where both succeed.  Then both tools are
timed on a larger stream (median of three runs each).

Needs qemu-system-x86_64; run from the repository root with savevm installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "qemu"))
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
import streamdump as sd  # noqa: E402

PAGE = 4096


def _qemu_stream(path: Path, machine: str, memory: str = "64M", caps: dict[str, bool] | None = None,
                 payload: Path | None = None) -> None:
    extra = harness.loader_args(payload, 0x100000) if payload else []
    with harness.QemuProcess(machine=machine, memory=memory, extra_args=extra) as vm:
        vm.set_parameters(max_bandwidth=0)
        if caps:
            vm.set_capabilities(**caps)
        vm.migrate_to_file(path, timeout=300)


def _xbzrle_stream(path: Path) -> None:
    import numpy as np

    import savevm
    import savevm_ram
    from savevm.channels import FdChannel
    from savevm.qemufile import QEMUFile
    from savevm.save import StreamWriter

    mem = np.zeros(64 << 20, dtype=np.uint8)
    mem[0x200000 : 0x240000] = np.frombuffer(np.random.default_rng(1).bytes(0x40000), dtype=np.uint8)
    cfg = savevm.MigrationConfig(machine="pc-q35-7.2").set_capability("xbzrle")
    reg = savevm.PluginHost(cfg).new_registry()
    h = savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", mem)]))
    f = QEMUFile(FdChannel(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "x"), writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    while not w.iterate():
        pass
    for r in range(2):
        for a in range(0x200000, 0x240000, PAGE):
            h.ram.find("pc.ram").write(a + 8 * r, b"\x01\x02")
        w.pending(1 << 62)
        while not w.iterate():
            pass
    w.complete_precopy()
    f.close()


def _with_vmdesc_length_0x7b(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dump = sd.parse_stream(data)
    raw = json.dumps(dump.vmdesc).encode()
    raw += b" " * ((0x7B - len(raw)) % 256)  # trailing spaces are still the same JSON
    assert len(raw) & 0xFF == 0x7B
    dst.write_bytes(data[: dump.vmdesc_offset] + b"\x06" + struct.pack(">I", len(raw)) + raw)


def _with_command(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dump = sd.parse_stream(data)
    end = 8 + len(dump.configuration_raw)
    dst.write_bytes(data[:end] + b"\x08\x00\x01\x00\x00" + data[end:])  # OPEN_RETURN_PATH


def _hand(path: Path, blocks: dict[str, int], pages: dict[tuple[str, int], bytes], vmdesc: bool = True) -> None:
    w = sd.StreamWriter().header().configuration("pc-q35-7.2")
    w.section_header(sd.SECTION_START, 2, "ram", 0, 4).ram_mem_size(blocks).ram_eos().footer(2)
    w.section_header(sd.SECTION_END, 2)
    for (b, off), body in pages.items():
        w.ram_page(b, off, body)
    w.ram_eos().footer(2).eof()
    if vmdesc:
        w.vmdesc()
    path.write_bytes(w.bytes())


def make_streams(d: Path, big: str) -> dict[str, Path]:
    payload = d / "payload.bin"
    payload.write_bytes(os.urandom(4 << 20))
    s: dict[str, Path] = {}
    for name, machine, caps in (("QEMU q35", "pc-q35-7.2", None), ("QEMU i440fx", "pc-i440fx-7.2", None),
                                ("QEMU q35, compress", "pc-q35-7.2", {"compress": True})):
        s[name] = d / (name.replace(" ", "_").replace(",", "") + ".mig")
        _qemu_stream(s[name], machine, caps=caps, payload=payload)
    s["savevm, XBZRLE pages"] = d / "xbzrle.mig"
    _xbzrle_stream(s["savevm, XBZRLE pages"])
    s["QEMU q35 + return-path command"] = d / "command.mig"
    _with_command(s["QEMU q35"], s["QEMU q35 + return-path command"])
    s["QEMU q35, vmdesc length 0x..7b"] = d / "len7b.mig"
    _with_vmdesc_length_0x7b(s["QEMU q35"], s["QEMU q35, vmdesc length 0x..7b"])
    s["QEMU q35, truncated"] = d / "cut.mig"
    s["QEMU q35, truncated"].write_bytes(s["QEMU q35"].read_bytes()[:200_000])
    s["no vmdesc (RAM only)"] = d / "novmdesc.mig"
    _hand(s["no vmdesc (RAM only)"], {"pc.ram": 16 * PAGE}, {("pc.ram", 0): b"A" * PAGE}, vmdesc=False)
    s["block name of 130 bytes"] = d / "longname.mig"
    _hand(s["block name of 130 bytes"], {"n" * 130: 4 * PAGE}, {("n" * 130, 0): b"L" * PAGE})
    s["block named ../escaped"] = d / "escape.mig"
    _hand(s["block named ../escaped"], {"../escaped": 4 * PAGE}, {("../escaped", 0): b"E" * PAGE})
    s["block of 1 EiB"] = d / "eib.mig"
    _hand(s["block of 1 EiB"], {"pc.ram": 1 << 60}, {})
    s[f"QEMU q35 {big}"] = d / "big.mig"
    payload_big = d / "big-payload.bin"
    with open(payload_big, "wb") as fh:
        fh.write(os.urandom(256 << 20))
    _qemu_stream(s[f"QEMU q35 {big}"], "pc-q35-7.2", memory=big, payload=payload_big)
    return s


def _outcome(r: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    if "Traceback" in r.stderr:
        last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1]
        return "TB", last[:90]
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        return "err", (lines[-1].removeprefix("savevm: analyze: ") if lines else f"exit {r.returncode}")[:90]
    return "ok", ""


def run_tasks(theirs: str, stream: Path, work: Path) -> dict[str, tuple[tuple[str, str], tuple[str, str]]]:
    py = sys.executable
    ours = [py, "-m", "savevm.cli", "analyze", str(stream)]
    tasks = {
        "summary": ([py, theirs, "-f", str(stream)], [*ours, "--json"]),
        "vmdesc": ([py, theirs, "-f", str(stream), "-d", "desc"], [*ours, "--dump-vmdesc"]),
        "devices": ([py, theirs, "-f", str(stream)], [*ours, "--dump-devices"]),
        "memory (-m)": ([py, theirs, "-f", str(stream), "-m"], None),
        "extract": ([py, theirs, "-f", str(stream), "-x"], [*ours, "--extract-ram", str(work / "ours")]),
    }
    out = {}
    for task, (t, o) in tasks.items():
        tdir = work / "theirs"
        shutil.rmtree(tdir, ignore_errors=True)
        tdir.mkdir(parents=True)
        rt = subprocess.run(t, capture_output=True, text=True, cwd=tdir, timeout=600)
        shutil.rmtree(work / "ours", ignore_errors=True)
        ro = subprocess.run(o, capture_output=True, text=True, timeout=600) if o else None
        out[task] = (_outcome(rt), _outcome(ro) if ro else ("-", "no such option (use --extract-ram)"))
        if task == "extract":
            escaped = list(work.glob("escaped"))
            if escaped:
                out[task] = (("ok!", "wrote OUTSIDE its folder: " + str(escaped[0])), out[task][1])
                for e in escaped:
                    e.unlink()
            if out[task][0][0] == "ok" and out[task][1][0] == "ok":
                same = all((tdir / p.relative_to(work / "ours")).read_bytes() == p.read_bytes()
                           for p in (work / "ours").rglob("*") if p.is_file())
                out[task] = (out[task][0], ("ok", "files equal theirs" if same else "files DIFFER from theirs"))
    return out


def timing(theirs: str, stream: Path, work: Path, runs: int = 3) -> list[tuple[str, float, float]]:
    py = sys.executable
    rows = []
    for what, t, o in (("summary", [py, theirs, "-f", str(stream)], [py, "-m", "savevm.cli", "analyze", str(stream),
                                                                       "--json"]),
                       ("extract RAM", [py, theirs, "-f", str(stream), "-x"],
                        [py, "-m", "savevm.cli", "analyze", str(stream), "--extract-ram", str(work / "ours")])):
        tt, to = [], []
        for _ in range(runs):
            for cmd, acc, cwd in ((t, tt, work / "theirs"), (o, to, None)):
                shutil.rmtree(work / "theirs", ignore_errors=True)
                shutil.rmtree(work / "ours", ignore_errors=True)
                (work / "theirs").mkdir()
                t0 = time.perf_counter()
                subprocess.run(cmd, capture_output=True, cwd=cwd, timeout=900, check=True)
                acc.append(time.perf_counter() - t0)
        rows.append((what, statistics.median(tt), statistics.median(to)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--theirs", required=True, help="path of QEMU's scripts/analyze-migration.py")
    ap.add_argument("--big", default="1G", help="guest size of the timed QEMU stream (default 1G)")
    ap.add_argument("--keep", help="make the streams in this folder and keep them")
    args = ap.parse_args()
    if harness.find_qemu() is None:
        print("qemu-system-x86_64 is not on PATH", file=sys.stderr)
        return 2
    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="savevm-compare-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        streams = make_streams(d, args.big)
        results: dict[str, Any] = {}
        for name, path in streams.items():
            if name.startswith(f"QEMU q35 {args.big}"):
                continue
            work = d / "work" / "x"
            work.mkdir(parents=True, exist_ok=True)
            results[name] = run_tasks(args.theirs, path, work)
        print("| stream | task | analyze-migration.py | savevm analyze |")
        print("|---|---|---|---|")
        for name, tasks in results.items():
            for task, ((ts, tm), (os_, om)) in tasks.items():
                print(f"| {name} | {task} | {ts} {tm} | {os_} {om} |")
        big = streams[f"QEMU q35 {args.big}"]
        print(f"\ntiming on a {args.big} q35 guest with 256 MiB of random data ({big.stat().st_size} bytes), "
              "median of 3 runs")
        print(f"{'task':<12} {'analyze-migration.py':>22} {'savevm analyze':>16}")
        for what, t, o in timing(args.theirs, big, d / "work"):
            print(f"{what:<12} {t:>21.2f}s {o:>15.2f}s")
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
