"""Positional encodings against the paper's formula, and the order they give back."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfx_jax as tfx


def test_sinusoidal_matches_paper_formula_elementwise():
    length, dim = 7, 10
    table = np.asarray(tfx.sinusoidal_position_encoding(length, dim))
    for pos in range(length):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def test_relative_positions_are_linear_maps():
    """Sec. 3.5: PE(pos + k) is a rotation of PE(pos) for each sin/cos pair."""
    dim, k = 8, 3
    table = np.asarray(tfx.sinusoidal_position_encoding(20, dim), np.float64)
    for i in range(dim // 2):
        w = 1 / 10000 ** (2 * i / dim)
        rotation = np.array([[math.cos(k * w), -math.sin(k * w)], [math.sin(k * w), math.cos(k * w)]])
        pairs = table[:, 2 * i:2 * i + 2]
        np.testing.assert_allclose(pairs[:-k] @ rotation, pairs[k:], atol=1e-5)


@pytest.mark.parametrize("length,dim", [(0, 4), (4, 0), (4, 5)])
def test_bad_sizes_are_rejected(length, dim):
    with pytest.raises(ValueError):
        tfx.sinusoidal_position_encoding(length, dim)


def test_module_adds_table_and_learned_has_params():
    x = jnp.zeros((2, 5, 6))
    sinus = tfx.AddPositionEncoding(max_len=9)
    out = sinus.apply(sinus.init(jax.random.key(0), x), x)
    np.testing.assert_allclose(out[1], tfx.sinusoidal_position_encoding(9, 6)[:5], atol=1e-7)
    learned = tfx.AddPositionEncoding(max_len=9, kind="learned")
    variables = learned.init(jax.random.key(0), x)
    assert variables["params"]["embedding"].shape == (9, 6)
    with pytest.raises(ValueError, match="exceeds max_len"):
        sinus.apply({}, jnp.zeros((1, 10, 6)))
