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

Layout inside this module: blocks on the leading axis, queries as ``[num_blocks,
B, K, G, block, H]`` and keys/values as ``[num_blocks, B, K, block, H]``, so that
``lax.scan`` walks over them. The query heads are split into K key/value heads
times G groups: grouped-query attention (Ainslie et al. 2023; K = 1 is Shazeer's
multi-query attention) is an einsum over the shared key head, with no copy of
K/V. Lengths that are not a multiple of the block size are padded; padded keys
are masked out and padded queries are dropped.

Skipped work. The causal mask and a sliding window ``local_window=(left,
right)`` (Beltagy et al. 2020) are one band ``-left <= j - i <= right``; the
loops visit only key blocks that meet the band (with ``causal=True`` about half
of them, with a window of width w about ``w / block_kv + 1`` per query block),
and with ``q_lengths`` / ``kv_lengths`` only blocks that hold real tokens.

Dropout on the weights uses a counter-based mask (``attention_dropout.py``): the
bit of (batch, head, query, key) is a hash of those positions and a seed, so the
backward pass regenerates each tile's bits instead of storing a ``T x S`` mask. The normaliser ``l`` sums the undropped
weights, as dense dropout after the softmax does.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from tfx_jax.attention_dropout import dropout_seeds, keep_multiplier

# Tile sizes, from docs/attention_memory.md (2-core CPU, float32, 8 heads x 64):
# interleaved in one process (best of 5), 512 x 256 was faster than 256 x 256 at 5 of
# 6 points (T = 1k-4k, forward and forward+backward: up to 2x in forward, 10-20% in
# forward+backward at 2k-4k); 256 x 256 needed 9-11 MiB less temporary memory (equal
# at 16k). A sequential run under heavy load had favoured 256 x 256: noise.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 256


class _Blocking(NamedTuple):
    """Static description of the tiling (hashable: a custom_vjp nondiff argument).

    The band ``k_pos - q_pos in [-left, right]`` (None = unbounded) holds both
    the causal mask (right = 0) and a sliding window.
    """
    q_length: int      # T before padding
    kv_length: int     # S before padding
    block_q: int
    block_kv: int
    left: Optional[int]
    right: Optional[int]
    scale: float
    dropout_rate: float
    soft_cap: Optional[float] = None  # scores -> c tanh(scores / c) before masking


