"""Attention dropout from a counter-based hash: the same mask tile by tile or all at once.

Dropout on the attention weights (Vaswani et al. 2017, sec. 5.4, "residual
dropout" applied to the softmax output) needs one random bit per (batch, head,
query, key). Storing those bits is the ``T x S`` matrix chunked attention avoids,
so FlashAttention regenerates them from a counter-based generator in the
backward pass. Here the bit of position ``(b, n, i, j)`` is a hash of the
position and two seed words drawn once from the rng (murmur3's 32-bit
finaliser as the mixing step): any tile of the mask can be computed on its own,
and the dense and chunked implementations drop exactly the same weights for the
same rng whatever the tile sizes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters


def _fmix32(x: jax.Array) -> jax.Array:
    """murmur3's finaliser: a bijection on uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_seeds(rng: jax.Array) -> jax.Array:
    """Two uint32 seed words from a PRNG key (typed or raw)."""
    return jax.random.bits(rng, (2,), jnp.uint32)


def keep_multiplier(seeds: jax.Array, rate: float, batch, head, q_pos, k_pos) -> jax.Array:
    """0 or 1/(1-rate) for every (batch, head, q_pos, k_pos) (integer arrays that
    broadcast together), float32. P(keep) = 1 - rate up to 2^-32."""
    u = lambda x: jnp.asarray(x).astype(jnp.uint32)
    row = _fmix32(seeds[0] ^ u(batch))
    row = _fmix32(row ^ u(head))
    row = _fmix32(row + u(q_pos) * jnp.uint32(_GOLDEN))
    col = _fmix32(seeds[1] + u(k_pos) * jnp.uint32(_GOLDEN))
    bits = _fmix32(row ^ col)
    threshold = jnp.uint32(min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1))
    return jnp.where(bits >= threshold, jnp.float32(1.0 / (1.0 - rate)), jnp.float32(0.0))


def dense_keep_multiplier(seeds: jax.Array, rate: float, shape) -> jax.Array:
    """The [B, N, T, S] multiplier (dense attention)."""
    b, n, t, s = shape
    return keep_multiplier(seeds, rate, jnp.arange(b)[:, None, None, None],
                           jnp.arange(n)[None, :, None, None],
                           jnp.arange(t)[None, None, :, None], jnp.arange(s)[None, None, None, :])
