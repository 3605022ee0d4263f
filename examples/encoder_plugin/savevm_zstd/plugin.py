"""The plugin's face to savevm: two hooks.

* ``savevm_migration_capabilities`` (a core hook) declares the capability
  ``zstd``: from then on ``--capability zstd``, ``[capabilities] zstd =
  true`` and QMP ``migrate-set-capabilities`` accept it, and a typo is
  still an error.
* ``ram_page_codecs`` (the RAM plugin's hook) hands the RAM section a fresh
  codec for each migration; its ``capability`` attribute makes the source use
  it only when ``zstd`` is on, while a destination can always decode it.

Options come from the TOML table ``[plugins.zstd]`` (``level = 1..19``).
"""

from __future__ import annotations

from savevm.config import MigrationConfig
from savevm.errors import ConfigError
from savevm.hookspecs import hookimpl
from savevm_zstd.codec import ZstdCodec

OPTIONS = ("level",)


@hookimpl
def savevm_migration_capabilities() -> list[str]:
    """The switch operators turn: ``zstd``."""
    return ["zstd"]


@hookimpl
def ram_page_codecs(config: MigrationConfig) -> list[ZstdCodec]:
    """A fresh codec per migration, with the level from ``[plugins.zstd]``."""
    opts = config.plugin_options("zstd")
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"plugins.zstd.{unknown[0]}", f"unknown option; the zstd plugin takes: {', '.join(OPTIONS)}")
    level = opts.get("level", 3)
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 19:
        raise ConfigError("plugins.zstd.level", f"expected an integer 1..19, got {level!r}")
    return [ZstdCodec(level)]