def _q_to_blocks(x: jax.Array, block: int, num_kv_heads: int) -> jax.Array:
    """[B, T, N, H] -> [T_pad / block, B, K, G, block, H] (N = K * G), zero-padding T."""
    b, length, n, h = x.shape
    num_blocks = -(-length // block)
    x = jnp.pad(x, ((0, 0), (0, num_blocks * block - length), (0, 0), (0, 0)))
    x = x.reshape(b, num_blocks, block, num_kv_heads, n // num_kv_heads, h)
    return x.transpose(1, 0, 3, 4, 2, 5)


def _kv_to_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, S, K, H] -> [S_pad / block, B, K, block, H], zero-padding S."""
    b, length, k, h = x.shape
    num_blocks = -(-length // block)
    x = jnp.pad(x, ((0, 0), (0, num_blocks * block - length), (0, 0), (0, 0)))
    return x.reshape(b, num_blocks, block, k, h).transpose(1, 0, 3, 2, 4)


def _kv_from_blocks(x: jax.Array, length: int) -> jax.Array:
    """[num_blocks, B, K, block, H] -> [B, length, K, H] (drops the padding)."""
    num_blocks, b, k, block, h = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, num_blocks * block, k, h)[:, :length]


def _q_from_blocks(x: jax.Array, length: int) -> jax.Array:
    """[num_blocks, B, K, G, block, H] -> [B, length, K * G, H] (drops the padding)."""
    num_blocks, b, k, g, block, h = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, num_blocks * block, k * g, h)[:, :length]


def _ids_to_blocks(ids: Optional[jax.Array], block: int) -> Optional[jax.Array]:
    """Segment ids [B, L] -> [L_pad / block, B, block]; padded positions get id 0."""
    if ids is None:
        return None
    b, length = ids.shape
    num_blocks = -(-length // block)
    ids = jnp.pad(jnp.asarray(ids, jnp.int32), ((0, 0), (0, num_blocks * block - length)))
    return ids.reshape(b, num_blocks, block).transpose(1, 0, 2)


def _pad_mask(mask: Optional[jax.Array], num_kv_heads: int, q_padded: int, kv_padded: int):
    """Mask as 5-D [Bm, Km, Gm, Tm, Sm] (heads split like the query), with each of
    Tm, Sm either 1 or the padded length."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    bm, nm, tm, sm = mask.shape
    if nm == 1:
        mask = mask.reshape(bm, 1, 1, tm, sm)
    else:
        mask = mask.reshape(bm, num_kv_heads, nm // num_kv_heads, tm, sm)
    pad_t = q_padded - tm if tm != 1 else 0
    pad_s = kv_padded - sm if sm != 1 else 0
    return jnp.pad(mask, ((0, 0),) * 3 + ((0, pad_t), (0, pad_s)), constant_values=False)


class _Extras(NamedTuple):
    """Per-call arrays that shape the mask (None when absent); not differentiable."""
    mask: Optional[jax.Array]          # [Bm, Km, Gm, Tm, Sm] bool
    q_lengths: Optional[jax.Array]     # [B] int32
    kv_lengths: Optional[jax.Array]    # [B] int32
    q_segments: Optional[jax.Array]    # [nq, B, bq] int32
    kv_segments: Optional[jax.Array]   # [nk, B, bk] int32
    dropout_seeds: Optional[jax.Array]  # [2] uint32 (attention_dropout.dropout_seeds)
    # Absolute position of the first query / key (int32 scalars; None = 0): the band
    # (causal, window) and the dropout bits use positions offset by them, so one piece
    # of a longer sequence can be attended to another (context_parallel.py).
    q_offset: Optional[jax.Array] = None
    kv_offset: Optional[jax.Array] = None


def _offsets(extras: _Extras):
    """(q_offset, kv_offset - q_offset), 0 where absent."""
    q_offset = 0 if extras.q_offset is None else extras.q_offset
    kv_offset = 0 if extras.kv_offset is None else extras.kv_offset
    return q_offset, kv_offset - q_offset


def _block_mask(blocking: _Blocking, i, j, extras: _Extras):
    """Boolean tile (broadcastable to [B, K, G, block_q, block_kv]) for query block i
    and key block j, or None when every pair in the tile may attend."""
    bq, bk = blocking.block_q, blocking.block_kv
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # within this call
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    _, shift = _offsets(extras)
    valid = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    def per_example(x):  # [B, bq or 1, bk or 1] -> [B, 1, 1, bq, bk]
        return x[:, None, None]

    if blocking.kv_length % bk:
        valid = both(valid, k_pos < blocking.kv_length)
    if blocking.right is not None:  # the band is on absolute positions
        valid = both(valid, k_pos + shift <= q_pos + blocking.right)
    if blocking.left is not None:
        valid = both(valid, k_pos + shift >= q_pos - blocking.left)
    if extras.kv_lengths is not None:
        valid = both(valid, per_example(k_pos[None] < extras.kv_lengths[:, None, None]))
    if extras.q_lengths is not None:
        valid = both(valid, per_example(q_pos[None] < extras.q_lengths[:, None, None]))
    if extras.q_segments is not None:
        q_ids = lax.dynamic_index_in_dim(extras.q_segments, i, keepdims=False)[:, :, None]
        kv_ids = lax.dynamic_index_in_dim(extras.kv_segments, j, keepdims=False)[:, None, :]
        valid = both(valid, per_example((q_ids == kv_ids) & (q_ids != 0)))
    if extras.mask is not None:
        tile = extras.mask
        if tile.shape[3] != 1:
            tile = lax.dynamic_slice_in_dim(tile, i * bq, bq, axis=3)
        if tile.shape[4] != 1:
            tile = lax.dynamic_slice_in_dim(tile, j * bk, bk, axis=4)
        valid = both(valid, tile)
    return valid


def _live_block_counts(blocking: _Blocking, num_q_blocks, num_kv_blocks, extras: _Extras):
    """How many leading query / key blocks hold any real (unpadded) token."""
    live_q, live_kv = num_q_blocks, num_kv_blocks
    if extras.q_lengths is not None:
        live_q = jnp.minimum(
            (jnp.max(extras.q_lengths) + blocking.block_q - 1) // blocking.block_q, num_q_blocks)
    if extras.kv_lengths is not None:
        live_kv = jnp.minimum(
            (jnp.max(extras.kv_lengths) + blocking.block_kv - 1) // blocking.block_kv,
            num_kv_blocks)
    return live_q, live_kv


def _kv_block_range(blocking: _Blocking, i, live_q, live_kv, extras: _Extras):
    """Key blocks [lo, hi) that query block i must visit: those meeting the band
    (an empty range, hi <= lo, when the keys lie wholly outside it)."""
    bq, bk = blocking.block_q, blocking.block_kv
    _, shift = _offsets(extras)
    lo, hi = 0, live_kv
    if blocking.left is not None:  # first query of block i sees keys from i*bq - left
        lo = jnp.maximum(0, (i * bq - blocking.left - shift) // bk)
    if blocking.right is not None:  # last query (i+1)*bq - 1 sees keys up to it + right
        hi = jnp.minimum(hi, ((i + 1) * bq - 1 + blocking.right - shift) // bk + 1)
    if not isinstance(live_q, int):  # query block i past every sequence's end: nothing
        hi = jnp.where(i < live_q, hi, lo)
    return lo, hi


def _q_block_range(blocking: _Blocking, j, live_q, live_kv, extras: _Extras):
    """Query blocks [lo, hi) that see key block j (the transpose of _kv_block_range)."""
    bq, bk = blocking.block_q, blocking.block_kv
    _, shift = _offsets(extras)
    lo, hi = 0, live_q
    if blocking.right is not None:  # queries from j*bk - right see key block j
        lo = jnp.maximum(0, (j * bk + shift - blocking.right) // bq)
    if blocking.left is not None:  # ... up to the last key (j+1)*bk - 1 plus left
        hi = jnp.minimum(hi, ((j + 1) * bk - 1 + shift + blocking.left) // bq + 1)
    if not isinstance(live_kv, int):
        hi = jnp.where(j < live_kv, hi, lo)
    return lo, hi


def _masked_scores(blocking: _Blocking, i, j, q_i, k_j, extras: _Extras):
    """Tile (i, j) of soft_cap(scale * Q K^T) in float32, -inf where attention is not allowed."""
    s = jnp.einsum("bkgqh,bkth->bkgqt", q_i, k_j,
                   preferred_element_type=jnp.float32) * blocking.scale
    if blocking.soft_cap is not None:
        s = blocking.soft_cap * jnp.tanh(s / blocking.soft_cap)
    valid = _block_mask(blocking, i, j, extras)
    return s if valid is None else jnp.where(valid, s, -jnp.inf)


def _dropout_multiplier(blocking: _Blocking, i, j, shape, extras: _Extras):
    """Tile (i, j) of the dropout mask as 0 or 1/(1-rate), or None without dropout.

    Counter-based, as FlashAttention does it: the bits depend only on the seeds
    and the absolute (batch, head, query, key) positions, so the backward pass
    regenerates exactly the mask the forward pass used without storing it.
    """
    if blocking.dropout_rate == 0.0:
        return None
    b, nk, g, bq, bk = shape
    iota = lambda size, axis: lax.broadcasted_iota(jnp.int32, (1,) * axis + (size,) +
                                                   (1,) * (4 - axis), axis)
    head = iota(nk, 1) * g + iota(g, 2)  # query head n = k * G + g
    q_offset, shift = _offsets(extras)
    return keep_multiplier(extras.dropout_seeds, blocking.dropout_rate, iota(b, 0), head,
                           q_offset + i * bq + iota(bq, 3),
                           q_offset + shift + j * bk + iota(bk, 4))


class SoftmaxState(NamedTuple):
    """The online softmax's running statistics per query, float32, blocked like the
    queries: running max ``m`` and normaliser ``l`` [nq, B, K, G, bq], unnormalised
    output ``acc`` [nq, B, K, G, bq, H_v]."""
    m: jax.Array
    l: jax.Array
    acc: jax.Array


def empty_state(q: jax.Array, value_dim: int) -> SoftmaxState:
    """The state before any key: m = -inf, l = 0, acc = 0 (q: query blocks)."""
    shape = q.shape[:-1]
    return SoftmaxState(jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                        jnp.zeros(shape + (value_dim,), jnp.float32))


def _finish(m, l, acc, dtype):
    """(out, lse) from the statistics; a query that attended nothing gets zeros."""
    attended = l > 0.0
    out = jnp.where(attended[..., None], acc / jnp.where(attended, l, 1.0)[..., None], 0.0)
    lse = jnp.where(attended, m + jnp.log(jnp.where(attended, l, 1.0)), 0.0)
    return out.astype(dtype), lse


def finish(state: SoftmaxState, dtype) -> tuple[jax.Array, jax.Array]:
    """(out blocks in ``dtype``, lse blocks) from a state: out = acc / l, lse = m + log l."""
    return _finish(*state, dtype)


def forward_blocks(blocking: _Blocking, q, k, v, extras: _Extras,
                   state: Optional[SoftmaxState] = None):
    """The online-softmax recurrence of every query block over the key blocks.

    Without ``state`` returns ``(out, lse)`` blocks; with one (the statistics after
    earlier key blocks, e.g. another device's) returns the state updated by these
    keys, for :func:`finish` after the last of them.
    """
    num_q_blocks, b, nk, g, bq, _ = q.shape
    num_kv_blocks = k.shape[0]
    live_q, live_kv = _live_block_counts(blocking, num_q_blocks, num_kv_blocks, extras)
    value_dim = v.shape[-1]

    def query_block(start, inputs):
        i, q_i = inputs

        def key_block(j, carry):
            m, l, acc = carry
            k_j = lax.dynamic_index_in_dim(k, j, keepdims=False)
            v_j = lax.dynamic_index_in_dim(v, j, keepdims=False)
            s = _masked_scores(blocking, i, j, q_i, k_j, extras)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # A row with nothing visible yet keeps m = -inf; subtract 0 instead.
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            l = l * correction + jnp.sum(p, axis=-1)  # the normaliser sees every weight
            drop = _dropout_multiplier(blocking, i, j, p.shape, extras)
            if drop is not None:  # ... but dropped weights do not reach the values
                p = p * drop
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqt,bkth->bkgqh", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
            return m_new, l, acc

        lo, hi = _kv_block_range(blocking, i, live_q, live_kv, extras)
        return lax.fori_loop(lo, hi, key_block, start)

    def fresh_query_block(_, inputs):
        i, q_i = inputs
        start = (jnp.full((b, nk, g, bq), -jnp.inf, jnp.float32),
                 jnp.zeros((b, nk, g, bq), jnp.float32),
                 jnp.zeros((b, nk, g, bq, value_dim), jnp.float32))
        return None, _finish(*query_block(start, (i, q_i)), v.dtype)

    def continued_query_block(state, inputs):
        # The state is the scan's carry, updated block by block in place (as xs and ys
        # it would be two copies).
        i = inputs[0]
        start = tuple(lax.dynamic_index_in_dim(x, i, keepdims=False) for x in state)
        return tuple(lax.dynamic_update_index_in_dim(x, new, i, axis=0) for x, new in
                     zip(state, query_block(start, inputs))), None

    if state is None:
        return lax.scan(fresh_query_block, None, (jnp.arange(num_q_blocks), q))[1]
    return SoftmaxState(*lax.scan(continued_query_block, tuple(state),
                                  (jnp.arange(num_q_blocks), q))[0])


def _forward(blocking: _Blocking, q, k, v, extras: _Extras):
    """Online-softmax forward; returns (out blocks, lse blocks [nq, B, K, G, bq])."""
    return forward_blocks(blocking, q, k, v, extras)


def backward_blocks(blocking: _Blocking, q, k, v, extras: _Extras, d_out, lse, delta, d_q,
                    d_kv=None):
    """FlashAttention's backward over every (key block, query block) pair in the band.

    ``d_q`` (float32, blocked like q) is accumulated into and returned; ``d_kv``
    = (d_k, d_v) float32 accumulators blocked like k / v, or None to start from
    zeros and return them in k's / v's dtype. ``delta`` = rowsum(dO * O).
    Returns ``(d_q, d_k, d_v)``.
    """
    num_q_blocks = q.shape[0]
    num_kv_blocks = k.shape[0]
    live_q, live_kv = _live_block_counts(blocking, num_q_blocks, num_kv_blocks, extras)

    def key_block(j, k_j, v_j, d_q, d_k, d_v):

        def query_block(i, carry):
            d_q, d_k, d_v = carry
            q_i = lax.dynamic_index_in_dim(q, i, keepdims=False)
            do_i = lax.dynamic_index_in_dim(d_out, i, keepdims=False)
            lse_i = lax.dynamic_index_in_dim(lse, i, keepdims=False)
            delta_i = lax.dynamic_index_in_dim(delta, i, keepdims=False)
            s = _masked_scores(blocking, i, j, q_i, k_j, extras)
            p = jnp.exp(s - lse_i[..., None])
            d_p = jnp.einsum("bkgqh,bkth->bkgqt", do_i, v_j, preferred_element_type=jnp.float32)
            drop = _dropout_multiplier(blocking, i, j, p.shape, extras)
            p_dropped = p if drop is None else p * drop
            d_p = d_p if drop is None else d_p * drop
            d_v = d_v + jnp.einsum("bkgqt,bkgqh->bkth", p_dropped.astype(do_i.dtype), do_i,
                                   preferred_element_type=jnp.float32)
            d_s = p * (d_p - delta_i[..., None]) * blocking.scale
            if blocking.soft_cap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2
                d_s = d_s * (1.0 - jnp.square(
                    jnp.where(jnp.isfinite(s), s, 0.0) / blocking.soft_cap))
            d_s = d_s.astype(q.dtype)
            d_q_i = jnp.einsum("bkgqt,bkth->bkgqh", d_s, k_j, preferred_element_type=jnp.float32)
            d_q = lax.dynamic_update_index_in_dim(
                d_q, lax.dynamic_index_in_dim(d_q, i, keepdims=False) + d_q_i, i, axis=0)
            d_k = d_k + jnp.einsum("bkgqt,bkgqh->bkth", d_s, q_i,
                                   preferred_element_type=jnp.float32)
            return d_q, d_k, d_v

        lo, hi = _q_block_range(blocking, j, live_q, live_kv, extras)
        return lax.fori_loop(lo, hi, query_block, (d_q, d_k, d_v))

    def fresh_key_block(d_q, inputs):
        j, k_j, v_j = inputs
        d_q, d_k, d_v = key_block(j, k_j, v_j, d_q, jnp.zeros(k_j.shape, jnp.float32),
                                  jnp.zeros(v_j.shape, jnp.float32))
        return d_q, (d_k.astype(k.dtype), d_v.astype(v.dtype))

    def continued_key_block(carry, inputs):
        # dK, dV accumulate in the scan's carry, in place (see forward_blocks).
        d_q, d_k, d_v = carry
        j, k_j, v_j = inputs
        d_q, d_k_j, d_v_j = key_block(j, k_j, v_j, d_q,
                                      *(lax.dynamic_index_in_dim(x, j, keepdims=False)
                                        for x in (d_k, d_v)))
        return (d_q, lax.dynamic_update_index_in_dim(d_k, d_k_j, j, axis=0),
                lax.dynamic_update_index_in_dim(d_v, d_v_j, j, axis=0)), None

    inputs = (jnp.arange(num_kv_blocks), k, v)
    if d_kv is None:
        d_q, (d_k, d_v) = lax.scan(fresh_key_block, d_q, inputs)
        return d_q, d_k, d_v
    return lax.scan(continued_key_block, (d_q,) + tuple(d_kv), inputs)[0]


def softmax_delta(out, d_out):
    """rowsum(dO * O) = rowsum(P * dP): the softmax Jacobian's correction term (with
    dropout too, since O is built from the dropped weights)."""
    return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)


def _backward(blocking: _Blocking, residuals, d_out):
    """Recomputes each tile's weights from lse; accumulates dQ, dK, dV."""
    q, k, v, extras, out, lse = residuals
    d_q, d_k, d_v = backward_blocks(blocking, q, k, v, extras, d_out, lse,
                                    softmax_delta(out, d_out), jnp.zeros(q.shape, jnp.float32))
    # Masks, lengths, segment ids and the rng are not differentiable: zero cotangents.
    no_grad = _Extras(*(None for _ in extras))
    return d_q.astype(q.dtype), d_k, d_v, no_grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(blocking, q, k, v, extras):
    return _forward(blocking, q, k, v, extras)[0]


def _blocked_attention_fwd(blocking, q, k, v, extras):
    out, lse = _forward(blocking, q, k, v, extras)
    return out, (q, k, v, extras, out, lse)


_blocked_attention.defvjp(_blocked_attention_fwd, _backward)


def _window_bounds(causal: bool, local_window) -> tuple[Optional[int], Optional[int]]:
    """(left, right) band of allowed k_pos - q_pos; causal caps right at 0."""
    left, right = (None, None) if local_window is None else local_window
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      mask: Optional[jax.Array] = None, *, causal: bool = False,
                      q_lengths: Optional[jax.Array] = None,
                      kv_lengths: Optional[jax.Array] = None,
                      q_segment_ids: Optional[jax.Array] = None,
                      kv_segment_ids: Optional[jax.Array] = None,
                      local_window: Optional[tuple[Optional[int], Optional[int]]] = None,
                      scale: Optional[float] = None,
                      dropout_rate: float = 0.0,
                      dropout_rng: Optional[jax.Array] = None,
                      logit_soft_cap: Optional[float] = None,
                      block_q: int = DEFAULT_BLOCK_Q,
                      block_kv: int = DEFAULT_BLOCK_KV) -> jax.Array:
    """softmax(scale * Q K^T) V computed tile by tile; returns [B, T, N, H].

    Same contract as ``tfx_jax.dot_product_attention`` (inputs are assumed
    validated there): ``query`` [B, T, N, H], ``key``/``value`` [B, S, K, H] with
    N a multiple of K (grouped-query attention: query head n uses key/value head
    n // (N/K), and K/V are never repeated); ``mask`` is boolean, broadcastable to
    [B, N, T, S]; ``causal`` lets query i see keys j <= i; ``local_window=(left,
    right)`` lets it see keys i-left <= j <= i+right (None = unbounded), and key
    blocks entirely outside that band are skipped; ``q_lengths`` /
    ``kv_lengths`` ([B] ints, clamped to [0, length]) mark the real tokens
    (queries past ``q_lengths`` return zeros, keys past ``kv_lengths`` are
    ignored); ``q_segment_ids`` / ``kv_segment_ids`` ([B, T] / [B, S] ints) let a
    query see only keys with its id, id 0 being padding (it sees nothing).
    Queries that can attend to no key return zeros. ``dropout_rate`` drops
    attention weights with a mask regenerated per tile from ``dropout_rng``;
    ``logit_soft_cap`` c replaces each score by c * tanh(score / c) (forward and
    gradient).
    ``block_q`` / ``block_kv`` are tile sizes (clipped to the sequence lengths);
    they trade loop overhead against tile memory.
    """
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ValueError(f"{name} must be a positive int, got {block!r}")
    b, t, n, h = query.shape
    s, num_kv_heads = key.shape[1], key.shape[2]
    if t == 0 or s == 0 or b == 0:  # nothing to attend: zeros, as dense returns
        return jnp.zeros(query.shape[:3] + value.shape[3:], value.dtype)
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"attention dropout_rate={dropout_rate} > 0 needs a dropout_rng")
    block_q, block_kv = min(block_q, t), min(block_kv, s)
    left, right = _window_bounds(causal, local_window)
    blocking = _Blocking(q_length=t, kv_length=s, block_q=block_q, block_kv=block_kv,
                         left=left, right=right,
                         scale=float(1.0 / math.sqrt(h) if scale is None else scale),
                         dropout_rate=float(dropout_rate),
                         soft_cap=None if logit_soft_cap is None else float(logit_soft_cap))
    q = _q_to_blocks(query, block_q, num_kv_heads)
    k, v = _kv_to_blocks(key, block_kv), _kv_to_blocks(value, block_kv)
    if q_lengths is not None:
        q_lengths = jnp.clip(jnp.asarray(q_lengths, jnp.int32), 0, t)
    if kv_lengths is not None:
        kv_lengths = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, s)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    extras = _Extras(
        mask=_pad_mask(mask, num_kv_heads, q.shape[0] * block_q, k.shape[0] * block_kv),
        q_lengths=q_lengths, kv_lengths=kv_lengths,
        q_segments=_ids_to_blocks(q_segment_ids, block_q),
        kv_segments=_ids_to_blocks(kv_segment_ids, block_kv),
        dropout_seeds=dropout_seeds(dropout_rng) if dropout_rate > 0.0 else None)
    out = _blocked_attention(blocking, q, k, v, extras)
    return _q_from_blocks(out, t)
