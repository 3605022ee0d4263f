"""Programs for the end-to-end migration tests.

Importable both by the test process (``tests/migration`` is on ``sys.path``
under pytest's rootdir-relative import) and by the ``savevm incoming``
subprocesses, which get this folder on ``PYTHONPATH`` from the conftest and
load these classes with ``--guest migration_guests:NAME``.
"""

from __future__ import annotations

import threading
from typing import Any

from savevm_ram.demo import DemoProgram


class RecordingDemo(DemoProgram):
    """The demo workload, recording every pause, resume and throttle it is told.

    ``pause_gate``: when set to an Event, ``pause()`` announces itself on
    ``pause_entered`` and blocks until the gate opens, so a test can act
    while the migration sits in the ``device`` state.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events: list[tuple[str, int]] = []
        self.throttles: list[int] = []
        self.pause_gate: threading.Event | None = None
        self.pause_entered = threading.Event()

    def pause(self) -> None:
        self.events.append(("pause", 0))
        self.pause_entered.set()
        if self.pause_gate is not None and not self.pause_gate.wait(60):
            raise RuntimeError("test pause gate never opened")
        super().pause()

    def resume(self) -> None:
        self.events.append(("resume", 0))
        super().resume()

    def set_throttle(self, percent: int) -> None:
        self.events.append(("throttle", int(percent)))
        self.throttles.append(int(percent))
        super().set_throttle(percent)

    @property
    def is_paused(self) -> bool:
        """True while the workload is held by ``pause()``."""
        return self._paused.is_set()

    @property
    def max_throttle(self) -> int:
        return max(self.throttles, default=0)

    @property
    def current_throttle(self) -> int:
        return self._throttle


class RamOnlyDemo(DemoProgram):
    """The demo's RAM blocks without its device section (a destination that lacks a device)."""

    def register(self, registry: Any) -> None:
        import savevm_ram

        savevm_ram.register_ram(registry, self.ram)


class DeviceOnlyDemo(DemoProgram):
    """The demo's device without its RAM (a destination that lacks the ``ram`` section)."""

    def register(self, registry: Any) -> None:
        registry.register_device("demo-device", 0, self.device)


class DiesOnResumeDemo(DemoProgram):
    """A destination that reads the whole stream, then dies while taking over."""

    def resume(self) -> None:
        import os

        os._exit(3)


class SneakyDemo(RecordingDemo):
    """A source whose workload writes its numpy buffers directly, telling the tracker nothing."""

    def _run(self) -> None:
        import time

        import numpy as np

        rng = np.random.default_rng(self.seed + 7)
        while not self._stop.is_set():
            if self._paused.is_set():
                self._idle.set()
                time.sleep(0.001)
                continue
            self._idle.clear()
            for _ in range(64):
                buf = self.buffers[int(rng.integers(len(self.buffers)))]
                page = int(rng.integers(len(buf) // 4096))
                buf[page * 4096 : page * 4096 + 16] = rng.integers(0, 256, 16, dtype=np.uint8)
            self.pages_dirtied += 64
            self._idle.set()
            time.sleep(0.005)
