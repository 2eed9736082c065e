"""Positional encoding: telling an order-blind attention where each word stands.

Attention treats its inputs as a set: permute the words and the outputs are
permuted the same way. Word order matters, so a position-dependent offset is
added to each embedding. The paper (Vaswani et al. 2017, sec. 3.5) uses fixed
sinusoids,

    PE(pos, 2i)   = sin(pos / 10000^(2i / d_model))
    PE(pos, 2i+1) = cos(pos / 10000^(2i / d_model)),

interleaved so that even feature indices carry sines and odd ones cosines, and
notes that learned position embeddings work about as well; ViT and GPT-style
models use learned ones.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.logical_axes import with_axes


def sinusoidal_position_encoding(length: int, dim: int) -> jax.Array:
    """The paper's [length, dim] table of interleaved sines and cosines (float32)."""
    if length <= 0 or dim <= 0:
        raise ValueError(f"length and dim must be positive, got length={length}, dim={dim}")
    if dim % 2:
        raise ValueError(f"dim must be even (sin/cos pairs), got {dim}")
    position = np.arange(length, dtype=np.float64)[:, None]
    two_i = np.arange(0, dim, 2, dtype=np.float64)[None, :]
    angle = position / np.power(10000.0, two_i / dim)
    table = np.empty((length, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle)
    return jnp.asarray(table, dtype=jnp.float32)


class AddPositionEncoding(nn.Module):
    """Adds a sinusoidal or learned position encoding to [batch, length, d_model] inputs.

    In ``decode`` mode the module remembers how many positions it has already
    emitted (a "cache" variable), so feeding a prompt and then one token at a
    time gives each token its true position.

    Attributes:
      max_len: longest sequence the encoding covers.
      kind: "sinusoidal" (paper, fixed) or "learned" (ViT/GPT, trained).
      decode: autoregressive mode with a position counter.
    """
    max_len: int
    kind: str = "sinusoidal"
    decode: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        length, dim = x.shape[-2], x.shape[-1]
        if self.kind == "sinusoidal":
            table = sinusoidal_position_encoding(self.max_len, dim)
        elif self.kind == "learned":
            table = self.param("embedding", with_axes(nn.initializers.normal(stddev=0.02),
                                                      ("position", "embed")),
                               (self.max_len, dim), self.param_dtype)
        else:
            raise ValueError(f"position kind must be 'sinusoidal' or 'learned', got {self.kind!r}")
        if not self.decode:
            if length > self.max_len:
                raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
            return x + table[:length].astype(x.dtype)
        is_initialized = self.has_variable("cache", "position")
        position = self.variable("cache", "position", jnp.zeros, x.shape[:1], jnp.int32)
        if not is_initialized:  # init call: shape the cache only
            return x + table[:length].astype(x.dtype)
        start = position.value[0]  # one counter per sequence, all equal
        position.value = position.value + length
        rows = jax.lax.dynamic_slice_in_dim(table, start, length, axis=0)
        return x + rows.astype(x.dtype)
