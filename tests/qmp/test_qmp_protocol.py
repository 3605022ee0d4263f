"""The QMP monitor's protocol, spoken by hand over a real unix socket, and its JSON framing."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from savevm.config import MigrationConfig
from savevm.errors import URIError
from savevm.guest import NullGuest
from savevm.qmp import MAX_MESSAGE, JSONStreamer, QMPError, QMPMonitor, serve


class Prog(NullGuest):
    """A program with no sections: enough for everything but a migration."""

    def __init__(self) -> None:
        super().__init__()
        self.pauses = 0
        self.resumes = 0

    def register(self, registry: Any) -> None:
        pass

    def pause(self) -> None:
        super().pause()
        self.pauses += 1

    def resume(self) -> None:
        super().resume()
        self.resumes += 1


class Conn:
    """A raw QMP connection: send dicts or bytes, read one JSON line at a time."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb")

    def read(self) -> dict[str, Any]:
        line = self.rfile.readline()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, msg: dict[str, Any] | bytes) -> None:
        self.sock.sendall(msg if isinstance(msg, bytes) else json.dumps(msg).encode())

    def cmd(self, name: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        self.send(msg)
        while True:
            reply = self.read()
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="qmp-")
    yield str(Path(d) / "m.sock")


def test_greeting_negotiation_and_replies(sock_path: str) -> None:
    prog = Prog()
    with serve(prog, f"unix:{sock_path}") as server:
        assert server.address == f"unix:{sock_path}"
        assert Path(sock_path).stat().st_mode & 0o077 == 0  # the monitor controls the program: owner only
        c = Conn(sock_path)
        greeting = c.read()
        assert greeting == {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                                "package": greeting["QMP"]["version"]["package"]},
                                    "capabilities": []}}
        # nothing but qmp_capabilities before negotiation
        r = c.cmd("query-status", id="a")
        assert r == {"error": {"class": "CommandNotFound",
                               "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": "a"}
        assert c.cmd("qmp_capabilities", id=1) == {"return": {}, "id": 1}
        assert c.cmd("qmp_capabilities")["error"]["class"] == "CommandNotFound"
        assert c.cmd("query-status", id={"x": [1]}) == {
            "return": {"status": "running", "singlestep": False, "running": True}, "id": {"x": [1]}}
        assert c.cmd("no-such-command")["error"] == {"class": "CommandNotFound",
                                                     "desc": "The command no-such-command has not been found"}
        assert c.cmd("query-migrate") == {"return": {}}
        names = {x["name"] for x in c.cmd("query-commands")["return"]}
        assert {"migrate", "migrate-incoming", "query-migrate", "migrate-set-capabilities",
                "query-migrate-capabilities", "migrate-set-parameters", "query-migrate-parameters",
                "migrate_cancel", "query-status", "cont", "stop", "quit"} <= names
        c.close()


def test_malformed_input_gets_errors_not_a_crash(sock_path: str) -> None:
    with serve(Prog(), f"unix:{sock_path}"):
        c = Conn(sock_path)
        c.read()
        c.cmd("qmp_capabilities")
        c.send(b'{"execute": "query-status", "arguments": [1]}')
        assert "must be an object" in c.read()["error"]["desc"]
        c.send(b'{"arguments": {}}')
        assert c.read()["error"]["desc"] == "QMP input lacks member 'execute'"
        c.send(b'{"execute": "stop", "bogus": 1, "id": 7}')
        assert c.read() == {"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"},
                            "id": 7}
        c.send(b'{"execute": "stop" "x"}')  # balanced but not JSON
        assert c.read()["error"]["desc"].startswith("JSON parse error")
        c.send(b"[1, 2]")
        assert c.read()["error"]["desc"] == "QMP input must be a JSON object"
        # split across writes and without newlines, as qemu.qmp sends
        c.send(b'{"execute": "query-')
        time.sleep(0.05)
        c.send(b'status", "id": "split"}{"execute": "query-version", "id": 2}')
        assert c.read()["id"] == "split"
        assert c.read()["return"]["qemu"]["major"] == 7
        # a message past the bound ends the connection with an error
        c.send(b'{"execute": "' + b"a" * (MAX_MESSAGE + 1))
        assert "longer than" in c.read()["error"]["desc"]
        assert c.rfile.readline() == b""
        c.close()


def test_stop_cont_events_and_runstate(sock_path: str) -> None:
    prog = Prog()
    with serve(prog, f"unix:{sock_path}"):
        c = Conn(sock_path)
        c.read()
        c.cmd("qmp_capabilities")
        c.send({"execute": "stop", "id": 1})
        ev, reply = c.read(), c.read()
        assert ev["event"] == "STOP" and set(ev["timestamp"]) == {"seconds", "microseconds"}
        assert reply == {"return": {}, "id": 1}
        assert prog.paused and prog.pauses == 1
        assert c.cmd("query-status")["return"] == {"status": "paused", "singlestep": False, "running": False}
        c.cmd("stop")  # twice: still paused once
        assert prog.pauses == 1
        c.send({"execute": "cont"})
        assert c.read()["event"] == "RESUME"
        assert c.read() == {"return": {}}
        assert not prog.paused and c.cmd("query-status")["return"]["running"] is True
        c.close()


