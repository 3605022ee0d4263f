"""Wire constants of the QEMU 7.2 migration stream (docs/wire-format.md).

Kept in one module so that the reader and the writer cannot disagree.
"""

from __future__ import annotations

import enum

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002
QEMU_VM_FILE_VERSION = 0x00000003

#: First be32 of every multifd channel (MultiFDInit_t.magic): a second connection that starts
#: with it means the source has capability ``multifd``, whose pages savevm does not receive.
MULTIFD_MAGIC = 0x11223344

#: x86 target page size (TARGET_PAGE_BITS = 12).
TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS

#: The largest idstr a section header can carry (u8 length).
MAX_IDSTR_LEN = 255


class SectionType(enum.IntEnum):
    """The one-byte record types of the top-level stream."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class Command(enum.IntEnum):
    """QEMU_VM_COMMAND numbers (docs/wire-format.md, Commands)."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    MAX = 11
    #: savevm extension, only ever sent to a destination that answered the negotiation PING as
    #: savevm: a JSON object of options for this migration (e.g. ``{"verify": true}``)
    SAVEVM_OPTIONS = 0x7301


#: Fixed argument lengths the loader enforces (-1: variable).
COMMAND_ARG_LEN: dict[Command, int] = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.POSTCOPY_ADVISE: -1,
    Command.POSTCOPY_LISTEN: 0,
    Command.POSTCOPY_RUN: 0,
    Command.POSTCOPY_RAM_DISCARD: -1,
    Command.PACKAGED: 4,
    Command.ENABLE_COLO: 0,
    Command.POSTCOPY_RESUME: 0,
    Command.RECV_BITMAP: -1,
    Command.SAVEVM_OPTIONS: -1,
}

#: Configuration subsection names (docs/wire-format.md, Header and configuration).
CONFIG_VMSD_NAME = "configuration"
