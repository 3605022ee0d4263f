"""The RAM section's wire vocabulary, defined once for every plugin that speaks it.

Page size, the RAM_SAVE_FLAG_* bits, the ``ram_control_*`` hook flags, the
save-page results and the XBZRLE body marker are QEMU 7.2's values.  The
XBZRLE and RDMA-style plugins import them from here, so the three plugins
cannot drift apart; the page size itself comes from the core's stream
format, because the core needs it too (xbzrle-cache-size is validated in
pages) and must not import a plugin.
"""

from __future__ import annotations

import enum
from typing import Final

import numpy as np

from savevm.format import TARGET_PAGE_BITS, TARGET_PAGE_SIZE

PAGE_SIZE: Final = TARGET_PAGE_SIZE
PAGE_BITS: Final = TARGET_PAGE_BITS
PAGE_MASK: Final = ~(PAGE_SIZE - 1) & 0xFFFFFFFFFFFFFFFF
#: the low bits of a page record's be64 carry the flags
FLAGS_MASK: Final = PAGE_SIZE - 1

#: ``ram_load`` accepts only this version.
RAM_SECTION_VERSION: Final = 4
RAM_IDSTR: Final = "ram"


class Flag(enum.IntFlag):
    """RAM_SAVE_FLAG_* (QEMU 7.2), plus savevm's two extension bits."""

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
QEMU_CODEC_FLAGS: Final = frozenset({int(Flag.XBZRLE), int(Flag.COMPRESS_PAGE)})

#: An XBZRLE page body starts with this byte (ENCODING_FLAG_XBZRLE), then be16 length.
ENCODING_FLAG_XBZRLE: Final = 0x01


class RAMControl(enum.IntEnum):
    """The ``flags`` argument of the ``ram_control_*`` hooks (RAM_CONTROL_*)."""

    SETUP = 0
    ROUND = 1
    HOOK = 2
    FINISH = 3
    BLOCK_REG = 4


RAM_CONTROL_SETUP: Final = int(RAMControl.SETUP)
RAM_CONTROL_ROUND: Final = int(RAMControl.ROUND)
RAM_CONTROL_HOOK: Final = int(RAMControl.HOOK)
RAM_CONTROL_FINISH: Final = int(RAMControl.FINISH)
RAM_CONTROL_BLOCK_REG: Final = int(RAMControl.BLOCK_REG)

#: ram_control_save_page results: not mine (use the normal path) / queued asynchronously.
RAM_SAVE_CONTROL_NOT_SUPP: Final = -1000
RAM_SAVE_CONTROL_DELAYED: Final = -2000

#: RDMA control message types carried after a HOOK record (RDMAControlHeader.type).
CONTROL_RAM_BLOCKS_REQUEST: Final = 4
CONTROL_REGISTER_FINISHED: Final = 9

BE64: Final = np.dtype(">u8")
#: A zero-page record with no block name: be64 header + fill byte.
ZERO_RECORD: Final = np.dtype([("hdr", ">u8"), ("fill", "u1")])
#: A normal page record with no block name: be64 header + the page.
PAGE_RECORD_SIZE: Final = 8 + PAGE_SIZE
