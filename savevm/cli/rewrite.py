"""``savevm rewrite REF OUT --ram BLOCK=FILE``: REF's stream with RAM blocks replaced.

REF is loaded the way ``savevm analyze`` loads it (every check of the real
loader), then OUT is written as a complete image a destination loads in one
go:

* REF's header and configuration record, byte for byte;
* REF's RAM section (same section id and version) with REF's block list in
  REF's order: a START with the list, a PART with every page of every block
  (a block named by ``--ram`` from its FILE, every other as REF left it
  once loaded), and an END that only closes the section, as QEMU's own
  streams of a paused guest look;
* REF's FULL device sections, byte for byte and in REF's order, unless
  ``--ram-only``;
* EOF, then REF's vmdesc (or, with ``--ram-only``, one listing no device,
  which keeps a QEMU destination quiet).

Commands in REF (return path, pings) are not copied: a file has no return
path, and a QEMU destination reading one refuses a PING.

OUT is written to ``OUT.part`` (created with O_EXCL | O_NOFOLLOW, mode
0600), flushed to disk, and renamed to OUT only when complete, so a failed
rewrite never leaves a truncated stream under OUT's name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from savevm.channels.fd import FdChannel
from savevm.cli.analyze import StreamSource, analyze
from savevm.errors import ConfigError, MigrationError, PluginError
from savevm.format import TARGET_PAGE_SIZE, SectionType
from savevm.qemufile import QEMUFile
from savevm.vmdesc import vmdesc_json

#: Pages read from a replacement FILE (or taken from a loaded block) per step: 4 MiB.
_CHUNK_PAGES = 1024
#: Bytes copied from REF per read when a section goes through unchanged.
_COPY_CHUNK = 1 << 20
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def parse_ram_specs(specs: list[str]) -> dict[str, str]:
    """``--ram BLOCK=FILE`` arguments -> {block: file}; the first ``=`` separates them."""
    out: dict[str, str] = {}
    for spec in specs:
        block, sep, path = spec.partition("=")
        if not sep or not block or not path:
            raise ConfigError("--ram", f"expected BLOCK=FILE, got {spec!r}")
        if block in out:
            raise ConfigError("--ram", f"block {block!r} is given twice")
        out[block] = path
    return out


def _ram_image() -> Any:
    try:
        from savevm_ram import image
    except ImportError as exc:
        raise PluginError("savevm rewrite writes RAM sections and needs the RAM plugin: install savevm-ram "
                          "(pip install -e plugins/ram)") from exc
    return image


def _file_chunks(path: str, length: int) -> Iterator[np.ndarray]:
    """The replacement FILE as page chunks, checking that it is still exactly ``length`` bytes."""
    buf = np.empty(_CHUNK_PAGES * TARGET_PAGE_SIZE, dtype=np.uint8)
    with open(path, "rb") as fh:
        done = 0
        while done < length:
            want = min(len(buf), length - done)
            view = buf.data[:want]
            got = 0
            while got < want:
                n = fh.readinto(view[got:])
                if not n:
                    raise MigrationError(f"--ram {path!r} shrank while it was read ({done + got} of {length} bytes)")
                got += n
            done += want
            yield buf[:want].reshape(-1, TARGET_PAGE_SIZE)
        if fh.read(1):
            raise MigrationError(f"--ram {path!r} grew while it was read (more than {length} bytes)")


def _block_chunks(block: Any) -> Iterator[np.ndarray]:
    pages = block.host[: block.used_length].reshape(-1, TARGET_PAGE_SIZE)
    for lo in range(0, len(pages), _CHUNK_PAGES):
        yield pages[lo : lo + _CHUNK_PAGES]


def _copy(f: QEMUFile, src: StreamSource, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        data = src.pread(min(_COPY_CHUNK, end - offset), offset)
        if not data:
            raise MigrationError(f"{src.name!r} shrank while it was copied (at offset {offset})")
        f.put_buffer_async(data)
        offset += len(data)


def rewrite(ref: str, out: str, ram: dict[str, str], *, ram_only: bool = False,
            max_ram: int | None = None) -> dict[str, Any]:
    """Write OUT from REF with the blocks in ``ram`` ({block: file}) replaced; return a summary."""
    image = _ram_image()
    with StreamSource(ref) as src:
        an = analyze(src, max_ram=max_ram)
        if not an.ok:
            raise MigrationError(f"REF {ref!r} cannot be rewritten: {an.report['error']}")
        if an.ram_section is None or an.header_end is None:
            raise MigrationError(f"REF {ref!r} has no RAM section to rewrite")
        by_name = {b.idstr: b for b in an.blocks}
        unknown = sorted(set(ram) - set(by_name))
        if unknown:
            raise ConfigError("--ram", f"REF has no RAMBlock {', '.join(map(repr, unknown))} "
                                       f"(its blocks: {', '.join(map(repr, by_name))})")
        for name, path in ram.items():
            try:
                size = os.stat(path).st_size
            except OSError as exc:
                raise ConfigError("--ram", f"cannot read {path!r}: {exc}") from exc
            if size != by_name[name].used_length:
                raise ConfigError("--ram", f"{path!r} is {size} bytes, RAMBlock {name!r} is "
                                           f"{by_name[name].used_length} bytes: the file must be exactly its length")
        part = out + ".part"
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC, 0o600)
        except FileExistsError as exc:
            raise MigrationError(f"{part!r} exists (another rewrite running, or left over: remove it)") from exc
        except OSError as exc:
            raise MigrationError(f"cannot create {part!r}: {exc}") from exc
        f = QEMUFile(FdChannel(fd, f"file:{part}"), writable=True)
        counts = image.ImageCounts()
        devices = 0
        try:
            _copy(f, src, 0, an.header_end)
            sid, version = an.ram_section
            ram_rec = next(r for r in an.sections if r.section_id == sid)
            f.put_byte(SectionType.SECTION_START)
            f.put_be32(sid)
            f.put_counted_string(ram_rec.idstr)
            f.put_be32(ram_rec.instance_id)
            f.put_be32(version)
            image.put_block_list(f, [(b.idstr, b.used_length) for b in an.blocks])
            image.put_eos(f)
            _footer(f, sid)
            f.put_byte(SectionType.SECTION_PART)
            f.put_be32(sid)
            for b in an.blocks:
                chunks = _file_chunks(ram[b.idstr], b.used_length) if b.idstr in ram else _block_chunks(b)
                image.put_block_pages(f, b.idstr, chunks, counts)
            image.put_eos(f)
            _footer(f, sid)
            f.put_byte(SectionType.SECTION_END)
            f.put_be32(sid)
            image.put_eos(f)
            _footer(f, sid)
            if not ram_only:
                for r in an.sections:
                    if r.kind == "FULL":
                        _copy(f, src, r.offset, r.size)
                        devices += 1
            f.put_byte(SectionType.EOF)
            if an.vmdesc_at is not None and not ram_only:
                _copy(f, src, an.vmdesc_at[0], src.size - an.vmdesc_at[0])
            elif ram_only:
                desc = vmdesc_json({"page_size": TARGET_PAGE_SIZE, "devices": []})
                f.put_byte(SectionType.VMDESCRIPTION)
                f.put_be32(len(desc))
                f.put_buffer(desc)
            f.flush()
            f.check_error()
            os.fsync(fd)
            written = f.pos
        except BaseException as exc:
            try:
                f.channel.close()
            finally:
                os.unlink(part)
            if isinstance(exc, OSError) and not isinstance(exc, MigrationError):
                raise MigrationError(f"writing {part!r}: {exc}") from exc
            raise
        f.channel.close()
        try:
            os.replace(part, out)
        except OSError as exc:
            os.unlink(part)
            raise MigrationError(f"cannot rename {part!r} to {out!r}: {exc}") from exc
    return {"ref": ref, "out": out, "bytes": written, "machine": an.report["machine"],
            "blocks": [{"idstr": b.idstr, "used_length": b.used_length,
                        "from": ram.get(b.idstr, "REF")} for b in an.blocks],
            "device_sections": devices, "zero": counts.zero, "normal": counts.normal}


def _footer(f: QEMUFile, section_id: int) -> None:
    f.put_byte(SectionType.SECTION_FOOTER)
    f.put_be32(section_id)


__all__ = ["parse_ram_specs", "rewrite"]
