"""Drive a real ``qemu-system-x86_64`` (QEMU 7.2) as a migration test oracle.

Standard library only.  The process is started without disks, network or
display, paused (``-S``), TCG only, with a QMP unix socket in a private temp
directory; it is always stopped through its own pid (never by name).

Typical use::

    with QemuProcess(machine="pc-q35-7.2", memory="64M") as vm:
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 0})
        info = vm.migrate_to_file("/tmp/out.mig")

    with QemuProcess(incoming="defer") as vm:
        vm.qmp("migrate-incoming", uri=f"exec:cat {shlex.quote(path)}")
        vm.wait_incoming_done()
        data = vm.read_guest_memory(0x1000, 4096)
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from typing import Any

QEMU_BINARY = "qemu-system-x86_64"


class QemuError(Exception):
    """QEMU could not be started, died, or a command failed."""


class QmpError(QemuError):
    """A QMP command returned an ``error`` object."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.error = error
        super().__init__(f"QMP {command} failed: {error.get('class')}: {error.get('desc')}")


class QemuTimeout(QemuError):
    """Something did not happen within its timeout."""


class QemuExited(QemuError):
    """QEMU exited while we talked to it (7.2 exits(1) when an incoming load fails)."""

    def __init__(self, returncode: int | None, stderr: str) -> None:
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"QEMU exited with status {returncode}: {stderr.strip()}")


class MigrationFailed(QemuError):
    """query-migrate reported ``failed`` (or ``cancelled``)."""

    def __init__(self, info: dict[str, Any], stderr: str) -> None:
        self.info = info
        self.stderr = stderr
        super().__init__(
            f"migration {info.get('status')}: {info.get('error-desc', '')!s}; stderr: {stderr.strip()}"
        )


def find_qemu() -> str | None:
    """Path of qemu-system-x86_64 on PATH, or None."""
    return shutil.which(QEMU_BINARY)


def qemu_version(binary: str | None = None) -> str:
    """First line of ``qemu-system-x86_64 --version``."""
    binary = binary or find_qemu()
    if binary is None:
        raise QemuError(f"{QEMU_BINARY} not found on PATH")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else ""


def exec_cat_to(path: str | os.PathLike[str]) -> str:
    """Migration URI that writes the outgoing stream to *path*."""
    return "exec:cat > " + shlex.quote(os.fspath(path))


def exec_cat_from(path: str | os.PathLike[str]) -> str:
    """Migration URI that reads an incoming stream from *path*."""
    return "exec:cat " + shlex.quote(os.fspath(path))


