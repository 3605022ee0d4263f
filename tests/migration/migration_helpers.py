"""End-to-end migration helpers: real processes, real sockets, timeouts everywhere.

* :class:`Destination` is a ``savevm incoming`` subprocess; its stdout is
  pumped by a thread (first line: the URI from ``--print-uri``, last line:
  the ``--json`` report), its stderr goes to a file for failure messages.
* :class:`Source` is the demo workload in this process with its own
  registry and plugin host, and a plugin that records every state change.

Every process a test starts is killed by its pid at teardown if it is still
running; every migration still running is cancelled.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import savevm
from savevm.config import MigrationConfig
from savevm.migration import Migration
from savevm.plugins import PluginHost

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from migration_guests import RecordingDemo  # noqa: E402

#: Seconds a destination process may take to start listening (imports on a loaded machine).
DEST_START_TIMEOUT = 45.0
#: Upper bound for any one migration in these tests.
MIGRATION_TIMEOUT = 90.0


def subprocess_env() -> dict[str, str]:
    """The environment for child processes: this folder importable, plain output."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("SAVEVM_DISABLE_PLUGINS", None)
    return env


class ChildProcess:
    """A subprocess whose stdout lines are collected by a thread and stderr goes to a file."""

    def __init__(self, argv: list[str], stderr_path: Path) -> None:
        self.argv = argv
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in reap()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env=subprocess_env(), cwd=str(HERE))
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, name=f"stdout-{self.pid}", daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next stdout line, or None at EOF; raises TimeoutError."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output from pid {self.pid} within {timeout}s; stderr:\n{self.stderr()}") from None

    def wait(self, timeout: float) -> int:
        """Exit code; raises TimeoutError (the process is left for teardown to kill)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"pid {self.pid} still running after {timeout}s; stderr:\n{self.stderr()}") from None
        self._pump.join(10)
        return rc

    def json_report(self) -> dict[str, Any] | None:
        """The last stdout line that parses as a JSON object."""
        for line in reversed(self.lines):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
        return None

    def finish(self, timeout: float = 60.0) -> tuple[int, dict[str, Any] | None]:
        """Wait for the exit; return (exit code, JSON report)."""
        rc = self.wait(timeout)
        return rc, self.json_report()

    def sigkill(self) -> None:
        """SIGKILL this child, by its pid, and reap it."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stderr(self) -> str:
        try:
            self._stderr.flush()
            return self.stderr_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def reap(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self._pump.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


class Destination(ChildProcess):
    """``savevm incoming URI --print-uri --json --guest ...`` as a subprocess."""

    uri: str

    def wait_listening(self, timeout: float = DEST_START_TIMEOUT) -> str:
        line = self.next_line(timeout)
        if not line or not line.strip():
            rc = self.proc.wait(10)
            raise AssertionError(f"destination exited ({rc}) before listening; stderr:\n{self.stderr()}")
        self.uri = line.strip()
        return self.uri


class StateRecorder:
    """A plugin implementing the migration notifier: records (side, old, new)."""

    def __init__(self) -> None:
        self.transitions: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    @savevm.hookimpl
    def savevm_migration_state_changed(self, migration: Any, old: str, new: str) -> None:
        with self._lock:
            self.transitions.append((migration.side, old, new))

    def states(self, side: str = "source") -> list[str]:
        """The states entered on ``side``, in order."""
        with self._lock:
            return [new for s, _old, new in self.transitions if s == side]


class Source:
    """The demo workload in this process, ready to migrate."""

    def __init__(self, cfg: MigrationConfig, **demo: Any) -> None:
        self.cfg = cfg
        self.prog = RecordingDemo(role="source", **demo)
        self.host = PluginHost(cfg)
        self.reg = self.host.new_registry()
        self.prog.register(self.reg)
        self.recorder = StateRecorder()
        assert self.reg.plugins is not None
        self.reg.plugins.register(self.recorder)
        self.mig: Migration | None = None
        self.prog.start()

    def migrate(self, uri: str) -> Migration:
        self.mig = Migration(self.reg, uri, guest=self.prog, config=self.cfg)
        self.mig.start()
        return self.mig

    def ram_handlers(self) -> Any:
        return next(e.handlers for e in self.reg.live() if e.idstr == "ram")

    def close(self) -> None:
        mig = self.mig
        if mig is not None and mig.is_running():
            mig.cancel()
            try:
                mig.wait(20)
            except TimeoutError:
                pass
        self.prog.stop()


class Session:
    """What one test started: processes and sources, all torn down at the end."""

    def __init__(self, tmp: Path, sock_dir: Path) -> None:
        self.tmp = tmp
        self.sock_dir = sock_dir
        self.children: list[ChildProcess] = []
        self.sources: list[Source] = []

    def destination(self, uri: str = "tcp:127.0.0.1:0", *, guest: str = "savevm_ram.demo:DemoProgram",
                    size: str = "32M", extra: list[str] | None = None, wait: bool = True) -> Destination:
        """Start ``savevm incoming`` and (by default) wait until it listens."""
        argv = [sys.executable, "-m", "savevm.cli", "incoming", uri, "--print-uri", "--json",
                "--guest", guest, "--guest-arg", f"size={size}", "--guest-arg", "role=destination",
                "--timeout", "60", "--log-level", "warning", *(extra or [])]
        d = Destination(argv, self.tmp / f"dest-{len(self.children)}.stderr")
        self.children.append(d)
        if wait:
            d.wait_listening()
        return d

    def savevm(self, *args: str, name: str = "cli") -> ChildProcess:
        """Run ``python -m savevm.cli ARGS`` as a child."""
        c = ChildProcess([sys.executable, "-m", "savevm.cli", *args],
                         self.tmp / f"{name}-{len(self.children)}.stderr")
        self.children.append(c)
        return c

    def source(self, cfg: MigrationConfig | None = None, **demo: Any) -> Source:
        s = Source(cfg or MigrationConfig(), **demo)
        self.sources.append(s)
        return s

    def unix_uri(self, name: str = "mig.sock") -> str:
        return f"unix:{self.sock_dir / name}"

    def close(self) -> None:
        for s in self.sources:
            s.close()
        for c in self.children:
            c.reap()


def wait_for(pred: Any, timeout: float, interval: float = 0.01, what: str = "condition") -> None:
    """Poll ``pred()`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
