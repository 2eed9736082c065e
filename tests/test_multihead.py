"""Multi-head attention: reference check, order blindness, the cache, fused QKV."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfx_jax as tfx
from tests.test_attention import numpy_attention


def init_mha(x, **kwargs):
    mha = tfx.MultiHeadAttention(num_heads=4, **kwargs)
    return mha, mha.init(jax.random.key(0), x)


def test_matches_numpy_heads_concat_and_output_projection():
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    mha, variables = init_mha(x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    xn = np.asarray(x, np.float64)
    proj = lambda name: np.einsum("btd,dnh->btnh", xn, p[name]["kernel"]) + p[name]["bias"]
    heads, _ = numpy_attention(proj("query"), proj("key"), proj("value"))
    expected = np.einsum("btnh,nhd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]  # W_o
    np.testing.assert_allclose(mha.apply(variables, x), expected, atol=1e-5)


def test_self_attention_is_permutation_equivariant_until_positions_are_added():
    x = jax.random.normal(jax.random.key(2), (1, 6, 16))
    perm = jnp.array([3, 0, 5, 1, 4, 2])
    mha, variables = init_mha(x)
    out = mha.apply(variables, x)
    np.testing.assert_allclose(mha.apply(variables, x[:, perm]), out[:, perm], atol=1e-5)

    pe = tfx.sinusoidal_position_encoding(6, 16)
    out_pe = mha.apply(variables, x + pe)
    out_perm_pe = mha.apply(variables, x[:, perm] + pe)
    assert np.abs(np.asarray(out_perm_pe - out_pe[:, perm])).max() > 1e-2


def test_cross_attention_has_query_length_and_ignores_masked_keys():
    xq = jax.random.normal(jax.random.key(3), (2, 3, 16))
    xkv = jax.random.normal(jax.random.key(4), (2, 7, 16))
    mha, variables = init_mha(xq, )
    variables = mha.init(jax.random.key(0), xq, xkv)
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])[:, None, None, :] != 0  # [B, 1, 1, S]
    out = mha.apply(variables, xq, xkv, mask)
    assert out.shape == (2, 3, 16)
    changed = xkv.at[1, 4:].set(100.0)  # only masked keys change
    np.testing.assert_allclose(mha.apply(variables, xq, changed, mask), out, atol=1e-5)


@pytest.mark.parametrize("prompt", [1, 3])
def test_kv_cache_decoding_equals_full_causal_pass(prompt):
    x = jax.random.normal(jax.random.key(5), (2, 6, 16))
    full_mha, variables = init_mha(x)
    full = full_mha.apply(variables, x, causal=True)
    step_mha = tfx.MultiHeadAttention(num_heads=4, decode=True)
    cache = step_mha.init(jax.random.key(0), x, causal=True)["cache"]
    pieces, start = [], 0
    for stop in [prompt] + list(range(prompt + 1, 7)):
        out, mutated = step_mha.apply({"params": variables["params"], "cache": cache},
                                      x[:, start:stop], causal=True, mutable=["cache"])
        cache, start = mutated["cache"], stop
        pieces.append(out)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_fused_qkv_equals_separate_projections():
    x = jax.random.normal(jax.random.key(6), (2, 5, 16))
    mha, variables = init_mha(x)
    p = variables["params"]
    fused_params = {"out": p["out"], "qkv": {
        "kernel": jnp.stack([p[n]["kernel"] for n in ("query", "key", "value")], axis=1),
        "bias": jnp.stack([p[n]["bias"] for n in ("query", "key", "value")], axis=0)}}
    fused = tfx.MultiHeadAttention(num_heads=4, fused_qkv=True)
    chex.assert_trees_all_equal_shapes(fused.init(jax.random.key(0), x)["params"], fused_params)
    np.testing.assert_allclose(fused.apply({"params": fused_params}, x), mha.apply(variables, x),
                               atol=1e-5)


def test_bad_shapes_are_named():
    mha = tfx.MultiHeadAttention(num_heads=3)
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        mha.init(jax.random.key(0), jnp.zeros((1, 4, 16)))
    with pytest.raises(ValueError, match=r"inputs_q must have shape \[batch, length, features\]"):
        mha.init(jax.random.key(0), jnp.zeros((4, 16)))


def test_attention_weights_are_recorded_only_on_request():
    x = jax.random.normal(jax.random.key(7), (2, 5, 16))
    mha, variables = init_mha(x)
    out, state = mha.apply(variables, x, causal=True, mutable=["intermediates"])
    (weights,) = state["intermediates"]["attention_weights"]
    chex.assert_shape(weights, (2, 4, 5, 5))
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.triu(np.asarray(weights[0, 0]), 1), 0.0)  # causal
    np.testing.assert_allclose(out, mha.apply(variables, x, causal=True), atol=1e-6)


def test_grouped_query_attention_matches_numpy_with_shared_kv_heads():
    x = jax.random.normal(jax.random.key(8), (2, 5, 16))
    mha = tfx.MultiHeadAttention(num_heads=4, num_kv_heads=2)
    variables = mha.init(jax.random.key(0), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    assert p["key"]["kernel"].shape == (16, 2, 4) and p["query"]["kernel"].shape == (16, 4, 4)
    xn = np.asarray(x, np.float64)

    def proj(name):
        return np.einsum("btd,dnh->btnh", xn, p[name]["kernel"]) + p[name]["bias"]

    # query heads 0, 1 share key/value head 0; heads 2, 3 share head 1
    shared = lambda name: np.repeat(proj(name), 2, axis=2)  # noqa: E731
    heads, _ = numpy_attention(proj("query"), shared("key"), shared("value"))
    expected = np.einsum("btnh,nhd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(mha.apply(variables, x), expected, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(num_kv_heads=1), dict(rotary=True),
                                    dict(num_kv_heads=2, rotary=True)])
def test_gqa_and_rotary_cache_decoding_equals_full_pass(kwargs):
    x = jax.random.normal(jax.random.key(9), (2, 6, 16))
    full_mha, variables = init_mha(x, **kwargs)
    full = full_mha.apply(variables, x, causal=True)
    step_mha = tfx.MultiHeadAttention(num_heads=4, decode=True, **kwargs)
    cache = step_mha.init(jax.random.key(0), x, causal=True)["cache"]
    kv_heads = kwargs.get("num_kv_heads", 4)
    assert cache["cached_key"].shape == (2, 6, kv_heads, 4)  # K/V heads are not repeated
    pieces, start = [], 0
    for stop in [3, 4, 5, 6]:
        out, mutated = step_mha.apply({"params": variables["params"], "cache": cache},
                                      x[:, start:stop], causal=True, mutable=["cache"])
        cache, start = mutated["cache"], stop
        pieces.append(out)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_segment_ids_and_lengths_restrict_keys():
    x = jax.random.normal(jax.random.key(10), (1, 6, 16))
    mha, variables = init_mha(x)
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    out = mha.apply(variables, x, q_segment_ids=seg)
    np.testing.assert_allclose(out[:, :3], mha.apply(variables, x[:, :3]), atol=1e-5)
    np.testing.assert_allclose(out[:, 3:5], mha.apply(variables, x[:, 3:5]), atol=1e-5)
    by_length = mha.apply(variables, x, kv_lengths=jnp.array([4]))
    np.testing.assert_allclose(by_length, mha.apply(variables, x, mask=jnp.array(
        [[1, 1, 1, 1, 0, 0]])[:, None, None, :] != 0), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.int32])
def test_non_real_float_inputs_are_refused_not_cast(dtype):
    mha = tfx.MultiHeadAttention(num_heads=2)
    with pytest.raises(TypeError, match=f"inputs_q must be a real floating-point array, got "
                                        f"dtype {jnp.dtype(dtype).name}"):
        mha.init(jax.random.key(0), jnp.ones((1, 3, 8), dtype))


def test_gqa_options_are_checked():
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        init_mha(jnp.zeros((1, 3, 16)), num_kv_heads=3)
    with pytest.raises(ValueError, match="fused_qkv=True needs num_kv_heads == num_heads"):
        init_mha(jnp.zeros((1, 3, 16)), num_kv_heads=2, fused_qkv=True)


def test_overflowing_decode_step_under_jit_returns_nan_not_wrong_values():
    step_mha = tfx.MultiHeadAttention(num_heads=2, decode=True)
    variables = step_mha.init(jax.random.key(0), jnp.zeros((1, 3, 8)))
    step = jax.jit(lambda c, x: step_mha.apply({"params": variables["params"], "cache": c}, x,
                                              causal=True, mutable=["cache"]))
    out, mutated = step(variables["cache"], jnp.ones((1, 3, 8)))
    assert np.isfinite(np.asarray(out)).all()
    out, _ = step(mutated["cache"], jnp.ones((1, 1, 8)))  # a 4th token in a 3-slot cache
    assert np.isnan(np.asarray(out)).all()
