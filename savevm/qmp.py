"""A monitor speaking QMP, QEMU's JSON monitor protocol, for a running program.

Why QMP rather than a protocol of our own: operators already drive live
migration with QMP (libvirt, ``qmp-shell``, the ``qemu.qmp`` library, their
own scripts), so a savevm program that speaks it can be migrated by the
tools that migrate virtual machines, unchanged.

The wire protocol, as QEMU's ``docs/interop/qmp-spec`` describes it:

* the server greets: ``{"QMP": {"version": {...}, "capabilities": []}}``;
* the client negotiates with ``{"execute": "qmp_capabilities"}``; before
  that every other command is refused;
* commands ``{"execute": NAME, "arguments": {...}, "id": ID}`` get
  ``{"return": ..., "id": ID}`` or ``{"error": {"class": ..., "desc": ...}, "id": ID}``;
* events arrive between replies: ``{"event": NAME, "data": {...},
  "timestamp": {"seconds": S, "microseconds": US}}``.

The commands keep QEMU's names and argument shapes (``migrate``,
``migrate-incoming``, ``query-migrate``, ``migrate-set-capabilities``,
``query-migrate-capabilities``, ``migrate-set-parameters``,
``query-migrate-parameters``, ``migrate_cancel``, ``query-status``,
``cont``, ``stop``, ``quit``, plus ``query-version``, ``query-commands`` and
``client_migrate_info``), and so do the events (``MIGRATION``,
``MIGRATION_PASS``, ``STOP``, ``RESUME``, ``SHUTDOWN``).

:class:`QMPMonitor` is the command logic (usable without a socket);
:class:`QMPServer` puts it on a unix or tcp socket, one thread per client;
:func:`serve` does both in one call.  The monitor controls the program
completely (``migrate exec:...`` runs a shell command, as in QEMU): unix
sockets are created mode 0600 and tcp should stay on loopback.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from savevm.config import QEMU_CAPABILITIES, MigrationConfig
from savevm.errors import MigrationError, URIError
from savevm.hookspecs import hookimpl
from savevm.logging import get_logger
from savevm.migration import Incoming, Migration, MigrationBase, RunState

log = get_logger("savevm.qmp")

#: QMP messages larger than this are refused and the connection closed (QEMU caps tokens too).
MAX_MESSAGE = 1 << 20
#: Deepest JSON nesting accepted in a command (QEMU's parser stops at 1024; commands need 3).
MAX_NESTING = 64
#: How often a running migration is polled for new dirty-bitmap passes (MIGRATION_PASS).
PASS_POLL_INTERVAL = 0.02
#: The QEMU version the greeting names: the stream format savevm speaks.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}


class QMPError(Exception):
    """A command failed; ``qmp_class`` is QEMU's ErrorClass (GenericError, CommandNotFound, ...)."""

    def __init__(self, desc: str, qmp_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.qmp_class = qmp_class


# ---------------------------------------------------------------------------
# framing
# ---------------------------------------------------------------------------


class JSONStreamer:
    """Splits a byte stream into top-level JSON texts, as QEMU's json-streamer does.

    Clients need not end messages with a newline (``qemu.qmp`` does not), so
    messages are delimited by balancing braces and brackets outside strings.
    Nothing is parsed until a text is complete, and a text that grows past
    ``max_len`` or nests deeper than ``max_depth`` is an error, so a client
    cannot make the monitor buffer without bound.
    """

    def __init__(self, max_len: int = MAX_MESSAGE, max_depth: int = MAX_NESTING) -> None:
        self.max_len = max_len
        self.max_depth = max_depth
        self._buf = bytearray()
        self._depth = 0
        self._in_str = False
        self._escape = False
        self._scanned = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Add bytes; yield every complete top-level JSON text (a bare scalar is yielded alone)."""
        for byte in data:
            self._buf.append(byte)
            if len(self._buf) > self.max_len:
                self._reset()
                raise QMPError(f"JSON message longer than {self.max_len} bytes")
            if self._in_str:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:
                    self._in_str = False
                continue
            if byte == 0x22:
                self._in_str = True
            elif byte in (0x7B, 0x5B):  # { [
                self._depth += 1
                if self._depth > self.max_depth:
                    self._reset()
                    raise QMPError(f"JSON nesting deeper than {self.max_depth}")
            elif byte in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth <= 0:
                    text = bytes(self._buf)
                    self._reset()
                    yield text
            elif self._depth == 0 and byte in b" \t\r\n":
                text = bytes(self._buf).strip()
                self._buf.clear()
                if text:
                    yield text

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_str = False
        self._escape = False


def _timestamp() -> dict[str, int]:
    now = time.time()
    sec = int(now)
    return {"seconds": sec, "microseconds": int((now - sec) * 1_000_000)}


def event_message(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """An event as QEMU sends it (``data`` is left out when there is none)."""
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = _timestamp()
    return msg


# ---------------------------------------------------------------------------
# the program as the monitor sees it
# ---------------------------------------------------------------------------


class MonitoredGuest:
    """The program behind a :class:`~savevm.guest.Guest` that reports STOP/RESUME and stays stopped on ``stop``.

    Pausing twice (a ``stop`` and then a migration's final pass) pauses the
    program once; a migration that fails while the operator had stopped the
    program does not restart it (QEMU restarts only a VM that was running).
    """

    def __init__(self, program: Any, emit: Callable[[str, dict[str, Any] | None], None]) -> None:
        self.program = program
        self._emit = emit
        self._lock = threading.RLock()
        self.paused = False
        #: the operator said ``stop``: only ``cont`` runs the program again
        self.held = False

    def pause(self, *, quiet: bool = False) -> None:
        """Pause the program (once) and report STOP (``quiet``: a destination waiting for its state)."""
        with self._lock:
            if self.paused:
                return
            self.program.pause()
            self.paused = True
        if not quiet:
            self._emit("STOP", None)

    def resume(self) -> None:
        """Resume the program unless the operator holds it stopped; report RESUME."""
        with self._lock:
            if self.held or not self.paused:
                return
            self.program.resume()
            self.paused = False
        self._emit("RESUME", None)

    def set_throttle(self, percent: int) -> None:
        """Pass auto-converge's throttle through."""
        self.program.set_throttle(percent)


class _Notifier:
    """The monitor's migration notifier: one MIGRATION event per state change (QEMU's migrate_set_state)."""

    def __init__(self, monitor: QMPMonitor) -> None:
        self._monitor = monitor

    @hookimpl
    def savevm_migration_state_changed(self, migration: MigrationBase, old: str, new: str) -> None:
        """Report the new state (must not block: emitting only queues bytes on sockets).

        Passes not reported yet go first, so a client sees every MIGRATION_PASS
        before the ``completed`` that follows the final one, as from QEMU.
        """
        if isinstance(migration, Migration):
            self._monitor._flush_passes(migration)
        self._monitor.emit("MIGRATION", {"status": new})


def _socket_address(uri: str) -> list[dict[str, str]]:
    """``query-migrate``'s ``socket-address`` for a listening URI (QEMU reports it for port 0)."""
    scheme, _, rest = uri.partition(":")
    if scheme in ("tcp", "rdma"):
        host, _, port = rest.rpartition(":")
        return [{"type": "inet", "host": host.strip("[]"), "port": port}]
    if scheme == "unix":
        return [{"type": "unix", "path": rest}]
    return []


class QMPMonitor:
    """QMP's commands over one program: migrate it out, load it in, stop, continue, quit.

    Every migration gets a fresh :class:`~savevm.plugins.PluginHost` and
    registry built from the monitor's current config (what
    ``migrate-set-capabilities`` / ``migrate-set-parameters`` changed), with
    the program's sections registered into it, as ``savevm migrate`` does.
    """

    def __init__(self, program: Any, *, config: MigrationConfig | None = None,
                 plugins: Any = None, name: str = "savevm") -> None:
        from savevm import __version__

        self.program = program
        self.config = config or MigrationConfig()
        #: called with the config to build each migration's PluginHost (tests pass their own)
        self._host_factory: Callable[[MigrationConfig], Any] = plugins or _default_host
        self.name = name
        self.version = __version__
        self._lock = threading.RLock()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._pass_lock = threading.Lock()
        #: migration id -> the last MIGRATION_PASS sent
        self._passes_sent: dict[str, int] = {}
        self.guest = MonitoredGuest(program, self.emit)
        self.migration: Migration | None = None
        self.incoming: Incoming | None = None
        #: waiting for ``migrate-incoming`` (QEMU's ``-incoming defer``)
        self.deferred = False
        #: set by ``quit``; whoever runs the program ends it
        self.quit_requested = threading.Event()
        #: what ``client_migrate_info`` said, for programs that redirect their clients
        self.client_migrate_info: dict[str, Any] | None = None
        self.commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-version": self._query_version,
            "query-commands": self._query_commands,
            "query-status": self._query_status,
            "stop": self._stop,
            "cont": self._cont,
            "quit": self._quit,
            "migrate": self._migrate,
            "migrate-incoming": self._migrate_incoming,
            "migrate_cancel": self._migrate_cancel,
            "query-migrate": self._query_migrate,
            "migrate-set-capabilities": self._set_capabilities,
            "query-migrate-capabilities": self._query_capabilities,
            "migrate-set-parameters": self._set_parameters,
            "query-migrate-parameters": self._query_parameters,
            "client_migrate_info": self._client_migrate_info,
        }

    # ------------------------------------------------------------ events
    def add_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Receive every event message (a server forwards them to its clients)."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Stop receiving events."""
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every listener; a failing listener never stops the migration."""
        msg = event_message(name, data)
        log.debug("qmp_event", qmp_event=name, data=data)
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(msg)
            except Exception:
                log.debug("qmp_event_listener_failed", qmp_event=name)

    # ------------------------------------------------------------ dispatch
    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; raises :class:`QMPError` with QEMU's error class on failure."""
        fn = self.commands.get(name)
        if fn is None:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise QMPError("QMP input member 'arguments' must be an object")
        try:
            return fn(arguments)
        except QMPError:
            raise
        except (MigrationError, ValueError, TypeError) as exc:
            raise QMPError(str(exc)) from exc

    # ------------------------------------------------------------ state
    @property
    def runstate(self) -> str:
        """QEMU's run state of the program (``query-status``)."""
        if self.guest.held:
            return RunState.PAUSED.value
        m = self.migration
        if m is not None and m.runstate != RunState.RUNNING:
            return m.runstate.value
        if self.deferred:
            return RunState.INMIGRATE.value
        inc = self.incoming
        if inc is not None and inc.runstate != RunState.RUNNING:
            return inc.runstate.value
        if self.guest.paused:
            return RunState.PAUSED.value
        return RunState.RUNNING.value

    def _migration_active(self) -> bool:
        m, inc = self.migration, self.incoming
        return (m is not None and m.is_running()) or (inc is not None and not inc.finished())

    def _new_registry(self) -> Any:
        host = self._host_factory(self.config)
        host.register(_Notifier(self), name=f"qmp-notifier-{id(self)}-{time.monotonic_ns()}")
        reg = host.new_registry()
        self.program.register(reg)
        return reg

    # ------------------------------------------------------------ commands
    def _qmp_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("enable"):
            raise QMPError(f"Capability '{args['enable'][0]}' not available")
        return {}

    def _query_version(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"qemu": dict(QEMU_VERSION), "package": f"{self.name} {self.version}"}

    def _query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": n} for n in sorted(self.commands)]

    def _query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        rs = self.runstate
        return {"status": rs, "singlestep": False, "running": rs == RunState.RUNNING.value}

    def stop(self) -> None:
        """Pause the program until ``cont`` (QMP ``stop``)."""
        if self.deferred or (self.incoming is not None and self.incoming.runstate == RunState.INMIGRATE):
            return  # not running yet: nothing to stop (QEMU keeps an incoming VM stopped too)
        with self.guest._lock:
            self.guest.pause()
            self.guest.held = True

    def cont(self) -> None:
        """Run the program again: after ``stop``, or after a completed migration left it paused."""
        if self.deferred or (self.incoming is not None and not self.incoming.finished()):
            return  # QEMU: the VM starts once the incoming migration has loaded
        m = self.migration
        if m is not None and m.is_running() and self.guest.held:
            self.guest.held = False  # the migration pauses it again for its final pass if it gets there
            self.guest.resume()
            return
        self.guest.held = False
        if m is not None and m.runstate in (RunState.POSTMIGRATE, RunState.FINISH_MIGRATE) and not m.is_running():
            m.resume()  # the operator's explicit choice: the destination is known not to run
            self.guest.resume()
            return
        if self.incoming is not None and self.incoming.runstate == RunState.INMIGRATE:
            raise QMPError("the incoming migration failed: this side has no state to run")
        self.guest.resume()

    def _stop(self, args: dict[str, Any]) -> dict[str, Any]:
        self.stop()
        return {}

    def _cont(self, args: dict[str, Any]) -> dict[str, Any]:
        self.cont()
        return {}

    def _quit(self, args: dict[str, Any]) -> dict[str, Any]:
        self.quit_requested.set()
        return {}

    def migrate(self, uri: str) -> Migration:
        """Start migrating the program to ``uri`` (QMP ``migrate``); returns at once."""
        if not isinstance(uri, str) or not uri:
            raise QMPError("Parameter 'uri' is missing")
        with self._lock:
            if self._migration_active():
                raise QMPError("There's a migration process in progress")
            if self.deferred or (self.incoming is not None and self.incoming.runstate == RunState.INMIGRATE):
                raise QMPError("Guest is waiting for an incoming migration")
            reg = self._new_registry()
            mig = Migration(reg, uri, guest=self.guest, config=self.config)
            mig.start()
            self.migration = mig
        threading.Thread(target=self._watch_passes, args=(mig,), name="savevm-qmp-pass", daemon=True).start()
        return mig

    def _flush_passes(self, mig: Migration) -> None:
        """One MIGRATION_PASS per dirty-bitmap sync not reported yet (QEMU's migration_bitmap_sync sends it)."""
        with self._pass_lock:
            ram = mig.query().ram or {}
            count = int(ram.get("dirty-sync-count", 0) or 0)
            last = self._passes_sent.get(mig.id, 0)
            for n in range(last + 1, count + 1):
                self.emit("MIGRATION_PASS", {"pass": n})
            self._passes_sent[mig.id] = max(last, count)

    def _watch_passes(self, mig: Migration) -> None:
        """Poll a running migration for new passes (the core has no per-sync hook)."""
        while True:
            done = mig.finished()
            self._flush_passes(mig)
            if done:
                with self._pass_lock:
                    self._passes_sent.pop(mig.id, None)
                return
            time.sleep(PASS_POLL_INTERVAL)

    def _migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        for unsupported in ("blk", "inc", "resume"):
            if args.get(unsupported):
                raise QMPError(f"Parameter '{unsupported}' is not supported by savevm")
        self.migrate(args.get("uri", ""))
        return {}

    def start_incoming(self, uri: str, *, accept_timeout: float | None = None,
                       vmdesc: dict[str, Any] | None = None) -> Incoming:
        """Listen on ``uri`` and load one migration into the program (``-incoming`` / ``migrate-incoming``)."""
        if not isinstance(uri, str) or not uri:
            raise QMPError("Parameter 'uri' is missing")
        with self._lock:
            if self._migration_active():
                raise QMPError("The incoming migration has been started already"
                               if self.incoming is not None else "There's a migration process in progress")
            reg = self._new_registry()
            inc = Incoming(reg, uri, guest=self.guest, config=self.config)
            inc.accept_timeout = accept_timeout
            inc.vmdesc = vmdesc
            inc.skip_unknown_devices = bool(getattr(self.guest, "skip_unknown_devices", False))
            self.guest.pause(quiet=True)  # nothing runs here until the stream is loaded and handed over
            inc.listen()
            inc.start()
            self.incoming = inc
            self.deferred = False
        return inc

    def _migrate_incoming(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self.deferred:
            raise QMPError("'-incoming' was not specified on the command line"
                           if self.incoming is None else "The incoming migration has been started already")
        self.start_incoming(args.get("uri", ""))
        return {}

    def _migrate_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        m = self.migration
        if m is not None and m.is_running():
            m.cancel()
        return {}

    def query_migrate(self) -> dict[str, Any]:
        """``query-migrate``: the source's migration, else the incoming one, else ``{}`` as QEMU answers."""
        m = self.migration
        if m is not None:
            return m.query().as_qmp()
        inc = self.incoming
        if inc is not None:
            out = inc.query().as_qmp()
            if inc.uri and not inc.finished():
                out["socket-address"] = _socket_address(inc.uri)
            return out
        return {}

    def _query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.query_migrate()

    def _set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        caps = args.get("capabilities")
        if not isinstance(caps, list):
            raise QMPError("Parameter 'capabilities' is missing or not a list")
        if self._migration_active():
            raise QMPError("There's a migration process in progress")
        cfg = self.config
        for item in caps:
            if not isinstance(item, dict) or "capability" not in item or "state" not in item:
                raise QMPError("each capability must be {\"capability\": NAME, \"state\": BOOL}")
            if not isinstance(item["state"], bool):
                raise QMPError(f"Invalid parameter type for 'state', expected: boolean (capability "
                               f"{item['capability']!r})")
            cfg = cfg.set_capability(str(item["capability"]), item["state"])
        self.config = cfg
        return {}

    def _query_capabilities(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        names = list(QEMU_CAPABILITIES) + sorted(self.config.plugin_capabilities)
        return [{"capability": n, "state": n in self.config.capabilities} for n in names]

    def _set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        for name, value in args.items():
            cfg = cfg.set_parameter(name, value)  # all validated before any is applied
        self.config = cfg
        m = self.migration
        if m is not None and m.is_running():
            for name, value in args.items():
                m.set_parameter(name, value)
        return {}

    def _query_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        m = self.migration
        cfg = m.config if m is not None and m.is_running() else self.config
        return cfg.parameters.as_qmp()

    def _client_migrate_info(self, args: dict[str, Any]) -> dict[str, Any]:
        """Where the program's clients reconnect after a migration (QEMU's SPICE client handover)."""
        if "protocol" not in args or "hostname" not in args:
            raise QMPError("Parameters 'protocol' and 'hostname' are required")
        fn = getattr(self.program, "client_migrate_info", None)
        if fn is None:
            raise QMPError(f"the program does not hand clients over (protocol {args['protocol']!r})")
        fn(**{k.replace("-", "_"): v for k, v in args.items()})
        self.client_migrate_info = dict(args)
        return {}


def _default_host(config: MigrationConfig) -> Any:
    from savevm.plugins import PluginHost

    return PluginHost(config)


# ---------------------------------------------------------------------------
# the socket server
# ---------------------------------------------------------------------------


def _parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:PATH`` or ``tcp:HOST:PORT``; QEMU's ``,server=on,wait=off`` style suffixes are ignored."""
    if not isinstance(address, str) or ":" not in address:
        raise URIError(str(address), "expected unix:PATH or tcp:HOST:PORT for the QMP monitor")
    head = address.split(",", 1)[0]
    scheme, _, rest = head.partition(":")
    if scheme == "unix":
        if not rest:
            raise URIError(address, "unix: needs a socket path")
        return "unix", rest
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise URIError(address, "expected tcp:HOST:PORT with a port number (0 for any free port)")
        return "tcp", (host.strip("[]") or "127.0.0.1", int(port))
    raise URIError(address, f"the QMP monitor listens on unix:PATH or tcp:HOST:PORT, not {scheme!r}")


class _Client:
    """One connected QMP client: its socket, its negotiation state, its write lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.negotiated = False
        self.lock = threading.Lock()
        self.closed = False

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\r\n").encode()
        with self.lock:
            if self.closed:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def on_event(self, msg: dict[str, Any]) -> None:
        if self.negotiated:
            self.send(msg)

    def close(self) -> None:
        with self.lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class QMPServer:
    """A :class:`QMPMonitor` on a listening socket; every client is served by a thread of its own.

    Use :func:`serve` to make one.  ``address`` is the real address (a tcp
    port 0 gets its number); :meth:`close` stops listening and disconnects
    every client; :meth:`wait_quit` blocks until a client said ``quit``.
    """

    def __init__(self, monitor: QMPMonitor, address: str) -> None:
        self.monitor = monitor
        kind, where = _parse_address(address)
        self._unix_path: str | None = None
        if kind == "unix":
            assert isinstance(where, str)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if os.path.exists(where) and _is_stale_socket(where):
                os.unlink(where)
            old = os.umask(0o077)
            try:
                sock.bind(where)
            except OSError as exc:
                sock.close()
                raise URIError(address, f"cannot listen on {where}: {exc}") from exc
            finally:
                os.umask(old)
            self._unix_path = where
            self.address = f"unix:{where}"
        else:
            assert isinstance(where, tuple)
            sock = socket.socket(socket.AF_INET6 if ":" in where[0] else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(where)
            except OSError as exc:
                sock.close()
                raise URIError(address, f"cannot listen on {where[0]}:{where[1]}: {exc}") from exc
            host, port = sock.getsockname()[:2]
            self.address = f"tcp:{host}:{port}"
        sock.listen(8)
        self._sock = sock
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="savevm-qmp", daemon=True)
        self._thread.start()
        log.info("qmp_listen", address=self.address)

    # ------------------------------------------------------------ lifecycle
    def wait_quit(self, timeout: float | None = None) -> bool:
        """Wait until a client said ``quit``; True if it did."""
        return self.monitor.quit_requested.wait(timeout)

    def close(self) -> None:
        """Stop listening and disconnect every client (the program itself is the caller's)."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            self.monitor.remove_listener(c.on_event)
            c.close()
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass
        self._thread.join(5)

    def __enter__(self) -> QMPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ serving
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            client = _Client(conn)
            with self._lock:
                self._clients.append(client)
            threading.Thread(target=self._serve_client, args=(client,), name="savevm-qmp-client",
                             daemon=True).start()

    def _greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self.monitor._query_version({}), "capabilities": []}}

    def _serve_client(self, client: _Client) -> None:
        self.monitor.add_listener(client.on_event)
        streamer = JSONStreamer()
        try:
            client.send(self._greeting())
            while not client.closed:
                try:
                    data = client.sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                try:
                    for text in streamer.feed(data):
                        self._handle(client, text)
                except QMPError as exc:  # framing: the stream cannot be trusted any more
                    client.send({"error": {"class": "GenericError", "desc": exc.desc}})
                    break
                if self.monitor.quit_requested.is_set():
                    self.monitor.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
                    break
        finally:
            self.monitor.remove_listener(client.on_event)
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()

    def _handle(self, client: _Client, text: bytes) -> None:
        try:
            msg = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            client.send({"error": {"class": "GenericError", "desc": f"JSON parse error, {exc}"}})
            return
        if not isinstance(msg, dict):
            client.send({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}})
            return
        reply: dict[str, Any]
        name = msg.get("execute")
        try:
            if "exec-oob" in msg:
                raise QMPError("QMP input member 'exec-oob' is unexpected (out-of-band was not negotiated)")
            if not isinstance(name, str):
                raise QMPError("QMP input lacks member 'execute'")
            unknown = set(msg) - {"execute", "arguments", "id"}
            if unknown:
                raise QMPError(f"QMP input member '{sorted(unknown)[0]}' is unexpected")
            if not client.negotiated and name != "qmp_capabilities":
                raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
            if client.negotiated and name == "qmp_capabilities":
                raise QMPError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
            log.debug("handle_qmp_command", command=name)
            result = self.monitor.execute(name, msg.get("arguments"))
            if name == "qmp_capabilities":
                client.negotiated = True
            reply = {"return": result}
        except QMPError as exc:
            reply = {"error": {"class": exc.qmp_class, "desc": exc.desc}}
        if "id" in msg:
            reply["id"] = msg["id"]
        client.send(reply)


def _is_stale_socket(path: str) -> bool:
    """A socket file nobody listens on any more (left by a killed process) may be replaced."""
    import stat

    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return True
    finally:
        probe.close()
    return False


def serve(program: Any, address: str, *, config: MigrationConfig | None = None,
          incoming: str | None = None, plugins: Any = None) -> QMPServer:
    """Put ``program`` under a QMP monitor on ``address`` (``unix:PATH`` or ``tcp:HOST:PORT``).

    ``incoming`` makes this the destination: a URI starts listening for a
    migration at once (QEMU's ``-incoming URI``), ``"defer"`` waits for the
    ``migrate-incoming`` command.  Returns the running server; ``close()`` it.
    """
    if config is None:
        config = MigrationConfig()
    monitor = QMPMonitor(program, config=config, plugins=plugins)
    if incoming == "defer":
        monitor.deferred = True
        monitor.guest.pause(quiet=True)
    server = QMPServer(monitor, address)
    if incoming is not None and incoming != "defer":
        try:
            monitor.start_incoming(incoming)
        except BaseException:
            server.close()
            raise
    return server


__all__ = ["JSONStreamer", "MonitoredGuest", "QMPError", "QMPMonitor", "QMPServer", "event_message", "serve"]
