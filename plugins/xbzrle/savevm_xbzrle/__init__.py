"""savevm XBZRLE plugin: QEMU 7.2's XBZRLE delta encoding, page cache and statistics."""

from savevm_xbzrle.cache import PageCache, xbzrle_save_batch
from savevm_xbzrle.codec import decode, decode_batch, encode, encode_batch
from savevm_xbzrle.encoder import XbzrleCodec
from savevm_xbzrle.stats import XbzrleStats

__all__ = ["PageCache", "XbzrleCodec", "XbzrleStats", "decode", "decode_batch", "encode", "encode_batch",
           "xbzrle_save_batch"]
