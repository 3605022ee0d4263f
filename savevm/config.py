"""Migration capabilities and parameters, with QEMU 7.2's names and defaults.

Everything is addressed by QEMU's hyphenated names (``max-bandwidth``,
``downtime-limit``, ``xbzrle``...), because those are what users already
type into QMP and what our config files and CLI accept.  The attrs classes
are frozen: a running migration holds one snapshot, and changes go through
:meth:`MigrationConfig.set_parameter`, which validates and returns a new one.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from savevm.errors import ConfigError
from savevm.format import TARGET_PAGE_SIZE

PAGE_SIZE = TARGET_PAGE_SIZE

#: Every capability QEMU 7.2 knows (qapi/migration.json MigrationCapability).
QEMU_CAPABILITIES: tuple[str, ...] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
    "zero-copy-send", "postcopy-preempt",
)
#: savevm's own capabilities (QEMU has no such names; a QEMU peer never hears of them).
#: ``verify``: the destination reports a digest of every block and device before it may run,
#: and the source completes only when they match its own.
SAVEVM_CAPABILITIES: tuple[str, ...] = ("verify",)
#: Every capability name savevm knows.
KNOWN_CAPABILITIES: tuple[str, ...] = QEMU_CAPABILITIES + SAVEVM_CAPABILITIES
#: The capabilities savevm implements; enabling another one is refused clearly.
SUPPORTED_CAPABILITIES: frozenset[str] = frozenset(
    {"xbzrle", "compress", "auto-converge", "events", "rdma-pin-all", "zero-blocks", "verify"}
)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(i?[bB])?\s*$")
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: str | int, key: str = "size") -> int:
    """``"256M"`` -> 268435456.  K/M/G/T are binary, as in QEMU's size parser."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(key, f"expected a size like 4096, 64K, 256M or 1G, got {value!r}")
    n = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if n != int(n):
        raise ConfigError(key, f"size {value!r} is not a whole number of bytes")
    return int(n)


def _parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("on", "true", "yes", "1"):
        return True
    if s in ("off", "false", "no", "0"):
        return False
    raise ConfigError(key, f"expected on/off (true/false), got {value!r}")


def _parse_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip(), 0)
    except ValueError:
        raise ConfigError(key, f"expected an integer, got {value!r}") from None


def _in_range(lo: int, hi: int) -> Callable[[Any, attrs.Attribute, int], None]:
    def check(_inst: Any, attr: attrs.Attribute, value: int) -> None:
        if not lo <= value <= hi:
            raise ConfigError(attr.metadata["qemu"], f"{value} is out of range [{lo}, {hi}]")

    return check


def _cache_size_check(_inst: Any, attr: attrs.Attribute, value: int) -> None:
    check_xbzrle_cache_size(value)


