"""A program with RAM and a device of its own, in two versions: how device state evolves.

``Thermostat`` is the device as version 3 of the program ships it; version 2
is the same device one release earlier.  Both register the same section name,
``thermostat``, so a stream written by one can be loaded by the other -- when
the vmstate rules allow it:

* a **version 2 stream into the version 3 program** loads: the fields version 3
  added (``history``) are not on the wire and keep their defaults
  (``version_id=3`` on the field says so);
* a **version 3 stream into the version 2 program** is refused with
  ``VersionMismatchError``: it carries fields version 2 does not know;
* the **subsection** ``thermostat/alarm`` travels only when it is needed (an
  alarm is set), so a stream without an alarm stays readable by a program
  that does not have the subsection at all.

Run as a program (``--guest thermostat:Thermostat --guest-arg version=2``) or
with ``python thermostat.py save|load FILE --version N``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any

import attrs
import numpy as np

import savevm
import savevm_ram
from savevm import vmstate as vs


def _alarm_needed(dev: Any) -> bool:
    return bool(dev.alarm_celsius)


@vs.vmsd("thermostat", version_id=3, minimum_version_id=1,
         subsections=[vs.Subsection("thermostat/alarm", needed=_alarm_needed)])
@attrs.define
class ThermostatV3:
    """Version 3: adds a history of readings."""

    target: int = vs.field(vs.uint16, default=20)
    current: int = vs.field(vs.uint16, default=18)
    mode: int = vs.field(vs.uint8, default=0, version_id=2)           # since version 2
    history: list[int] = vs.field(vs.array(vs.uint16, 4), factory=lambda: [0] * 4, version_id=3)
    alarm_celsius: int = vs.field(vs.uint16, default=0, subsection="thermostat/alarm")


@vs.vmsd("thermostat", version_id=2, minimum_version_id=1,
         subsections=[vs.Subsection("thermostat/alarm", needed=_alarm_needed)])
@attrs.define
class ThermostatV2:
    """Version 2, one release earlier."""

    target: int = vs.field(vs.uint16, default=20)
    current: int = vs.field(vs.uint16, default=18)
    mode: int = vs.field(vs.uint8, default=0, version_id=2)
    alarm_celsius: int = vs.field(vs.uint16, default=0, subsection="thermostat/alarm")


DEVICES = {2: ThermostatV2, 3: ThermostatV3}


class Thermostat:
    """RAM (a log buffer) plus the device; ``role=source`` fills both with recognisable values."""

    def __init__(self, version: str | int = 3, role: str = "source", alarm: str | int = 0,
                 ram: str | int = 4 << 20) -> None:
        self.version = int(version)
        if self.version not in DEVICES:
            raise savevm.ConfigError("version", f"this program ships device versions 2 and 3, not {version}")
        self.mem = np.zeros(int(ram), dtype=np.uint8)
        self.device: Any = DEVICES[self.version]()
        if role == "source":
            self.mem[::4096] = np.arange(len(self.mem) // 4096, dtype=np.uint64).astype(np.uint8) | 1
            self.device.target, self.device.current, self.device.mode = 22, 21, 2
            self.device.alarm_celsius = int(alarm)
            if self.version >= 3:
                self.device.history = [19, 20, 21, 21]

    # savevm Program
    def register(self, registry: Any) -> None:
        savevm_ram.register_ram(registry, savevm_ram.RAMList([savevm_ram.RAMBlock("thermo.log", self.mem)]))
        registry.register_device("thermostat", 0, self.device)

    def pause(self) -> None:
        """Nothing runs in the background here."""

    def resume(self) -> None:
        """Nothing to restart."""

    def set_throttle(self, percent: int) -> None:
        """Nothing to slow down."""

    def report(self) -> dict[str, Any]:
        return {"version": self.version, "device": attrs.asdict(self.device),
                "ram-sha256": hashlib.sha256(self.mem.tobytes()).hexdigest()[:16]}


def main() -> int:
    ap = argparse.ArgumentParser(description="save or load the thermostat program's state")
    ap.add_argument("action", choices=("save", "load"))
    ap.add_argument("file")
    ap.add_argument("--version", type=int, default=3)
    ap.add_argument("--alarm", type=int, default=0, help="set an alarm (the subsection then travels)")
    args = ap.parse_args()
    prog = Thermostat(args.version, role="source" if args.action == "save" else "destination", alarm=args.alarm)
    reg = savevm.SectionRegistry()
    prog.register(reg)
    try:
        if args.action == "save":
            savevm.snapshot(args.file, reg)
            print(f"saved by version {args.version}: {prog.report()['device']}")
        else:
            savevm.restore(args.file, reg)
            print(f"loaded into version {args.version}: {prog.report()['device']}")
    except savevm.MigrationError as exc:
        print(f"refused by version {args.version}: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