class _QmpConnection:
    """Minimal line-oriented QMP client over a unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self._buf = b""
            self._next_id = 0
            self.events: list[dict[str, Any]] = []
            self.greeting = self._read_message(timeout)
            if "QMP" not in self.greeting:
                raise QemuError(f"unexpected QMP greeting: {self.greeting!r}")
            self.execute("qmp_capabilities", {}, timeout)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _read_message(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QemuTimeout("timed out waiting for QMP message")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError as exc:
                raise QemuTimeout("timed out waiting for QMP message") from exc
            if not chunk:
                raise QemuError("QMP connection closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any], timeout: float) -> Any:
        self._next_id += 1
        msg_id = f"savevm-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(max(0.0, deadline - time.monotonic()))
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue
            if "error" in reply:
                raise QmpError(command, reply["error"])
            return reply.get("return")


class QemuProcess:
    """A paused qemu-system-x86_64 with a QMP socket; a context manager.

    ``stopped=False`` drops ``-S`` (the guest would then run its firmware).
    ``incoming`` is passed to ``-incoming`` (e.g. ``"defer"`` or
    ``exec_cat_from(path)``).  ``extra_args`` are appended to the command line
    (e.g. ``["-device", "loader,file=...,addr=0x100000,force-raw=on"]``).
    """

    def __init__(
        self,
        machine: str = "pc-q35-7.2",
        memory: str = "64M",
        incoming: str | None = None,
        extra_args: Iterable[str] = (),
        binary: str | None = None,
        stopped: bool = True,
        start_timeout: float = 20.0,
        qmp_timeout: float = 20.0,
    ) -> None:
        self.binary = binary or find_qemu()
        if self.binary is None:
            raise QemuError(f"{QEMU_BINARY} not found on PATH")
        self.machine = machine
        self.memory = memory
        self.incoming = incoming
        self.extra_args = list(extra_args)
        self.stopped = stopped
        self.start_timeout = start_timeout
        self.qmp_timeout = qmp_timeout
        self.tmpdir: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: _QmpConnection | None = None
        self._stderr_file: Any = None
        self.returncode: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def qmp_path(self) -> str:
        assert self.tmpdir is not None
        return os.path.join(self.tmpdir, "qmp.sock")

    @property
    def stderr_path(self) -> str:
        assert self.tmpdir is not None
        return os.path.join(self.tmpdir, "stderr.log")

    def command_line(self) -> list[str]:
        args = [
            self.binary or QEMU_BINARY,
            "-nodefaults",
            "-machine", f"{self.machine},accel=tcg",
            "-m", self.memory,
            "-display", "none",
            "-serial", "none",
            "-monitor", "none",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.stopped:
            args.append("-S")
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        return args + self.extra_args

    def start(self) -> QemuProcess:
        self.tmpdir = tempfile.mkdtemp(prefix="savevm-qemu-")
        self._stderr_file = open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=self._stderr_file,
                stderr=self._stderr_file,
                cwd=self.tmpdir,
            )
            self._connect()
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise QemuExited(self.proc.returncode, self.stderr())
            if os.path.exists(self.qmp_path):
                # Short greeting timeout and reconnect: once in ~100 starts with
                # "-incoming exec:..." QEMU 7.2 accepted the connection but never sent
                # the greeting; a fresh connection gets one.
                greeting_timeout = max(0.1, min(self.qmp_timeout, 3.0, deadline - time.monotonic()))
                try:
                    self._qmp = _QmpConnection(self.qmp_path, greeting_timeout)
                    return
                except (OSError, QemuError, ValueError) as exc:  # not listening yet / lost greeting
                    last_exc = exc
            time.sleep(0.02)
        raise QemuTimeout(f"QMP socket not ready after {self.start_timeout}s ({last_exc})")

    def stop(self, timeout: float = 10.0) -> int | None:
        """Quit QEMU (QMP quit, then SIGTERM, then SIGKILL by pid) and clean up."""
        if self._qmp is not None and self.alive():
            try:
                self._qmp.execute("quit", {}, min(timeout, 5.0))
            except (QemuError, OSError, ValueError):
                pass
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.proc is not None:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and self.proc.poll() is None:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=timeout / 2)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.returncode = self.proc.returncode
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None
        self._final_stderr = self._read_stderr()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        return self.returncode

    def __enter__(self) -> QemuProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _read_stderr(self) -> str:
        if self.tmpdir is None:
            return getattr(self, "_final_stderr", "")
        try:
            with open(self.stderr_path, "rb") as fh:
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def stderr(self) -> str:
        """Everything QEMU wrote to stdout/stderr so far (also after stop())."""
        return self._read_stderr()

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (e.g. after a failed incoming migration)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise QemuTimeout(f"QEMU still running after {timeout}s") from exc

    # -- monitor -----------------------------------------------------------------------------
    def qmp(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        """Run a QMP command and return its ``return`` value (a dict for most commands)."""
        if self._qmp is None:
            raise QemuError("QEMU is not running")
        try:
            return self._qmp.execute(cmd, args, timeout or self.qmp_timeout)
        except QmpError:
            raise
        except (QemuError, OSError, ValueError) as exc:
            # connection reset / closed / garbled: usually QEMU exited (failed incoming load)
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
            if not self.alive():
                raise QemuExited(self.proc.returncode if self.proc else None,
                                 self.stderr()) from exc
            if isinstance(exc, QemuError):
                raise
            raise QemuError(f"QMP {cmd}: {exc}") from exc

    def hmp(self, cmdline: str, timeout: float | None = None) -> str:
        """Run an HMP command through ``human-monitor-command``; return its text output."""
        return self.qmp("human-monitor-command", timeout=timeout, **{"command-line": cmdline})

    @property
    def events(self) -> list[dict[str, Any]]:
        return self._qmp.events if self._qmp is not None else []

    def status(self) -> str:
        """``query-status`` status string, e.g. ``prelaunch``, ``paused``, ``inmigrate``."""
        return self.qmp("query-status")["status"]

    # -- migration ---------------------------------------------------------------------------
    def set_parameters(self, **params: Any) -> None:
        """migrate-set-parameters with python-style names (max_bandwidth -> max-bandwidth)."""
        self.qmp("migrate-set-parameters", **{k.replace("_", "-"): v for k, v in params.items()})

    def set_capabilities(self, **caps: bool) -> None:
        self.qmp(
            "migrate-set-capabilities",
            capabilities=[{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()],
        )

    def _poll_migration(self, timeout: float, done: tuple[str, ...]) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if not self.alive():
                raise QemuExited(self.proc.returncode if self.proc else None, self.stderr())
            info = self.qmp("query-migrate")
            status = info.get("status")
            if status in done:
                return info
            if status in ("failed", "cancelled"):
                raise MigrationFailed(info, self.stderr())
            time.sleep(0.02)
        raise QemuTimeout(f"migration not finished after {timeout}s: {info}")

    def migrate(self, uri: str, timeout: float = 60.0) -> dict[str, Any]:
        """Start an outgoing migration and wait for ``completed``; return query-migrate."""
        self.qmp("migrate", uri=uri)
        return self._poll_migration(timeout, ("completed",))

    def migrate_to_file(self, path: str | os.PathLike[str], timeout: float = 60.0) -> dict[str, Any]:
        """Migrate with ``exec:cat > PATH``; return the final query-migrate dict.

        QEMU reports ``completed`` before its ``cat`` child has necessarily drained the
        pipe, so the stream goes to ``PATH.part`` and is renamed to PATH by the same shell
        command once cat exits; this waits for the rename, so PATH is complete on return.
        """
        path = os.fspath(path)
        part = path + ".part"
        for p in (path, part):
            if os.path.exists(p):
                os.unlink(p)
        uri = f"{exec_cat_to(part)} && mv {shlex.quote(part)} {shlex.quote(path)}"
        deadline = time.monotonic() + timeout
        info = self.migrate(uri, timeout)
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise QemuTimeout(f"migration completed but {path} never appeared")
            time.sleep(0.01)
        return info

    def migrate_incoming(self, uri: str) -> None:
        """For ``incoming="defer"``: start listening on *uri*."""
        self.qmp("migrate-incoming", uri=uri)

    def wait_incoming_done(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the incoming migration is ``completed``; raise MigrationFailed on failure.

        A failed incoming migration makes QEMU 7.2 exit(1); the exception then carries
        QEMU's stderr, which holds the reason.
        """
        return self._poll_migration(timeout, ("completed",))

    # -- guest memory ------------------------------------------------------------------------
    def read_guest_memory(self, addr: int, size: int) -> bytes:
        """Guest-physical memory via HMP ``pmemsave`` into a temp file."""
        assert self.tmpdir is not None
        path = os.path.join(self.tmpdir, f"pmem-{addr:x}-{size:x}.bin")
        # Quote the path: unquoted, HMP parses "SIZE /tmp/..." as a division expression.
        out = self.hmp(f"pmemsave {addr:#x} {size:#x} \"{path}\"")
        if out.strip():
            raise QemuError(f"pmemsave {addr:#x} {size:#x}: {out.strip()}")
        with open(path, "rb") as fh:
            data = fh.read()
        os.unlink(path)
        return data


