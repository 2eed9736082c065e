"""What an image tokenizer is: images <-> a fixed-length sequence of ids.

DALL-E (Ramesh et al. 2021) trains a discrete VAE that turns a 256x256 image
into a 32x32 grid of tokens from an 8192-entry codebook, read in raster order,
so a Transformer can model text and image as one token stream. tfx_jax's
tokenizers are the small analogue for 8x8 digits (`GrayLevelTokenizer`,
`PatchVQTokenizer`); both follow this protocol.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class ImageTokenizer(Protocol):
    """Images uint8 [..., H, W, C] <-> token ids int32 [..., sequence_length]."""

    image_shape: tuple[int, int, int]

    @property
    def vocab_size(self) -> int: ...

    @property
    def sequence_length(self) -> int: ...

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def decode(self, tokens: np.ndarray) -> np.ndarray: ...


def check_images(images, image_shape: tuple[int, ...]) -> np.ndarray:
    """``images`` as uint8 with trailing shape ``image_shape``, else ValueError."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images (0..255), got dtype {images.dtype}")
    if images.shape[images.ndim - len(image_shape):] != tuple(image_shape):
        dims = ", ".join(map(str, image_shape))
        raise ValueError(f"expected images [..., {dims}], got shape {images.shape}")
    return images


def check_tokens(tokens, sequence_length: int, vocab_size: int) -> np.ndarray:
    """``tokens`` as int64 [..., sequence_length] with ids in [0, vocab_size)."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"expected integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim == 0 or tokens.shape[-1] != sequence_length:
        raise ValueError(f"expected tokens [..., {sequence_length}], got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"image token ids must lie in [0, {vocab_size}), got range "
            f"[{tokens.min()}, {tokens.max()}]"
        )
    return tokens.astype(np.int64)
