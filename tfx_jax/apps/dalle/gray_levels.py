"""Image tokens by grey-level quantisation: one token per pixel.

The simplest discrete image code, in place of DALL-E's learned dVAE: each pixel
of a grey image becomes the index of the nearest of K evenly spaced levels
``round(k * 255 / (K - 1))``, k = 0..K-1 (so black and white are exact), read
in raster order (row by row). An 8x8 digit becomes 64 tokens.

Decoding maps each index back to its level. An image whose pixels are already
levels round-trips exactly; any other pixel moves by at most
``255 / (2 (K - 1)) + 1/2`` (half a level step, plus rounding to uint8).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tfx_jax.errors import ConfigError
from tfx_jax.apps.dalle.image_tokenizer import check_images, check_tokens


@dataclasses.dataclass(frozen=True)
class GrayLevelTokenizer:
    """K-level per-pixel quantiser for grey images [H, W, 1] (raster order)."""

    image_shape: tuple[int, int, int] = (8, 8, 1)
    num_levels: int = 8

    def __post_init__(self):
        if len(self.image_shape) != 3 or self.image_shape[-1] != 1:
            raise ConfigError(
                "GrayLevelTokenizer needs grey images (H, W, 1), got image_shape "
                f"{self.image_shape}"
                " (use PatchVQTokenizer for colour)"
            )
        if not 2 <= self.num_levels <= 256:
            raise ConfigError(f"num_levels must be in 2..256, got {self.num_levels}")

    @property
    def vocab_size(self) -> int:
        return self.num_levels

    @property
    def sequence_length(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    @property
    def levels(self) -> np.ndarray:
        """uint8 [K]: the grey value each token decodes to."""
        steps = np.arange(self.num_levels) * (255.0 / (self.num_levels - 1))
        return np.floor(steps + 0.5).astype(np.uint8)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [..., H, W, 1] -> int32 [..., H*W], nearest level per pixel."""
        images = check_images(images, self.image_shape)
        scaled = images.astype(np.float64) * ((self.num_levels - 1) / 255.0)
        tokens = np.floor(scaled + 0.5).astype(np.int32)
        return tokens.reshape(*images.shape[:-3], self.sequence_length)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """int [..., H*W] -> uint8 [..., H, W, 1]."""
        tokens = check_tokens(tokens, self.sequence_length, self.vocab_size)
        return self.levels[tokens].reshape(*tokens.shape[:-1], *self.image_shape)
