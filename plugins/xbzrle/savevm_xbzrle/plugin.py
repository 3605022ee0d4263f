"""The XBZRLE plugin's pluggy face: it offers one page codec to the RAM plugin."""

from __future__ import annotations

from savevm_ram.codecs import PageCodec

from savevm.config import MigrationConfig
from savevm.hookspecs import hookimpl
from savevm_xbzrle.encoder import XbzrleCodec


@hookimpl
def ram_page_codecs(config: MigrationConfig) -> list[PageCodec]:
    """A fresh XBZRLE codec (source: used only with capability ``xbzrle``)."""
    return [XbzrleCodec()]
