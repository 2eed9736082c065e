"""Exact attention in blocks, with memory that grows linearly in sequence length.

The seed's price of self-attention is the ``T x S`` score matrix. It is not
needed all at once: Rabe & Staats (2021, "Self-attention does not need O(n^2)
memory") compute the softmax-weighted sum one block of keys at a time, keeping
per query only a running maximum ``m``, a running normaliser ``l`` and an
unnormalised output ``acc`` (the "online softmax", the recurrence FlashAttention
(Dao et al. 2022, 2023) uses on GPUs). For a new block of scores ``s``::

    m'   = max(m, rowmax(s))
    l'   = l * exp(m - m') + rowsum(exp(s - m'))
    acc' = acc * exp(m - m') + exp(s - m') @ V_block

and at the end ``out = acc / l``; ``lse = m + log(l)`` is the log-sum-exp of a
query's scores. The result equals ``softmax(Q K^T / sqrt(d)) V`` exactly (up to
float rounding): nothing is approximated.

Backward pass. Differentiating the loop would store every block's weights (the
``T x S`` matrix again, just in pieces). Instead a ``jax.custom_vjp`` keeps only
Q, K, V, the output and ``lse`` and recomputes each block's weights
``P = exp(S - lse)`` on the way back (FlashAttention's backward)::

    dV  += P^T dO             dP = dO V^T
    dS   = P * (dP - rowsum(dO * O))
    dQ  += dS K / sqrt(d)     dK += dS^T Q / sqrt(d)

Extra memory is therefore O(T + S) per head plus one ``block_q x block_kv``
tile, in the forward and in the backward pass.

Layout inside this module: blocks on the leading axis, ``[num_blocks, B, N,
block, H]``, so that ``lax.scan`` walks over them. Lengths that are not a
multiple of the block size are padded; padded keys are masked out and padded
queries are dropped. With ``causal=True`` the loops visit only the key blocks
at or below the diagonal (about half of them), and with ``q_lengths`` /
``kv_lengths`` only blocks that hold real tokens.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

# Tile sizes: on a 2-core CPU (float32, 4 heads x 64, T = 2k and 4k, causal and
# not) 512 x 256 was the fastest of 128..1024 in forward and forward+backward,
# within noise of 512 x 512 and 256 x 256 (docs/attention_memory.md).
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 256


class _Blocking(NamedTuple):
    """Static description of the tiling (hashable: a custom_vjp nondiff argument)."""
    q_length: int      # T before padding
    kv_length: int     # S before padding
    block_q: int
    block_kv: int
    causal: bool


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, L, N, H] -> [L_pad / block, B, N, block, H], zero-padding L."""
    b, length, n, h = x.shape
    num_blocks = -(-length // block)
    x = jnp.pad(x, ((0, 0), (0, num_blocks * block - length), (0, 0), (0, 0)))
    return x.reshape(b, num_blocks, block, n, h).transpose(1, 0, 3, 2, 4)


def _from_blocks(x: jax.Array, length: int) -> jax.Array:
    """[num_blocks, B, N, block, H] -> [B, length, N, H] (drops the padding)."""
    num_blocks, b, n, block, h = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, num_blocks * block, n, h)[:, :length]


