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
full ``q_length x kv_length`` score matrix per head. "chunked"
(``attention_chunked.py``) computes the same numbers tile by tile with memory
linear in the lengths; "cudnn" (``attention_cudnn.py``) is NVIDIA's fused kernel.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from tfx_jax.attention_chunked import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, chunked_attention
from tfx_jax.attention_cudnn import cudnn_attention, cudnn_unsupported_reason

IMPLEMENTATIONS = ("auto", "dense", "chunked", "cudnn")
# "auto" switches from dense to chunked at this length. CPU measurements
# (docs/attention_memory.md): from T = 512 on chunked was faster in both passes and
# its gradient needed half the memory; below, one tile covers the whole sequence.
CHUNKED_MIN_LENGTH = 512


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


def lengths_mask(q_length: int, kv_length: int, q_lengths: Optional[jax.Array] = None,
                 kv_lengths: Optional[jax.Array] = None) -> Optional[jax.Array]:
    """Padding as a boolean [B, 1, T, S]-broadcastable mask (None if no lengths).

    Query i of sequence b is real iff i < q_lengths[b]; key j iff j < kv_lengths[b].
    """
    mask = None
    if kv_lengths is not None:
        mask = (jnp.arange(kv_length)[None, :] < jnp.asarray(kv_lengths)[:, None])[:, None, None, :]
    if q_lengths is not None:
        q_mask = (jnp.arange(q_length)[None, :] < jnp.asarray(q_lengths)[:, None])[:, None, :, None]
        mask = combine_masks(mask, q_mask)
    return mask


def _check_lengths(query, q_lengths, kv_lengths):
    for name, lengths in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
        if lengths is None:
            continue
        lengths = jnp.asarray(lengths)
        if lengths.shape != (query.shape[0],):
            raise ValueError(f"{name} must have shape [batch] = ({query.shape[0]},), "
                             f"got {tuple(lengths.shape)}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(f"{name} must be integers, got dtype {lengths.dtype}")


def select_implementation(query, key, mask=None, causal=False, dropout_rate=0.0, *,
                          platform: Optional[str] = None,
                          compute_capability: Optional[str] = None,
                          value_head_dim: Optional[int] = None) -> str:
    """What "auto" resolves to for these inputs.

    1. dropout on the weights -> "dense" (the only one that implements it);
    2. an NVIDIA GPU (sm80+), float16/bfloat16, a cuDNN head_dim and no mask array
       (causal and lengths are fine) -> "cudnn";
    3. max(q_length, kv_length) >= CHUNKED_MIN_LENGTH -> "chunked";
    4. otherwise "dense" (short sequences: one tile would cover them anyway).

    ``platform`` ("cpu"/"gpu"/"tpu") and ``compute_capability`` (e.g. "9.0")
    default to the first local device; pass them to ask about another machine.
    ``value_head_dim``: the value's head size when it differs from the query's.
    """
    if dropout_rate > 0.0:
        return "dense"
    reason = cudnn_unsupported_reason(
        query.dtype, query.shape[-1], has_mask=mask is not None, dropout_rate=dropout_rate,
        causal=causal, q_length=query.shape[1], kv_length=key.shape[1],
        value_head_dim=value_head_dim, platform=platform, compute_capability=compute_capability)
    if reason is None:
        return "cudnn"
    if max(query.shape[1], key.shape[1]) >= CHUNKED_MIN_LENGTH:
        return "chunked"
    return "dense"


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: Optional[jax.Array] = None, *, causal: bool = False,
                          dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                          implementation: str = "auto",
                          q_lengths: Optional[jax.Array] = None,
                          kv_lengths: Optional[jax.Array] = None,
                          block_q: int = DEFAULT_BLOCK_Q,
                          block_kv: int = DEFAULT_BLOCK_KV) -> jax.Array:
    """softmax(Q K^T / sqrt(d_k)) V for every head; returns [B, T, N, H] in value's dtype.

    Args:
      query: [batch, q_length, num_heads, head_dim].
      key, value: [batch, kv_length, num_heads, head_dim]; kv_length may differ from
        q_length (cross-attention).
      mask: optional boolean array broadcastable to [batch, num_heads, q_length,
        kv_length]; True = may attend. Queries with no key to attend return zeros.
      causal: also forbid query i to attend key j > i (decoder self-attention).
      dropout_rate, dropout_rng: dropout on the attention weights (training only;
        "dense" only).
      implementation: "dense" materialises the scores; "chunked" (any backend) and
        "cudnn" (NVIDIA GPU) avoid it; "auto" picks with `select_implementation`.
      q_lengths, kv_lengths: optional [batch] ints: padding given as lengths, the
        memory-lean alternative to a padding mask. Query i of sequence b is real
        iff i < q_lengths[b] (other queries return zeros); key j iff j < kv_lengths[b].
      block_q, block_kv: tile sizes of "chunked" (ignored by the others).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _check_inputs(query, key, value, mask)
    _check_lengths(query, q_lengths, kv_lengths)
    if implementation == "auto":
        implementation = select_implementation(query, key, mask, causal, dropout_rate,
                                               value_head_dim=value.shape[-1])
    if implementation == "dense":
        mask = combine_masks(mask, lengths_mask(query.shape[1], key.shape[1], q_lengths, kv_lengths))
        return _dense_attention(query, key, value, mask, causal, dropout_rate, dropout_rng)
    if implementation == "chunked":
        if dropout_rate > 0.0:
            raise ValueError("implementation='chunked' has no attention dropout "
                             f"(dropout_rate={dropout_rate}); use 'dense' or 'auto'")
        return chunked_attention(query, key, value, mask, causal=causal, q_lengths=q_lengths,
                                 kv_lengths=kv_lengths, block_q=block_q, block_kv=block_kv)
    reason = cudnn_unsupported_reason(
        query.dtype, query.shape[-1], has_mask=mask is not None, dropout_rate=dropout_rate,
        value_head_dim=value.shape[-1])
    if reason is not None:
        raise ValueError(f"implementation='cudnn' cannot run here: {reason}")
    return cudnn_attention(query, key, value, causal=causal, q_lengths=q_lengths,
                           kv_lengths=kv_lengths)
