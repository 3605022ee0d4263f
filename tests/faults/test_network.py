"""Network faults between two network namespaces we create: link down (short, long, during
switchover), a black-holed address (connect timeout and cancel).

The destination runs in its own namespace behind a veth pair whose addresses
these tests assign (10.199.N.1 here, 10.199.N.2 there); nothing outside the
pair is ever a target.  Needs root and iproute2; skipped with the reason
otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from migration_helpers import MIGRATION_TIMEOUT, Destination, Session, wait_for

from savevm.config import MigrationConfig

pytestmark = pytest.mark.slow

STALL_MS = 4000
SWITCHOVER_MS = 2000
HANDOVER_MS = 4000
SLACK = 3.0


def _ip(*args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


class NetNS:
    """A namespace ``ns`` joined to ours by a veth pair; the link can go down and up."""

    def __init__(self, index: int) -> None:
        tag = f"{os.getpid() % 10000}{index}"
        self.ns = f"svm{tag}"
        self.here, self.there = f"svh{tag}", f"svt{tag}"
        subnet = 100 + (os.getpid() + index) % 150
        self.local, self.remote = f"10.199.{subnet}.1", f"10.199.{subnet}.2"
        self.blackhole = f"10.199.{subnet}.3"

    def up(self) -> None:
        steps = [
            (("netns", "add", self.ns), None),
            (("link", "add", self.here, "type", "veth", "peer", "name", self.there), None),
            (("link", "set", self.there, "netns", self.ns), None),
            (("addr", "add", f"{self.local}/24", "dev", self.here), None),
            (("link", "set", self.here, "up"), None),
            (("addr", "add", f"{self.remote}/24", "dev", self.there), self.ns),
            (("link", "set", self.there, "up"), self.ns),
            (("link", "set", "lo", "up"), self.ns),
            # an address whose frames go to a MAC nobody has: SYNs vanish (a black hole)
            (("neigh", "add", self.blackhole, "lladdr", "02:00:5e:00:53:01", "dev", self.here, "nud",
              "permanent"), None),
        ]
        for args, ns in steps:
            r = _ip(*args, ns=ns)
            if r.returncode != 0:
                self.down()
                raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def link(self, up: bool) -> None:
        r = _ip("link", "set", self.here, "up" if up else "down")
        assert r.returncode == 0, r.stderr

    def down(self) -> None:
        _ip("link", "del", self.here)
        _ip("netns", "del", self.ns)


@pytest.fixture
def net() -> Iterator[NetNS]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    n = NetNS(0)
    try:
        n.up()
    except (RuntimeError, FileNotFoundError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot make a network namespace here: {exc}")
    try:
        yield n
    finally:
        n.down()


def _dest_in(net: NetNS, session: Session, size: str = "32M") -> Destination:
    argv = ["ip", "netns", "exec", net.ns, sys.executable, "-m", "savevm.cli", "incoming", f"tcp:{net.remote}:0",
            "--print-uri", "--json", "--guest", "savevm_ram.demo:DemoProgram", "--guest-arg", f"size={size}",
            "--guest-arg", "role=destination", "--set", f"x-stall-timeout={STALL_MS}",
            "--set", f"x-handover-timeout={HANDOVER_MS}"]
    d = Destination(argv, session.tmp / f"netdest-{len(session.children)}.stderr")
    session.children.append(d)
    d.wait_listening()
    return d


def _cfg(**params: Any) -> MigrationConfig:
    cfg = (MigrationConfig().set_parameter("x-stall-timeout", STALL_MS)
           .set_parameter("x-switchover-timeout", SWITCHOVER_MS).set_parameter("x-handover-timeout", HANDOVER_MS))
    for k, v in params.items():
        cfg = cfg.set_parameter(k.replace("_", "-"), v)
    return cfg


def test_short_link_drop_is_ridden_out(net: NetNS, session: Session, record: Any) -> None:
    dest = _dest_in(net, session)
    src = session.source(_cfg(max_bandwidth="8M"), size="32M", dirty_rate="1M")
    mig = src.migrate(dest.uri)
    wait_for(lambda: (mig.query().stream_bytes or 0) > 2 << 20, 30, what="streaming")
    net.link(False)
    time.sleep(1.0)  # well inside x-stall-timeout: TCP retransmits once the link is back
    net.link(True)
    st = mig.wait(MIGRATION_TIMEOUT)
    assert st.status == "completed", mig.error
    rc, report = dest.finish(60)
    assert rc == 0 and report is not None and report["status"] == "completed"
    assert report["guest"]["checksums"] == src.prog.checksums()
    record(fault="link down 1 s", phase="active", detect_s=None, bound="x-stall-timeout (not reached)",
           source="completed", destination="completed, verified", downtime_ms=st.downtime)


def test_long_link_drop_fails_both_sides_within_the_bound(net: NetNS, session: Session, record: Any) -> None:
    dest = _dest_in(net, session)
    src = session.source(_cfg(max_bandwidth="4M"), size="32M", dirty_rate="0")
    before = src.prog.checksums()
    mig = src.migrate(dest.uri)
    wait_for(lambda: (mig.query().stream_bytes or 0) > 2 << 20, 30, what="streaming")
    net.link(False)
    t0 = time.monotonic()
    try:
        st = mig.wait(MIGRATION_TIMEOUT)
        dt_src = time.monotonic() - t0
        rc, report = dest.finish(60)
        dt_dest = time.monotonic() - t0
    finally:
        net.link(True)
    assert st.status == "failed" and st.as_qmp().get("bound-fired") == "x-stall-timeout", st.as_qmp()
    assert not src.prog.is_paused and src.prog.checksums() == before
    assert dt_src < STALL_MS / 1000 + SLACK
    assert rc != 0 and report is not None and report["status"] == "failed" and report["runstate"] == "inmigrate"
    assert report.get("bound-fired") == "x-stall-timeout"
    assert dt_dest < STALL_MS / 1000 + SLACK
    record(fault="link down for good", phase="active", detect_s=round(dt_src, 2), bound="x-stall-timeout",
           source="failed, running", destination=f"failed in {dt_dest:.2f}s, paused")


def test_link_drop_during_switchover_keeps_the_pause_bounded(net: NetNS, session: Session, record: Any) -> None:
    dest = _dest_in(net, session, size="16M")
    src = session.source(_cfg(max_bandwidth=0), size="16M", dirty_rate="0")
    before = src.prog.checksums()
    gate = threading.Event()
    src.prog.pause_gate = gate
    mig = src.migrate(dest.uri)
    assert src.prog.pause_entered.wait(30)
    net.link(False)
    t0 = time.monotonic()
    gate.set()
    try:
        st = mig.wait(MIGRATION_TIMEOUT)
        paused_for = time.monotonic() - t0
        rc, report = dest.finish(60)
    finally:
        net.link(True)
    assert st.status == "failed", st.as_qmp()
    assert st.as_qmp().get("bound-fired") in ("x-switchover-timeout", "x-handover-timeout"), st.as_qmp()
    assert not src.prog.is_paused and src.prog.checksums() == before
    assert paused_for < max(SWITCHOVER_MS, HANDOVER_MS) / 1000 + SLACK
    assert rc != 0 and report is not None and report["runstate"] == "inmigrate"
    record(fault="link down in switchover", phase="device (source paused)", detect_s=round(paused_for, 2),
           bound=st.as_qmp().get("bound-fired"), source="failed, running again", destination="failed, paused")


def test_connect_to_a_black_hole_is_bounded_and_cancellable(net: NetNS, session: Session, record: Any) -> None:
    src = session.source(_cfg(x_connect_timeout=2000), size="4M", dirty_rate="0")
    t0 = time.monotonic()
    st = src.migrate(f"tcp:{net.blackhole}:4444").wait(30)
    dt = time.monotonic() - t0
    assert st.status == "failed" and st.as_qmp().get("bound-fired") == "x-connect-timeout", st.as_qmp()
    assert 1.5 < dt < 2 + SLACK
    src2 = session.source(_cfg(x_connect_timeout=60000), size="4M", dirty_rate="0")
    mig = src2.migrate(f"tcp:{net.blackhole}:4444")
    time.sleep(0.5)
    t1 = time.monotonic()
    mig.cancel()
    st2 = mig.wait(30)
    dt_cancel = time.monotonic() - t1
    assert st2.status == "cancelled"
    assert dt_cancel < 1.0
    record(fault="connect to a black hole", phase="connect", detect_s=round(dt, 2), bound="x-connect-timeout",
           source=f"failed; cancel during connect took {dt_cancel:.2f}s", destination="-")
