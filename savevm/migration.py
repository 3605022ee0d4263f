"""Live migration: the source's migration thread and the destination's loader.

:class:`Migration` is QEMU's ``migration_thread``: set up every live
section, then iterate while the program keeps running, measuring bandwidth
over 100 ms windows (:mod:`savevm.convergence`); once what is pending (by
default its expected cost on the wire) fits in ``bandwidth × downtime-limit``
it pauses the program, completes live sections, sends the devices, EOF and
the vmdesc, and hands over.  Every iteration leaves one record
(:attr:`Migration.records`).

:class:`Incoming` is ``process_incoming_migration``: accept one stream,
load it strictly, and run the program only when the handover says so.

The handover, over the return path (:mod:`savevm.return_path`):

* savevm to savevm: the destination reports LOADED and waits; the source
  says GO; the destination resumes and reports RESUMED.  Before GO the
  source resumes its own copy on any failure (the destination will not
  run); after GO it never does on its own: if RESUMED does not come, the
  outcome is unknown and the source stays paused (``handover-uncertain``).
  A destination that never hears GO stays paused and says so.
* to a QEMU destination: it answers SHUT(0) once loaded; the source then
  completes and stays paused, as QEMU's ``postmigrate``, until an explicit
  :meth:`Migration.resume`.
* one-way channels (file, exec, fd) end when the last byte is written; the
  source program stays paused.
"""

from __future__ import annotations

import abc
import enum
import hmac
import secrets
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import structlog

from savevm.channels import listen as listen_uri
from savevm.channels import open_channel
from savevm.config import MigrationConfig
from savevm.convergence import Convergence, IterationRecord
from savevm.errors import (
    ChannelError,
    CorruptStreamError,
    MigrationCancelled,
    MigrationError,
    MigrationFailed,
    TruncatedStreamError,
)
from savevm.format import MULTIFD_MAGIC, Command
from savevm.guest import Guest, NullGuest
from savevm.handlers import SaveContext
from savevm.load import StreamLoader
from savevm.logging import get_logger
from savevm.qemufile import QEMUFile
from savevm.return_path import (
    MAX_LEN,
    NEGOTIATE_PING,
    NONCE_LEN,
    DestReturnPath,
    RPMessage,
    SourceReturnPath,
    check_message,
    encode_json,
    frame,
)
from savevm.save import StreamWriter
from savevm.stats import MigrationStats

if TYPE_CHECKING:
    from savevm.channels.base import Channel, Listener
    from savevm.plugins import PluginHost
    from savevm.registry import SectionRegistry

log = get_logger("savevm.migration")



