"""Image files (PNG, JPEG, ...) -> model input, for prediction.

The same conventions as the training data: converted to the model's channels
(grey "L" for C=1, "RGB" for C=3; transparency is composited over white, as a
viewer shows it), resized bilinearly to (H, W), normalised to [-1, 1].

Digit datasets store ink as bright on a dark background (digits: 255 = full
ink; MNIST likewise). A scan or drawing of dark ink on white paper must be
inverted to match: pass ``invert=True``. The model also expects what it was
trained on: for the 8x8 digits, a digit that fills the frame, centred.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from tfx_jax.data.image_preprocess import normalize_images, resize_image
from tfx_jax.errors import DataError, DataNotFound, require

_PIL_MODES = {1: "L", 3: "RGB"}


def read_image_file(path: str | os.PathLike, channels: int) -> np.ndarray:
    """Reads one file as uint8 [H, W, channels] (channels 1 or 3)."""
    if channels not in _PIL_MODES:
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    path = os.fspath(path)
    file = epath.Path(path)  # a local path or a gs:// URL
    require(not file.is_dir(), f"{path} is a directory, not an image file; name its image "
            f"files, comma-separated (e.g. --predict={os.path.join(path, 'a.png')},"
            f"{os.path.join(path, 'b.png')})", DataError)
    if not file.is_file():
        raise DataNotFound(f"image file not found: {path}")
    try:
        with Image.open(io.BytesIO(file.read_bytes())) as image:
            image.load()
            if "A" in image.getbands() or "transparency" in image.info:
                image = Image.alpha_composite(
                    Image.new("RGBA", image.size, "white"), image.convert("RGBA")
                )
            image = image.convert(_PIL_MODES[channels])
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot read image file {path}: {error}") from error
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def load_image_files(
    paths: Sequence[str | os.PathLike],
    image_shape: Sequence[int],
    *,
    invert: bool = False,
) -> np.ndarray:
    """Files -> float32 [len(paths), H, W, C] in [-1, 1], the model's input.

    Args:
      paths: image files pillow can read.
      image_shape: (H, W, C) of the model input, C in {1, 3}.
      invert: map pixel p to 255 - p (dark ink on light paper -> digits' style).

    Raises:
      FileNotFoundError: a path does not exist (the error names it).
      ValueError: a file is not a readable image (the error names it), or a bad
        ``image_shape``.
    """
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("paths must be a sequence of file paths, not a single path")
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {tuple(image_shape)}")
    height, width, channels = (int(d) for d in image_shape)
    images = []
    for path in paths:
        image = resize_image(read_image_file(path, channels), (height, width))
        images.append(255 - image if invert else image)
    if not images:
        return np.zeros((0, height, width, channels), np.float32)
    return normalize_images(np.stack(images))