def _pad_mask(mask: Optional[jax.Array], q_padded: int, kv_padded: int):
    """Mask as 4-D [Bm, Nm, Tm, Sm] with each of Tm, Sm either 1 or padded length."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    pad_t = q_padded - mask.shape[2] if mask.shape[2] != 1 else 0
    pad_s = kv_padded - mask.shape[3] if mask.shape[3] != 1 else 0
    return jnp.pad(mask, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)), constant_values=False)


def _block_mask(blocking: _Blocking, i, j, mask, q_lengths, kv_lengths):
    """Boolean tile (broadcastable to [B, N, block_q, block_kv]) for query block i
    and key block j, or None when every pair in the tile may attend."""
    bq, bk = blocking.block_q, blocking.block_kv
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    valid = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if blocking.kv_length % bk:
        valid = both(valid, k_pos < blocking.kv_length)
    if blocking.causal:
        valid = both(valid, k_pos <= q_pos)
    if kv_lengths is not None:
        valid = both(valid, k_pos[None, None] < kv_lengths[:, None, None, None])
    if q_lengths is not None:
        valid = both(valid, q_pos[None, None] < q_lengths[:, None, None, None])
    if mask is not None:
        tile = mask
        if mask.shape[2] != 1:
            tile = lax.dynamic_slice_in_dim(tile, i * bq, bq, axis=2)
        if mask.shape[3] != 1:
            tile = lax.dynamic_slice_in_dim(tile, j * bk, bk, axis=3)
        valid = both(valid, tile)
    return valid


def _live_block_counts(blocking: _Blocking, num_q_blocks, num_kv_blocks, q_lengths, kv_lengths):
    """How many leading query / key blocks hold any real (unpadded) token."""
    live_q, live_kv = num_q_blocks, num_kv_blocks
    if q_lengths is not None:
        live_q = (jnp.max(q_lengths) + blocking.block_q - 1) // blocking.block_q
    if kv_lengths is not None:
        live_kv = (jnp.max(kv_lengths) + blocking.block_kv - 1) // blocking.block_kv
    return live_q, live_kv


def _kv_block_range(blocking: _Blocking, i, live_q, live_kv):
    """Key blocks [0, hi) that query block i must visit."""
    hi = live_kv
    if blocking.causal:  # last query of block i is (i+1)*bq - 1; keys up to it
        hi = jnp.minimum(hi, ((i + 1) * blocking.block_q - 1) // blocking.block_kv + 1)
    if not isinstance(live_q, int):  # query block i past every sequence's end: nothing
        hi = jnp.where(i < live_q, hi, 0)
    return hi


def _q_block_range(blocking: _Blocking, j, live_q, live_kv):
    """Query blocks [lo, hi) that see key block j (the transpose of _kv_block_range)."""
    lo = (j * blocking.block_kv) // blocking.block_q if blocking.causal else 0
    hi = live_q
    if not isinstance(live_kv, int):
        hi = jnp.where(j < live_kv, hi, lo)
    return lo, hi


def _masked_scores(blocking: _Blocking, i, j, q_i, k_j, mask, q_lengths, kv_lengths):
    """Tile (i, j) of Q K^T / sqrt(d) in float32, -inf where attention is not allowed."""
    scale = 1.0 / math.sqrt(q_i.shape[-1])
    s = jnp.einsum("bnqh,bnkh->bnqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
    valid = _block_mask(blocking, i, j, mask, q_lengths, kv_lengths)
    return s if valid is None else jnp.where(valid, s, -jnp.inf)


def _forward(blocking: _Blocking, q, k, v, mask, q_lengths, kv_lengths):
    """Online-softmax forward; returns (out blocks, lse blocks [nq, B, N, bq])."""
    num_q_blocks, b, n, bq, _ = q.shape
    num_kv_blocks = k.shape[0]
    live_q, live_kv = _live_block_counts(blocking, num_q_blocks, num_kv_blocks,
                                         q_lengths, kv_lengths)
    value_dim = v.shape[-1]

    def query_block(_, inputs):
        i, q_i = inputs

        def key_block(j, carry):
            m, l, acc = carry
            k_j = lax.dynamic_index_in_dim(k, j, keepdims=False)
            v_j = lax.dynamic_index_in_dim(v, j, keepdims=False)
            s = _masked_scores(blocking, i, j, q_i, k_j, mask, q_lengths, kv_lengths)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # A row with nothing visible yet keeps m = -inf; subtract 0 instead.
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            l = l * correction + jnp.sum(p, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bnqk,bnkh->bnqh", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((b, n, bq), -jnp.inf, jnp.float32),
                jnp.zeros((b, n, bq), jnp.float32),
                jnp.zeros((b, n, bq, value_dim), jnp.float32))
        hi = _kv_block_range(blocking, i, live_q, live_kv)
        m, l, acc = lax.fori_loop(0, hi, key_block, init)
        attended = l > 0.0  # False for a query with no key to attend: output zeros
        out = jnp.where(attended[..., None], acc / jnp.where(attended, l, 1.0)[..., None], 0.0)
        lse = jnp.where(attended, m + jnp.log(jnp.where(attended, l, 1.0)), 0.0)
        return None, (out.astype(v.dtype), lse)

    _, (out, lse) = lax.scan(query_block, None, (jnp.arange(num_q_blocks), q))
    return out, lse


def _backward(blocking: _Blocking, residuals, d_out):
    """Recomputes each tile's weights from lse; accumulates dQ, dK, dV."""
    q, k, v, mask, q_lengths, kv_lengths, out, lse = residuals
    num_q_blocks = q.shape[0]
    num_kv_blocks = k.shape[0]
    scale = 1.0 / math.sqrt(q.shape[-1])
    live_q, live_kv = _live_block_counts(blocking, num_q_blocks, num_kv_blocks,
                                         q_lengths, kv_lengths)
    # rowsum(dO * O) = rowsum(P * dP): the softmax Jacobian's correction term.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def key_block(d_q, inputs):
        j, k_j, v_j = inputs

        def query_block(i, carry):
            d_q, d_k, d_v = carry
            q_i = lax.dynamic_index_in_dim(q, i, keepdims=False)
            do_i = lax.dynamic_index_in_dim(d_out, i, keepdims=False)
            lse_i = lax.dynamic_index_in_dim(lse, i, keepdims=False)
            delta_i = lax.dynamic_index_in_dim(delta, i, keepdims=False)
            s = _masked_scores(blocking, i, j, q_i, k_j, mask, q_lengths, kv_lengths)
            p = jnp.exp(s - lse_i[..., None])
            d_v = d_v + jnp.einsum("bnqk,bnqh->bnkh", p.astype(do_i.dtype), do_i,
                                   preferred_element_type=jnp.float32)
            d_p = jnp.einsum("bnqh,bnkh->bnqk", do_i, v_j, preferred_element_type=jnp.float32)
            d_s = (p * (d_p - delta_i[..., None]) * scale).astype(q.dtype)
            d_q_i = jnp.einsum("bnqk,bnkh->bnqh", d_s, k_j, preferred_element_type=jnp.float32)
            d_q = lax.dynamic_update_index_in_dim(
                d_q, lax.dynamic_index_in_dim(d_q, i, keepdims=False) + d_q_i, i, axis=0)
            d_k = d_k + jnp.einsum("bnqk,bnqh->bnkh", d_s, q_i,
                                   preferred_element_type=jnp.float32)
            return d_q, d_k, d_v

        lo, hi = _q_block_range(blocking, j, live_q, live_kv)
        d_q, d_k, d_v = lax.fori_loop(lo, hi, query_block, (
            d_q, jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32)))
        return d_q, (d_k.astype(k.dtype), d_v.astype(v.dtype))

    d_q, (d_k, d_v) = lax.scan(key_block, jnp.zeros(q.shape, jnp.float32),
                               (jnp.arange(num_kv_blocks), k, v))
    # Masks and lengths are not differentiable: None is a zero cotangent.
    return d_q.astype(q.dtype), d_k, d_v, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(blocking, q, k, v, mask, q_lengths, kv_lengths):
    return _forward(blocking, q, k, v, mask, q_lengths, kv_lengths)[0]


