"""The savevm exception tree.

Every failure a user can cause or meet derives from :class:`MigrationError`,
so one ``except savevm.MigrationError`` is enough for a caller that only wants
to know "did it work".  Stream errors carry the byte offset at which the
problem was found, because a migration stream has no other landmarks: an
offset is what lets someone open the file in a hex editor and look.
"""

from __future__ import annotations


class MigrationError(Exception):
    """Root of every error savevm raises on purpose."""


class ConfigError(MigrationError, ValueError):
    """A capability, parameter or plugin setting is unknown or out of range.

    ``key`` names the offending setting so tools can point at it.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class URIError(MigrationError, ValueError):
    """A migration URI cannot be parsed or names no known transport."""

    def __init__(self, uri: str, message: str) -> None:
        super().__init__(f"{uri!r}: {message}")
        self.uri = uri


class ChannelError(MigrationError, OSError):
    """The transport failed: connection refused or reset, write error, ..."""


class RegistrationError(MigrationError):
    """A section or plugin was registered twice, or not at all when needed."""


class PluginError(MigrationError):
    """A plugin is misconfigured, missing, or implements an unknown hook."""


class StreamError(MigrationError):
    """The incoming stream is not what the loader expected.

    ``offset`` is the byte offset in the stream where the bad data starts
    (``None`` when not known, e.g. on the sending side).
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        where = f" at offset {offset} (0x{offset:x})" if offset is not None else ""
        super().__init__(f"{message}{where}")
        self.offset = offset
        self.detail = message


class TruncatedStreamError(StreamError):
    """The stream ended before a complete record could be read."""


class CorruptStreamError(StreamError):
    """A byte or value read from the stream is not valid where it appears."""


class BadMagicError(CorruptStreamError):
    """The stream does not start with QEVM and version 3."""


class UnknownSectionError(StreamError):
    """A section names an (idstr, instance_id) or section id we do not have."""


class VersionMismatchError(StreamError):
    """A section's version is newer than supported or older than the minimum."""


class FooterMismatchError(CorruptStreamError):
    """A section footer is missing or names a different section id."""


class TrailingDataError(StreamError):
    """Bytes follow the end of the stream where nothing may follow."""


class PageRangeError(CorruptStreamError):
    """A RAM page record points outside its block."""


class ConfigurationMismatchError(StreamError):
    """The configuration section (machine name, capabilities) does not match."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled by the user (source) or the peer."""


class MigrationFailed(MigrationError):
    """The migration failed; ``__cause__`` holds the underlying error."""


class MigrationStalled(MigrationFailed):
    """The migration stopped making progress and ``x-stall-policy`` is ``fail``: the source keeps running."""
