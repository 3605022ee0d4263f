"""Files that hold a program's memory.

A snapshot or migration file holds a program's memory, so it is created
0600, and never through a path another user could have prepared: the
partial file gets an unpredictable name made with ``O_EXCL`` (no symlink can
be planted for it) and is renamed over the final name on success.  (Names
that come from a stream, RAM block idstrs written under a folder, are the
business of :mod:`savevm.cli.blockfiles`.)
"""

from __future__ import annotations

import os
import tempfile

from savevm.errors import ChannelError

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


__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "create_private_temp"]
