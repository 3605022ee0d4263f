"""A real QEMU 7.2 as peer of savevm's return path and of device sections sized by its own vmdesc.

* QEMU source with capability ``return-path`` into ``savevm incoming``: QEMU
  opens the return path and waits for SHUT after its stream; savevm answers
  PONG and SHUT(0), and QEMU completes.
* A running guest (not ``-S``) into ``savevm incoming`` with no reference
  file: its device sections (including subsections a paused guest lacks)
  are skipped by the vmdesc QEMU sends after EOF.
* savevm's source into a QEMU destination: the negotiation PING is echoed
  (a QEMU peer), and completion waits for QEMU's SHUT(0).
* A QEMU source with ``multifd``: savevm refuses clearly instead of
  completing with the pages that went over the other connections missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.qemu import harness

pytestmark = pytest.mark.qemu
if harness.find_qemu() is None:  # the CI sets SAVEVM_REQUIRE_QEMU=1, which turns this into a failure
    pytestmark = [pytest.mark.qemu, pytest.mark.skip(reason="qemu-system-x86_64 not installed")]

Q35 = "pc-q35-7.2"
PAGE = 4096


def _incoming(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str, Path]:
    dump_dir = tmp_path / "blocks"
    dump_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "savevm.cli", "incoming", "tcp:127.0.0.1:0", "--print-uri", "--json",
         "--machine", Q35, "--timeout", "60", "--guest", "savevm.cli.qemu_guest:QemuGuest",
         "--guest-arg", f"dump_dir={dump_dir}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    uri = proc.stdout.readline().strip()
    assert uri.startswith("tcp:"), proc.stderr.read() if proc.stderr else ""
    return proc, uri, dump_dir


def _finish(proc: subprocess.Popen[str]) -> tuple[int, dict, str]:
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else {}), err


@pytest.mark.parametrize("return_path", [True, False], ids=["return-path", "no-return-path"])
def test_running_qemu_into_savevm_without_reference(tmp_path: Path, return_path: bool) -> None:
    payload = np.frombuffer(np.random.default_rng(31).bytes(8 * PAGE), dtype=np.uint8).tobytes()
    blob = tmp_path / "payload.bin"
    blob.write_bytes(payload)
    proc, uri, dump_dir = _incoming(tmp_path)
    with harness.QemuProcess(machine=Q35, memory="64M", stopped=False,
                             extra_args=harness.loader_args(str(blob), 0x600000)) as vm:
        time.sleep(0.5)  # the firmware runs: the CPU carries state a paused guest does not
        if return_path:
            vm.set_capabilities(return_path=True)
        vm.set_parameters(max_bandwidth=0)
        info = vm.migrate(uri, timeout=60)  # with return-path, QEMU completes only after our SHUT(0)
        assert info["status"] == "completed"
        assert vm.status() == "postmigrate"
        expected = vm.read_guest_memory(0, 64 << 20)
    rc, rep, err = _finish(proc)
    assert rc == 0, err
    assert rep["status"] == "completed"
    pc_ram = (dump_dir / "pc.ram").read_bytes()
    assert pc_ram[0x600000 : 0x600000 + 8 * PAGE] == payload
    # the guest is stopped once the stream ends, so the source's memory is what we hold;
    # pmemsave reads guest-physical memory, and below 2 GiB on q35 that is pc.ram itself
    # (minus the BIOS/VGA holes, which QEMU maps to other regions)
    for lo, hi in ((0, 0xA0000), (0x100000, 64 << 20)):
        assert pc_ram[lo:hi] == expected[lo:hi], f"pc.ram differs in [{lo:#x}, {hi:#x})"


def test_savevm_into_qemu_completes_on_shut() -> None:
    """The source echoes nothing new to QEMU and completes on its SHUT(0)."""
    import socket

    import savevm_ram
    from savevm.migration import Migration
    from savevm.plugins import PluginHost

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    buf = np.zeros(64 << 20, dtype=np.uint8)
    buf[0x500000 : 0x500000 + 4 * PAGE] = np.frombuffer(np.random.default_rng(3).bytes(4 * PAGE), np.uint8)
    cfg = PluginHost().config
    import attrs

    cfg = attrs.evolve(cfg, machine=Q35)
    reg = PluginHost(cfg).new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", buf)]))
    with harness.QemuProcess(machine=Q35, memory="64M", incoming=f"tcp:127.0.0.1:{port}") as vm:
        mig = Migration(reg, f"tcp:127.0.0.1:{port}", config=cfg)
        try:
            st = mig.wait(60) if mig.start() is None else None
        finally:
            if mig.is_running():
                mig.cancel()
        assert st is not None and st.status == "completed", mig.error
        rp = mig._rp
        assert rp is not None and rp.savevm_peer is False and rp.shut == 0
        assert st.as_qmp()["runstate"] == "postmigrate"
        vm.wait_incoming_done(30)
        assert vm.read_guest_memory(0x500000, 4 * PAGE) == bytes(buf[0x500000 : 0x500000 + 4 * PAGE])


def test_qemu_multifd_source_is_refused(tmp_path: Path) -> None:
    """Pages over extra connections savevm does not read: never 'completed', the capability named."""
    proc, uri, _ = _incoming(tmp_path)
    with harness.QemuProcess(machine=Q35, memory="64M") as vm:
        vm.set_capabilities(multifd=True)
        vm.qmp("migrate", uri=uri)
        rc, rep, err = _finish(proc)
        assert rc != 0, rep
        assert rep.get("status") == "failed", rep
        assert "multifd" in rep.get("error-desc", ""), rep
        assert "completed" not in json.dumps(rep.get("status"))