def loader_args(path: str | os.PathLike[str], addr: int) -> list[str]:
    """Command-line args that load the raw file *path* at guest-physical *addr* at reset.

    Bytes land in ``pc.ram`` at offset *addr* (for *addr* < 0xa0000 or 0x100000..low-RAM top;
    low RAM ends at 2 GiB on q35 with -m >= 2.75G and at 3 GiB on i440fx with -m >= 3.5G) and
    are part of the outgoing migration stream.  QEMU skips them when started with -incoming.
    Raw files only (``force-raw=on``); see FINDINGS.md.
    """
    return ["-device", f"loader,file={os.fspath(path)},addr={addr:#x},force-raw=on"]


class IncomingResult:
    """Outcome of :func:`try_incoming`."""

    def __init__(self) -> None:
        self.ok = False
        self.migrate_status: str | None = None  # query-migrate status on the destination
        self.runstate: str | None = None  # query-status after the load
        self.stderr = ""
        self.returncode: int | None = None  # set if QEMU exited (7.2 exits on a failed load)
        self.memory: dict[int, bytes] = {}  # guest-physical addr -> bytes read after the load

    def error_lines(self) -> list[str]:
        """QEMU's stderr lines with the ``qemu-system-x86_64: `` prefix removed."""
        prefix = f"{QEMU_BINARY}: "
        return [ln[len(prefix):] if ln.startswith(prefix) else ln for ln in self.stderr.splitlines()]

    def __repr__(self) -> str:
        return (f"IncomingResult(ok={self.ok}, migrate_status={self.migrate_status!r}, "
                f"runstate={self.runstate!r}, returncode={self.returncode}, stderr={self.stderr!r})")


def try_incoming(
    path: str | os.PathLike[str],
    machine: str = "pc-q35-7.2",
    memory: str = "64M",
    read: Iterable[tuple[int, int]] = (),
    timeout: float = 20.0,
    defer: bool = True,
    extra_args: Iterable[str] = (),
    stopped: bool = True,
) -> IncomingResult:
    """Feed the stream file *path* to a fresh QEMU and report what happened.

    With ``defer`` the QEMU starts with ``-incoming defer`` and gets ``migrate-incoming``;
    otherwise it starts with ``-incoming exec:cat PATH``.  On success the guest-physical
    ranges in *read* (addr, size) are dumped with pmemsave into ``result.memory``.
    """
    res = IncomingResult()
    uri = exec_cat_from(path)
    vm = QemuProcess(machine, memory, incoming="defer" if defer else uri,
                     extra_args=extra_args, stopped=stopped)
    try:
        with vm:
            try:
                if defer:
                    vm.migrate_incoming(uri)
                info = vm.wait_incoming_done(timeout)
                res.migrate_status = info.get("status")
                res.runstate = vm.status()
                for addr, size in read:
                    res.memory[addr] = vm.read_guest_memory(addr, size)
                res.ok = True
            except MigrationFailed as exc:
                res.migrate_status = exc.info.get("status")
            except QemuTimeout:
                res.migrate_status = "timeout"
                res.runstate = vm.status() if vm.alive() else None
    except QemuExited as exc:  # during start-up (-incoming exec:...) or while polling
        res.migrate_status = "qemu-exited"
        res.returncode = exc.returncode
    res.stderr = vm.stderr()
    return res
