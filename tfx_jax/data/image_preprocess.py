"""Pixel conventions shared by training, evaluation and prediction.

Images are stored as uint8 0..255 and enter models as float32 in [-1, 1]:
``x = pixel / 127.5 - 1`` (0 -> -1, 255 -> 1). One fixed affine map for every
dataset, so no per-dataset statistics travel with a checkpoint; a ViT's first
layer (a learned linear patch embedding) absorbs any further scale and shift.
Resizing is bilinear through pillow, which also low-pass filters when it
shrinks an image.

Image files (PNG, JPEG, ...) -> model input, for prediction. The same conventions as
the training data: converted to the model's channels (grey "L" for C=1, "RGB" for
C=3; transparency is composited over white, as a viewer shows it), resized
bilinearly to (H, W), normalised to [-1, 1].

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

from tfx_jax.errors import ConfigError, DataError, DataNotFound, require


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


# --- image files, for prediction -----------------------------------------------------------

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
