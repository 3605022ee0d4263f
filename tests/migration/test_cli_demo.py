"""``savevm demo``: two processes, a live migration, and a real verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from migration_helpers import ChildProcess, Session

RAM_KEYS = {"transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "mbps",
            "dirty-sync-count", "dirty-pages-rate", "pages-per-second"}
TOP_KEYS = {"status", "total-time", "downtime", "setup-time", "ram", "verified"}


def _run(c: ChildProcess, timeout: float = 150.0) -> tuple[int, str]:
    rc = c.wait(timeout)
    return rc, "".join(c.lines)


def _report(out: str, c: ChildProcess) -> dict:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"--json must print exactly one line, got:\n{out}\nstderr:\n{c.stderr()}"
    return json.loads(lines[0])


@pytest.mark.slow
def test_demo_json_verifies(session: Session) -> None:
    c = session.savevm("demo", "--size", "32M", "--json", name="demo")
    rc, out = _run(c)
    rep = _report(out, c)
    assert rc == 0, (rep, c.stderr())
    assert rep["status"] == "completed"
    assert rep["verified"] is True
    assert rep["destination-status"] == "completed"
    assert TOP_KEYS <= rep.keys(), sorted(rep)
    assert RAM_KEYS <= rep["ram"].keys(), sorted(rep["ram"])
    assert rep["ram"]["total"] == 32 << 20
    assert rep["ram"]["remaining"] == 0
    assert rep["downtime"] > 0
    assert "mismatched" not in rep


@pytest.mark.slow
def test_demo_detects_a_corrupted_destination_page(session: Session) -> None:
    c = session.savevm("demo", "--size", "32M", "--json", "--corrupt-dest-page", "5", name="demo")
    rc, out = _run(c)
    rep = _report(out, c)
    assert rc != 0, rep
    assert rep["verified"] is False
    # the migration itself completed: only the verification caught the damage
    assert rep["status"] == "completed"
    assert rep["destination-status"] == "completed"
    assert rep["mismatched"] == ["demo.ram0"]


@pytest.mark.slow
def test_demo_over_a_unix_socket(session: Session) -> None:
    uri = session.unix_uri("demo.sock")
    c = session.savevm("demo", "--uri", uri, "--size", "16M", "--json", name="demo")
    rc, out = _run(c)
    rep = _report(out, c)
    assert rc == 0, (rep, c.stderr())
    assert rep["status"] == "completed" and rep["verified"] is True
    assert rep["ram"]["total"] == 16 << 20


@pytest.mark.slow
def test_demo_plain_output_in_a_pipe(session: Session) -> None:
    c = session.savevm("demo", "--size", "8M", "--dirty-rate", "2M", name="demo")
    rc, out = _run(c)
    assert rc == 0, (out, c.stderr())
    assert "== savevm demo ==" in out
    rows = {ln.split("  ", 1)[0].strip(): ln.split("  ", 1)[1].strip()
            for ln in out.splitlines() if "  " in ln and not ln.startswith("==")}
    assert rows.get("status") == "completed", out
    for key in ("total time", "setup time", "downtime", "ram total", "ram transferred", "ram normal",
                "ram duplicate", "ram dirty-sync-count", "ram mbps", "destination", "verified"):
        assert key in rows, f"{key!r} missing from:\n{out}"
    assert rows["ram total"].startswith("8.0 MiB")
    assert rows["verified"].startswith("yes")
    assert rows["destination"] == "completed"
    err = c.stderr()
    assert "savevm demo:" in err  # the intro line
    assert "[" in err and "transferred" in err  # plain progress lines, no terminal codes
    assert "\x1b[" not in out + err


@pytest.mark.slow
def test_demo_sparse_working_set_with_plot(session: Session, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed (pip install 'savevm[plot]')")
    png = tmp_path / "demo.png"
    c = session.savevm("demo", "--size", "16M", "--working-set", "4M", "--dirty-pattern", "sparse",
                       "--capability", "xbzrle", "--plot", str(png), "--json", name="demo")
    rc, out = _run(c)
    rep = _report(out, c)
    assert rc == 0, (rep, c.stderr())
    assert rep["status"] == "completed" and rep["verified"] is True
    assert rep["convergence"]["pending-estimate"] == "wire"
    assert rep["xbzrle-cache"]["cache-size"] > 0
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000
    assert f"written to {png}" in c.stderr()


@pytest.mark.slow
def test_demo_that_cannot_converge_says_why_and_ends_at_its_timeout(session: Session) -> None:
    # the whole of RAM rewritten every pass, an XBZRLE cache of 1/16 of it, 8 MiB/s: no stop rule can
    # finish this, so the demo must end at --timeout, say so, and name the cache as the cause
    c = session.savevm("demo", "--size", "16M", "--working-set", "16M", "--dirty-pattern", "sparse",
                       "--capability", "xbzrle", "--set", "xbzrle-cache-size=1M", "--set", "max-bandwidth=8M",
                       "--set", "x-stall-policy=continue", "--timeout", "8", name="demo")
    rc, out = _run(c, timeout=60)
    assert rc == 1, (out, c.stderr())
    rows = {ln.split("  ", 1)[0].strip(): ln.split("  ", 1)[1].strip()
            for ln in out.splitlines() if "  " in ln and not ln.startswith("==")}
    assert rows["status"] == "cancelled", out
    assert rows["error"] == "not completed within --timeout 8 s: cancelled", out
    assert rows["verified"] == "no (the migration cancelled: nothing to compare)", out
    err = c.stderr()
    assert "xbzrle_cache_thrashing" in err, err
    assert "set xbzrle-cache-size=16M or more" in err, err
