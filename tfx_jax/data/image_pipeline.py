"""Grain input pipelines for image classification (ViT training and eval).

Batches are dicts of NumPy arrays, leading dimension the process-local batch:

* ``"image"``: float32 [b, H, W, C] in [-1, 1] (`normalize_images`), resized
  to ``image_size`` when one is given (required for variable-size datasets);
* ``"label"``: int32 [b];
* ``"valid"``: bool [b]; False only on the padding of the last eval batch.

Training batches are augmented (`augment_image`: random translation by up to
1/8 of the side, horizontal flips only for mirror-invariant datasets), at the
model's input resolution, after resizing. Shuffling, repetition, process
sharding and exact resume are `grain_batches`'s.

The augmentation: label-preserving, for small image classifiers. Two standard moves
(the CIFAR recipe of He et al. 2016, "pad 4 pixels and take a random 32x32 crop,
plus random horizontal flips"):

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

import functools
from collections.abc import Sequence

import grain
import numpy as np

from tfx_jax.data import grain_batches
from tfx_jax.data.image_datasets import ImageDataset
from tfx_jax.data.image_preprocess import image_size_pair, normalize_images, resize_image
from tfx_jax.errors import ConfigError, DataError


def image_input_shape(
    dataset: ImageDataset, image_size: int | Sequence[int] | None = None
) -> tuple[int, int, int]:
    """(H, W, C) of the batches a pipeline yields for ``dataset``."""
    channels = dataset.image_shape[-1]
    if image_size is not None:
        return (*image_size_pair(image_size), channels)
    height, width = dataset.image_shape[:2]
    if height is None or width is None:
        raise DataError(
            f"dataset {dataset.name!r} has images of varying size {dataset.image_shape};"
            " set image_size to resize them"
        )
    return height, width, channels


def _classification_example(example, *, size) -> dict[str, np.ndarray]:
    return {
        "image": normalize_images(resize_image(example["image"], size)),
        "label": np.int32(example["label"]),
    }


def _augmented_example(example, rng, *, size, max_shift, horizontal_flip):
    image = resize_image(example["image"], size)
    image = augment_image(image, rng, max_shift=max_shift, horizontal_flip=horizontal_flip)
    return {"image": normalize_images(image), "label": np.int32(example["label"])}


def train_image_batches(
    dataset: ImageDataset,
    *,
    global_batch_size: int,
    seed: int,
    image_size: int | Sequence[int] | None = None,
    augment: bool = True,
    max_shift: int | None = None,
    horizontal_flip: bool | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Infinite augmented training batches of this process's shard.

    Args:
      dataset: from `load_image_dataset`.
      global_batch_size: over all processes; must divide by the process count.
      seed: fixes shuffling and augmentation.
      image_size: output size (int or (H, W)); None keeps the stored size.
      augment: False gives shuffled, un-augmented batches (overrides the next two).
      max_shift: translation range in pixels (default: height // 8, at least 1).
      horizontal_flip: override the dataset's ``horizontal_flip`` metadata.
      process_index, process_count, read_options: see `grain_batches`.
    """
    height, width, _ = image_input_shape(dataset, image_size)
    if not augment:
        max_shift, horizontal_flip = 0, False
    if max_shift is None:
        max_shift = default_max_shift(height)
    if horizontal_flip is None:
        horizontal_flip = dataset.horizontal_flip
    transform = functools.partial(
        _augmented_example,
        size=(height, width),
        max_shift=max_shift,
        horizontal_flip=horizontal_flip,
    )
    return grain_batches.training_batches(
        dataset,
        global_batch_size=global_batch_size,
        seed=seed,
        transform=transform,
        process_index=process_index,
        process_count=process_count,
        read_options=read_options,
    )


def eval_image_batches(
    dataset: ImageDataset,
    *,
    global_batch_size: int,
    image_size: int | Sequence[int] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """One pass over this process's shard, last batch padded, ``"valid"`` marked."""
    height, width, _ = image_input_shape(dataset, image_size)
    return grain_batches.evaluation_batches(
        dataset,
        global_batch_size=global_batch_size,
        transform=functools.partial(_classification_example, size=(height, width)),
        process_index=process_index,
        process_count=process_count,
        read_options=read_options,
    )


# --- training augmentation -----------------------------------------------------------------

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
