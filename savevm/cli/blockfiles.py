"""RAM blocks written to files named after their idstrs, without letting a stream pick the path.

A block's idstr comes from the stream, and QEMU's contain slashes
(``/rom@etc/acpi/tables``), so ``--extract-ram DIR`` (and QemuGuest's
``dump_dir``) make folders of them: ``DIR/rom@etc/acpi/tables``.  A hostile
stream must not use that to write elsewhere, so a name is split on ``/``,
empty parts are dropped (a leading slash is QEMU's habit, not a request for
the filesystem root), and a ``.`` or ``..`` part or a NUL byte is refused.
Every folder is entered through a descriptor opened with ``O_NOFOLLOW``
relative to its parent, and every file is created with ``O_EXCL |
O_NOFOLLOW`` and mode 0600, so a symlink planted inside DIR is never
followed and nothing that already exists is overwritten.

Files are written sparsely: only pages holding something other than zeros
are written, and the file is then sized to the block's length.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import numpy as np

from savevm.errors import MigrationError
from savevm.format import TARGET_PAGE_SIZE

#: Pages examined per step when writing a block (a 16 MiB window: no block-sized temporaries).
_CHUNK_PAGES = 4096
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class UnsafeBlockName(MigrationError):
    """A RAMBlock idstr cannot become a path inside the target folder."""


def block_path_parts(idstr: str) -> list[str]:
    """The path components ``idstr`` maps to under the target folder, or :class:`UnsafeBlockName`."""
    if "\0" in idstr:
        raise UnsafeBlockName(f"RAMBlock name {idstr!r} contains a NUL byte")
    parts = [p for p in idstr.split("/") if p]
    if not parts:
        raise UnsafeBlockName(f"RAMBlock name {idstr!r} names no file")
    bad = [p for p in parts if p in (".", "..")]
    if bad:
        raise UnsafeBlockName(f"RAMBlock name {idstr!r} contains {bad[0]!r}, which would leave the folder")
    return parts


class BlockDir:
    """A folder that RAM blocks are written into, opened once; use as a context manager."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
        except OSError as exc:
            raise MigrationError(f"cannot use {path!r} as the folder for RAM blocks: {exc}") from exc

    def display(self, idstr: str) -> str:
        """Where ``idstr`` goes, for messages and reports."""
        return os.path.join(self.path, *block_path_parts(idstr))

    def create(self, idstr: str) -> int:
        """A new file for ``idstr`` (folders made as needed), opened for writing; the caller closes it."""
        parts = block_path_parts(idstr)
        opened: list[int] = []
        dfd = self.fd
        comp = parts[0]
        try:
            for comp in parts[:-1]:
                try:
                    os.mkdir(comp, 0o700, dir_fd=dfd)
                except FileExistsError:
                    pass
                dfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=dfd)
                opened.append(dfd)
            comp = parts[-1]
            return os.open(comp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC, 0o600,
                           dir_fd=dfd)
        except OSError as exc:
            why = "a symlink is in the way" if _is_symlink(comp, dfd) else exc.strerror
            raise MigrationError(f"cannot create {self.display(idstr)!r} for RAMBlock {idstr!r}: {why}") from exc
        finally:
            for fd in opened:
                os.close(fd)

    def write_block(self, idstr: str, data: Any) -> str:
        """Write ``data`` (a page-aligned uint8 array) as ``idstr``'s file, sparsely; return its path."""
        fd = self.create(idstr)
        try:
            write_sparse(fd, data)
        except OSError as exc:
            raise MigrationError(f"writing {self.display(idstr)!r}: {exc}") from exc
        finally:
            os.close(fd)
        return self.display(idstr)

    def close(self) -> None:
        """Release the folder's descriptor."""
        os.close(self.fd)

    def __enter__(self) -> BlockDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def write_sparse(fd: int, data: Any) -> None:
    """Write the non-zero pages of ``data`` at their offsets, then size the file to ``len(data)``.

    Zero pages become holes, which read back as zeros: the file is
    byte-equal to ``data`` and takes disk space only for what is in use.
    """
    host = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    n = len(host)
    step = _CHUNK_PAGES * TARGET_PAGE_SIZE
    for base in range(0, n - n % TARGET_PAGE_SIZE, step):
        chunk = host[base : min(n - n % TARGET_PAGE_SIZE, base + step)]
        used = np.ascontiguousarray(chunk).view(np.uint64).reshape(-1, TARGET_PAGE_SIZE // 8).any(axis=1)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], used.view(np.int8), [0]))))
        for a, b in edges.reshape(-1, 2):
            _pwrite_all(fd, chunk[a * TARGET_PAGE_SIZE : b * TARGET_PAGE_SIZE].data,
                        base + int(a) * TARGET_PAGE_SIZE)
    tail = n % TARGET_PAGE_SIZE
    if tail and host[n - tail :].any():
        _pwrite_all(fd, host[n - tail :].data, n - tail)
    os.ftruncate(fd, n)


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        k = os.pwrite(fd, buf, offset)
        buf = buf[k:]
        offset += k


__all__ = ["BlockDir", "UnsafeBlockName", "block_path_parts", "write_sparse"]
