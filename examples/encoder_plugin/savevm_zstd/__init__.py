"""savevm-zstd: a third-party page codec for savevm, and the template for writing one.

Install it (``pip install -e .``), turn it on with ``--capability zstd``
(or ``[capabilities] zstd = true``, or QMP ``migrate-set-capabilities``),
and the RAM section sends compressible pages zstd-compressed.
"""

from savevm_zstd.codec import ZstdCodec

__all__ = ["ZstdCodec"]
