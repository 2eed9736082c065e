"""Scaled dot-product attention: the cornerstone of the encoder and the decoder.

For every query the seed's recipe is: take the dot product of the query with
every key (the *score*: how much this word should look at that word), scale it
by 1/sqrt(d_k) so the values do not grow with the head size, turn the scores
into weights with a softmax, and return the weighted sum of the values
(Vaswani et al. 2017, eq. 1):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

Layout follows ``jax.nn.dot_product_attention``: ``query`` is
``[batch, q_length, num_heads, head_dim]`` and ``key``/``value`` are
``[batch, kv_length, num_heads, head_dim]``. Masks are boolean, broadcastable
to ``[batch, num_heads, q_length, kv_length]``, and ``True`` means "may attend".

The price the seed names is visible here: the "dense" implementation builds the
full ``q_length x kv_length`` score matrix per head.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "dense", "chunked", "cudnn")


def _check_inputs(query, key, value, mask):
    """Raises ValueError/TypeError naming the offending argument and its shape."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have shape [batch, length, num_heads, head_dim], "
                f"got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    b, _, n, h = query.shape
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key and value must agree in [batch, kv_length, num_heads], "
            f"got key {tuple(key.shape)} and value {tuple(value.shape)}")
    if key.shape[0] != b or key.shape[2] != n:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree in batch "
            f"and num_heads")
    if key.shape[3] != h:
        raise ValueError(
            f"query and key must have the same head_dim, got {h} and {key.shape[3]}")
    if mask is not None:
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}")
        if mask.ndim > 4:
            raise ValueError(f"mask must be broadcastable to [B,N,T,S], got {tuple(mask.shape)}")
        target = (b, n, query.shape[1], key.shape[1])
        try:
            jnp.broadcast_shapes(mask.shape, target)
        except ValueError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} is not broadcastable to "
                f"[batch, num_heads, q_length, kv_length] = {target}") from None


def causal_mask(q_length: int, kv_length: int, q_offset: int | jax.Array = 0) -> jax.Array:
    """Boolean [q_length, kv_length] mask: query i may attend key j iff j <= i + q_offset.

    ``q_offset`` places the queries at positions ``q_offset ... q_offset+q_length-1``
    of the key sequence (used when a decoder continues from a key/value cache).
    """
    q_pos = jnp.arange(q_length)[:, None] + q_offset
    k_pos = jnp.arange(kv_length)[None, :]
    return k_pos <= q_pos


def combine_masks(*masks: Optional[jax.Array]) -> Optional[jax.Array]:
    """Logical AND of the masks that are not None (None if all are None)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def _full_mask(query, key, mask, causal):
    """The boolean mask actually applied, shaped to broadcast against [B,N,T,S]."""
    if causal:
        mask = combine_masks(mask, causal_mask(query.shape[1], key.shape[1]))
    return mask


def attention_weights(query: jax.Array, key: jax.Array, mask: Optional[jax.Array] = None,
                      *, causal: bool = False) -> jax.Array:
    """The attention probabilities softmax(Q K^T / sqrt(d_k)), shape [B, N, T, S].

    Computed in float32 whatever the input dtype. A query whose keys are all
    masked gets an all-zero row (it attends to nothing) instead of NaN.
    """
    _check_inputs(query, key, key, mask)
    mask = _full_mask(query, key, mask, causal)
    depth = query.shape[-1]
    scores = jnp.einsum("btnh,bsnh->bnts", query, key,
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(depth))
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    big_negative = jnp.finfo(jnp.float32).min
    scores = jnp.where(mask, scores, big_negative)
    weights = jax.nn.softmax(scores, axis=-1)
    # Fully masked rows: softmax of a constant row is uniform; make them zero instead.
    return jnp.where(mask, weights, 0.0)


def _dense_attention(query, key, value, mask, causal, dropout_rate, dropout_rng):
    """Materialises the [B, N, T, S] weights, then takes the weighted sum of values."""
    weights = attention_weights(query, key, mask, causal=causal)
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("attention dropout_rate > 0 needs a dropout_rng")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bnts,bsnh->btnh", weights.astype(value.dtype), value,
                     preferred_element_type=jnp.float32)
    return out.astype(value.dtype)


def select_implementation(query, key, mask, causal, dropout_rate) -> str:
    """What "auto" resolves to for these inputs on the default backend."""
    del query, key, mask, causal, dropout_rate
    return "dense"


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: Optional[jax.Array] = None, *, causal: bool = False,
                          dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                          implementation: str = "auto") -> jax.Array:
    """softmax(Q K^T / sqrt(d_k)) V for every head; returns [B, T, N, H] in value's dtype.

    Args:
      query: [batch, q_length, num_heads, head_dim].
      key, value: [batch, kv_length, num_heads, head_dim]; kv_length may differ from
        q_length (cross-attention).
      mask: optional boolean array broadcastable to [batch, num_heads, q_length,
        kv_length]; True = may attend. Queries with no key to attend return zeros.
      causal: also forbid query i to attend key j > i (decoder self-attention).
      dropout_rate, dropout_rng: dropout on the attention weights (training only).
      implementation: "dense" materialises the scores; "chunked" and "cudnn" avoid
        it; "auto" picks the best available for the platform and inputs.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _check_inputs(query, key, value, mask)
    if implementation == "auto":
        implementation = select_implementation(query, key, mask, causal, dropout_rate)
    if implementation == "dense":
        return _dense_attention(query, key, value, mask, causal, dropout_rate, dropout_rng)
    raise NotImplementedError(f"attention implementation {implementation!r} is not available yet")