def check_xbzrle_cache_size(value: Any, page_size: int = PAGE_SIZE) -> int:
    """Validate an xbzrle-cache-size and return its number of page slots.

    QEMU 7.2 wants a power-of-two number of pages, at least one, and never
    rounds; the message names the nearest valid sizes so the user does not
    have to do the arithmetic.  The XBZRLE plugin's page cache uses this
    same check, so the parameter and the cache can never disagree.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError("xbzrle-cache-size", f"must be an integer number of bytes, got {value!r}")
    size = int(value)
    items, rest = divmod(size, page_size)
    if size >= page_size and rest == 0 and items & (items - 1) == 0:
        return items
    rule = f"must be a power-of-two number of {page_size}-byte pages and >= {page_size}"
    if size < page_size:
        hint = f"smallest valid size: {page_size}"
    else:
        below = (1 << (items.bit_length() - 1)) * page_size
        hint = f"nearest valid sizes: {below}, {below * 2}"
    raise ConfigError("xbzrle-cache-size", f"{rule}; got {size}; {hint}")


def _one_of(*choices: str) -> Callable[[Any, attrs.Attribute, str], None]:
    def check(_inst: Any, attr: attrs.Attribute, value: str) -> None:
        if value not in choices:
            raise ConfigError(attr.metadata["qemu"], f"expected {' or '.join(choices)}, got {value!r}")

    return check


@attrs.frozen
class DowntimeRamp:
    """``x-downtime-ramp``: the downtime limit a migration that does not converge is allowed, over time.

    Written ``START:STEP:CEILING:INTERVAL`` in milliseconds (``300:100:2000:5000``):
    the limit starts at START and, once the first full pass over memory is
    done, rises by STEP every INTERVAL that the migration keeps iterating,
    never above CEILING.  An empty string (the default) or ``off`` means no
    ramp: ``downtime-limit`` holds throughout.
    """

    start: int
    step: int
    ceiling: int
    interval: int

    def limit_after(self, elapsed_ms: float) -> int:
        """The limit ``elapsed_ms`` after the ramp's clock started."""
        steps = int(max(elapsed_ms, 0) // self.interval)
        return min(self.start + steps * self.step, self.ceiling)

    def __str__(self) -> str:
        return f"{self.start}:{self.step}:{self.ceiling}:{self.interval}"


#: Bounds of the ramp's fields, in ms (the ceiling shares downtime-limit's range).
_RAMP_MAX = 2_000_000
_RAMP_MIN_INTERVAL = 100


def parse_downtime_ramp(value: str) -> DowntimeRamp | None:
    """``"300:100:2000:5000"`` -> a :class:`DowntimeRamp`; ``""`` or ``"off"`` -> None."""
    key = "x-downtime-ramp"
    text = str(value).strip().lower()
    if text in ("", "off", "none"):
        return None
    parts = text.split(":")
    if len(parts) != 4:
        raise ConfigError(key, f"expected START:STEP:CEILING:INTERVAL in ms, e.g. 300:100:2000:5000, got {value!r}")
    try:
        start, step, ceiling, interval = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(key, f"expected four whole numbers of ms (START:STEP:CEILING:INTERVAL), got {value!r}") \
            from None
    if not 0 <= start <= ceiling <= _RAMP_MAX:
        raise ConfigError(key, f"need 0 <= START ({start}) <= CEILING ({ceiling}) <= {_RAMP_MAX} ms")
    if step <= 0:
        raise ConfigError(key, f"STEP must be at least 1 ms, got {step}")
    if not _RAMP_MIN_INTERVAL <= interval <= 3_600_000:
        raise ConfigError(key, f"INTERVAL must be between {_RAMP_MIN_INTERVAL} and 3600000 ms, got {interval}")
    return DowntimeRamp(start, step, ceiling, interval)


def _ramp_check(_inst: Any, _attr: attrs.Attribute, value: str) -> None:
    parse_downtime_ramp(value)


#: ``x-pending-estimate``: how the stop rule counts what is left (see savevm.convergence).
PENDING_ESTIMATES = ("wire", "qemu")
#: ``x-stall-policy``: what a stalled migration does (see savevm.convergence).
STALL_POLICIES = ("throttle", "continue", "fail")


def _names(names: Iterable[str]) -> frozenset[str]:
    return frozenset(names)


def _p(qemu: str, default: Any, kind: str, validator: Any = None) -> Any:
    return attrs.field(default=default, validator=validator, metadata={"qemu": qemu, "kind": kind})


@attrs.frozen
class MigrationParameters:
    """QEMU 7.2 migration parameters (``migrate-set-parameters``), 7.2 defaults."""

    downtime_limit: int = _p("downtime-limit", 300, "int", _in_range(0, 2_000_000))
    max_bandwidth: int = _p("max-bandwidth", 128 << 20, "size", _in_range(0, (1 << 63) - 1))
    xbzrle_cache_size: int = _p("xbzrle-cache-size", 64 << 20, "size", _cache_size_check)
    compress_level: int = _p("compress-level", 1, "int", _in_range(0, 9))
    compress_threads: int = _p("compress-threads", 8, "int", _in_range(1, 255))
    compress_wait_thread: bool = _p("compress-wait-thread", True, "bool")
    decompress_threads: int = _p("decompress-threads", 2, "int", _in_range(1, 255))
    throttle_trigger_threshold: int = _p("throttle-trigger-threshold", 50, "int", _in_range(1, 100))
    cpu_throttle_initial: int = _p("cpu-throttle-initial", 20, "int", _in_range(1, 99))
    cpu_throttle_increment: int = _p("cpu-throttle-increment", 10, "int", _in_range(1, 99))
    cpu_throttle_tailslow: bool = _p("cpu-throttle-tailslow", False, "bool")
    max_cpu_throttle: int = _p("max-cpu-throttle", 99, "int", _in_range(1, 99))
    multifd_channels: int = _p("multifd-channels", 2, "int", _in_range(1, 255))
    max_postcopy_bandwidth: int = _p("max-postcopy-bandwidth", 0, "size", _in_range(0, (1 << 63) - 1))
    x_checkpoint_delay: int = _p("x-checkpoint-delay", 20000, "int", _in_range(0, 2**32 - 1))
    announce_initial: int = _p("announce-initial", 50, "int", _in_range(1, 100_000))
    announce_max: int = _p("announce-max", 550, "int", _in_range(1, 100_000))
    announce_rounds: int = _p("announce-rounds", 5, "int", _in_range(1, 1000))
    announce_step: int = _p("announce-step", 100, "int", _in_range(1, 10_000))
    # savevm's own (x- like QEMU's experimental ones): named bounds on every wait, in ms
    #: the source waits this long for LOADED and then RESUMED (or a QEMU's SHUT) after the stream;
    #: the destination waits this long for GO once it has loaded
    x_handover_timeout: int = _p("x-handover-timeout", 30_000, "int", _in_range(100, 3_600_000))
    #: no progress on the connection (nothing written, or nothing received) for this long while the
    #: program runs fails the migration, on either side
    x_stall_timeout: int = _p("x-stall-timeout", 30_000, "int", _in_range(100, 3_600_000))
    #: the same bound once the source program is paused for the last pass: every second counts
    x_switchover_timeout: int = _p("x-switchover-timeout", 5_000, "int", _in_range(100, 3_600_000))
    #: the source's connect to the destination
    x_connect_timeout: int = _p("x-connect-timeout", 10_000, "int", _in_range(100, 3_600_000))
    # savevm's convergence controls (savevm.convergence, docs/convergence.md)
    #: what the stop rule compares with bandwidth x downtime-limit: "wire", the bytes the pending pages are
    #: expected to cost on the wire (XBZRLE deltas, zero pages, compressed pages as measured), or "qemu",
    #: QEMU's dirty pages x page size
    x_pending_estimate: str = _p("x-pending-estimate", "wire", "str", _one_of(*PENDING_ESTIMATES))
    #: START:STEP:CEILING:INTERVAL (ms): raise the downtime limit while the migration does not converge
    x_downtime_ramp: str = _p("x-downtime-ramp", "", "str", _ramp_check)
    #: passes over dirty memory in a row that must each fail to bring the pending wire bytes
    #: x-stall-reduction percent below the best so far before the migration counts as stalled
    x_stall_iterations: int = _p("x-stall-iterations", 20, "int", _in_range(1, 1_000_000))
    #: percent by which the pending wire bytes must fall below the best so far to count as progress
    x_stall_reduction: int = _p("x-stall-reduction", 10, "int", _in_range(0, 100))
    #: what a stalled migration does: "throttle" (start auto-converge even if the capability is off),
    #: "continue" (only the migration_stalled event), "fail" (cancel: the source resumes)
    x_stall_policy: str = _p("x-stall-policy", "throttle", "str", _one_of(*STALL_POLICIES))
    #: TLS (QEMU's names): a directory laid out as QEMU's tls-creds-x509 expects; "" = no TLS
    tls_creds: str = _p("tls-creds", "", "str")
    #: the name the source checks the destination's certificate against (default: the URI's host)
    tls_hostname: str = _p("tls-hostname", "", "str")
    #: client identities the destination accepts (DNs or CNs, ";"-separated); "" = any the CA signed
    tls_authz: str = _p("tls-authz", "", "str")

    @classmethod
    def names(cls) -> dict[str, attrs.Attribute]:
        """QEMU name -> attribute."""
        return {a.metadata["qemu"]: a for a in attrs.fields(cls)}

    def get(self, name: str) -> Any:
        """Value of a parameter by its QEMU name."""
        a = self.names().get(name)
        if a is None:
            raise ConfigError(name, _unknown("parameter", name, self.names()))
        return getattr(self, a.name)

    def as_qmp(self) -> dict[str, Any]:
        """Shaped like ``query-migrate-parameters``."""
        return {q: getattr(self, a.name) for q, a in self.names().items()}

    @property
    def downtime_ramp(self) -> DowntimeRamp | None:
        """``x-downtime-ramp`` parsed (it was validated when set)."""
        return parse_downtime_ramp(self.x_downtime_ramp)


def convert_parameter(name: str, value: Any) -> Any:
    """Parse a raw value (CLI string, TOML value) for parameter ``name``."""
    a = MigrationParameters.names().get(name)
    if a is None:
        raise ConfigError(name, _unknown("parameter", name, MigrationParameters.names()))
    kind = a.metadata["kind"]
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return value
    if kind == "size":
        return parse_size(value, name)
    if kind == "bool":
        return _parse_bool(value, name)
    return _parse_int(value, name)


def _unknown(what: str, name: str, known: Mapping[str, Any] | frozenset[str] | tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown migration {what} {name!r}{hint}"


@attrs.frozen
class PluginSettings:
    """Which plugins to use and their own options.

    ``disable`` names plugins (entry-point or registration names) to block,
    ``enable`` (if not empty) is an allow-list, ``options`` maps a plugin
    name to its option table.
    """

    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)


@attrs.frozen
class MigrationConfig:
    """Everything that shapes one migration, on either side."""

    capabilities: frozenset[str] = frozenset()
    parameters: MigrationParameters = attrs.field(factory=MigrationParameters)
    #: The machine name sent in the configuration section and required on load.
    machine: str = "savevm"
    #: QEMU migration properties (on for every modern machine type).
    send_configuration: bool = True
    send_section_footer: bool = True
    send_vmdesc: bool = True
    plugins: PluginSettings = attrs.field(factory=PluginSettings)
    #: URI scheme -> the transport scheme that carries it (``{"tcp": "rdma"}`` sends
    #: ``tcp:HOST:PORT`` URIs over the RDMA-style transport): swapping transports is config
    transports: Mapping[str, str] = attrs.field(factory=dict)
    #: capabilities installed plugins add (a third-party page codec's switch, e.g. ``zstd``),
    #: declared through the ``savevm_migration_capabilities`` hook; only these and QEMU's own
    #: names are accepted, so a typo is an error rather than a capability that is silently off
    plugin_capabilities: frozenset[str] = attrs.field(default=frozenset(), converter=_names)
    #: QEMU's ``-mem-prealloc``: sections fault their memory in as soon as it is registered
    #: (in the background), so a destination's load does not pay first-touch page faults
    mem_prealloc: bool = False
    #: a destination faults its memory in only while it waits for its source, and zero pages
    #: release it again (see savevm_ram.RAMList.prefault_while_waiting); None: the command
    #: decides (``savevm incoming`` turns it on, ``--no-prefault`` off; the API leaves it off)
    prefault_while_waiting: bool | None = None

    # ---------------------------------------------------------------- access
    def has(self, capability: str) -> bool:
        """Is ``capability`` on?  Unknown names raise rather than read as off."""
        if capability not in KNOWN_CAPABILITIES and capability not in self.plugin_capabilities:
            raise ConfigError(capability, self._unknown_capability(capability))
        return capability in self.capabilities

    def _unknown_capability(self, name: str) -> str:
        msg = _unknown("capability", name, (*KNOWN_CAPABILITIES, *sorted(self.plugin_capabilities)))
        if self.plugin_capabilities:
            return f"{msg} (installed plugins add: {', '.join(sorted(self.plugin_capabilities))})"
        return msg

    def param(self, name: str) -> Any:
        """A parameter by QEMU name."""
        return self.parameters.get(name)

    def plugin_options(self, name: str) -> Mapping[str, Any]:
        """The ``[plugins.NAME]`` table of a plugin, found by any of its names.

        A plugin registered as ``savevm_xbzrle.plugin`` (module) or
        ``xbzrle`` (entry point) finds a table named ``xbzrle``,
        ``savevm_xbzrle`` or its full registration name.
        """
        opts = self.plugins.options
        short = name.rsplit(".", 1)[-1]
        for key in (name, short, short.removeprefix("savevm_")):
            if key in opts:
                return opts[key]
        for key in (n for n in name.split(".") if n.startswith("savevm_")):
            if key in opts or key.removeprefix("savevm_") in opts:
                return opts.get(key) or opts[key.removeprefix("savevm_")]
        return {}

    # ---------------------------------------------------------------- changes
    def set_parameter(self, name: str, value: Any) -> MigrationConfig:
        """A copy with one parameter changed (value parsed and validated)."""
        v = convert_parameter(name, value)
        a = MigrationParameters.names()[name]
        return attrs.evolve(self, parameters=attrs.evolve(self.parameters, **{a.name: v}))

    def set_capability(self, name: str, on: bool = True) -> MigrationConfig:
        """A copy with one capability switched."""
        if name in self.plugin_capabilities:
            caps = set(self.capabilities)
            caps.add(name) if on else caps.discard(name)
            return attrs.evolve(self, capabilities=frozenset(caps))
        if name not in KNOWN_CAPABILITIES:
            raise ConfigError(name, self._unknown_capability(name))
        if on and name not in SUPPORTED_CAPABILITIES:
            raise ConfigError(
                name,
                f"capability {name!r} is a QEMU capability savevm does not implement "
                f"(supported: {', '.join(sorted(SUPPORTED_CAPABILITIES))})",
            )
        caps = set(self.capabilities)
        caps.add(name) if on else caps.discard(name)
        return attrs.evolve(self, capabilities=frozenset(caps))

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, plugin_capabilities: Iterable[str] = ()) -> MigrationConfig:
        """Build from a mapping shaped like the TOML file (see README).

        ``plugin_capabilities`` are the capability names installed plugins
        declare (``PluginHost.plugin_capabilities()``); ``[capabilities]``
        may switch those on as well as QEMU's.
        """
        known = {"capabilities", "parameters", "machine", "plugins", "transports",
                 "send-configuration", "send-section-footer", "send-vmdesc", "mem-prealloc",
                 "prefault-while-waiting"}
        for k in data:
            if k not in known:
                raise ConfigError(k, f"unknown config key; expected one of {', '.join(sorted(known))}")
        cfg = cls(plugin_capabilities=frozenset(plugin_capabilities))
        caps = data.get("capabilities", {})
        if isinstance(caps, (list, tuple)):
            caps = {c: True for c in caps}
        if not isinstance(caps, Mapping):
            raise ConfigError("capabilities", "expected a table of name = true/false or a list of names")
        for name, on in caps.items():
            cfg = cfg.set_capability(name, _parse_bool(on, name))
        params = data.get("parameters", {})
        if not isinstance(params, Mapping):
            raise ConfigError("parameters", "expected a table of name = value")
        for name, value in params.items():
            cfg = cfg.set_parameter(name, value)
        changes: dict[str, Any] = {}
        if "machine" in data:
            if not isinstance(data["machine"], str) or not 0 < len(data["machine"].encode()) < 256:
                raise ConfigError("machine", "expected a machine name of 1..255 bytes")
            changes["machine"] = data["machine"]
        for key in ("send-configuration", "send-section-footer", "send-vmdesc", "mem-prealloc",
                    "prefault-while-waiting"):
            if key in data:
                changes[key.replace("-", "_")] = _parse_bool(data[key], key)
        if "plugins" in data:
            changes["plugins"] = _plugin_settings(data["plugins"])
        if "transports" in data:
            tr = data["transports"]
            if not isinstance(tr, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in tr.items()):
                raise ConfigError("transports", 'expected a table of scheme = "transport scheme", e.g. tcp = "rdma"')
            changes["transports"] = dict(tr)
        return attrs.evolve(cfg, **changes)

    @classmethod
    def from_toml(cls, path: str | Path, *, plugin_capabilities: Iterable[str] = ()) -> MigrationConfig:
        """Load a TOML config file; syntax errors name the file."""
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read config file: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"invalid TOML: {exc}") from exc
        return cls.from_dict(data, plugin_capabilities=plugin_capabilities)

    def as_dict(self) -> dict[str, Any]:
        """The config as the TOML-shaped mapping :meth:`from_dict` reads."""
        return {
            "machine": self.machine,
            "capabilities": {c: True for c in sorted(self.capabilities)},
            "parameters": self.parameters.as_qmp(),
            "send-configuration": self.send_configuration,
            "send-section-footer": self.send_section_footer,
            "send-vmdesc": self.send_vmdesc,
            "mem-prealloc": self.mem_prealloc,
            **({} if self.prefault_while_waiting is None else {"prefault-while-waiting": self.prefault_while_waiting}),
            "transports": dict(self.transports),
            "plugins": {
                "enable": list(self.plugins.enable),
                "disable": list(self.plugins.disable),
                **{k: dict(v) for k, v in self.plugins.options.items()},
            },
        }


def _plugin_settings(raw: Any) -> PluginSettings:
    if not isinstance(raw, Mapping):
        raise ConfigError("plugins", "expected a table with enable/disable lists and per-plugin tables")
    enable = raw.get("enable", [])
    disable = raw.get("disable", [])
    for key, val in (("plugins.enable", enable), ("plugins.disable", disable)):
        if not isinstance(val, (list, tuple)) or not all(isinstance(v, str) for v in val):
            raise ConfigError(key, "expected a list of plugin names")
    options = {}
    for k, v in raw.items():
        if k in ("enable", "disable"):
            continue
        if not isinstance(v, Mapping):
            raise ConfigError(f"plugins.{k}", "expected a table of plugin options")
        options[k] = dict(v)
    return PluginSettings(enable=tuple(enable), disable=tuple(disable), options=options)
