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


def test_positions_restart_per_segment_and_are_looked_up_per_token():
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(tfx.positions_from_segment_ids(segment_ids),
                                  [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]])
    x = jnp.zeros((1, 3, 6))
    sinus = tfx.AddPositionEncoding(max_len=9)
    out = sinus.apply({}, x, jnp.array([[4, 0, 8]]))
    table = np.asarray(tfx.sinusoidal_position_encoding(9, 6))
    np.testing.assert_allclose(out[0], table[[4, 0, 8]], atol=1e-7)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, max_len=9\)"):
        sinus.apply({}, x, jnp.array([[0, 1, 9]]))


def test_decode_layout_continues_each_rows_positions_and_segment():
    layout = tfx.SequenceLayout(decode=True)
    cache = layout.init(jax.random.key(0), 2, 6)["cache"]
    (pos, seg), state = layout.apply({"cache": cache}, 2, 3, None,
                                     jnp.array([[0, 1, 1], [1, 1, 1]]), mutable=["cache"])
    np.testing.assert_array_equal(pos, [[0, 0, 1], [0, 1, 2]])
    (pos, seg), state = layout.apply(state, 2, 2, mutable=["cache"])  # no ids: continue
    np.testing.assert_array_equal(pos, [[2, 3], [3, 4]])
    np.testing.assert_array_equal(seg, [[1, 1], [1, 1]])
