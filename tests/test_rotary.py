"""Rotary position embeddings: the paper's rotation in float64, and scores that see only i - j."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfx_jax as tfx
from tests.test_attention import numpy_attention


def numpy_rotary(x, positions, base=10000.0):
    """RoFormer eq. 13-15 literally: a 2x2 rotation by m * theta_i of every feature pair."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    head_dim = x.shape[-1]
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            m = float(positions[b, t])
            for i in range(head_dim // 2):
                theta = base ** (-2.0 * i / head_dim)
                c, s = np.cos(m * theta), np.sin(m * theta)
                rotation = np.array([[c, -s], [s, c]])
                out[b, t, :, 2 * i:2 * i + 2] = x[b, t, :, 2 * i:2 * i + 2] @ rotation.T
    return out


def test_rotation_matches_float64_reference_at_given_positions():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 0, 1, 2, 30]])
    got = tfx.apply_rotary(x, positions)
    np.testing.assert_allclose(got, numpy_rotary(x, np.asarray(positions)), atol=2e-6)
    np.testing.assert_allclose(got[:, :1][0], x[0, :1], atol=1e-7)  # position 0: identity
    np.testing.assert_allclose(jnp.linalg.norm(got, axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)  # a rotation keeps lengths


def test_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, 16))
    positions = jnp.arange(12)

    def rotated(v):
        return tfx.apply_rotary(jnp.broadcast_to(v, (1, 12, 1, 16)), positions[None])[0, :, 0]

    scores = np.asarray(rotated(q) @ rotated(k).T, np.float64)  # scores[i, j] = <R_i q, R_j k>
    for offset in range(-11, 12):
        diagonal = np.diagonal(scores, offset=offset)
        np.testing.assert_allclose(diagonal, diagonal[0], atol=2e-5)  # same i - j, same score
    assert np.ptp([scores[0, j] for j in range(12)]) > 1e-2  # but i - j itself matters


def test_rotary_multihead_attention_matches_numpy():
    x = jax.random.normal(jax.random.key(2), (2, 6, 16))
    positions = jnp.array([[0, 1, 2, 0, 1, 2], [3, 4, 5, 6, 7, 8]])
    mha = tfx.MultiHeadAttention(num_heads=2, rotary=True)
    variables = mha.init(jax.random.key(0), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    xn = np.asarray(x, np.float64)

    def proj(name):
        return np.einsum("btd,dnh->btnh", xn, p[name]["kernel"]) + p[name]["bias"]

    pos = np.asarray(positions)
    causal = np.tril(np.ones((6, 6), bool))
    heads, _ = numpy_attention(numpy_rotary(proj("query"), pos), numpy_rotary(proj("key"), pos),
                               proj("value"), causal)
    expected = np.einsum("btnh,nhd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
    got = mha.apply(variables, x, causal=True, positions=positions)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("head_dim", [0, 5])
def test_odd_head_dim_is_refused(head_dim):
    with pytest.raises(ValueError, match="even head_dim"):
        tfx.apply_rotary(jnp.zeros((1, 2, 1, head_dim)), jnp.zeros((1, 2), jnp.int32))
