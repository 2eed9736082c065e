"""Image tokens: images <-> a fixed-length sequence of ids, and the two tokenizers.

DALL-E (Ramesh et al. 2021) trains a discrete VAE that turns a 256x256 image
into a 32x32 grid of tokens from an 8192-entry codebook, read in raster order,
so a Transformer can model text and image as one token stream. tfx_jax's
tokenizers are the small analogue for 8x8 digits (`GrayLevelTokenizer`,
`PatchVQTokenizer`); both follow this protocol.

`GrayLevelTokenizer`, grey-level quantisation (one token per pixel): the simplest
discrete image code, in place of DALL-E's learned dVAE: each pixel of a grey image
becomes the index of the nearest of K evenly spaced levels
``round(k * 255 / (K - 1))``, k = 0..K-1 (so black and white are exact), read in
raster order (row by row). An 8x8 digit becomes 64 tokens.

Decoding maps each index back to its level. An image whose pixels are already
levels round-trips exactly; any other pixel moves by at most
``255 / (2 (K - 1)) + 1/2`` (half a level step, plus rounding to uint8).

`PatchVQTokenizer`, a learned codebook of small patches (vector quantisation): a
step closer to DALL-E's dVAE, which maps each 8x8 region of a 256x256 image to one
of 8192 learned codes: here each non-overlapping ``p x p`` patch becomes the index
of its nearest codeword (squared Euclidean distance on pixel values), and the
codebook is learned by k-means (Lloyd's algorithm, k-means++ start) on the training
images' patches. An 8x8 digit with p=2 becomes 16 tokens.

Codewords are stored as uint8 pixels, so decoding is a table lookup and an
image made of codewords round-trips exactly. Duplicate codewords (possible
after rounding) are merged, so ``vocab_size <= codebook_size``.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Protocol

import numpy as np
from etils import epath

from tfx_jax.errors import ConfigError


# --- the protocol and its input checks -----------------------------------------------------

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


# --- grey-level quantisation: one token per pixel ------------------------------------------

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


# --- a learned codebook of small patches ---------------------------------------------------

def image_patches(images: np.ndarray, patch_size: int) -> np.ndarray:
    """[..., H, W, C] -> [..., (H/p)*(W/p), p*p*C], patches in raster order."""
    *batch, height, width, channels = images.shape
    p = patch_size
    patches = images.reshape(*batch, height // p, p, width // p, p, channels)
    patches = np.moveaxis(patches, -4, -3)  # [..., H/p, W/p, p, p, C]
    return patches.reshape(*batch, (height // p) * (width // p), p * p * channels)


def patches_to_images(patches: np.ndarray, image_shape, patch_size: int) -> np.ndarray:
    """Inverse of `image_patches`."""
    height, width, channels = image_shape
    p = patch_size
    batch = patches.shape[:-2]
    grid = patches.reshape(*batch, height // p, width // p, p, p, channels)
    return np.moveaxis(grid, -3, -4).reshape(*batch, height, width, channels)


def _squared_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return (
        np.sum(points**2, axis=1, keepdims=True)
        - 2.0 * points @ centers.T
        + np.sum(centers**2, axis=1)[None, :]
    )


def kmeans(points: np.ndarray, k: int, *, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; returns float64 centres [k, D]."""
    points = np.asarray(points, np.float64)
    centers = [points[rng.integers(len(points))]]
    nearest = np.sum((points - centers[0]) ** 2, axis=1)
    for _ in range(1, k):
        if nearest.sum() == 0:  # fewer distinct points than k
            break
        centers.append(points[rng.choice(len(points), p=nearest / nearest.sum())])
        nearest = np.minimum(nearest, np.sum((points - centers[-1]) ** 2, axis=1))
    centers = np.stack(centers)
    for _ in range(iterations):
        assignment = np.argmin(_squared_distances(points, centers), axis=1)
        counts = np.bincount(assignment, minlength=len(centers))
        sums = np.zeros_like(centers)
        np.add.at(sums, assignment, points)
        occupied = counts > 0
        centers[occupied] = sums[occupied] / counts[occupied, None]
    return centers


@dataclasses.dataclass(frozen=True, eq=False)
class PatchVQTokenizer:
    """Nearest-codeword tokens for non-overlapping p x p patches (raster order).

    Build one with `PatchVQTokenizer.fit(train_images)` or `load(path)`.
    """

    codebook: np.ndarray  # uint8 [vocab_size, p*p*C]
    image_shape: tuple[int, int, int]
    patch_size: int = 2

    def __post_init__(self):
        height, width, channels = self.image_shape
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(
                f"image_shape {self.image_shape} is not divisible into {self.patch_size}x"
                f"{self.patch_size} patches"
            )
        dim = self.patch_size**2 * channels
        codebook = self.codebook
        if codebook.dtype != np.uint8 or codebook.ndim != 2 or codebook.shape[1] != dim:
            raise ValueError(
                f"codebook must be uint8 [K, {dim}], got {codebook.dtype} {codebook.shape}")

    @classmethod
    def fit(
        cls,
        images: np.ndarray,
        *,
        codebook_size: int = 64,
        patch_size: int = 2,
        iterations: int = 20,
        seed: int = 0,
    ) -> "PatchVQTokenizer":
        """Learns the codebook by k-means over all patches of uint8 [N, H, W, C]."""
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"fit needs images [N, H, W, C], got shape {images.shape}")
        image_shape = tuple(int(d) for d in images.shape[1:])
        check_images(images, image_shape)
        if codebook_size < 1:
            raise ConfigError(f"codebook_size must be >= 1, got {codebook_size}")
        points = image_patches(images, patch_size).reshape(-1, patch_size**2 * image_shape[-1])
        centers = kmeans(points, codebook_size, iterations=iterations,
                         rng=np.random.default_rng(seed))
        codebook = np.unique(np.clip(np.floor(centers + 0.5), 0, 255).astype(np.uint8), axis=0)
        return cls(codebook=codebook, image_shape=image_shape, patch_size=patch_size)

    @property
    def vocab_size(self) -> int:
        return len(self.codebook)

    @property
    def sequence_length(self) -> int:
        height, width, _ = self.image_shape
        return (height // self.patch_size) * (width // self.patch_size)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [..., H, W, C] -> int32 [..., (H/p)(W/p)] nearest codeword ids."""
        images = check_images(images, self.image_shape)
        patches = image_patches(images, self.patch_size).astype(np.float64)
        flat = patches.reshape(-1, patches.shape[-1])
        ids = np.argmin(_squared_distances(flat, self.codebook.astype(np.float64)), axis=1)
        return ids.astype(np.int32).reshape(patches.shape[:-1])

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """int [..., (H/p)(W/p)] -> uint8 [..., H, W, C]."""
        tokens = check_tokens(tokens, self.sequence_length, self.vocab_size)
        return patches_to_images(self.codebook[tokens], self.image_shape, self.patch_size)

    def save(self, path: str | os.PathLike) -> None:
        """Writes codebook, image shape and patch size to an .npz file (a gs:// URL too)."""
        buffer = io.BytesIO()
        np.savez(buffer, codebook=self.codebook, image_shape=np.asarray(self.image_shape),
                 patch_size=np.asarray(self.patch_size))
        epath.Path(path).write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PatchVQTokenizer":
        """Reads a tokenizer written by `save`."""
        with np.load(io.BytesIO(epath.Path(path).read_bytes())) as data:
            image_shape = tuple(int(d) for d in data["image_shape"])
            return cls(codebook=data["codebook"], image_shape=image_shape,
                       patch_size=int(data["patch_size"]))
