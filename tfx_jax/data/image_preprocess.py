"""Pixel conventions shared by training, evaluation and prediction.

Images are stored as uint8 0..255 and enter models as float32 in [-1, 1]:
``x = pixel / 127.5 - 1`` (0 -> -1, 255 -> 1). One fixed affine map for every
dataset, so no per-dataset statistics travel with a checkpoint; a ViT's first
layer (a learned linear patch embedding) absorbs any further scale and shift.
Resizing is bilinear through pillow, which also low-pass filters when it
shrinks an image.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from tfx_jax.errors import ConfigError


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (any leading shape)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images (0..255), got dtype {images.dtype}")
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def denormalize_images(images) -> np.ndarray:
    """Inverse of `normalize_images`: floats in [-1, 1] -> uint8, clipped."""
    pixels = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def image_size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """An int (square) or (height, width) -> (height, width), validated."""
    if isinstance(image_size, (int, np.integer)):
        image_size = (image_size, image_size)
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ConfigError(
            f"image_size must be a positive int or (height, width), got {image_size!r}")
    return int(size[0]), int(size[1])


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one uint8 image [H, W, C] to [size[0], size[1], C]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected one uint8 image [H, W, C], got shape {image.shape} dtype {image.dtype}"
        )
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    # Pillow resizes RGB images whole and anything else one 8-bit plane at a time.
    rgb = image.shape[-1] == 3
    planes = [image] if rgb else [image[..., c] for c in range(image.shape[-1])]
    resized = [
        np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.BILINEAR))
        for plane in planes
    ]
    return resized[0] if rgb else np.stack(resized, axis=-1)
