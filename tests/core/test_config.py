"""MigrationConfig: QEMU 7.2 defaults, validation, sizes, TOML."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from savevm.config import (
    QEMU_CAPABILITIES,
    SUPPORTED_CAPABILITIES,
    MigrationConfig,
    MigrationParameters,
    check_xbzrle_cache_size,
    parse_size,
)
from savevm.errors import ConfigError

QEMU_72_DEFAULTS = {
    "downtime-limit": 300,
    "max-bandwidth": 134217728,
    "xbzrle-cache-size": 67108864,
    "compress-level": 1,
    "compress-threads": 8,
    "decompress-threads": 2,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "max-cpu-throttle": 99,
    "multifd-channels": 2,
    "compress-wait-thread": True,
    "cpu-throttle-tailslow": False,
    "max-postcopy-bandwidth": 0,
    "x-checkpoint-delay": 20000,
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
}


def test_defaults_are_qemu_72() -> None:
    cfg = MigrationConfig()
    for name, value in QEMU_72_DEFAULTS.items():
        assert cfg.param(name) == value, name
    # savevm's own parameters are x- prefixed, like QEMU's experimental ones
    assert {k: v for k, v in cfg.parameters.as_qmp().items() if not k.startswith(("x-", "tls-"))
            or k in QEMU_72_DEFAULTS} == QEMU_72_DEFAULTS
    assert cfg.param("tls-creds") == cfg.param("tls-hostname") == cfg.param("tls-authz") == ""  # 7.2: no TLS
    assert cfg.capabilities == frozenset()
    assert all(not cfg.has(c) for c in QEMU_CAPABILITIES)
    assert cfg.send_configuration and cfg.send_section_footer and cfg.send_vmdesc


def test_unknown_parameter_names_key_and_suggests() -> None:
    cfg = MigrationConfig()
    with pytest.raises(ConfigError) as ei:
        cfg.set_parameter("downtime-limt", 100)
    assert ei.value.key == "downtime-limt"
    assert "downtime-limit" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        cfg.param("max_bandwidth")
    assert ei.value.key == "max_bandwidth"
    assert "max-bandwidth" in str(ei.value)


def test_unknown_capability_names_key_and_suggests() -> None:
    cfg = MigrationConfig()
    with pytest.raises(ConfigError) as ei:
        cfg.set_capability("xbzlre")
    assert ei.value.key == "xbzlre"
    assert "xbzrle" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        cfg.has("auto-converg")
    assert ei.value.key == "auto-converg" and "auto-converge" in str(ei.value)


def test_unsupported_qemu_capability_refused_clearly() -> None:
    with pytest.raises(ConfigError) as ei:
        MigrationConfig().set_capability("postcopy-ram")
    assert ei.value.key == "postcopy-ram"
    assert "does not implement" in str(ei.value)
    # switching it off is harmless
    assert not MigrationConfig().set_capability("postcopy-ram", False).has("postcopy-ram")
    with pytest.raises(ConfigError) as ei:
        MigrationConfig.from_dict({"capabilities": {"postcopy-ram": True}})
    assert ei.value.key == "postcopy-ram"


@pytest.mark.parametrize("cap", sorted(SUPPORTED_CAPABILITIES))
def test_supported_capabilities_switch(cap: str) -> None:
    cfg = MigrationConfig().set_capability(cap)
    assert cfg.has(cap)
    assert not cfg.set_capability(cap, False).has(cap)


@pytest.mark.parametrize("name,value", [
    ("downtime-limit", 2_000_001), ("downtime-limit", -1), ("compress-level", 10), ("compress-threads", 0),
    ("decompress-threads", 0), ("throttle-trigger-threshold", 0), ("throttle-trigger-threshold", 101),
    ("cpu-throttle-initial", 100), ("cpu-throttle-increment", 0), ("max-cpu-throttle", 100),
    ("multifd-channels", 0), ("max-bandwidth", -1),
])
def test_out_of_range_names_key(name: str, value: int) -> None:
    with pytest.raises(ConfigError) as ei:
        MigrationConfig().set_parameter(name, value)
    assert ei.value.key == name
    assert str(value) in str(ei.value)


@pytest.mark.parametrize("name,value", [("compress-level", "high"), ("compress-level", True),
                                        ("compress-wait-thread", "maybe"), ("max-bandwidth", "12Q")])
def test_bad_value_type_names_key(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as ei:
        MigrationConfig().set_parameter(name, value)
    assert ei.value.key == name


def test_set_parameter_returns_new_frozen_config() -> None:
    a = MigrationConfig()
    b = a.set_parameter("downtime-limit", "500")
    assert b is not a
    assert a.param("downtime-limit") == 300 and b.param("downtime-limit") == 500
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        a.machine = "other"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        a.parameters.downtime_limit = 1  # type: ignore[misc]
    assert a.set_parameter("compress-wait-thread", "off").param("compress-wait-thread") is False


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("1G", 1 << 30), ("64M", 64 << 20), ("64m", 64 << 20), ("512K", 512 << 10),
    ("1.5K", 1536), ("2T", 2 << 40), ("256MiB", 256 << 20), (" 8 M ", 8 << 20), (12345, 12345),
])
def test_size_suffixes(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "1X", "-5", "0.3K", "1 G B"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text, "max-bandwidth")


def test_size_parameters_accept_suffixes() -> None:
    cfg = MigrationConfig().set_parameter("max-bandwidth", "1G").set_parameter("xbzrle-cache-size", "64M")
    assert cfg.param("max-bandwidth") == 1 << 30
    assert cfg.param("xbzrle-cache-size") == 64 << 20


@pytest.mark.parametrize("value,near", [
    (100 << 20, (64 << 20, 128 << 20)),
    (3 * 4096, (8192, 16384)),
    (5000, (4096, 8192)),
])
def test_xbzrle_cache_size_not_power_of_two(value: int, near: tuple[int, int]) -> None:
    with pytest.raises(ConfigError) as ei:
        MigrationConfig().set_parameter("xbzrle-cache-size", value)
    assert ei.value.key == "xbzrle-cache-size"
    assert f"nearest valid sizes: {near[0]}, {near[1]}" in str(ei.value)


def test_xbzrle_cache_size_below_a_page() -> None:
    with pytest.raises(ConfigError) as ei:
        MigrationConfig().set_parameter("xbzrle-cache-size", 1024)
    assert "4096" in str(ei.value)


@given(st.integers(0, 20))
def test_xbzrle_cache_size_powers_of_two_accepted(shift: int) -> None:
    check_xbzrle_cache_size(4096 << shift)
    assert MigrationParameters(xbzrle_cache_size=4096 << shift).xbzrle_cache_size == 4096 << shift


def test_from_toml_valid(tmp_path) -> None:  # noqa: ANN001
    p = tmp_path / "mig.toml"
    p.write_text(
        'machine = "pc-q35-7.2"\n'
        "send-vmdesc = false\n"
        "[capabilities]\nxbzrle = true\nauto-converge = false\n"
        '[parameters]\nmax-bandwidth = "1G"\ndowntime-limit = 100\nxbzrle-cache-size = "128M"\n'
        '[plugins]\ndisable = ["rdma"]\n[plugins.xbzrle]\nlevel = 3\n'
    )
    cfg = MigrationConfig.from_toml(p)
    assert cfg.machine == "pc-q35-7.2"
    assert cfg.send_vmdesc is False
    assert cfg.capabilities == {"xbzrle"}
    assert cfg.param("max-bandwidth") == 1 << 30
    assert cfg.param("downtime-limit") == 100
    assert cfg.param("xbzrle-cache-size") == 128 << 20
    assert cfg.plugins.disable == ("rdma",)
    assert cfg.plugins.options == {"xbzrle": {"level": 3}}
    # round trip through the TOML-shaped dict
    assert MigrationConfig.from_dict(cfg.as_dict()) == cfg


def test_from_toml_syntax_error_names_file(tmp_path) -> None:  # noqa: ANN001
    p = tmp_path / "broken.toml"
    p.write_text("[parameters\nmax-bandwidth = 1\n")
    with pytest.raises(ConfigError) as ei:
        MigrationConfig.from_toml(p)
    assert ei.value.key == str(p)
    assert "TOML" in str(ei.value)


def test_from_toml_missing_file(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError):
        MigrationConfig.from_toml(tmp_path / "absent.toml")


@pytest.mark.parametrize("text,key", [
    ('[parameters]\ncompress-level = 42\n', "compress-level"),
    ('[parameters]\nno-such-param = 1\n', "no-such-param"),
    ('[capabilities]\nxbzrl = true\n', "xbzrl"),
    ('unknown-top = 1\n', "unknown-top"),
    ('machine = ""\n', "machine"),
    ('[plugins]\ndisable = "rdma"\n', "plugins.disable"),
    ('[plugins]\nxbzrle = 3\n', "plugins.xbzrle"),
    ('capabilities = 3\n', "capabilities"),
])
def test_from_toml_invalid_values_name_key(tmp_path, text: str, key: str) -> None:  # noqa: ANN001
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        MigrationConfig.from_toml(p)
    assert ei.value.key == key


def test_capabilities_as_list() -> None:
    cfg = MigrationConfig.from_dict({"capabilities": ["xbzrle", "compress"]})
    assert cfg.capabilities == {"xbzrle", "compress"}
