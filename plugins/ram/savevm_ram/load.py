"""The RAM section's load side (QEMU's ``ram_load_precopy``), strictly checked.

:class:`RAMLoader` owns everything only the destination needs: the block
the last record named, the decoders by wire flag, and the third-party codecs
the source announced.  Every record's block and offset are validated before
a byte is written, so a corrupt stream can fail a migration but never write
outside a block.  Runs of ``PAGE|CONTINUE``, ``ZERO|CONTINUE`` and
``COMPRESS_PAGE|CONTINUE`` records are parsed straight out of QEMUFile's
4 MiB staging buffer in a tight loop; anything else takes the general path.
A zero page is written only where the block does not already read as zero,
so zero pages loaded into fresh memory allocate nothing (QEMU's
``is_zero_range`` check).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from savevm.errors import (
    ConfigurationMismatchError,
    CorruptStreamError,
    MigrationError,
    PageRangeError,
    StreamError,
    UnknownSectionError,
    VersionMismatchError,
)
from savevm_ram.fingerprint import block_fingerprints, digest, fingerprints
from savevm_ram.memory import discard
from savevm_ram.pipeline import zero_pages
from savevm_ram.wire import (
    FLAGS_MASK,
    PAGE_BITS,
    PAGE_MASK,
    PAGE_RECORD_SIZE,
    PAGE_SIZE,
    QEMU_CODEC_FLAGS,
    RAM_CONTROL_BLOCK_REG,
    RAM_CONTROL_HOOK,
    RAM_SECTION_VERSION,
    Flag,
)

if TYPE_CHECKING:
    from savevm.qemufile import QEMUFile
    from savevm_ram.block import RAMBlock, RAMList
    from savevm_ram.codecs import PageCodec
    from savevm_ram.control import RAMHooks
    from savevm_ram.state import RAMState
    from savevm_ram.stats import RAMCounters

_BE64 = struct.Struct(">Q")
_unpack = _BE64.unpack_from

_ZERO = int(Flag.ZERO)
_PAGE = int(Flag.PAGE)
_XBZRLE = int(Flag.XBZRLE)
_COMPRESS = int(Flag.COMPRESS_PAGE)
_CONT = int(Flag.CONTINUE)
_EOS = int(Flag.EOS)
_MEM_SIZE = int(Flag.MEM_SIZE)
_HOOK = int(Flag.HOOK)
_EXT = int(Flag.SAVEVM_ENCODED)
_CODECS = int(Flag.SAVEVM_CODECS)
_PAGE_C = _PAGE | _CONT
_COMPRESS_C = _COMPRESS | _CONT
_unpack32 = struct.Struct(">I").unpack_from
#: compressBound(4096): the longest COMPRESS_PAGE body the loader accepts
_COMPRESS_BOUND = 4110
_ZERO_C = _ZERO | _CONT
_BE64_DT = np.dtype(">u8")
_SHIFT = np.uint64(12)
#: pages a run of ZERO records is checked in at a time (4 MiB of memory)
_ZERO_SLICE = 1024
#: a transparent huge page: zero runs are discarded only in whole ones of these
_HUGE = 2 << 20
_HUGE_PAGES = _HUGE // PAGE_SIZE
#: a run of ZERO records shorter than this starts no zero span (it may still continue one)
_SPAN_MIN_RUN = 16


class RAMLoader:
    """The destination side of one migration's RAM section."""

    def __init__(self, rs: RAMState, ram: RAMList, counters: RAMCounters, hooks: RAMHooks,
                 codecs: list[PageCodec]) -> None:
        self.rs = rs
        self.ram = ram
        self.counters = counters
        self.hooks = hooks
        self.codecs = codecs
        #: the block named by the last page record (CONTINUE records reuse it, across chunks)
        self.last_block: RAMBlock | None = None
        #: pages the latest records made zero, in order, with nothing else in between (see _ZeroSpan)
        self.zero_span: tuple[RAMBlock, _ZeroSpan] | None = None
        self._by_flag: dict[int, PageCodec] = {c.wire_flag: c for c in codecs if c.wire_flag in QEMU_CODEC_FLAGS}
        self._ext: dict[int, PageCodec] = {}
        #: ``verify``: page fingerprints of what arrived, per block (None until the source asks)
        self.fps: dict[str, np.ndarray] | None = None
        self._fp_valid: dict[str, np.ndarray] = {}
        comp = self._by_flag.get(_COMPRESS)
        #: the compress codec's inflate of a run of pages, for the fast path (None: general path only)
        self.inflate = getattr(comp, "inflate_pages", None)
        for c in codecs:
            c.load_setup(rs)
        hooks.refresh()

    def codec_for(self, flag: int) -> PageCodec | None:
        """The decoder for one of QEMU's codec flags (XBZRLE, COMPRESS_PAGE)."""
        return self._by_flag.get(flag)

    def announce_codecs(self, names: dict[int, str], offset: int) -> None:
        """The source named its third-party codecs; refuse if one is missing here."""
        by_name = {c.name: c for c in self.codecs}
        missing = sorted(n for n in names.values() if n not in by_name)
        if missing:
            raise ConfigurationMismatchError(
                f"the stream uses page codec(s) {', '.join(map(repr, missing))} but no installed plugin "
                f"provides them (have: {', '.join(sorted(by_name)) or 'none'})", offset)
        self._ext = {i: by_name[n] for i, n in names.items()}

    def has_ext_codecs(self) -> bool:
        """Did the stream announce third-party codecs?"""
        return bool(self._ext)

    def ext_codec(self, codec_id: int) -> PageCodec | None:
        """The third-party codec announced under ``codec_id``."""
        return self._ext.get(codec_id)

    def load(self, f: QEMUFile, version_id: int) -> None:
        """Load one RAM chunk, up to and including its EOS."""
        ram_load(self, f, version_id)

    # ------------------------------------------------------------ verify
    def start_verify(self) -> None:
        """Fingerprint every page as it is written, so the digests at the end cost little downtime."""
        if self.fps is None:
            self.fps = {}

    def note_pages(self, block: RAMBlock, pages: np.ndarray) -> None:
        """These pages of ``block`` were just written: fingerprint them from their new contents."""
        assert self.fps is not None
        fps = self.fps.get(block.idstr)
        if fps is None or len(fps) < block.pages:
            fps = self.fps[block.idstr] = np.zeros(block.pages, dtype=np.uint64)
            self._fp_valid[block.idstr] = np.zeros(block.pages, dtype=np.bool_)
        view = block.host[: block.pages * PAGE_SIZE].reshape(-1, PAGE_SIZE)
        fps[pages] = fingerprints(view[pages])
        self._fp_valid[block.idstr][pages] = True

    def digests(self) -> dict[str, str]:
        """Per-block digests of what was loaded; pages never seen arrive (a transport's) are hashed now."""
        out: dict[str, str] = {}
        for b in self.ram:
            fps = (self.fps or {}).get(b.idstr)
            if fps is None or len(fps) < b.pages:
                fps = block_fingerprints(b.host, b.pages)
            else:
                missing = np.flatnonzero(~self._fp_valid[b.idstr][: b.pages])
                fps = fps[: b.pages].copy()
                if missing.size:
                    view = b.host[: b.pages * PAGE_SIZE].reshape(-1, PAGE_SIZE)
                    for i in range(0, missing.size, 1024):
                        part = missing[i : i + 1024]
                        fps[part] = fingerprints(view[part])
            out[f"ram/{b.idstr}"] = digest(fps)
        return out


