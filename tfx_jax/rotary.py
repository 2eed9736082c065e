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

Long-context checkpoints stretch the rotation frequencies (``rope_scaling``):

* ``{"rope_type": "linear", "factor": f}`` divides every theta_i by f, i.e.
  position m is rotated as position m / f ("position interpolation", Chen et
  al. 2023);
* ``{"rope_type": "llama3", "factor": f, "low_freq_factor": a, "high_freq_factor": b,
  "original_max_position_embeddings": L}`` (Llama 3.1): frequencies whose
  wavelength 2 pi / theta_i is shorter than L / b are kept, those longer than
  L / a are divided by f, and the ones in between are blended linearly in
  L / wavelength between the two.

Other scaling types (dynamic NTK, YaRN, LongRoPE) are refused by name.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.errors import ConfigError

ROPE_SCALING_TYPES = ("linear", "llama3")
_SCALING_KEYS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}


def rope_scaling_items(scaling: Any) -> Optional[tuple]:
    """``rope_scaling`` (a mapping, pairs, or None) as sorted hashable (key, value) pairs.

    Checks the type and its numbers; unknown types raise :class:`ConfigError` by name.
    """
    if scaling is None:
        return None
    items = dict(scaling.items() if isinstance(scaling, Mapping) else scaling)
    kind = items.get("rope_type", items.get("type"))
    if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(f"rope_scaling rope_type={kind!r} is not supported; supported: "
                          f"{ROPE_SCALING_TYPES} (or no scaling)")
    clean = {"rope_type": kind}
    for key in _SCALING_KEYS[kind]:
        value = items.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"rope_scaling[{key!r}] must be a positive number for "
                              f"rope_type={kind!r}, got {value!r}")
        clean[key] = float(value) if key != "original_max_position_embeddings" else int(value)
    if kind == "llama3" and not clean["high_freq_factor"] > clean["low_freq_factor"]:
        raise ConfigError(f"rope_scaling high_freq_factor={clean['high_freq_factor']} must "
                          f"exceed low_freq_factor={clean['low_freq_factor']}")
    return tuple(sorted(clean.items()))


def inverse_frequencies(head_dim: int, base: float = 10000.0, scaling=None) -> np.ndarray:
    """theta_i, float32 [head_dim // 2], with ``rope_scaling`` applied (see above)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    items = dict(rope_scaling_items(scaling) or ())
    if items.get("rope_type") == "linear":
        inv_freq = inv_freq / items["factor"]
    elif items.get("rope_type") == "llama3":
        factor, low, high = items["factor"], items["low_freq_factor"], items["high_freq_factor"]
        context = items["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        smooth = np.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq.astype(np.float32)


def rotary_angles(positions: jax.Array, head_dim: int, base: float = 10000.0,
                  scaling=None) -> jax.Array:
    """Angles m * theta_i, float32 [..., head_dim // 2], for integer positions m [...]."""
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, base, scaling))
    return jnp.asarray(positions, jnp.float32)[..., None] * inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0,
                 scaling=None) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] by its positions [batch, length].

    Computed in float32 and returned in x's dtype. The same positions apply to
    every head; ``scaling`` is a ``rope_scaling`` (see the module docstring).
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape [batch, length, heads, head_dim], "
                         f"got {tuple(x.shape)}")
    positions = jnp.asarray(positions)
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions must have shape [batch, length] = {tuple(x.shape[:2])}, "
                         f"got {tuple(positions.shape)}")
    angles = rotary_angles(positions, x.shape[-1], base, scaling)[:, :, None, :]  # [B,T,1,H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
