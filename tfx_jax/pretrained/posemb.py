"""Resizing ViT position embeddings for another input resolution.

ViT learns one position embedding per patch of a fixed grid. To fine-tune at
a higher resolution the paper "performs 2D interpolation of the pre-trained
position embeddings, according to their location in the original image"
(Dosovitskiy et al. 2021, sec. 3.2): the (grid x grid x D) table of the patch
tokens is resized bilinearly to the new grid, and the [CLS] token's embedding,
which has no place in the image, is kept as it is. The resize is
``jax.image.resize(..., "bilinear")`` with its default anti-aliasing (a wider
triangle filter when shrinking), as big_vision does.
"""
from __future__ import annotations

import math

import jax
import numpy as np


def resize_position_embedding(table: np.ndarray, new_grid: int, *,
                              num_prefix_tokens: int = 1) -> np.ndarray:
    """[prefix + g*g, D] -> [prefix + new_grid**2, D], float32.

    Args:
      table: the learned table; its first ``num_prefix_tokens`` rows ([CLS]) are kept.
      new_grid: side of the new patch grid (image_size // patch_size).
      num_prefix_tokens: 1 with a [CLS] token, 0 for global-average-pooled models.
    """
    table = np.asarray(table, np.float32)
    if table.ndim != 2:
        raise ValueError(f"position table must be [tokens, dim], got shape {table.shape}")
    if not isinstance(new_grid, int) or new_grid <= 0:
        raise ValueError(f"new_grid must be a positive int, got {new_grid!r}")
    prefix, patches = table[:num_prefix_tokens], table[num_prefix_tokens:]
    grid = math.isqrt(len(patches))
    if grid * grid != len(patches):
        raise ValueError(f"position table has {len(patches)} patch rows after "
                         f"{num_prefix_tokens} prefix token(s): not a square grid")
    if grid == new_grid:
        return table
    dim = table.shape[1]
    resized = jax.image.resize(patches.reshape(grid, grid, dim), (new_grid, new_grid, dim),
                               method="bilinear")
    return np.concatenate([prefix, np.asarray(resized, np.float32).reshape(-1, dim)])