def ram_load(rs: RAMLoader, f: QEMUFile, version_id: int) -> None:
    """Load one RAM chunk, up to and including its EOS."""
    if version_id != RAM_SECTION_VERSION:
        # only a START can bring a bad version (PART/END reuse its version), and
        # there the version field is the be32 just before the payload
        raise VersionMismatchError(
            f"unsupported version {version_id} for 'ram', expected {RAM_SECTION_VERSION}", max(0, f.pos - 4))
    ram = rs.ram
    block = rs.last_block
    counters = rs.counters
    while True:
        # ---- fast path: runs of CONTINUE page/zero records in the staged buffer
        if block is not None:
            block = _fast_run(rs, f, block)
        off = f.pos
        v = f.get_be64()
        flags = v & FLAGS_MASK
        addr = v & PAGE_MASK
        kind = flags & ~_CONT
        if kind == _EXT and not rs.has_ext_codecs():
            raise CorruptStreamError(
                f"unknown combination of RAM flags 0x{flags:x} (a savevm codec page, but setup announced no codecs)",
                off)
        if kind in (_ZERO, _PAGE, _XBZRLE, _COMPRESS, _EXT):
            zspan, rs.zero_span = rs.zero_span, None  # only a zero record continues a zero span
            if flags & _CONT:
                if block is None:
                    raise CorruptStreamError(
                        "page record with CONTINUE but no previous block in this stream", off)
            else:
                name_off = f.pos
                name = f.get_counted_string()
                found = ram.find(name)
                if found is None:
                    raise UnknownSectionError(f"unknown RAMBlock {name!r}, cannot accept migration", name_off)
                block = found
                rs.last_block = block
            if addr + PAGE_SIZE > block.used_length:
                raise PageRangeError(
                    f"page offset 0x{addr:x} is outside RAMBlock {block.idstr!r} "
                    f"(used_length 0x{block.used_length:x})", off)
            if kind == _PAGE:
                f.get_buffer_into(block.mv[addr : addr + PAGE_SIZE])
                counters.normal += 1
            elif kind == _ZERO:
                fill = f.get_byte()
                page = block.host[addr : addr + PAGE_SIZE]
                a = b = 0
                if not fill and block.discardable and ram.zero_by_discard:
                    prev = zspan[1] if zspan is not None and zspan[0] is block else _NO_SPAN
                    span, a, b = _zero_span_discard(rs, block, prev, addr >> PAGE_BITS, (addr >> PAGE_BITS) + 1,
                                                    _huge_off(block))
                    rs.zero_span = (block, span)
                # QEMU's is_zero_range check: writing zeros over zeros would fault in untouched memory
                if not b > a and (fill or page.view(np.uint64).any()):
                    page[:] = fill
                counters.duplicate += 1
            elif kind == _EXT:
                cid_off = f.pos
                cid = f.get_byte()
                ext = rs.ext_codec(cid)
                if ext is None:
                    raise CorruptStreamError(f"page encoded by codec id {cid}, which setup never announced", cid_off)
                ext.load_page(f, block, addr // PAGE_SIZE, block.host[addr : addr + PAGE_SIZE], off)
                counters.encoded += 1
            else:
                codec = rs.codec_for(kind)
                if codec is None:
                    what = "XBZRLE" if kind == _XBZRLE else "compressed"
                    raise CorruptStreamError(
                        f"{what} page for {block.idstr!r}@0x{addr:x} but no decoder for flag 0x{kind:x} "
                        f"is installed (plugin savevm-{'xbzrle' if kind == _XBZRLE else 'ram compress'})", off)
                codec.load_page(f, block, addr // PAGE_SIZE, block.host[addr : addr + PAGE_SIZE], off)
                counters.encoded += 1
            counters.loaded_pages += 1
            if rs.fps is not None:
                rs.note_pages(block, np.array([addr >> PAGE_BITS], dtype=np.intp))
        elif kind == _MEM_SIZE:
            _load_block_list(rs, f, addr, off)
        elif flags == _CODECS:
            count = f.get_byte()
            names = {}
            for _ in range(count):
                cid = f.get_byte()
                names[cid] = f.get_counted_string()
            rs.announce_codecs(names, off)
        elif kind == _EOS:
            if flags != _EOS:
                raise CorruptStreamError(f"unknown combination of RAM flags 0x{flags:x}", off)
            rs.last_block = block
            return
        elif flags == _HOOK:
            rs.zero_span = None  # a transport may write pages here
            handled = rs.hooks.load_hook(rs.rs, f, RAM_CONTROL_HOOK, None)
            if not handled:
                raise CorruptStreamError("RAM_SAVE_FLAG_HOOK record but no transport plugin handles it", off)
        else:
            raise CorruptStreamError(f"unknown combination of RAM flags 0x{flags:x}", off)


#: Most and fewest records examined per vectorised step of :func:`_fast_run` (a longer run
#: takes several steps; the window follows the length of recent runs between the two).
_RUN_WINDOW = 1024
_RUN_WINDOW_MIN = 4


def _fast_run(rs: RAMLoader, f: QEMUFile, block: RAMBlock) -> RAMBlock:
    """Apply runs of PAGE|CONTINUE / ZERO|CONTINUE records straight from the stage.

    A run of equal-typed records sits in the staging buffer at a fixed stride
    (4104 or 9 bytes), so its headers and bodies are strided numpy views:
    one vectorised check of flags and bounds and one copy per run, instead
    of Python work per page.  Waits only for bytes the stream must still
    contain (the rest of a record already begun, or the next header of a
    chunk not yet ended by EOS), so it never blocks on data the source has
    no reason to send.
    """
    used = block.used_length
    host = block.host
    pages2d = host[:used].reshape(-1, PAGE_SIZE)
    discard_ok = block.discardable and rs.ram.zero_by_discard
    # consecutive contiguous zero runs: whole huge pages inside them are discarded (see _ZeroSpan)
    span = rs.zero_span[1] if rs.zero_span is not None and rs.zero_span[0] is block else _NO_SPAN
    rs.zero_span = None
    huge_off = _huge_off(block) if discard_ok else 0
    loaded = 0
    window = _RUN_WINDOW
    while True:
        buf = f.buffered()
        avail = len(buf)
        pos = 0
        need = 0
        while True:
            left = avail - pos
            if left < 8:
                need = 8
                break
            fl = _unpack(buf, pos)[0] & FLAGS_MASK
            if fl == _PAGE_C:
                stride = PAGE_RECORD_SIZE
            elif fl == _ZERO_C:
                stride = 9
            elif fl == _COMPRESS_C and rs.inflate is not None:
                span = _NO_SPAN
                done, need = _compressed_run(rs, buf, pos, block, used)
                pos += done[0]
                loaded += done[1]
                if need or not done[1]:
                    break
                continue
            else:
                break
            k = left // stride
            if k == 0:
                need = stride
                break
            if k == 1 or (_unpack(buf, pos + stride)[0] & FLAGS_MASK) != fl:
                # a run of one (sparse memory is full of them): plain slicing beats numpy's set-up
                addr = _unpack(buf, pos)[0] & PAGE_MASK
                if addr >= used:
                    break  # the general path reports the bad record with its offset
                if fl == _PAGE_C:
                    span = _NO_SPAN
                    host[addr : addr + PAGE_SIZE] = buf[pos + 8 : pos + 8 + PAGE_SIZE]
                    rs.counters.normal += 1
                else:
                    fill1 = buf[pos + 8]
                    if discard_ok and not fill1:
                        page = addr >> PAGE_BITS
                        a = b = 0
                        if page == span.end:  # continues a span: it may now cover a whole huge page
                            span, a, b = _zero_span_discard(rs, block, span, page, page + 1, huge_off)
                        else:  # sparse memory is full of lone zero pages: keep their cost at one write
                            rs.ram.stop_waiting()
                            span = _ZeroSpan(page, page + 1)
                        if not b > a:
                            host[addr : addr + PAGE_SIZE] = 0
                    else:
                        span = _NO_SPAN
                        host[addr : addr + PAGE_SIZE] = fill1
                    rs.counters.duplicate += 1
                if rs.fps is not None:
                    rs.note_pages(block, np.array([addr >> PAGE_BITS], dtype=np.intp))
                pos += stride
                loaded += 1
                continue
            # look at a window of headers that grows while runs fill it and shrinks when they
            # end early: checking every header left in a 4 MiB stage at each step made sparse
            # memory (short runs of zero and normal pages alternating) load in quadratic time
            k = min(k, window)
            hdr = np.ndarray((k,), dtype=_BE64_DT, buffer=buf, offset=pos, strides=(stride,))
            same = (hdr & FLAGS_MASK) == fl
            if not same.all():
                k = int(same.argmin())
            addrs = hdr[:k] & PAGE_MASK
            inside = addrs < used  # page aligned, so addr < used means the page fits
            if not inside.all():
                k = int(inside.argmin())
                addrs = addrs[:k]
            if k == 0:
                break  # the general path reports the bad record with its offset
            window = min(window * 2, _RUN_WINDOW) if k == window else max(k * 2, _RUN_WINDOW_MIN)
            idx = (addrs >> _SHIFT).astype(np.intp)
            if fl == _PAGE_C:
                span = _NO_SPAN
                body = np.ndarray((k, PAGE_SIZE), dtype=np.uint8, buffer=buf, offset=pos + 8,
                                  strides=(stride, 1))
                first = int(idx[0])
                if k == 1 or (int(idx[-1]) - first == k - 1 and bool((np.diff(idx) == 1).all())):
                    pages2d[first : first + k] = body
                else:
                    pages2d[idx] = body
                rs.counters.normal += k
            else:
                fill = np.ndarray((k,), dtype=np.uint8, buffer=buf, offset=pos + 8, strides=(stride,))
                first = int(idx[0])
                # short runs that do not continue a span (sparse memory) skip the span's numpy checks
                if discard_ok and (first == span.end or k >= _SPAN_MIN_RUN) and not fill.any() and (
                        k == 1 or (int(idx[-1]) - first == k - 1 and bool((np.diff(idx) == 1).all()))):
                    span, a, b = _zero_span_discard(rs, block, span, first, first + k, huge_off)
                    if b > a:
                        # the run's pages outside the discarded huge pages are scanned as usual
                        if first < a:
                            _apply_zero_run(pages2d, idx[: a - first], fill[: a - first])
                        if b < first + k:
                            _apply_zero_run(pages2d, idx[max(0, b - first) :], fill[max(0, b - first) :])
                    else:
                        _apply_zero_run(pages2d, idx, fill)
                else:
                    span = _NO_SPAN
                    _apply_zero_run(pages2d, idx, fill)
                rs.counters.duplicate += k
            if rs.fps is not None:
                rs.note_pages(block, idx)
            pos += stride * k
            loaded += k
        f.consume(pos)
        if not need:
            break  # a record for the general path is next
        # the chunk has not ended (no EOS yet), so `need` more bytes must come
        if f.fill(need) < need:
            break  # truncated: let the general path raise with the offset
    rs.counters.loaded_pages += loaded
    if span is not _NO_SPAN:
        rs.zero_span = (block, span)
    return block


def _compressed_run(rs: RAMLoader, buf: memoryview, pos: int, block: RAMBlock,
                    used: int) -> tuple[tuple[int, int], int]:
    """COMPRESS_PAGE|CONTINUE records from the stage: ((bytes used, pages loaded), bytes needed).

    Each record is a be64 header, a be32 length and a zlib stream, so they
    are taken one by one, but without the general path's per-field calls.
    Anything unusual (a length over compressBound, a page outside the block,
    a stream that does not inflate to one page) stops the run, and the
    general path reports that record with its offset.  ``bytes needed`` is
    non-zero when the next record is incomplete in the stage.
    """
    inflate = rs.inflate
    assert inflate is not None
    avail = len(buf)
    start = pos
    need = 0
    addrs: list[int] = []
    bodies: list[memoryview] = []
    while True:
        left = avail - pos
        if left < 8:
            need = 8  # a chunk ends with EOS: at least a header must still come
            break
        v = _unpack(buf, pos)[0]
        if v & FLAGS_MASK != _COMPRESS_C:
            break
        if left < 12:
            need = 12
            break
        addr = v & PAGE_MASK
        clen = _unpack32(buf, pos + 8)[0]
        if addr + PAGE_SIZE > used or clen > _COMPRESS_BOUND:
            break
        if left < 12 + clen:
            need = 12 + clen
            break
        addrs.append(addr)
        bodies.append(buf[pos + 12 : pos + 12 + clen])
        pos += 12 + clen
    pos = start
    n = 0
    mv = block.mv
    # in stream order: a page sent twice in one run ends with its later content
    for addr, body, page in zip(addrs, bodies, inflate(bodies)):
        if page is None:
            need = 0  # the general path reports this record with its offset
            break
        mv[addr : addr + PAGE_SIZE] = page
        pos += 12 + len(body)
        n += 1
    if n and rs.fps is not None:
        rs.note_pages(block, np.array(addrs[:n], dtype=np.intp) >> PAGE_BITS)
    rs.counters.encoded += n
    return (pos - start, n), need


class _ZeroSpan:
    """Pages ``[start, end)`` of one block that the last runs of ZERO records made zero, in order.

    Runs are cut wherever the staging buffer or the run window ends, so one
    run rarely covers a whole 2 MiB huge page; the span does.  Every huge page
    that lies wholly inside it is discarded once (``done`` marks how far),
    whatever its earlier pages' runs did: they are all meant to be zero.  Any
    other record ends the span, so a page never counts as zero after a later
    record wrote it.
    """

    __slots__ = ("done", "end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = self.done = start
        self.end = end

    def extend(self, first: int, end: int) -> _ZeroSpan:
        """The span after a zero run ``[first, end)``: longer if it continues this one, else a new one."""
        if first != self.end or self.end < 0:
            return _ZeroSpan(first, end)
        self.end = end
        return self

    def take_huge(self, huge_off: int) -> tuple[int, int]:
        """Page range of the whole huge pages newly inside the span (empty if none), marked done.

        ``huge_off``: the block's first page's position within its huge page.
        """
        a = self.done + (-(self.done + huge_off) % _HUGE_PAGES)
        b = self.end - ((self.end + huge_off) % _HUGE_PAGES)
        if b <= a:
            return 0, 0
        self.done = b
        return a, b


_NO_SPAN = _ZeroSpan(-1, -1)


def _huge_off(block: RAMBlock) -> int:
    """Where the block's first page sits within its huge page (in pages)."""
    return (int(block.host.ctypes.data) // PAGE_SIZE) % _HUGE_PAGES


def _zero_span_discard(rs: RAMLoader, block: RAMBlock, span: _ZeroSpan, first: int, end: int,
                       huge_off: int) -> tuple[_ZeroSpan, int, int]:
    """Add zero pages ``[first, end)`` to ``span`` and discard the whole huge pages now inside it.

    Returns the span and the page range discarded (empty when none was, or
    the kernel refused: then the caller scans those pages as usual).  The
    first zero page also ends prefault-while-waiting: from here on it would
    fault in memory that zero pages give back.  ``huge_off``: :func:`_huge_off`
    of the block (computed once per run of records, not per record).
    """
    rs.ram.stop_waiting()
    span = span.extend(first, end)
    a, b = span.take_huge(huge_off)
    if b > a and discard(block.host, a * PAGE_SIZE, (b - a) * PAGE_SIZE):
        return span, a, b
    return span, 0, 0


def _apply_zero_run(pages2d: np.ndarray, idx: np.ndarray, fill: np.ndarray) -> None:
    """Apply a run of ZERO records: write only pages that are not already what they should be.

    QEMU's destination checks ``is_zero_range`` before its memset, and so do we:
    reading memory that was never written maps the kernel's shared zero page
    (no allocation), writing it faults in a fresh page.  So a destination that
    receives zero pages into fresh memory scans instead of allocating, and its
    resident memory does not grow.  Pages are checked in slices (views when the
    run is contiguous, small gathered copies otherwise), never all at once.
    """
    k = len(idx)
    contiguous = k == 1 or (int(idx[-1]) - int(idx[0]) == k - 1 and bool((np.diff(idx) == 1).all()))
    for lo in range(0, k, _ZERO_SLICE):
        hi = min(k, lo + _ZERO_SLICE)
        sub = idx[lo:hi]
        val = fill[lo:hi]
        if not contiguous:
            # a page named twice ends as its last record says: keep only that record
            # (each record rewrites the whole page, so the earlier ones cannot matter)
            rev, last = np.unique(sub[::-1], return_index=True)
            if len(rev) < len(sub):
                keep = len(sub) - 1 - last
                sub, val = sub[keep], val[keep]
        data = pages2d[int(sub[0]) : int(sub[0]) + len(sub)] if contiguous else pages2d[sub]
        ok = zero_pages(data) & (val == 0)
        if ok.all():
            continue
        bad = np.flatnonzero(~ok)
        pages2d[sub[bad]] = val[bad, None]


def _load_block_list(rs: RAMLoader, f: QEMUFile, total: int, off: int) -> None:
    """MEM_SIZE: (idstr, used_length) pairs until the lengths add up to ``total``."""
    remaining = total
    while remaining > 0:
        name_off = f.pos
        name = f.get_counted_string()
        length = f.get_be64()
        block = rs.ram.find(name)
        if length > remaining or length % PAGE_SIZE:
            raise CorruptStreamError(
                f"RAMBlock {name!r} length 0x{length:x} is not page aligned or exceeds the "
                f"announced total (0x{remaining:x} left of 0x{total:x})", name_off)
        if block is None and rs.ram.auto_create:
            try:
                block = rs.ram.create(name, length)
            except MigrationError as exc:
                raise CorruptStreamError(str(exc), name_off) from exc
        if block is None:
            raise UnknownSectionError(f"unknown RAMBlock {name!r}, cannot accept migration", name_off)
        if length != block.used_length:
            try:
                block.resize(length)
            except MigrationError as exc:
                if isinstance(exc, StreamError):
                    raise
                raise CorruptStreamError(str(exc), name_off) from exc
        if block.owned:
            memory = rs.hooks.block_memory(rs.rs, f, block)
            if memory is not None:
                block.replace_memory(memory)  # a transport's registered memory becomes the block's
        rs.hooks.load_hook(rs.rs, f, RAM_CONTROL_BLOCK_REG, block)
        remaining -= length
    rs.counters.total = total