def _blocked_attention_fwd(blocking, q, k, v, mask, q_lengths, kv_lengths):
    out, lse = _forward(blocking, q, k, v, mask, q_lengths, kv_lengths)
    return out, (q, k, v, mask, q_lengths, kv_lengths, out, lse)


_blocked_attention.defvjp(_blocked_attention_fwd, _backward)


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      mask: Optional[jax.Array] = None, *, causal: bool = False,
                      q_lengths: Optional[jax.Array] = None,
                      kv_lengths: Optional[jax.Array] = None,
                      block_q: int = DEFAULT_BLOCK_Q,
                      block_kv: int = DEFAULT_BLOCK_KV) -> jax.Array:
    """softmax(Q K^T / sqrt(d)) V computed tile by tile; returns [B, T, N, H].

    Same contract as ``tfx_jax.dot_product_attention`` (inputs are assumed
    validated there): ``mask`` is boolean, broadcastable to [B, N, T, S];
    ``causal`` lets query i see keys j <= i; ``q_lengths`` / ``kv_lengths`` ([B]
    ints) mark the real tokens of each sequence (queries past ``q_lengths``
    return zeros, keys past ``kv_lengths`` are ignored). Queries that can attend
    to no key return zeros. ``block_q`` / ``block_kv`` are tile sizes (clipped
    to the sequence lengths); they trade loop overhead against tile memory.
    """
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"{name} must be a positive int, got {block!r}")
    t, s = query.shape[1], key.shape[1]
    if t == 0 or s == 0:  # nothing to attend: zeros, as dense returns
        return jnp.zeros(query.shape[:3] + value.shape[3:], value.dtype)
    block_q, block_kv = min(block_q, t), min(block_kv, s)
    blocking = _Blocking(q_length=t, kv_length=s, block_q=block_q, block_kv=block_kv,
                         causal=bool(causal))
    q, k, v = _to_blocks(query, block_q), _to_blocks(key, block_kv), _to_blocks(value, block_kv)
    mask = _pad_mask(mask, q.shape[0] * block_q, k.shape[0] * block_kv)
    if q_lengths is not None:
        q_lengths = jnp.asarray(q_lengths, jnp.int32)
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    out = _blocked_attention(blocking, q, k, v, mask, q_lengths, kv_lengths)
    return _from_blocks(out, t)
