"""TLS with QEMU's parameter names: verified both ways, authz, refusal of everyone else; and QEMU itself."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import tlscerts  # noqa: E402

from savevm.config import MigrationConfig  # noqa: E402
from savevm.migration import Incoming, Migration  # noqa: E402
from savevm.plugins import PluginHost  # noqa: E402
from savevm_ram.demo import DemoProgram  # noqa: E402

pytestmark = pytest.mark.skipif(not tlscerts.have_openssl(), reason="the openssl command is not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    tlscerts.make_ca(root / "ca")
    tlscerts.make_ca(root / "other-ca", cn="someone else's CA")
    return {
        "good": tlscerts.creds_dir(root / "good", ca=root / "ca"),
        "intruder": tlscerts.creds_dir(root / "intruder", ca=root / "ca", client_cn="intruder"),
        "foreign": tlscerts.creds_dir(root / "foreign", ca=root / "other-ca"),
        "ca": root / "ca",
    }


def _tls(creds: Path, **extra: str) -> MigrationConfig:
    cfg = MigrationConfig().set_parameter("tls-creds", str(creds))
    for k, v in extra.items():
        cfg = cfg.set_parameter(k.replace("_", "-"), v)
    return cfg


def _migrate(src_cfg: MigrationConfig, dst_cfg: MigrationConfig, size: str = "8M",
             accept_timeout: float | None = 20) -> tuple[Any, Any, DemoProgram, DemoProgram]:
    src = DemoProgram(size=size, role="source", dirty_rate="1M")
    sreg = PluginHost(src_cfg).new_registry()
    src.register(sreg)
    dst = DemoProgram(size=size, role="destination")
    dreg = PluginHost(dst_cfg).new_registry()
    dst.register(dreg)
    inc = Incoming(dreg, "tcp:127.0.0.1:0", guest=dst, config=dst_cfg)
    inc.accept_timeout = accept_timeout
    uri = inc.listen()
    inc.start()
    src.start()
    mig = Migration(sreg, uri, guest=src, config=src_cfg)
    mig.start()
    mig.wait(60)
    src.stop()
    return mig, inc, src, dst


def test_tls_migration_completes_verified(pki: dict[str, Path]) -> None:
    cfg = _tls(pki["good"]).set_capability("verify")
    mig, inc, src, dst = _migrate(cfg, _tls(pki["good"], tls_authz="savevm-source"))
    assert mig.query().status == "completed", mig.error
    assert inc.wait(30).status == "completed"
    assert src.checksums() == dst.checksums()


@pytest.mark.parametrize("who,expect", [("intruder", "not allowed by tls-authz"),
                                        ("foreign", "certificate verify failed")])
def test_unauthorised_sources_are_refused_and_the_destination_waits_on(pki: dict[str, Path], who: str,
                                                                       expect: str) -> None:
    dst_cfg = _tls(pki["good"], tls_authz="CN=savevm-source,O=savevm tests")
    mig, inc, src, dst = _migrate(_tls(pki[who]), dst_cfg, accept_timeout=4)
    st = mig.query()
    assert st.status == "failed"
    assert not src._paused.is_set()
    ist = inc.wait(30)  # nobody good came: it gave up waiting, having refused the intruder
    assert ist.status == "failed" and ist.as_qmp()["runstate"] == "inmigrate"


def test_plaintext_client_cannot_hold_a_tls_destination(pki: dict[str, Path]) -> None:
    dst_cfg = _tls(pki["good"])
    dst = DemoProgram(size="8M", role="destination")
    dreg = PluginHost(dst_cfg).new_registry()
    dst.register(dreg)
    inc = Incoming(dreg, "tcp:127.0.0.1:0", guest=dst, config=dst_cfg)
    inc.accept_timeout = 30
    uri = inc.listen()
    inc.start()
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"QEVM\x00\x00\x00\x03" + b"\x00" * 64)  # a plaintext stream: not a TLS hello
        s.settimeout(5)
        try:
            s.recv(100)
        except OSError:
            pass
    # the real source still gets in afterwards
    src = DemoProgram(size="8M", role="source", dirty_rate="0")
    sreg = PluginHost(_tls(pki["good"])).new_registry()
    src.register(sreg)
    st = Migration(sreg, uri, guest=src, config=_tls(pki["good"])).run()
    assert st.status == "completed"
    assert inc.wait(30).status == "completed"


def test_the_source_checks_the_destination_name(pki: dict[str, Path]) -> None:
    cfg = _tls(pki["good"], tls_hostname="migration-target.example")
    mig, inc, src, _ = _migrate(cfg, _tls(pki["good"]), accept_timeout=4)
    assert mig.query().status == "failed"
    assert "certificate" in str(mig.error).lower() or "hostname" in str(mig.error).lower(), mig.error
    inc.cancel()


# ----------------------------------------------------------------------------- QEMU over TLS
def _qemu_available() -> bool:
    from tests.qemu import harness

    return harness.find_qemu() is not None


@pytest.mark.qemu
@pytest.mark.skipif(not _qemu_available(), reason="qemu-system-x86_64 not installed")
def test_qemu_source_over_tls_into_savevm(pki: dict[str, Path], tmp_path: Path) -> None:
    from savevm.cli.qemu_guest import QemuGuest
    from tests.qemu import harness

    creds = pki["good"]
    cfg = _tls(creds).set_parameter("x-stall-timeout", 30000)
    import attrs

    cfg = attrs.evolve(cfg, machine="pc-q35-7.2")
    guest = QemuGuest(dump_dir=str(tmp_path / "blocks"))
    reg = PluginHost(cfg).new_registry()
    guest.register(reg)
    inc = Incoming(reg, "tcp:127.0.0.1:0", guest=guest, config=cfg)
    inc.skip_unknown_devices = True
    inc.accept_timeout = 60
    uri = inc.listen()
    inc.start()
    obj = f"tls-creds-x509,id=tls0,dir={creds},endpoint=client,verify-peer=on"
    with harness.QemuProcess(machine="pc-q35-7.2", memory="64M", extra_args=["-object", obj]) as vm:
        vm.set_parameters(tls_creds="tls0", tls_hostname="localhost", max_bandwidth=0)
        vm.migrate(uri, timeout=60)
        expected = vm.read_guest_memory(0x100000, 1 << 20)
    st = inc.wait(60)
    assert st.status == "completed", inc.error
    pc = guest.ram.find("pc.ram")
    assert pc is not None and bytes(pc.mv[0x100000 : 0x200000]) == expected


@pytest.mark.qemu
@pytest.mark.skipif(not _qemu_available(), reason="qemu-system-x86_64 not installed")
def test_savevm_source_over_tls_into_qemu(pki: dict[str, Path]) -> None:
    import attrs
    import numpy as np

    import savevm_ram
    from tests.qemu import harness

    creds = pki["good"]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = attrs.evolve(_tls(creds, tls_hostname="localhost"), machine="pc-q35-7.2")
    buf = np.zeros(64 << 20, dtype=np.uint8)
    buf[0x500000 : 0x504000] = np.frombuffer(np.random.default_rng(9).bytes(0x4000), np.uint8)
    reg = PluginHost(cfg).new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", buf)]))
    obj = f"tls-creds-x509,id=tls0,dir={creds},endpoint=server,verify-peer=on"
    with harness.QemuProcess(machine="pc-q35-7.2", memory="64M", incoming="defer",
                             extra_args=["-object", obj]) as vm:
        vm.set_parameters(tls_creds="tls0")
        vm.migrate_incoming(f"tcp:127.0.0.1:{port}")
        mig = Migration(reg, f"tcp:127.0.0.1:{port}", config=cfg)
        mig.start()
        st = mig.wait(60)
        assert st.status == "completed", mig.error
        vm.wait_incoming_done(30)
        assert vm.read_guest_memory(0x500000, 0x4000) == bytes(buf[0x500000:0x504000])
