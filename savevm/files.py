"""Files that hold a program's memory, and file names that came from a stream.

Two dangers, both met on real systems:

* A snapshot or migration file holds a program's memory, so it is created
  0600, and never through a path another user could have prepared: the
  partial file gets an unpredictable name made with ``O_EXCL`` (no symlink
  can be planted for it) and is renamed over the final name on success.
* A RAM block name comes from the peer.  Turned into a path under a dump
  directory it must never leave that directory: no ``..``, no absolute
  part, no NUL, and no symlink followed on the way (every component is
  opened relative to its parent with ``O_NOFOLLOW``).
"""

from __future__ import annotations

import os
import tempfile

from savevm.errors import ChannelError, MigrationError

#: mode of files holding program state
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def create_private_temp(final: str) -> tuple[int, str]:
    """A new 0600 file next to ``final`` with an unpredictable name; (fd, path).

    Written to, then renamed over ``final`` with :func:`os.replace` (which
    replaces a symlink at ``final`` itself, never the file it points to).
    """
    directory, name = os.path.split(os.path.abspath(final))
    try:
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
    except OSError as exc:
        raise ChannelError(f"cannot create a file next to {final!r}: {exc}") from exc
    os.fchmod(fd, PRIVATE_FILE_MODE)
    return fd, path


def safe_components(name: str) -> list[str]:
    """The path components of a stream-supplied name, or MigrationError if it could escape.

    A leading ``/`` is dropped (QEMU's ROM blocks are named ``/rom@etc/...``);
    empty, ``.`` and ``..`` components, NUL bytes and backslashes are refused.
    """
    if "\x00" in name or "\\" in name:
        raise MigrationError(f"block name {name!r} cannot become a file name (NUL or backslash)")
    parts = name.lstrip("/").split("/")
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise MigrationError(f"block name {name!r} would leave the dump directory or is empty")
    return parts


def open_under(root: str, name: str) -> int:
    """Open ``root/<name>`` for writing (created 0600, truncated), never leaving ``root``.

    Directories on the way are created 0700; no component, the last
    included, may be a symlink (``O_NOFOLLOW`` on every step), so a link
    planted inside ``root`` cannot redirect the write.
    """
    parts = safe_components(name)
    flags_dir = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise MigrationError(f"dump directory {root!r} cannot be opened: {exc}") from exc
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, PRIVATE_DIR_MODE, dir_fd=dfd)
            except FileExistsError:
                pass
            try:
                nfd = os.open(part, flags_dir, dir_fd=dfd)
            except OSError as exc:
                raise MigrationError(f"{name!r}: {part!r} is not a plain directory under {root!r}: {exc}") from exc
            os.close(dfd)
            dfd = nfd
        try:
            return os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE_MODE,
                           dir_fd=dfd)
        except OSError as exc:
            raise MigrationError(f"{name!r}: cannot create it under {root!r} (a symlink?): {exc}") from exc
    finally:
        os.close(dfd)


__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "create_private_temp", "open_under", "safe_components"]
