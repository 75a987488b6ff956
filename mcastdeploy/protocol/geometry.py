"""How an image is cut into blocks of symbols; shared by sender, receiver and drivers."""

from __future__ import annotations

from dataclasses import dataclass

from mcastdeploy.wire import MAX_BLOCK_SYMBOLS


@dataclass(frozen=True)
class ImageGeometry:
    """An image of ``image_size`` bytes as blocks of ``block_symbols`` symbols of ``symbol_size``.

    Every block but the last holds exactly ``block_symbols`` source symbols; the last holds as
    many as its bytes need, its last symbol zero-padded on the wire.  Keeping the last block
    short (rather than padding it to k symbols) means no bandwidth is spent on padding.
    """

    image_size: int
    symbol_size: int
    block_symbols: int

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError("the image is empty")
        if self.symbol_size <= 0:
            raise ValueError("symbol size must be positive")
        if not 1 <= self.block_symbols <= MAX_BLOCK_SYMBOLS:
            raise ValueError(f"block symbols must be 1..{MAX_BLOCK_SYMBOLS}")

    @property
    def block_bytes(self) -> int:
        return self.block_symbols * self.symbol_size

    @property
    def block_count(self) -> int:
        return -(-self.image_size // self.block_bytes)

    def offset(self, block: int) -> int:
        return block * self.block_bytes

    def block_length(self, block: int) -> int:
        """Bytes of image data in ``block`` (only the last block is shorter)."""
        return min(self.block_bytes, self.image_size - self.offset(block))

    def symbols_in(self, block: int) -> int:
        """Source symbols of ``block``: k, or fewer for the last block."""
        return -(-self.block_length(block) // self.symbol_size)
