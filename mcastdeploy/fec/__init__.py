"""Forward error correction for multicast blocks: a systematic Reed–Solomon erasure code.

Symbol ids 0..k-1 of a block are its source symbols, k..254 its repair
symbols; any k distinct symbols recover the block.  Repair symbols are
byte-identical to what ``reedsolo`` computes column by column.
"""

from .errors import FecError
from .reed_solomon import MAX_SYMBOLS, ReedSolomonCodec, codec_for

__all__ = ["FecError", "MAX_SYMBOLS", "ReedSolomonCodec", "codec_for"]
