"""savevm: live state migration for Python programs, in QEMU 7.2's wire format.

The public API, one import away::

    import savevm
    reg = savevm.SectionRegistry()
    reg.register_device("mydev", 0, MyDevice())
    savevm.snapshot("state.bin", reg)
    savevm.restore("state.bin", reg)
"""

from __future__ import annotations

from savevm.config import MigrationConfig, MigrationParameters
from savevm.errors import (
    BadMagicError,
    ChannelError,
    ConfigError,
    ConfigurationMismatchError,
    CorruptStreamError,
    FooterMismatchError,
    MigrationCancelled,
    MigrationError,
    MigrationFailed,
    MigrationStalled,
    PageRangeError,
    PluginError,
    RegistrationError,
    StreamError,
    TrailingDataError,
    TruncatedStreamError,
    UnknownSectionError,
    URIError,
    VersionMismatchError,
)
from savevm.guest import Guest, NullGuest
from savevm.handlers import SaveContext, SaveVMHandlers
from savevm.hookspecs import hookimpl, hookspec
from savevm.load import LoadResult, StreamLoader, load_stream
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile
from savevm.registry import SectionEntry, SectionRegistry
from savevm.save import StreamWriter, save_stream
from savevm.snapshot import restore, snapshot

__version__ = "0.1.0"

__all__ = [
    "BadMagicError", "ChannelError", "ConfigError", "ConfigurationMismatchError", "CorruptStreamError",
    "FooterMismatchError", "Guest", "LoadResult", "MigrationCancelled", "MigrationConfig", "MigrationError",
    "MigrationFailed", "MigrationParameters", "MigrationStalled", "NullGuest", "PageRangeError", "PluginError",
    "PluginHost", "QEMUFile", "RegistrationError", "SaveContext", "SaveVMHandlers", "SectionEntry", "SectionRegistry",
    "StreamError", "StreamLoader", "StreamWriter", "TrailingDataError", "TruncatedStreamError", "URIError",
    "UnknownSectionError", "VersionMismatchError", "hookimpl", "hookspec", "load_stream", "restore",
    "save_stream", "snapshot",
]
