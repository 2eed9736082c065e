"""Label-preserving training augmentation for small image classifiers.

Two standard moves (the CIFAR recipe of He et al. 2016, "pad 4 pixels and take
a random 32x32 crop, plus random horizontal flips"):

* random translation: zero-pad by ``max_shift`` pixels on every side and crop
  back to the original size at a random offset, so the content moves by up to
  ``max_shift`` pixels in each direction (zero is the background of digits);
* horizontal flip with probability 1/2, only for datasets whose classes survive
  a mirror image (objects, clothes), never for writing: a mirrored 2 or 7 is
  not a digit.

All randomness comes from the ``np.random.Generator`` passed in; Grain's
``random_map`` seeds it from the pipeline seed and the example's position, so
each example's augmentation is a fixed function of (seed, position) and a
resumed run recomputes it exactly.
"""
from __future__ import annotations

import numpy as np

from tfx_jax.errors import ConfigError


def default_max_shift(image_height: int) -> int:
    """Translation range: 1/8 of the side (4 px on CIFAR's 32, 1 px on 8x8 digits)."""
    return max(1, image_height // 8)


def random_translate(image: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Moves [H, W, C] content by up to ``max_shift`` pixels, filling with 0."""
    if max_shift < 0:
        raise ConfigError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return image
    height, width = image.shape[:2]
    padded = np.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    top, left = rng.integers(0, 2 * max_shift + 1, size=2)
    return padded[top : top + height, left : left + width]


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors [H, W, C] left-right with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def augment_image(
    image: np.ndarray, rng: np.random.Generator, *, max_shift: int, horizontal_flip: bool
) -> np.ndarray:
    """Random translation, then (if allowed for the dataset) a random flip."""
    image = random_translate(image, rng, max_shift)
    if horizontal_flip:
        image = random_horizontal_flip(image, rng)
    return np.ascontiguousarray(image)
