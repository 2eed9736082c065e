"""Rotary position embeddings (RoPE; Su et al. 2021, RoFormer).

Instead of adding a position vector to the word embedding, RoPE rotates the
query and the key of every head by an angle proportional to their position.
The head's features are taken in pairs (x_{2i}, x_{2i+1}), each pair a point in
the plane, and the pair of a token at position m is rotated by m * theta_i with

    theta_i = base^(-2i / d),   i = 0 .. d/2 - 1,   base = 10000   (RoFormer eq. 15)

    [x'_{2i}  ]   [cos m theta_i   -sin m theta_i] [x_{2i}  ]
    [x'_{2i+1}] = [sin m theta_i    cos m theta_i] [x_{2i+1}].

A rotation by m theta followed by the dot product with a key rotated by
n theta equals the dot product of the unrotated vectors with a rotation by
(n - m) theta in between, so the attention score q_m . k_n depends on the
tokens and on the *relative* position m - n only (the paper's eq. 16). Nothing
is added to the residual stream, and absolute positions can be given per token:
packed sequences restart at 0, left-padded prompts start their real tokens at 0.

We rotate adjacent pairs as the paper writes it; GPT-NeoX and Llama rotate
feature i with feature i + d/2 instead, which is the same map up to a fixed
permutation of the head features (so the same model, with permuted weights).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(positions: jax.Array, head_dim: int, base: float = 10000.0) -> jax.Array:
    """Angles m * theta_i, float32 [..., head_dim // 2], for integer positions m [...]."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return jnp.asarray(positions, jnp.float32)[..., None] * inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] by its positions [batch, length].

    Computed in float32 and returned in x's dtype. The same positions apply to
    every head.
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape [batch, length, heads, head_dim], "
                         f"got {tuple(x.shape)}")
    positions = jnp.asarray(positions)
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions must have shape [batch, length] = {tuple(x.shape[:2])}, "
                         f"got {tuple(positions.shape)}")
    angles = rotary_angles(positions, x.shape[-1], base)[:, :, None, :]  # [B, T, 1, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