def test_events_go_to_every_negotiated_client(sock_path: str) -> None:
    with serve(Prog(), f"unix:{sock_path}"):
        a, b, late = Conn(sock_path), Conn(sock_path), Conn(sock_path)
        for c in (a, b, late):
            c.read()
        a.cmd("qmp_capabilities")
        b.cmd("qmp_capabilities")
        a.cmd("stop")
        assert b.read()["event"] == "STOP"
        late.cmd("qmp_capabilities")  # not negotiated at the time: saw no STOP
        late.send({"execute": "cont"})
        assert late.read()["event"] == "RESUME"
        for c in (a, b, late):
            c.close()


def test_capabilities_and_parameters(sock_path: str) -> None:
    cfg = MigrationConfig(plugin_capabilities={"toy-codec"})
    with serve(Prog(), f"unix:{sock_path}", config=cfg) as server:
        c = Conn(sock_path)
        c.read()
        c.cmd("qmp_capabilities")
        r = c.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True},
                                                                {"capability": "toy-codec", "state": True}]})
        assert r == {"return": {}}
        caps = {x["capability"]: x["state"] for x in c.cmd("query-migrate-capabilities")["return"]}
        assert caps["xbzrle"] and caps["toy-codec"] and not caps["auto-converge"]
        r = c.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrl", "state": True}]})
        assert r["error"]["class"] == "GenericError" and "did you mean xbzrle" in r["error"]["desc"]
        r = c.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        assert "does not implement" in r["error"]["desc"]
        r = c.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": "yes"}]})
        assert "boolean" in r["error"]["desc"]
        assert c.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 20, "downtime-limit": 50}) == {"return": {}}
        params = c.cmd("query-migrate-parameters")["return"]
        assert params["max-bandwidth"] == 1 << 20 and params["downtime-limit"] == 50
        # one bad value: nothing applied
        r = c.cmd("migrate-set-parameters", {"downtime-limit": 10, "no-such": 1})
        assert "no-such" in r["error"]["desc"]
        assert c.cmd("query-migrate-parameters")["return"]["downtime-limit"] == 50
        assert server.monitor.config.has("toy-codec")
        c.close()


def test_quit_sends_shutdown_and_closes(sock_path: str) -> None:
    with serve(Prog(), f"unix:{sock_path}") as server:
        c = Conn(sock_path)
        c.read()
        c.cmd("qmp_capabilities")
        assert c.cmd("quit") == {"return": {}}
        ev = c.read()
        assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert c.rfile.readline() == b""  # the monitor hangs up after quit, as QEMU's does
        assert server.wait_quit(5)
        c.close()
    assert not Path(sock_path).exists()


def test_bad_addresses_and_a_stale_socket(sock_path: str) -> None:
    for bad in ("unix:", "tcp:localhost", "tcp:127.0.0.1:http", "file:/x", "nothing"):
        with pytest.raises(URIError):
            serve(Prog(), bad)
    # a socket file left by a killed process is replaced; QEMU's ",server=on,wait=off" is accepted
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()
    with serve(Prog(), f"unix:{sock_path},server=on,wait=off") as server:
        assert server.address == f"unix:{sock_path}"
        with pytest.raises(URIError, match="cannot listen"):
            serve(Prog(), f"unix:{sock_path}")  # a live one is not
    with serve(Prog(), "tcp:127.0.0.1:0") as server:
        host, port = server.address.split(":")[1:]
        s = socket.create_connection((host, int(port)), timeout=5)
        assert b'"QMP"' in s.makefile("rb").readline()
        s.close()


def test_monitor_without_a_socket() -> None:
    mon = QMPMonitor(Prog())
    events: list[dict[str, Any]] = []
    mon.add_listener(events.append)
    with pytest.raises(QMPError) as err:
        mon.execute("migrate", {})
    assert err.value.desc == "Parameter 'uri' is missing"
    with pytest.raises(QMPError, match="not specified"):
        mon.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    with pytest.raises(QMPError, match="does not hand clients over"):
        mon.execute("client_migrate_info", {"protocol": "spice", "hostname": "h", "port": 1})
    mon.execute("stop")
    assert [e["event"] for e in events] == ["STOP"]


messages = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(codec="utf-8")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.lists(st.dictionaries(st.text(max_size=6), messages, max_size=4), min_size=1, max_size=5),
       st.lists(st.integers(min_value=1, max_value=40), max_size=10), st.sampled_from(["", "\n", "\r\n", " "]))
def test_streamer_splits_any_chunking(objs: list[dict[str, Any]], cuts: list[int], sep: str) -> None:
    data = sep.join(json.dumps(o) for o in objs).encode()
    s = JSONStreamer()
    out: list[bytes] = []
    pos = 0
    for n in cuts:
        out.extend(s.feed(data[pos : pos + n]))
        pos += n
    out.extend(s.feed(data[pos:]))
    assert [json.loads(t) for t in out] == objs


def test_streamer_bounds() -> None:
    with pytest.raises(QMPError, match="nesting"):
        list(JSONStreamer(max_depth=3).feed(b'{"a": [[[1]]]}'))
    s = JSONStreamer(max_len=10)
    with pytest.raises(QMPError, match="longer"):
        list(s.feed(b'{"a": "0123456789"}'))
    assert [json.loads(t) for t in s.feed(b'{"b": 1}')] == [{"b": 1}]  # usable again after the error