class MigrationState(enum.StrEnum):
    """QEMU's MigrationStatus values used by precopy."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class RunState(enum.StrEnum):
    """The migrated program's run state, with QEMU's names (``query-status``)."""

    RUNNING = "running"
    #: destination: waiting for the stream, or loaded and waiting for the source's go
    INMIGRATE = "inmigrate"
    #: source: paused for the final pass
    FINISH_MIGRATE = "finish-migrate"
    #: source: the state was handed over; the program stays paused until resumed explicitly
    POSTMIGRATE = "postmigrate"
    PAUSED = "paused"


class HandoverUncertain(MigrationFailed):
    """The source said GO but never heard that the destination runs: either may hold the program.

    The source therefore stays paused; resume it (:meth:`Migration.resume`)
    only once the destination is known not to run.
    """


RUNNING_STATES = frozenset({MigrationState.SETUP, MigrationState.ACTIVE, MigrationState.DEVICE,
                            MigrationState.CANCELLING})
_ALLOWED = {
    # the destination goes none -> active -> completed, as QEMU's process_incoming_migration does
    MigrationState.NONE: {MigrationState.SETUP, MigrationState.ACTIVE, MigrationState.FAILED,
                          MigrationState.CANCELLING},
    MigrationState.SETUP: {MigrationState.ACTIVE, MigrationState.FAILED, MigrationState.CANCELLING},
    MigrationState.ACTIVE: {MigrationState.DEVICE, MigrationState.COMPLETED, MigrationState.FAILED,
                            MigrationState.CANCELLING},
    MigrationState.DEVICE: {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.CANCELLING},
    MigrationState.CANCELLING: {MigrationState.CANCELLED, MigrationState.FAILED},
}


def _timed_out(exc: BaseException | None) -> bool:
    """Did a socket timeout (a named bound) cause this error, anywhere down its cause chain?"""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, TimeoutError):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _uri_host(uri: str) -> str | None:
    """The host part of a tcp-like URI (what the source's TLS checks), else None."""
    scheme, _, rest = uri.partition(":")
    if scheme in ("unix", "file", "exec", "fd"):
        return None
    host = rest.rpartition(":")[0]
    return host.strip("[]") or None


def _socket_of(channel: Channel | None) -> Any:
    """The socket face of a channel that can carry a return path (tcp, unix, rdma, TLS), else None."""
    sock = getattr(channel, "sock", None)
    if all(hasattr(sock, m) for m in ("recv", "sendall", "settimeout", "shutdown")):
        return sock
    return None


class MigrationBase(abc.ABC):
    """State with cmpxchg-style transitions, events and notifier hooks."""

    side = "source"

    def __init__(
        self,
        registry: SectionRegistry,
        uri: str | None = None,
        *,
        channel: Channel | None = None,
        guest: Guest | None = None,
        config: MigrationConfig | None = None,
        plugins: PluginHost | None = None,
    ) -> None:
        if (uri is None) == (channel is None):
            raise MigrationError("give exactly one of uri= or channel=")
        self.registry = registry
        self.uri = uri
        self.config = config or registry.config
        self.guest: Guest = guest or NullGuest()
        self._channel = channel
        self.plugins = plugins or registry.plugins
        #: tells this migration's log events apart from another's in the same process
        self.id = uuid.uuid4().hex[:12]
        self.log = log.bind(side=self.side, uri=uri or "channel", migration=self.id)
        self._init_side()
        self._state = MigrationState.NONE
        self._state_lock = threading.Lock()
        self._done = threading.Event()
        self.error: MigrationError | None = None

    @property
    def state(self) -> MigrationState:
        return self._state

    def _set_state(self, new: MigrationState, expect: MigrationState | None = None) -> bool:
        with self._state_lock:
            old = self._state
            if expect is not None and old != expect:
                return False
            if new not in _ALLOWED.get(old, set()):
                return False
            self._state = new
        self.log.info("migrate_set_state", old=old.value, new=new.value)
        if self.plugins is not None:
            try:
                self.plugins.state_changed(self, old.value, new.value)
            except Exception:
                self.log.exception("migration_notifier_failed", new=new.value)
        if new in (MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.CANCELLED):
            self._done.set()
        return True

    def _bind_log_context(self) -> None:
        """Every event logged from this migration's thread carries side, uri and id.

        structlog's contextvars are per thread, and the migration runs in a
        thread of its own, so two migrations in one process never mix.
        """
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(side=self.side, uri=self.uri or "channel", migration=self.id)

    @property
    def transport(self) -> str | None:
        """The transport carrying this migration after ``[transports]`` routing (``tcp`` -> ``rdma``).

        None when the migration was given a channel rather than a URI.
        """
        if not self.uri or ":" not in self.uri:
            return None
        scheme = self.uri.partition(":")[0]
        return self.config.transports.get(scheme, scheme)

    def is_running(self) -> bool:
        """True while in setup, active, device or cancelling."""
        return self._state in RUNNING_STATES

    def _ensure_ended(self) -> None:
        """Safety net when the thread exits: never leave a running state behind.

        If recording the real ending itself failed (say, a log sink raised),
        the migration still ends as failed, so ``wait()`` cannot report a
        running state for a thread that is gone.
        """
        with self._state_lock:
            if self._state in RUNNING_STATES or self._state == MigrationState.NONE:
                self._state = MigrationState.FAILED
                if self.error is None:
                    self.error = MigrationFailed(f"{self.side} migration thread ended unexpectedly")
        self._done.set()

    def finished(self) -> bool:
        """True once completed, failed or cancelled."""
        return self._done.is_set()

    # the sides provide these
    _thread: threading.Thread | None

    @abc.abstractmethod
    def _init_side(self) -> None:
        """Side-specific state, set up at the end of ``__init__``."""

    @abc.abstractmethod
    def start(self) -> None:
        """Begin in a background thread."""

    @abc.abstractmethod
    def query(self) -> MigrationStats:
        """Stats now."""

    def wait(self, timeout: float | None = None) -> MigrationStats:
        """Wait for the end (completed, failed or cancelled) and return the stats."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.side} migration still {self.state} after {timeout}s")
        if self._thread is not None:
            self._thread.join(timeout)
        return self.query()

    def run(self) -> MigrationStats:
        """Start, wait, and raise the error if it failed or was cancelled."""
        self.start()
        stats = self.wait()
        if self.error is not None:
            raise self.error
        return stats


class Migration(MigrationBase):
    """The source side of one live migration."""

    side = "source"

    def _init_side(self) -> None:
        self._f: QEMUFile | None = None
        self._writer: StreamWriter | None = None
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._params_lock = threading.Lock()
        self._paused = False
        #: the return path, when the channel can carry one (a socket)
        self._rp: SourceReturnPath | None = None
        #: GO was (possibly) sent: from here the source never resumes on its own
        self._go_sent = False
        self.runstate = RunState.RUNNING
        #: which named bound ended the migration, if one did (e.g. "x-handover-timeout")
        self.bound_fired: str | None = None
        #: the no-progress bound in force (x-stall-timeout, then x-switchover-timeout while paused)
        self._stall_bound = "x-stall-timeout"
        #: verify: our digests at the pause, the time they took, and the verdict
        self._digests: dict[str, str] | None = None
        self.verify_ms: int | None = None
        self.verified: bool | None = None
        # timing and counters (ms unless named otherwise)
        self._t_start = 0.0
        self._t_end: float | None = None
        self.setup_time: int | None = None
        self.downtime: int | None = None
        self.iterations = 0
        self.convergence = Convergence(lambda: self.config, lambda pct: self.guest.set_throttle(pct), self.log)
        self._final_stats: dict[str, Any] | None = None

    # ------------------------------------------------------------ public API
    @property
    def records(self) -> list[IterationRecord]:
        """The canonical per-iteration records so far (the ``migration_iteration`` events), oldest first.

        Once :meth:`wait` has returned for a completed migration, the last
        one has ``stage == "complete"`` and the measured downtime.
        """
        return list(self.convergence.records)

    def start(self) -> None:
        """Start the migration thread (returns at once)."""
        if self._thread is not None:
            raise MigrationError("migration already started")
        self._t_start = time.monotonic()
        if self._channel is None and self.uri is not None:
            # a malformed URI or unknown scheme is the caller's error, raised here, not a failed migration
            from savevm.channels import split_uri

            scheme, _ = split_uri(self.uri)
            if self.registry.plugins is not None:
                self.registry.plugins.get_transport(scheme)
        if not self._set_state(MigrationState.SETUP, MigrationState.NONE):
            raise MigrationError(f"cannot start a migration in state {self.state}")
        self._thread = threading.Thread(target=self._thread_main, name="savevm-migration", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Cancel from any thread; the program is resumed if it was paused."""
        if self._done.is_set():
            return
        if self._go_sent:
            self.log.warning("migrate_cancel_too_late", reason="GO was sent: the destination owns the state")
            return
        if not self._set_state(MigrationState.CANCELLING):
            return
        self._cancel.set()
        ch = self._channel
        shut = getattr(ch, "shutdown", None)
        if shut is not None:
            shut()  # unblock a write stuck in the kernel
        if self._thread is None:
            self._finish_cancel()

    def resume(self) -> None:
        """Run the source program again after it was left paused (QMP ``cont``).

        After a completed migration to a peer that holds the state (QEMU's
        ``postmigrate``), or after an uncertain handover, only the operator
        knows whether the destination runs; this is their explicit choice.
        """
        if self.is_running():
            raise MigrationError(f"cannot resume the source while the migration is {self.state}")
        if self._paused:
            self._paused = False
            self.guest.resume()
            self.runstate = RunState.RUNNING
            self.log.info("vm_resume", reason="explicit")

    def set_parameter(self, name: str, value: Any) -> None:
        """Change a parameter while running (``max-bandwidth``, ``downtime-limit``, ...)."""
        with self._params_lock:
            self.config = self.config.set_parameter(name, value)
            cfg = self.config
        self._apply_config(cfg)
        f = self._f
        # QEMU applies it whenever the stream exists (setup included); during completion the
        # stream runs unlimited and stays so
        if name == "max-bandwidth" and f is not None and self.state in (MigrationState.SETUP,
                                                                         MigrationState.ACTIVE):
            f.set_rate_limit(cfg.parameters.max_bandwidth)
        self.log.info("migrate_set_parameter", name=name, value=cfg.param(name))

    def _apply_config(self, cfg: MigrationConfig) -> None:
        """The one path a config takes: to the plugins (savevm_configure), then to the sections."""
        if self.plugins is not None:
            self.plugins.configure(cfg)
        self.registry.configure(cfg)

    def query(self) -> MigrationStats:
        """Stats now, shaped like query-migrate."""
        now = time.monotonic()
        end = self._t_end or now
        st = MigrationStats(status=self.state.value)
        if self._t_start:
            st.total_time = int((end - self._t_start) * 1000)
        st.setup_time = self.setup_time
        if self.state == MigrationState.COMPLETED:
            st.downtime = self.downtime
            # what the stop decision predicted, beside what the pause measured
            st.expected_downtime = self.convergence.expected_downtime_at_stop
        elif self.is_running():
            st.expected_downtime = self.convergence.expected_downtime
        sections = self._final_stats if self._final_stats is not None else self.registry.query_stats()
        ram = sections.get("ram")
        if ram is not None:
            ram = dict(ram)
            if self.state == MigrationState.COMPLETED:
                ram["remaining"] = 0
                if "pending-wire-bytes" in ram:
                    ram["pending-wire-bytes"] = 0
                tt = max(st.total_time or 1, 1)
                ram["mbps"] = round(ram["transferred"] * 8 / tt / 1000, 3)
            else:
                ram["mbps"] = round(self.convergence.mbps, 3)
            st.ram = ram
        st.xbzrle_cache = sections.get("xbzrle-cache")
        st.compression = sections.get("compression")
        for key, value in sections.items():  # a third-party codec's or section's own stats
            if key not in ("ram", "xbzrle-cache", "compression"):
                st.extra.setdefault(key, value)
        st.cpu_throttle_percentage = self.convergence.throttle_percentage
        if self.convergence.max_throttle_percentage:
            st.extra["cpu-throttle-percentage-max"] = self.convergence.max_throttle_percentage
        if self._t_start:
            st.extra["convergence"] = self.convergence.query()
        st.iterations = self.iterations
        if self._f is not None:
            st.stream_bytes = self._f.pos
        st.extra["runstate"] = self.runstate.value
        st.extra["transport"] = self.transport
        if self.bound_fired is not None:
            st.extra["bound-fired"] = self.bound_fired
        if self.verified is not None:
            st.extra["verify"] = {"verified": self.verified, "source-ms": self.verify_ms,
                                  "destination-ms": (self._rp.loaded or {}).get("digest_ms") if self._rp else None}
        if self.error is not None:
            st.error_desc = str(self.error)
        if self.plugins is not None:
            info = st.as_qmp()
            self.plugins.query_migrate(self, info)
            known = set(MigrationStats().as_qmp()) | {"total-time", "expected-downtime", "downtime", "setup-time",
                                                     "ram", "xbzrle-cache", "compression",
                                                     "cpu-throttle-percentage", "error-desc", "iterations",
                                                     "stream-bytes", "runstate", "bound-fired", "verify", "transport",
                                                     "convergence"}
            st.extra.update({k: v for k, v in info.items() if k not in known})
        return st

    # ------------------------------------------------------------ the thread
    def _thread_main(self) -> None:
        self._bind_log_context()
        try:
            self._migrate()
        except BaseException as exc:  # every ending is recorded, with its cause
            if self._cancel.is_set() and self.state == MigrationState.CANCELLING and not self._go_sent:
                self._finish_cancel()
            else:
                self._fail(exc)
        finally:
            self._t_end = time.monotonic()
            try:
                self._cleanup()
            finally:
                self._ensure_ended()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled("migration cancelled")

    def _connect(self, uri: str) -> Channel:
        """open_channel, bounded by x-connect-timeout and interrupted by cancel.

        The connect runs in a helper thread, so any transport (a plugin's
        too) is bounded without knowing about timeouts: on timeout or cancel
        the migration ends at once, and a connection that arrives later is
        closed by the helper.
        """
        timeout = self.config.parameters.x_connect_timeout / 1000
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["ch"] = open_channel(uri, self.registry.plugins)
            except BaseException as exc:
                box["exc"] = exc
            done.set()
            if box.get("abandoned") and "ch" in box:
                box["ch"].close()

        threading.Thread(target=run, name="savevm-connect", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not done.wait(0.05):
            if self._cancel.is_set() or time.monotonic() > deadline:
                box["abandoned"] = True
                if done.is_set() and "ch" in box:
                    box["ch"].close()
                self._check_cancel()
                self.bound_fired = "x-connect-timeout"
                raise ChannelError(f"cannot connect to {uri} within {timeout:g}s (x-connect-timeout)")
        if "exc" in box:
            raise box["exc"]
        ch: Channel = box["ch"]
        return ch

    def _set_stall_bound(self, param: str) -> None:
        """No progress on the socket for this long fails the migration (a send that blocks, a silent peer)."""
        self._stall_bound = param
        sock = _socket_of(self._channel)
        if sock is not None:
            sock.settimeout(self.config.param(param) / 1000)

    def _migrate(self) -> None:
        cfg = self.config
        if self._channel is None:
            assert self.uri is not None
            self._channel = self._connect(self.uri)
            if cfg.parameters.tls_creds:
                from savevm.channels.tls import wrap_client

                self._channel = wrap_client(self._channel, cfg, _uri_host(self.uri))
        self._check_cancel()
        self._set_stall_bound("x-stall-timeout")
        f = self._f = QEMUFile(self._channel, writable=True, rate_limit=cfg.parameters.max_bandwidth)
        w = self._writer = StreamWriter(f, self.registry, cfg)
        self._apply_config(cfg)
        w.header()
        self._open_return_path(w, f)
        conv = self.convergence
        w.setup(SaveContext(on_dirty_period=conv.dirty_period, migration_id=self.id, on_sync=conv.on_sync))
        self._check_cancel()
        self.setup_time = int((time.monotonic() - self._t_start) * 1000)
        if not self._set_state(MigrationState.ACTIVE, MigrationState.SETUP):
            self._check_cancel()
        self.log.info("migration_setup_done", setup_time=self.setup_time)
        # a max-bandwidth set after the stream was opened but before it was published in _f
        f.set_rate_limit(self.config.parameters.max_bandwidth)
        f.reset_rate_limit()
        conv.start(f.pos, self._t_start)
        while True:
            self._check_cancel()
            f.check_error()
            pending = w.pending_estimate(conv.threshold_size, self.config.parameters.x_pending_estimate)
            if conv.should_iterate(pending):
                w.iterate()
                self.iterations += 1
            else:
                self.log.info("migration_completion", pending=pending.ram, pending_wire=pending.wire,
                              estimate=pending.estimate, threshold=conv.threshold_size, iterations=self.iterations)
                self._complete(w, f)
                conv.record(self.iterations + 1, w.sent_by_kind(), stage="complete", downtime=self.downtime)
                return
            # migration_rate_limit + migration_update_counters, once per loop
            f.rate_limit_wait()
            rp = self._rp
            if rp is not None and rp.progress is not None:
                conv.destination_progress(f.pos, rp.progress[0], rp.progress[3])
                conv.pace(f.pos, rp)
            conv.update(f.pos, pending)
            conv.record(self.iterations, w.sent_by_kind())

    def _open_return_path(self, w: StreamWriter, f: QEMUFile) -> None:
        """OPEN_RETURN_PATH and the negotiation PING, as QEMU sends them, on a channel that can answer."""
        sock = _socket_of(self._channel)
        if sock is None:
            if self.config.has("verify"):
                raise MigrationFailed("capability verify needs a return path: migrate over tcp, unix or rdma")
            return
        w.command(Command.OPEN_RETURN_PATH, b"")
        w.command(Command.PING, NEGOTIATE_PING.to_bytes(4, "big"))
        f.flush()
        f.check_error()
        rp = self._rp = SourceReturnPath(sock, self._cancel)
        f.return_path = rp
        rp.start()
        if self.config.has("verify"):
            timeout = self.config.parameters.x_handover_timeout / 1000
            rp.wait(lambda: rp.savevm_peer is not None, timeout)
            if not rp.savevm_peer:
                raise MigrationFailed("capability verify needs a savevm destination, which reports digests over "
                                      "the return path (this peer is a QEMU or did not answer)")
            w.command(Command.SAVEVM_OPTIONS, encode_json({"verify": True}))
            f.flush()

    def _complete(self, w: StreamWriter, f: QEMUFile) -> None:
        t0 = time.monotonic()
        self._set_state(MigrationState.DEVICE, MigrationState.ACTIVE)
        self.guest.pause()
        self._paused = True
        self.runstate = RunState.FINISH_MIGRATE
        self._set_stall_bound("x-switchover-timeout")
        self._check_cancel()
        f.set_rate_limit(0)
        w.complete_precopy()
        f.flush()
        f.check_error()
        self._final_stats = self.registry.query_stats()
        if self.config.has("verify") and self._rp is not None:
            t_v = time.monotonic()
            self._digests = self.registry.digests()  # paused: this is the state the destination must hold
            self.verify_ms = int((time.monotonic() - t_v) * 1000)
        self._handover(f)
        self.downtime = int((time.monotonic() - t0) * 1000)
        with self._state_lock:
            if self._state == MigrationState.CANCELLING:
                self.log.warning("migrate_cancel_too_late", reason="the destination owns the state")
                self._state = MigrationState.DEVICE
        self.runstate = RunState.POSTMIGRATE
        self._set_state(MigrationState.COMPLETED)
        self.log.info("migration_completed", downtime=self.downtime, iterations=self.iterations,
                      bytes=f.pos, total_time=int((time.monotonic() - self._t_start) * 1000))

    def _handover(self, f: QEMUFile) -> None:
        """After the whole stream: make sure exactly one side runs the program."""
        rp = self._rp
        if rp is None:
            return  # one-way channel: done once written; the program stays paused
        timeout = self.config.parameters.x_handover_timeout / 1000
        rp.wait(lambda: rp.savevm_peer is not None or rp.shut is not None or rp.refused is not None, timeout)
        if rp.savevm_peer:
            self._handover_savevm(f, rp, timeout)
        else:
            self._handover_qemu(rp, timeout)

    def _handover_savevm(self, f: QEMUFile, rp: SourceReturnPath, timeout: float) -> None:
        got = rp.wait(lambda: rp.loaded is not None or rp.refused is not None, timeout)
        if rp.refused is not None:
            raise MigrationFailed(f"destination refused the stream: {rp.refused}")
        if not got:
            self._check_cancel()
            if not rp.closed:
                self.bound_fired = "x-handover-timeout"
            raise MigrationFailed(
                f"the destination did not report the stream loaded within {timeout:g}s "
                f"({'connection closed' if rp.closed else 'x-handover-timeout'}); it never got the go, "
                "so the source keeps the program")
        if self._cancel.is_set():
            raise MigrationCancelled("migration cancelled before the handover")
        if self._digests is not None:
            self._compare_digests(rp.loaded or {})
        nonce = bytes.fromhex(str(rp.loaded.get("nonce", ""))) if rp.loaded else b""
        if len(nonce) != NONCE_LEN:
            raise MigrationFailed("the destination's LOADED carries no valid nonce to answer")
        self._go_sent = True  # from the first byte of GO on, the destination may run
        f.put_buffer(frame(RPMessage.GO, nonce))
        f.flush()
        if f.get_error() is not None:
            raise HandoverUncertain(f"sending GO failed ({f.get_error()}); the destination may or may not run: "
                                    "the source program stays paused")
        if not rp.wait(lambda: rp.resumed, timeout):
            if not rp.closed:
                self.bound_fired = "x-handover-timeout"
            raise HandoverUncertain(
                f"GO was sent but the destination did not confirm it runs within {timeout:g}s "
                f"({'connection closed' if rp.closed else 'x-handover-timeout'}); the source program stays "
                "paused: resume it only if the destination is known not to run")

    def _compare_digests(self, loaded: dict[str, Any]) -> None:
        """verify: the destination's digests must equal ours, block by block and device by device."""
        theirs = loaded.get("digests")
        if not isinstance(theirs, dict):
            raise MigrationFailed("verify: the destination reported no digests")
        ours = self._digests or {}
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        self.verified = not differ
        self.log.info("migration_verify", items=len(ours), differ=differ, source_ms=self.verify_ms,
                      destination_ms=loaded.get("digest_ms"))
        if differ:
            raise MigrationFailed(f"verify: the destination's copy differs from the source in {', '.join(differ)}; "
                                  "it was told not to run, and the source keeps the program")

    def _handover_qemu(self, rp: SourceReturnPath, timeout: float) -> None:
        """A QEMU destination answers SHUT(0) once loaded (and started), SHUT(1) on failure."""
        self._go_sent = True  # QEMU starts on its own once loaded: the handover is out of our hands
        if not rp.wait(lambda: rp.shut is not None, timeout):
            if not rp.closed:
                self.bound_fired = "x-handover-timeout"
            raise HandoverUncertain(
                f"the destination sent no SHUT within {timeout:g}s after the stream; it may be running: "
                "the source program stays paused")
        if rp.shut != 0:
            self._go_sent = False  # it failed to load, so it will not run: safe to resume ours
            raise MigrationFailed(f"the destination failed to load the stream (return path SHUT {rp.shut})")

    # ------------------------------------------------------------ endings
    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, MigrationError):
            err: MigrationError = exc
        else:
            err = MigrationFailed(f"migration failed: {exc!r}")
            err.__cause__ = exc
        rp = self._rp
        if isinstance(exc, ChannelError) and rp is not None:
            rp.wait(lambda: rp.refused is not None, 0.5)  # the destination may have said why
            if rp.refused:
                err = MigrationFailed(f"destination refused the stream: {rp.refused}")
                err.__cause__ = exc
        if self.bound_fired is None and _timed_out(exc):
            self.bound_fired = self._stall_bound
            err = MigrationFailed(f"no progress on the connection for {self.config.param(self._stall_bound)} ms "
                                  f"({self._stall_bound}): {err}")
            err.__cause__ = exc
        self.error = err
        self.log.error("migrate_fd_error", error=str(err), bound=self.bound_fired)
        self._abort_sections()
        if self._go_sent:
            # the destination may run the program: resuming ours could make two
            self.runstate = RunState.POSTMIGRATE
            self.log.error("migration_handover_uncertain", error=str(err))
        else:
            self._send_abort(str(err))
            self._resume_guest()
        with self._state_lock:
            if self._state == MigrationState.CANCELLING:
                self._state = MigrationState.ACTIVE  # a failure while cancelling is still a failure
        self._set_state(MigrationState.FAILED)

    def _send_abort(self, reason: str) -> None:
        """Tell a savevm destination waiting for GO not to run (best effort: it stays paused anyway)."""
        rp, f = self._rp, self._f
        if rp is None or not rp.savevm_peer or f is None or f.get_error() is not None:
            return
        try:
            f.put_buffer(frame(RPMessage.ABORT, reason.encode()[:1000]))
            f.flush()
        except Exception:
            self.log.debug("migration_abort_not_sent")

    def _finish_cancel(self) -> None:
        self.error = MigrationCancelled("migration cancelled by the user")
        self._send_abort("cancelled by the user")
        self._abort_sections()
        self._resume_guest()
        self._set_state(MigrationState.CANCELLED, MigrationState.CANCELLING)

    def _abort_sections(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
        abort = getattr(self._channel, "abort", None)
        if abort is not None:
            abort()

    def _resume_guest(self) -> None:
        if self._paused:
            self._paused = False
            self.runstate = RunState.RUNNING
            try:
                self.guest.resume()
            except Exception:
                self.log.exception("guest_resume_failed")

    def _cleanup(self) -> None:
        if self._writer is not None:
            self._writer.cleanup()
        self.convergence.reset_throttle()
        try:
            self.guest.set_throttle(0)
        except Exception:
            self.log.exception("guest_throttle_reset_failed")
        ch = self._channel
        if self._rp is not None:
            self._rp.stopping = True
        if ch is not None:
            try:
                ch.close()
            except Exception as exc:  # exec: a failing command is a failed migration
                if self.state == MigrationState.COMPLETED:
                    self.log.warning("channel_close_failed", error=str(exc))
        if self._rp is not None:
            self._rp.join()
        self._done.set()


class Incoming(MigrationBase):
    """The destination side: accept one stream and load it."""

    side = "destination"

    def _init_side(self) -> None:
        self._listener: Listener | None = None
        self._thread: threading.Thread | None = None
        self._t_start = 0.0
        self._t_end: float | None = None
        self._f: QEMUFile | None = None
        self.bytes_loaded = 0
        self.accept_timeout: float | None = None
        self._rp: DestReturnPath | None = None
        self._watcher: threading.Thread | None = None
        self._listener_closed = False
        self._extra_error: MigrationError | None = None
        #: cancel() was called: whatever error ends the load, it ends as cancelled
        self._cancelled = False
        self.runstate = RunState.INMIGRATE
        self.bound_fired: str | None = None
        #: a vmdesc describing device sections this side does not model (e.g. a real QEMU
        #: source's CPUs and chipset), so they are skipped by size instead of refused; only
        #: needed for a source that sends no vmdesc of its own
        self.vmdesc: dict[str, Any] | None = None
        #: skip device sections this side does not model, sized from the stream's own vmdesc
        #: (a RAM-only receiver of a QEMU); otherwise an unknown device section is refused
        self.skip_unknown_devices = False

    def listen(self) -> str:
        """Start listening; returns the real URI (``tcp:127.0.0.1:0`` gets its port)."""
        if self._channel is None and self._listener is None:
            assert self.uri is not None
            self._listener = listen_uri(self.uri, self.registry.plugins)
            self.uri = self._listener.uri
            self.log = self.log.bind(uri=self.uri)
            self.log.info("migration_incoming_listen", uri=self.uri)
            scheme = self.uri.partition(":")[0]  # the listener's own scheme: what carries the stream
            for e in self.registry.live():
                if e.handlers is not None:
                    e.handlers.load_listening(scheme)
        return self.uri or "channel"

    def start(self) -> None:
        """Listen (if not yet) and load in a background thread."""
        self.listen()
        self._thread = threading.Thread(target=self._thread_main, name="savevm-incoming", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop waiting / loading; what was loaded is discarded (guest not resumed)."""
        if self._done.is_set():
            return
        self._cancelled = True
        if self._listener is not None:
            self._listener.close()
        shut = getattr(self._channel, "shutdown", None)
        if shut is not None:
            shut()
        if self._thread is None:
            self._fail(MigrationCancelled("incoming migration cancelled"))

    def query(self) -> MigrationStats:
        """Destination-side stats (status, total-time, ram pages loaded)."""
        st = MigrationStats(status=self.state.value)
        if self._t_start:
            st.total_time = int(((self._t_end or time.monotonic()) - self._t_start) * 1000)
        if self._f is not None:
            st.stream_bytes = self._f.pos
        st.ram = self.registry.query_stats().get("ram")
        if self.error is not None:
            st.error_desc = str(self.error)
        st.extra["runstate"] = self.runstate.value
        st.extra["transport"] = self.transport
        if self.bound_fired is not None:
            st.extra["bound-fired"] = self.bound_fired
        return st

    def _thread_main(self) -> None:
        self._bind_log_context()
        try:
            self._load()
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._t_end = time.monotonic()
            if self._listener is not None:
                self._listener_closed = True
                self._listener.close()
            if self._channel is not None:
                try:
                    self._channel.close()
                except Exception:
                    self.log.debug("incoming_channel_close_failed")
            self._ensure_ended()

    def _load(self) -> None:
        if self._channel is None:
            assert self._listener is not None
            self._channel = self._accept(self._listener)
            self._watcher = threading.Thread(target=self._watch_listener, name="savevm-incoming-watch",
                                             daemon=True)
            self._watcher.start()
        self._t_start = time.monotonic()
        self._set_state(MigrationState.ACTIVE)
        sock = _socket_of(self._channel)
        if sock is not None:
            # a source that goes silent this long is gone: fail instead of waiting forever
            sock.settimeout(self.config.parameters.x_stall_timeout / 1000)
        rp = self._rp = DestReturnPath(sock) if sock is not None else None
        f = self._f = QEMUFile(self._channel)
        f.return_path = rp
        loader = StreamLoader(f, self.registry, self.config, vmdesc=self.vmdesc, return_path=rp,
                              skip_unknown_devices=self.skip_unknown_devices or self.vmdesc is not None,
                              keep_vmdesc=False)
        loader.load()
        self.bytes_loaded = f.pos
        self._check_extra_connections()
        if rp is not None and rp.negotiated:
            nonce = secrets.token_bytes(NONCE_LEN)
            loaded: dict[str, Any] = {"bytes": f.pos, "nonce": nonce.hex()}
            if loader.verify:
                t_v = time.monotonic()
                loaded["digests"] = self.registry.digests()
                loaded["digest_ms"] = int((time.monotonic() - t_v) * 1000)
            rp.send(RPMessage.LOADED, encode_json(loaded))
            self._await_go(f, sock, nonce)
        self.guest.resume()
        self.runstate = RunState.RUNNING
        # completed here before the source hears RESUMED, so no one sees the source done and us not
        self._set_state(MigrationState.COMPLETED)
        if rp is not None:
            rp.send(RPMessage.RESUMED)
            rp.shut(0)
        self.log.info("migration_incoming_completed", bytes=f.pos)

    def _accept(self, listener: Listener) -> Channel:
        """The source's connection; with TLS, the first one that proves who it is.

        A client that fails the handshake or ``tls-authz`` is refused and
        logged, and the listener waits on (within ``accept_timeout``): an
        unauthenticated peer cannot take the destination's one stream.
        """
        deadline = None if self.accept_timeout is None else time.monotonic() + self.accept_timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ch = listener.accept(left)
            if not self.config.parameters.tls_creds:
                return ch
            from savevm.channels.tls import wrap_server

            try:
                return wrap_server(ch, self.config)
            except ChannelError as exc:
                self.log.warning("migration_incoming_tls_refused", peer=getattr(ch, "name", "?"), error=str(exc))
                ch.close()

    def _watch_listener(self) -> None:
        """One stream per listener: any other connection is inspected, refused and logged.

        A QEMU source with capability ``multifd`` sends its pages over extra
        connections; loading only the main stream would "complete" with
        those pages missing, so such a connection fails the migration at once.
        """
        lst = self._listener
        while lst is not None and not self._done.is_set():
            try:
                extra = lst.accept(0.25)
            except (ChannelError, OSError, ValueError):  # a timeout, or the listener closed under us
                if self._listener_closed or self._done.is_set():
                    return
                continue
            self._inspect_extra(extra)

    def _inspect_extra(self, extra: Channel) -> None:
        sock = _socket_of(extra)
        head = b""
        if sock is not None:
            try:
                sock.settimeout(2.0)
                head = sock.recv(4, socket.MSG_PEEK)
            except OSError:
                head = b""
        name = getattr(extra, "name", "?")
        if head == MULTIFD_MAGIC.to_bytes(4, "big"):
            self._extra_error = MigrationFailed(
                "the source has capability multifd: its pages travel over extra connections savevm does not "
                f"receive ({name}); turn multifd off on the source (migrate-set-capabilities multifd off)")
            self.log.error("migration_incoming_multifd_refused", peer=name)
            shut = getattr(self._channel, "shutdown", None)
            if shut is not None:
                shut()  # end the load now rather than waiting on a source stalled by its multifd channels
        else:
            self.log.warning("migration_incoming_refused_connection", peer=name, first_bytes=head.hex())
        try:
            extra.close()
        except Exception:
            self.log.debug("incoming_extra_close_failed")

    def _check_extra_connections(self) -> None:
        """Before anything is reported loaded: did a multifd channel show up?"""
        if self._extra_error is not None:
            raise self._extra_error

    def _await_go(self, f: QEMUFile, sock: socket.socket | None, nonce: bytes) -> None:
        """Loaded: wait for the source's GO (or ABORT); without it the program never runs here."""
        timeout = self.config.parameters.x_handover_timeout / 1000
        if sock is not None:
            sock.settimeout(timeout)
        off = f.pos
        try:
            kind = f.get_be16()
            length = f.get_be16()
            t = check_message(kind, length, extensions=True, offset=off)
            body = f.get_bytes(length, limit=MAX_LEN)
        except TruncatedStreamError as exc:
            raise MigrationFailed("the source closed the connection without saying go: the program stays "
                                  "paused here (the source keeps or resumes it)") from exc
        except ChannelError as exc:
            if isinstance(exc.__cause__, TimeoutError):
                self.bound_fired = "x-handover-timeout"
                raise MigrationFailed(f"no go from the source within {timeout:g}s (x-handover-timeout): the "
                                      "program stays paused here") from exc
            raise
        if t == RPMessage.ABORT:
            raise MigrationFailed(f"the source aborted the handover: {body.decode(errors='replace')}; the "
                                  "program stays paused here")
        if t != RPMessage.GO:
            raise CorruptStreamError(f"expected GO or ABORT after the stream, found {t.name}", off)
        if not hmac.compare_digest(body, nonce):
            raise MigrationFailed("GO does not answer this destination's LOADED (a replayed or forged stream): "
                                  "the program stays paused here")

    def _fail(self, exc: BaseException) -> None:
        if self._cancelled and not isinstance(exc, MigrationCancelled):
            err: MigrationError = MigrationCancelled(f"incoming migration cancelled ({exc})")
            err.__cause__ = exc
        elif self._extra_error is not None:
            err = self._extra_error  # the real cause of a load cut short
            err.__cause__ = exc
        elif isinstance(exc, MigrationError):
            err = exc
        else:
            err = MigrationFailed(f"incoming migration failed: {exc!r}")
            err.__cause__ = exc
        if self.bound_fired is None and _timed_out(exc):
            connected = self._t_start > 0
            self.bound_fired = "x-stall-timeout" if connected else "accept-timeout"
            err = MigrationFailed(
                f"the source sent nothing for {self.config.parameters.x_stall_timeout} ms (x-stall-timeout): {err}"
                if connected else f"no source connected within {self.accept_timeout:g}s: {err}")
            err.__cause__ = exc
        self.error = err
        self.log.error("load_migration_failed", error=str(err), bound=self.bound_fired)
        rp = self._rp
        if rp is not None:
            rp.send(RPMessage.REFUSED, str(err).encode()[:4000])
            rp.shut(1)
        self._set_state(MigrationState.FAILED)


__all__ = ["HandoverUncertain", "Incoming", "Migration", "MigrationBase", "MigrationState", "RunState"]
