"""One resolver from a config value to a random-access image dataset.

``load_image_dataset("digits", "train")`` gives the built-in scikit-learn
digits (prepared on first use into ``data_dir``, no download);
``load_image_dataset("mnist", "test", data_dir=...)`` (or ``cifar10``,
``fashion_mnist``, ``imagenet2012``, any TFDS image classification dataset)
reads a dataset the user has already prepared in TFDS's ArrayRecord format,
through ``tfds.data_source``. Image features are decoded by pillow, no
TensorFlow needed.

Either way the result is an `ImageDataset`: ``len(ds)``, ``ds[i] ->
{"image": uint8 [H, W, C], "label": int32}`` and the metadata a model and an
input pipeline need (image shape, number of classes, class names, and whether a
mirror image keeps its class).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tfx_jax.errors import ConfigError, DataError, DataNotFound
from tfx_jax.data import digits

DIGITS = "digits"

# Datasets whose classes survive a left-right mirror (objects, scenes,
# clothes). Writing is not among them, and unknown datasets default to no flip.
MIRROR_INVARIANT_DATASETS = frozenset({
    "cifar10", "cifar100", "fashion_mnist", "imagenet2012", "imagenette",
    "imagenet_resized", "oxford_flowers102", "oxford_iiit_pet", "food101",
    "stl10", "caltech101", "tf_flowers",
})


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """A random-access split of an image classification dataset.

    Attributes:
      name: the config value it was resolved from ("digits" or a TFDS name).
      split: the TFDS split string ("train", "test", "train[:90%]", ...).
      source: the underlying TFDS random-access data source.
      image_shape: (H, W, C) of stored images; H and W are None when sizes vary
        (e.g. imagenet2012), in which case a pipeline must resize.
      num_classes: number of labels.
      class_names: one name per label.
      horizontal_flip: whether a mirror image keeps its label (augmentation).
      image_key, label_key: the feature names in the TFDS examples.
    """

    name: str
    split: str
    source: Any
    image_shape: tuple[int | None, int | None, int]
    num_classes: int
    class_names: tuple[str, ...]
    horizontal_flip: bool
    image_key: str = "image"
    label_key: str = "label"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = self.source[index]
        image = np.asarray(example[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        return {"image": image, "label": np.int32(example[self.label_key])}


def load_image_dataset(name: str, split: str, *, data_dir: str | None = None) -> ImageDataset:
    """Resolves a config value ("digits" or a TFDS name) to an `ImageDataset`.

    Args:
      name: "digits" for the built-in dataset, otherwise a TFDS dataset name
        (optionally "name/config:version").
      split: TFDS split string; "digits" has "train" (1442) and "test" (355).
      data_dir: TFDS data directory (None: TFDS's default, ~/tensorflow_datasets).

    Raises:
      ValueError: unknown dataset name or split, or not an image classifier.
      FileNotFoundError: the TFDS dataset is not prepared in ArrayRecord format.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"dataset name must be a non-empty string, got {name!r}")
    if name == DIGITS:
        builder = digits.SklearnDigits(data_dir=data_dir)
        builder.download_and_prepare()  # offline and quick; a no-op once prepared
    else:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as error:
            raise ConfigError(
                f"unknown image dataset {name!r}: it is neither {DIGITS!r} (built in) "
                "nor a dataset in the TFDS catalogue (tfds.list_builders()); TFDS "
                f"said: {str(error).splitlines()[0]}"
            ) from error
    image_key, label_key = _supervised_keys(name, builder.info)
    source = _data_source(name, builder, split)
    image_feature = builder.info.features[image_key]
    if np.dtype(image_feature.np_dtype) != np.uint8:
        raise DataError(
            f"dataset {name!r}: feature {image_key!r} has dtype {image_feature.np_dtype},"
            " expected uint8 images"
        )
    label_feature = builder.info.features[label_key]
    shape = tuple(image_feature.shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    return ImageDataset(
        name=name,
        split=split,
        source=source,
        image_shape=shape,
        num_classes=int(label_feature.num_classes),
        class_names=tuple(label_feature.names),
        horizontal_flip=builder.name in MIRROR_INVARIANT_DATASETS,
        image_key=image_key,
        label_key=label_key,
    )


def _supervised_keys(name: str, info) -> tuple[str, str]:
    """(image, label) feature names, checked to be an image and a ClassLabel."""
    keys = info.supervised_keys
    image_key, label_key = keys if keys and len(keys) == 2 else ("image", "label")
    features = info.features
    if not isinstance(image_key, str) or image_key not in features:
        raise DataError(f"dataset {name!r} has no image feature {image_key!r}: {features}")
    label_feature = features[label_key] if label_key in features else None
    if not isinstance(label_feature, tfds.features.ClassLabel):
        raise DataError(
            f"dataset {name!r} is not an image classification dataset: no ClassLabel"
            f" feature {label_key!r} in {list(features)}"
        )
    return image_key, label_key


def _data_source(name: str, builder, split: str):
    """The builder's random-access source, with errors that say what to do."""
    try:
        return builder.as_data_source(split=split)
    except ValueError as error:  # unknown split or bad slice; TFDS lists splits
        raise DataError(f"dataset {name!r}, split {split!r}: {error}") from error
    except (NotImplementedError, AssertionError, FileNotFoundError) as error:
        raise DataNotFound(
            f"dataset {name!r} is not prepared in ArrayRecord format under "
            f"{builder.data_dir!r}. Prepare it once where it can be downloaded "
            f"(its Image features need TensorFlow to encode): `tfds build {name} "
            "--file_format=array_record --data_dir=DIR`, then pass data_dir=DIR. "
            f"TFDS said: {error}"
        ) from error
