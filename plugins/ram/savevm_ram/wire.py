"""The RAM section's wire pieces (qemu-format.md section 3), in one place."""

from __future__ import annotations

import enum

import numpy as np

PAGE_SIZE = 4096
PAGE_BITS = 12
PAGE_MASK = ~(PAGE_SIZE - 1) & 0xFFFFFFFFFFFFFFFF
FLAGS_MASK = PAGE_SIZE - 1

#: ``ram_load`` accepts only this version.
RAM_SECTION_VERSION = 4
RAM_IDSTR = "ram"


class Flag(enum.IntFlag):
    """RAM_SAVE_FLAG_* (QEMU 7.2)."""

    FULL = 0x01
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80
    COMPRESS_PAGE = 0x100
    #: savevm extension (not QEMU): the list of third-party codecs, in the START chunk
    SAVEVM_CODECS = 0x400
    #: savevm extension (not QEMU): a page encoded by a third-party codec (u8 codec id + body)
    SAVEVM_ENCODED = 0x800


#: wire flags QEMU itself defines for codecs; any other codec travels as SAVEVM_ENCODED
QEMU_CODEC_FLAGS = frozenset({0x40, 0x100})


#: XBZRLE body starts with this byte (ENCODING_FLAG_XBZRLE).
ENCODING_FLAG_XBZRLE = 0x01

#: ram_control_* hook flags (qemu-file.h).
RAM_CONTROL_SETUP = 0
RAM_CONTROL_ROUND = 1
RAM_CONTROL_HOOK = 2
RAM_CONTROL_FINISH = 3
RAM_CONTROL_BLOCK_REG = 4

#: ram_control_save_page results.
RAM_SAVE_CONTROL_NOT_SUPP = -1000
RAM_SAVE_CONTROL_DELAYED = -2000

BE64 = np.dtype(">u8")
#: A zero-page record with no block name: be64 header + fill byte.
ZERO_RECORD = np.dtype([("hdr", ">u8"), ("fill", "u1")])
