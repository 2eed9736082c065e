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
"""
from __future__ import annotations

from collections.abc import Sequence
import functools

import grain
import numpy as np

from tfx_jax.errors import DataError
from tfx_jax.data import grain_batches
from tfx_jax.data.image_augment import augment_image, default_max_shift
from tfx_jax.data.image_datasets import ImageDataset
from tfx_jax.data.image_preprocess import image_size_pair, normalize_images, resize_image


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

