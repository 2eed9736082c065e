"""Dense attention against a float64 NumPy reference and jax.nn.dot_product_attention."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfx_jax as tfx


def numpy_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v in float64, written from the formula; masked-out rows -> 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s = k.shape[1]
    allowed = np.ones((b, n, t, s), bool) if mask is None else np.broadcast_to(mask, (b, n, t, s))
    out = np.zeros((b, t, n, v.shape[-1]))
    weights = np.zeros((b, n, t, s))
    for bi in range(b):
        for ni in range(n):
            for ti in range(t):
                keys = np.flatnonzero(allowed[bi, ni, ti])
                if keys.size == 0:
                    continue
                scores = np.array([q[bi, ti, ni] @ k[bi, j, ni] for j in keys]) / np.sqrt(h)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                weights[bi, ni, ti, keys] = w
                out[bi, ti, ni] = w @ v[bi, keys, ni]
    return out, weights


def random_qkv(t, s, seed=0, b=2, n=3, h=8, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, t, n, h), dtype), jax.random.normal(kk, (b, s, n, h), dtype),
            jax.random.normal(kv, (b, s, n, h), dtype))


def padding(lengths, s):
    return (np.arange(s)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]


MASKS = {
    "none": lambda t, s: None,
    "causal": lambda t, s: np.tril(np.ones((t, s), bool)),
    "padding": lambda t, s: padding([s, s - 3], s),
    "fully_masked_rows": lambda t, s: np.broadcast_to(
        padding([s, 0], s), (2, 1, t, s)),  # the second example has no key at all
}


@pytest.mark.parametrize("mask_kind", sorted(MASKS))
@pytest.mark.parametrize("t,s", [(5, 5), (4, 7)])  # self- and cross-attention
def test_dense_matches_float64_reference(mask_kind, t, s):
    q, k, v = random_qkv(t, s)
    mask = MASKS[mask_kind](t, s)
    expected, expected_weights = numpy_attention(q, k, v, mask)
    got = tfx.dot_product_attention(q, k, v, None if mask is None else jnp.asarray(mask),
                                    implementation="dense")
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    weights = tfx.attention_weights(q, k, None if mask is None else jnp.asarray(mask))
    np.testing.assert_allclose(weights, expected_weights, atol=1e-6)
    assert np.isfinite(np.asarray(got)).all()


def test_causal_flag_equals_explicit_triangular_mask():
    q, k, v = random_qkv(6, 6, seed=1)
    explicit = tfx.dot_product_attention(q, k, v, jnp.tril(jnp.ones((6, 6), bool)))
    np.testing.assert_allclose(tfx.dot_product_attention(q, k, v, causal=True), explicit,
                               atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_jax_nn_dot_product_attention(causal):
    q, k, v = random_qkv(9, 9, seed=2)
    lengths = jnp.array([9, 5])
    ours = tfx.dot_product_attention(q, k, v, jnp.asarray(padding(lengths, 9)), causal=causal)
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                          key_value_seq_lengths=lengths)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_gradients_are_finite_with_fully_masked_rows():
    q, k, v = random_qkv(4, 4, seed=3)
    mask = jnp.asarray(MASKS["fully_masked_rows"](4, 4))
    grads = jax.grad(lambda q, k, v: tfx.dot_product_attention(q, k, v, mask).sum(),
                     argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(grads[0][1], 0.0)  # no key -> no dependence on the query


def test_dropout_keeps_expectation_and_needs_rng():
    q, k, v = random_qkv(4, 4, seed=4, b=1, n=1)
    v = jnp.ones_like(v)
    outs = jax.jit(jax.vmap(lambda rng: tfx.dot_product_attention(
        q, k, v, dropout_rate=0.5, dropout_rng=rng)))(jax.random.split(jax.random.key(0), 400))
    np.testing.assert_allclose(np.mean(outs, axis=0), 1.0, atol=0.1)  # E[dropout(w)] = w
    with pytest.raises(ValueError, match="dropout_rng"):
        tfx.dot_product_attention(q, k, v, dropout_rate=0.5)


def test_bfloat16_inputs_give_bfloat16_output_close_to_float32():
    q, k, v = random_qkv(8, 8, seed=5)
    out16 = tfx.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), tfx.dot_product_attention(q, k, v),
                               atol=5e-2)


class AttentionVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        q, k, v = random_qkv(6, 6, seed=6)
        expected, _ = numpy_attention(q, k, v, np.tril(np.ones((6, 6), bool)))
        got = self.variant(lambda q, k, v: tfx.dot_product_attention(q, k, v, causal=True))(
            q, k, v)
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("bad,message", [
    (dict(query=jnp.zeros((2, 3, 4))), "query must have shape"),
    (dict(key=jnp.zeros((2, 5, 2, 4))), "head_dim"),
    (dict(value=jnp.zeros((2, 6, 2, 8))), "key and value must agree"),
    (dict(query=jnp.zeros((2, 3, 2, 8), jnp.int32)), "floating-point"),
    (dict(mask=jnp.ones((2, 1, 3, 5))), "boolean"),
    (dict(mask=jnp.ones((2, 1, 3, 4), bool)), "not broadcastable"),
    (dict(implementation="flash"), "implementation must be one of"),
])
def test_bad_input_is_named(bad, message):
    args = dict(query=jnp.zeros((2, 3, 2, 8)), key=jnp.zeros((2, 5, 2, 8)),
                value=jnp.zeros((2, 5, 2, 8)), mask=None, implementation="auto")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        tfx.dot_product_attention(args["query"], args["key"], args["value"], args["mask"],
                                  implementation=args["implementation"])
