"""One-shot save and restore (QEMU's ``savevm`` / ``loadvm``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from savevm.errors import MigrationError
from savevm.load import LoadResult, load_stream
from savevm.qemufile import QEMUFile
from savevm.save import save_stream

if TYPE_CHECKING:
    from savevm.registry import SectionRegistry


def snapshot(path: str | os.PathLike[str], registry: SectionRegistry) -> int:
    """Write every registered section to ``path``; return the bytes written.

    Live sections iterate until they have nothing pending, then everything is
    completed, as ``qemu_savevm_state`` does.  The file is written next to
    its final name and renamed only on success, so a failure never replaces
    a good snapshot with a broken one.
    """
    from savevm.channels.fd import FileTransport

    path = os.fspath(path)
    ch = FileTransport().connect(path)
    f = QEMUFile(ch, writable=True)
    try:
        save_stream(f, registry)
        f.flush()
        f.check_error()
    except BaseException:
        # file:/dev/... gives a plain FdChannel, which has nothing to abort
        abort = getattr(ch, "abort", None)
        abort() if abort is not None else ch.close()
        raise
    n = f.pos
    ch.close()
    return n


def restore(path: str | os.PathLike[str], registry: SectionRegistry) -> LoadResult:
    """Load a snapshot written by :func:`snapshot` (or by QEMU) into the registry's sections."""
    from savevm.channels.fd import FdChannel

    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as exc:
        raise MigrationError(f"cannot open snapshot {str(p)!r}: {exc}") from exc
    f = QEMUFile(FdChannel(fd, f"file:{p}"))
    try:
        return load_stream(f, registry)
    finally:
        f.channel.close()
