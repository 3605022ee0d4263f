"""A key-value service that keeps serving while it is live-migrated.

Run it under savevm's QMP monitor (``savevm run --guest service:KVService
--qmp unix:PATH``), migrate it with any QMP client, and its clients move to
the new process without losing an acknowledged write.

The protocol is one line per request over TCP: ``SET key value`` answers
``OK <seq>``, ``GET key`` answers ``VALUE <value>`` or ``NONE``, and a
server that has handed its state over answers ``MOVED host:port``: the
client reconnects there and sends the same request again.

How it keeps the ``Guest.pause()`` contract (see savevm/guest.py): every
request passes a gate.  ``pause()`` closes the gate and waits until the
requests already inside have written their answer; requests that arrive
later wait at the gate, neither applied nor answered.  After a completed
migration (the core's migration notifier says ``completed`` on the source)
the gate opens with a redirect, so the held requests are answered
``MOVED`` and are applied by the destination instead.  If the migration
fails, ``resume()`` opens the gate and they are served here.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from typing import Any

from kvstore import KVTable, TableFull

import savevm
from savevm.logging import get_logger

log = get_logger("kv_service")


class Gate:
    """Admission of requests: open, paused (drained and holding), or handed over (redirecting)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paused = False
        self._inflight = 0
        self.moved_to: str | None = None

    def enter(self) -> str | None:
        """Wait while paused; None to go ahead, or the address the client must move to."""
        with self._cond:
            while self._paused and self.moved_to is None:
                self._cond.wait()
            if self.moved_to is not None:
                return self.moved_to
            self._inflight += 1
            return None

    def leave(self) -> None:
        """A request has been applied and answered."""
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def pause(self) -> None:
        """Hold new requests; return once none is in flight."""
        with self._cond:
            self._paused = True
            while self._inflight:
                self._cond.wait()

    def resume(self) -> None:
        """Serve again (here)."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def hand_over(self, address: str) -> None:
        """The state runs elsewhere now: every held and future request is redirected."""
        with self._cond:
            self.moved_to = address
            self._cond.notify_all()


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        svc = self.server.service
        for raw in self.rfile:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            moved = svc.gate.enter()
            if moved is not None:
                self.wfile.write(f"MOVED {moved}\n".encode())
                return
            try:
                self.wfile.write(svc.answer(line).encode())
            finally:
                svc.gate.leave()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    service: KVService


class _HandoverNotifier:
    """The service's migration notifier: redirect clients once the destination runs the state."""

    def __init__(self, service: KVService) -> None:
        self.service = service

    @savevm.hookimpl
    def savevm_migration_state_changed(self, migration: Any, old: str, new: str) -> None:
        """``completed`` on the source: the destination has confirmed it runs (never before)."""
        if migration.side == "source" and new == "completed":
            target = self.service.client_target or "elsewhere"
            log.info("kv_handover", to=target)
            self.service.gate.hand_over(target)


class KVService:
    """The program: a :class:`~kvstore.KVTable` served over TCP; a savevm ``Program``."""

    def __init__(self, listen: str = "127.0.0.1:0", slots: str | int = 65536, addr_file: str | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self.listen = (host or "127.0.0.1", int(port))
        self.table = KVTable(int(slots))
        self.gate = Gate()
        self.addr_file = addr_file
        #: where clients go after a completed migration (QMP client_migrate_info)
        self.client_target: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.address: str | None = None

    # ------------------------------------------------------------ the protocol
    def answer(self, line: str) -> str:
        """One request line -> its answer line (called inside the gate)."""
        op, _, rest = line.partition(" ")
        op = op.upper()
        try:
            if op == "SET":
                key, _, value = rest.partition(" ")
                return f"OK {self.table.set(key.encode(), value.encode())}\n"
            if op == "GET":
                v = self.table.get(rest.strip().encode())
                return "NONE\n" if v is None else f"VALUE {v.decode(errors='replace')}\n"
            if op == "STATS":
                m = self.table.meta
                return f"STATS slots={m.slots} used={m.used} writes={m.writes}\n"
        except (ValueError, TableFull) as exc:
            return f"ERR {exc}\n"
        return f"ERR unknown request {op!r} (SET key value | GET key | STATS)\n"

    # ------------------------------------------------------------ savevm Program
    def register(self, registry: Any) -> None:
        """Table and metadata; and our notifier, so we learn when the handover is done."""
        self.table.register(registry)
        if registry.plugins is not None:
            registry.plugins.register(_HandoverNotifier(self))

    def start(self) -> None:
        """Open the listening socket (on a destination: paused, so clients wait for the state)."""
        if self._server is not None:
            return
        srv = _Server(self.listen, _Handler)
        srv.service = self
        self._server = srv
        host, port = srv.server_address[:2]
        self.address = f"{host}:{port}"
        if self.addr_file:
            tmp = self.addr_file + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(self.address)
            import os

            os.replace(tmp, self.addr_file)
        self._thread = threading.Thread(target=srv.serve_forever, name="kv-serve", daemon=True)
        self._thread.start()
        log.info("kv_listen", address=self.address)

    def stop(self) -> None:
        """Stop serving (the process is ending)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def pause(self) -> None:
        """Drain: hold new requests, wait for the ones in flight (the Guest.pause contract)."""
        self.gate.pause()

    def resume(self) -> None:
        """Serve again: after a failed migration here, or after the load on the destination."""
        self.gate.resume()

    def set_throttle(self, percent: int) -> None:
        """Writes are small; nothing to slow down."""

    def client_migrate_info(self, protocol: str, hostname: str, port: int, **_: Any) -> None:
        """QMP ``client_migrate_info``: where clients reconnect after the migration."""
        self.client_target = f"{hostname}:{port}"

    def report(self) -> dict[str, Any]:
        """For ``--json``: the table's counters."""
        m = self.table.meta
        return {"slots": m.slots, "used": m.used, "writes": m.writes, "address": self.address}


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    """A connection to ``host:port``."""
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=timeout)
