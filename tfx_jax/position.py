"""Positional encoding: telling an order-blind attention where each word stands.

Attention treats its inputs as a set: permute the words and the outputs are
permuted the same way. Word order matters, so a position-dependent offset is
added to each embedding. The paper (Vaswani et al. 2017, sec. 3.5) uses fixed
sinusoids,

    PE(pos, 2i)   = sin(pos / 10000^(2i / d_model))
    PE(pos, 2i+1) = cos(pos / 10000^(2i / d_model)),

interleaved so that even feature indices carry sines and odd ones cosines, and
notes that learned position embeddings work about as well; ViT and GPT-style
models use learned ones. Rotary embeddings (``rotary.py``) rotate queries and
keys inside attention instead of adding anything here.

Positions can be given per token ([batch, length] integers): packed rows
restart them at every segment, left-padded prompts start their real tokens at 0.
"""
from __future__ import annotations

from typing import Any, Optional

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

    Decoding passes each token's ``positions`` (kept by :class:`SequenceLayout`'s
    decode counter), so this module has no state of its own.

    Attributes:
      max_len: longest sequence the encoding covers.
      kind: "sinusoidal" (paper, fixed) or "learned" (ViT/GPT, trained).
    """
    max_len: int
    kind: str = "sinusoidal"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: Optional[jax.Array] = None) -> jax.Array:
        """Adds the encoding of ``positions`` [B, T] (default 0..T-1)."""
        length, dim = x.shape[-2], x.shape[-1]
        if self.kind == "sinusoidal":
            table = sinusoidal_position_encoding(self.max_len, dim)
        elif self.kind == "learned":
            table = self.param("embedding", with_axes(nn.initializers.normal(stddev=0.02),
                                                      ("position", "embed")),
                               (self.max_len, dim), self.param_dtype)
        else:
            raise ValueError(f"position kind must be 'sinusoidal' or 'learned', got {self.kind!r}")
        if positions is not None:
            if positions.shape != x.shape[:-1]:
                raise ValueError(f"positions must have shape [batch, length] = "
                                 f"{tuple(x.shape[:-1])}, got {tuple(positions.shape)}")
            _check_concrete_positions(positions, self.max_len)
            return x + jnp.take(table, positions, axis=0).astype(x.dtype)
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        return x + table[:length].astype(x.dtype)


def _check_concrete_positions(positions, max_len):
    """Positions known at trace time must lie in [0, max_len)."""
    if isinstance(positions, jax.core.Tracer):
        return
    positions = np.asarray(positions)
    if not np.issubdtype(positions.dtype, np.integer):
        raise TypeError(f"positions must be integers, got dtype {positions.dtype}")
    if positions.size and (positions.min() < 0 or positions.max() >= max_len):
        raise ValueError(f"positions must lie in [0, max_len={max_len}), got values in "
                         f"[{positions.min()}, {positions.max()}]")


def positions_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
    """Per-segment positions [B, T]: 0, 1, 2, ... restarting wherever the segment id changes.

    For packed rows (segments contiguous) this is each token's position in its own
    example, which is what the example would see if run alone. Padding (segment 0)
    gets positions too; they are never attended to.
    """
    segment_ids = jnp.asarray(segment_ids)
    length = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool),
                              segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return (index - start_index).astype(jnp.int32)


class SequenceLayout(nn.Module):
    """Positions [B, T] and segment ids of the tokens, in training and in decoding.

    Outside ``decode`` mode: given ``positions`` are returned as they are;
    otherwise tokens are numbered 0..T-1, restarting at every segment when
    ``segment_ids`` are given; segment ids are returned unchanged (maybe None).

    In ``decode`` mode the module keeps, per sequence, the next position and the
    last segment id ("cache" variables), so a prompt can be fed with explicit
    positions and segment ids (e.g. left padding as segment 0) and every later
    call continues each sequence where it stopped: tokens without segment ids
    extend the last segment (1 at the start), and tokens without positions
    continue their segment's numbering (restarting when the segment changes).
    Segment ids are then always returned as an int32 [B, T] array.
    """
    decode: bool = False

    @nn.compact
    def __call__(self, batch: int, length: int, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None):
        for name, value in (("positions", positions), ("segment_ids", segment_ids)):
            if value is None:
                continue
            if jnp.shape(value) != (batch, length):
                raise ValueError(f"{name} must have shape [batch, length] = {(batch, length)}, "
                                 f"got {tuple(jnp.shape(value))}")
            if not jnp.issubdtype(jnp.asarray(value).dtype, jnp.integer):
                raise TypeError(f"{name} must be integers, got dtype {jnp.asarray(value).dtype}")
        if not self.decode:
            if positions is not None:
                return jnp.asarray(positions, jnp.int32), segment_ids
            if segment_ids is not None:
                return positions_from_segment_ids(segment_ids), segment_ids
            return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)), None
        is_initialized = self.has_variable("cache", "next_position")
        next_position = self.variable("cache", "next_position", jnp.zeros, (batch,), jnp.int32)
        last_segment = self.variable("cache", "last_segment", jnp.zeros, (batch,), jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.broadcast_to(jnp.maximum(last_segment.value, 1)[:, None],
                                           (batch, length))
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if positions is None:
            index = jnp.arange(length, dtype=jnp.int32)
            previous = jnp.concatenate([last_segment.value[:, None], segment_ids[:, :-1]], 1)
            start = jax.lax.cummax(jnp.where(segment_ids != previous, index, -1), axis=1)
            positions = jnp.where(start < 0, next_position.value[:, None] + index, index - start)
        positions = jnp.asarray(positions, jnp.int32)
        if is_initialized:
            next_position.value = positions[:, -1] + 1
            last_segment.value = segment_ids[:, -1]
        return positions, segment_ids


def check_tokens(name: str, tokens: jax.Array, max_len: int) -> None:
    """Token inputs must be integer [batch, length] with length <= max_len."""
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, length], got {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"{name} length {tokens.shape[1]} exceeds max_len={max_len}")


def add_positions(x: jax.Array, positions: jax.Array, config, *, name: str = "position"):
    """Adds the additive position encoding at ``positions`` (nothing for "rope")."""
    if config.position == "rope":
        return x
    return AddPositionEncoding(config.max_len, config.position, param_dtype=config.param_dtype,
                               name=name)(x, positions)
