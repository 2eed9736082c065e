"""scikit-learn's handwritten digits as a TFDS dataset (ArrayRecord, offline).

`sklearn.datasets.load_digits()` ships with scikit-learn: 1,797 real 8x8
grey-level images of the digits 0-9 (the test part of the UCI "Optical
Recognition of Handwritten Digits" data, Alpaydin & Kaynak 1998), each pixel
counting the ink in a 4x4 block of the original 32x32 bitmap, so values are
integers 0..16 (16 = fully inked).

The builder stores

* ``image``: ``uint8 [8, 8, 1]``, the count rescaled to 0..255 as
  ``floor(v * 255 / 16 + 1/2)`` (ink is bright, background is 0);
* ``label``: ``ClassLabel(num_classes=10)``;
* ``index``: the example's row in ``load_digits()`` (for provenance).

Splits are fixed and stratified: within each class, in the order scikit-learn
lists the examples, every fifth example (class ranks 4, 9, 14, ...) goes to
``test`` and the rest to ``train``. That gives **1,442 train / 355 test**
images, every class in both splits (34-36 test images per class). Nothing is
random, so every machine builds byte-identical splits.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

DIGITS_IMAGE_SHAPE = (8, 8, 1)
DIGITS_NUM_CLASSES = 10
DIGITS_SPLIT_SIZES = {"train": 1442, "test": 355}
DIGITS_TEST_STRIDE = 5  # every fifth example of a class is held out
DIGITS_MAX_VALUE = 16  # load_digits() pixel values are counts 0..16


def digits_to_uint8(values: np.ndarray) -> np.ndarray:
    """Rescales load_digits() counts 0..16 to uint8 0..255 (round half up)."""
    values = np.asarray(values)
    return np.floor(values * (255.0 / DIGITS_MAX_VALUE) + 0.5).astype(np.uint8)


def digits_split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of load_digits() in each split: the stratified every-fifth rule."""
    labels = np.asarray(labels)
    is_test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        is_test[rows[DIGITS_TEST_STRIDE - 1 :: DIGITS_TEST_STRIDE]] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for scikit-learn's 8x8 handwritten digits (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 1442/355 train/test split."}

    def __init__(self, *, file_format="array_record", **kwargs):
        # Without TensorFlow only ArrayRecord files can be written and read.
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "1,797 8x8 grey-level handwritten digits from scikit-learn "
                "(UCI optdigits test part), pixel counts 0..16 rescaled to 0..255."
            ),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=DIGITS_IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=DIGITS_NUM_CLASSES),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation=(
                "@misc{alpaydin1998optdigits, author={Alpaydin, E. and Kaynak, C.},"
                " title={Optical Recognition of Handwritten Digits}, year={1998},"
                " howpublished={UCI Machine Learning Repository}}"
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships with scikit-learn
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

        digits = load_digits()
        images = digits_to_uint8(digits.images)[..., None]
        labels = digits.target
        return {
            split: self._generate_examples(images, labels, rows)
            for split, rows in digits_split_indices(labels).items()
        }

    def _generate_examples(self, images, labels, rows):
        for row in rows:
            yield int(row), {
                "image": images[row],
                "label": int(labels[row]),
                "index": int(row),
            }
