"""What the migrated program offers the migration: pause, resume, throttle.

QEMU stops vCPUs (``vm_stop``), restarts them, and slows them down for
auto-converge (``cpu_throttle_set``).  A Python program does the same by
implementing :class:`Guest`; :class:`NullGuest` is for state that nobody
writes while it migrates.

The pause contract
------------------

``pause()`` is where the source's final pass begins: after it returns, the
migration sends the last dirty pages and the device sections, and what it
sends is what the destination will run.  So a program must guarantee, when
``pause()`` returns:

1. **No more writes to migrated state.**  No thread of the program, no timer,
   no callback may change a registered RAM block or device until
   ``resume()`` -- a write after the pause is lost (it misses the final pass)
   or, worse, half of it travels.
2. **In-flight work is drained, one way or the other.**  A request being
   handled when the pause comes is either *finished* (its effect is in
   migrated state and, if it is answered, the answer has been sent) before
   ``pause()`` returns, or *held*: not applied, not answered, waiting.  A held
   request is then served by whichever side runs next: here after
   ``resume()`` (the migration failed or was cancelled), or by the
   destination after the handover (tell its client where to go: the
   ``completed`` state change, see ``savevm_migration_state_changed``).
   Never answer a request whose effect is not in migrated state.
3. **Pause returns promptly**: the time it takes is downtime.

``resume()`` is called on the source when a migration fails or is cancelled
(and by an explicit QMP ``cont`` after a completed one), and on the
destination once the loaded state is handed over; before that, a
destination program must not change migrated state either (it may accept
connections and hold their requests).  After a completed migration the
source program stays paused (QEMU's ``postmigrate``).
``set_throttle`` may be called from the migration thread at any time.
``examples/kv_service`` implements all of it with a request gate.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Guest(Protocol):
    """The migrated program, as the migration thread sees it."""

    def pause(self) -> None:
        """Stop changing migrated state; return once nothing will write it any more.

        Requests in flight are finished (applied and answered) or held
        (neither) before this returns: see the pause contract in this
        module's documentation.
        """
        ...

    def resume(self) -> None:
        """Continue (after a failed or cancelled migration on the source, or after load on the destination)."""
        ...

    def set_throttle(self, percent: int) -> None:
        """Slow down to ``100 - percent`` % of full speed (0 = no throttle)."""
        ...


class NullGuest:
    """A guest with nothing to pause."""

    def __init__(self) -> None:
        self.paused = False
        self.throttle = 0

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def set_throttle(self, percent: int) -> None:
        self.throttle = percent


@runtime_checkable
class Program(Guest, Protocol):
    """A migratable program as the CLI loads it with ``--guest module:callable``.

    Besides the :class:`Guest` controls it registers its own sections (RAM
    blocks through ``savevm_ram.register_ram``, devices through
    ``registry.register_device``); ``register`` is called once per
    migration, each time with a fresh registry.  Optional methods the CLI
    uses when present: ``start()`` (begin running: on the source before
    migrating, and with ``savevm incoming --run`` on the destination, where
    the program is paused first and resumed by the handover), ``stop()``
    (end it), ``report() -> dict`` (extra JSON for ``--json``), and
    ``client_migrate_info(protocol, hostname, port, ...)`` (QMP's command of
    that name: where the program's clients reconnect after a migration).
    """

    def register(self, registry: Any) -> None:
        """Register the program's sections into a migration's registry."""
        ...
