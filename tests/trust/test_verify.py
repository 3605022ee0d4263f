"""Capability verify: digests of every block and device compared before the destination may run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import savevm_ram
from savevm.config import MigrationConfig
from savevm.migration import Incoming, Migration
from savevm.plugins import PluginHost
from savevm_ram.demo import DemoProgram


def _pair(cfg: MigrationConfig, size: str = "8M") -> tuple[DemoProgram, Any, DemoProgram, Any]:
    src = DemoProgram(size=size, role="source", dirty_rate="2M")
    sreg = PluginHost(cfg).new_registry()
    src.register(sreg)
    dst = DemoProgram(size=size, role="destination")
    dreg = PluginHost(MigrationConfig()).new_registry()
    dst.register(dreg)
    return src, sreg, dst, dreg


def _run(src: DemoProgram, sreg: Any, dst: DemoProgram, dreg: Any, cfg: MigrationConfig) -> tuple[Any, Any, Any]:
    inc = Incoming(dreg, "tcp:127.0.0.1:0", guest=dst)
    uri = inc.listen()
    inc.start()
    src.start()
    mig = Migration(sreg, uri, guest=src, config=cfg)
    mig.start()
    st = mig.wait(60)
    ist = inc.wait(60)
    src.stop()
    return mig, st, ist


@pytest.mark.parametrize("caps", [[], ["compress"], ["xbzrle"]])
def test_verify_completes_with_equal_digests(caps: list[str]) -> None:
    """Every loader path (runs, single records, compressed and XBZRLE pages) fingerprints what it wrote."""
    cfg = MigrationConfig().set_capability("verify").set_parameter("max-bandwidth", "32M")
    for c in caps:
        cfg = cfg.set_capability(c)
    src, sreg, dst, dreg = _pair(cfg)
    mig, st, ist = _run(src, sreg, dst, dreg, cfg)
    assert st.status == "completed", mig.error
    assert ist.status == "completed"
    v = st.as_qmp()["verify"]
    assert v["verified"] is True and v["source-ms"] is not None and v["destination-ms"] is not None
    assert src.checksums() == dst.checksums()


def test_verify_catches_a_destination_that_differs() -> None:
    """The loader writes one wrong byte (as a decoder bug would): the source refuses GO, keeps the program."""
    cfg = MigrationConfig().set_capability("verify")
    src, sreg, dst, dreg = _pair(cfg)
    ram = next(e.handlers for e in dreg.live() if e.idstr == "ram")
    real_verify = ram.load_verify
    damaged: list[int] = []

    def load_verify() -> None:
        real_verify()
        loader = ram.loader
        real_note = loader.note_pages

        def note_pages(block: Any, pages: Any) -> None:
            if not damaged and block.idstr == "demo.ram1":
                p = int(pages[0])
                block.host[p * 4096 + 100] ^= 0x01
                damaged.append(p)
            real_note(block, pages)

        loader.note_pages = note_pages

    ram.load_verify = load_verify
    mig, st, ist = _run(src, sreg, dst, dreg, cfg)
    assert st.status == "failed"
    assert "verify" in (st.error_desc or "") and "ram/demo.ram1" in (st.error_desc or "")
    assert st.as_qmp()["verify"]["verified"] is False
    assert not src._paused.is_set(), "the source runs on"
    assert ist.status == "failed" and ist.as_qmp()["runstate"] == "inmigrate", "the destination never ran"


def test_verify_needs_a_return_path(tmp_path: Any) -> None:
    cfg = MigrationConfig().set_capability("verify")
    reg = PluginHost(cfg).new_registry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("a", np.zeros(8192, np.uint8))]))
    mig = Migration(reg, f"file:{tmp_path / 's'}", config=cfg)
    mig.start()
    st = mig.wait(30)
    assert st.status == "failed" and "needs a return path" in (st.error_desc or "")


@pytest.mark.parametrize("fingerprint_order", ["same"])
def test_fingerprints_are_a_fixed_function(fingerprint_order: str) -> None:
    """Both sides must compute the same numbers: pin a few, and check single-word sensitivity."""
    from savevm_ram.fingerprint import MULTIPLIERS, fingerprints

    assert int(MULTIPLIERS[0]) & 1 and int(MULTIPLIERS[-1]) & 1
    pages = np.zeros((3, 4096), dtype=np.uint8)
    pages[1, 0] = 1
    pages[2, 4095] = 0x80
    fp = fingerprints(pages)
    assert fp[0] == 0
    assert fp[1] == MULTIPLIERS[0]
    assert int(fp[2]) == (int(MULTIPLIERS[511]) * (0x80 << 56)) & ((1 << 64) - 1)
    rng = np.random.default_rng(4)
    base = rng.integers(0, 256, (64, 4096), dtype=np.uint8)
    f0 = fingerprints(base)
    for _ in range(64):
        other = base.copy()
        i, j = int(rng.integers(64)), int(rng.integers(4096))
        other[i, j] ^= int(rng.integers(1, 256))
        assert (fingerprints(other) != f0).sum() == 1
