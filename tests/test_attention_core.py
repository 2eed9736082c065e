"""Segment ids, grouped-query attention, sliding windows, bias and scale: dense and
chunked against a float64 NumPy reference (forward and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfx_jax as tfx
from tfx_jax.attention import select_implementation

BLOCKS = dict(block_q=8, block_kv=8)


def reference(q, k, v, allowed, d_out, scale=None, bias=None):
    """float64 softmax(scale q k^T + bias) v with K/V heads shared by groups of query
    heads, and the gradients of sum(out * d_out). allowed: [B, N, T, S] bool."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    b, t, n, h = q.shape
    g = n // k.shape[2]
    k_full, v_full = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # head n -> n // g
    q_, k_, v_, do_ = (x.transpose(0, 2, 1, 3) for x in (q, k_full, v_full, d_out))
    scale = 1 / np.sqrt(h) if scale is None else scale
    scores = q_ @ k_.transpose(0, 1, 3, 2) * scale
    if bias is not None:
        scores = scores + np.asarray(bias, np.float64)
    scores = np.where(allowed, scores, -np.inf)
    top = np.max(scores, -1, keepdims=True)
    e = np.where(allowed, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0)
    total = e.sum(-1, keepdims=True)
    p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    out = p @ v_
    d_v = p.transpose(0, 1, 3, 2) @ do_
    d_p = do_ @ v_.transpose(0, 1, 3, 2)
    d_s = p * (d_p - (p * d_p).sum(-1, keepdims=True))
    d_q = d_s @ k_ * scale
    d_k = d_s.transpose(0, 1, 3, 2) @ q_ * scale
    d_bias = d_s

    def back(x):  # [B, N, L, H] -> [B, L, K, H], summing each group of query heads
        x = x.transpose(0, 2, 1, 3)
        return x.reshape(x.shape[0], x.shape[1], -1, g, x.shape[-1]).sum(3)
    return out.transpose(0, 2, 1, 3), d_q.transpose(0, 2, 1, 3), back(d_k), back(d_v), d_bias


def allowed_pairs(b, n, t, s, causal=False, window=None, q_seg=None, kv_seg=None):
    """The [B, N, T, S] mask written out pair by pair from the definitions."""
    out = np.ones((b, n, t, s), bool)
    for i in range(t):
        for j in range(s):
            if causal and j > i:
                out[:, :, i, j] = False
            if window is not None:
                left, right = window
                if (left is not None and j < i - left) or (right is not None and j > i + right):
                    out[:, :, i, j] = False
            if q_seg is not None:
                for bi in range(b):
                    if q_seg[bi, i] != kv_seg[bi, j] or q_seg[bi, i] == 0:
                        out[bi, :, i, j] = False
    return out


def inputs(t, s, n=4, kv_heads=2, h=8, b=2, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(b, t, n, h), (b, s, kv_heads, h), (b, s, kv_heads, h), (b, t, n, h)]
    return [jnp.asarray(rng.standard_normal(x), jnp.float32) for x in shapes]


def run(implementation, q, k, v, d_out, **kwargs):
    def loss(q, k, v):
        out = tfx.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
        return jnp.sum(out * d_out), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out,) + grads


PACKED = np.array([[1] * 7 + [2] * 9 + [3] * 4 + [0] * 4,
                   [1] * 20 + [0] * 4])  # three packed sequences + padding; one + padding
CASES = {
    # name: (T, S, query heads, kv heads, kwargs)
    "gqa": (24, 24, 4, 2, dict()),
    "mqa_causal": (24, 24, 4, 1, dict(causal=True)),
    "segments": (24, 24, 2, 2, dict(q_segment_ids=PACKED)),
    "segments_gqa_causal": (24, 24, 4, 2, dict(q_segment_ids=PACKED, causal=True)),
    "segments_cross": (24, 13, 2, 2, dict(q_segment_ids=PACKED, kv_segment_ids=np.array(
        [[1] * 4 + [2] * 6 + [3] * 3, [1] * 10 + [0] * 3]))),
    "window_sym": (29, 29, 2, 2, dict(local_window=(5, 3))),
    "window_causal": (29, 29, 4, 2, dict(local_window=(6, None), causal=True)),
    "window_left_only": (29, 29, 2, 1, dict(local_window=(None, 2))),
    "window_cross_scale": (21, 33, 2, 2, dict(local_window=(3, 9), scale=0.5)),
    "window_zero": (16, 16, 2, 2, dict(local_window=(0, 0))),
    "everything": (24, 24, 4, 2, dict(q_segment_ids=PACKED, causal=True, local_window=(4, 0),
                                      scale=0.3, kv_lengths=np.array([22, 12]))),
}


def _reference_mask(t, s, n, kwargs):
    q_seg = kwargs.get("q_segment_ids")
    kv_seg = kwargs.get("kv_segment_ids", q_seg)
    allowed = allowed_pairs(2, n, t, s, kwargs.get("causal", False),
                            kwargs.get("local_window"), q_seg, kv_seg)
    if "kv_lengths" in kwargs:
        allowed &= np.arange(s)[None, None, None, :] < kwargs["kv_lengths"][:, None, None, None]
    return allowed


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_and_chunked_match_float64_reference(case):
    t, s, n, kv_heads, kwargs = CASES[case]
    q, k, v, d_out = inputs(t, s, n, kv_heads)
    expected = reference(q, k, v, _reference_mask(t, s, n, kwargs), d_out,
                         scale=kwargs.get("scale"))[:4]
    for implementation, extra in (("dense", {}), ("chunked", BLOCKS)):
        got = run(implementation, q, k, v, d_out, **kwargs, **extra)
        for name, g, e in zip(("out", "d_query", "d_key", "d_value"), got, expected):
            assert g.shape == e.shape, (implementation, name)
            np.testing.assert_allclose(g, e, atol=2e-5, rtol=2e-5,
                                       err_msg=f"{case}: {implementation} {name}")


def test_attention_weights_with_segments_gqa_and_window():
    t, n = 24, 4
    q, k, _, _ = inputs(t, t, n, 2)
    kwargs = dict(q_segment_ids=PACKED, local_window=(3, 1))
    weights = tfx.attention_weights(q, k, **kwargs)
    d_out = np.zeros((2, t, n, 8))
    allowed = _reference_mask(t, t, n, kwargs)
    # The weights are the reference's softmax: recover them as out for v = one-hot keys.
    expected = reference(q, k, np.eye(t)[None, :, None, :].repeat(2, 0).repeat(2, 2),
                         allowed, np.zeros((2, t, n, t)))[0]
    assert weights.shape == (2, n, t, t)
    np.testing.assert_allclose(weights, expected.transpose(0, 2, 1, 3), atol=1e-6)
    del d_out
    padding_rows = PACKED[:, None, :] == 0  # padding queries attend nothing
    assert np.all(np.asarray(weights).sum(-1)[np.broadcast_to(padding_rows, (2, n, t))] == 0)


def test_bias_in_dense_matches_reference_and_other_implementations_refuse():
    t = 12
    q, k, v, d_out = inputs(t, t, 2, 2)
    bias = jnp.asarray(np.random.default_rng(3).standard_normal((2, 2, t, t)), jnp.float32)

    def loss(q, k, v, bias):
        out = tfx.dot_product_attention(q, k, v, bias=bias, causal=True, scale=0.7)
        return jnp.sum(out * d_out), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, bias)
    expected = reference(q, k, v, allowed_pairs(2, 2, t, t, causal=True), d_out, 0.7, bias)
    for got, e in zip((out,) + grads, expected):
        np.testing.assert_allclose(got, np.where(np.isfinite(e), e, 0), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="implementation='chunked'.*bias"):
        tfx.dot_product_attention(q, k, v, bias=bias, implementation="chunked")
    with pytest.raises(ValueError, match="implementation='cudnn'.*bias"):
        tfx.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")


def test_chunked_window_skips_key_blocks_outside_the_band():
    # NaN values poison every query block that loads them (0 * NaN = NaN): with a
    # window (4, 0) and 8-wide blocks, queries 24..31 need only key blocks 2 and 3.
    q, k, v, _ = inputs(32, 32, 2, 2)
    v = v.at[:, :8].set(jnp.nan)
    out = tfx.dot_product_attention(q, k, v, local_window=(4, 0), implementation="chunked",
                                    **BLOCKS)
    assert np.all(np.isfinite(out[:, 16:])) and np.all(np.isnan(out[:, :8]))
    # ... and with a right-looking window (0, 4) queries 0..15 never load keys 24..31.
    v = v.at[:, :8].set(1.0).at[:, 24:].set(jnp.nan)
    out = tfx.dot_product_attention(q, k, v, local_window=(0, 4), implementation="chunked",
                                    **BLOCKS)
    assert np.all(np.isfinite(out[:, :16])) and np.all(np.isnan(out[:, 24:]))


def _largest_intermediate(closed_jaxpr):
    """Element count of the biggest value any equation (at any nesting) produces."""
    largest = 0

    def walk(jaxpr):
        nonlocal largest
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
            for param in eqn.params.values():
                for sub in (param if isinstance(param, (list, tuple)) else [param]):
                    if hasattr(sub, "jaxpr"):  # ClosedJaxpr
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)
    walk(closed_jaxpr.jaxpr)
    return largest


def test_chunked_gqa_never_repeats_kv_in_memory():
    # 8 query heads over 1 kv head, short queries over long keys: a repeated K or V
    # ([1, 512, 8, 16] = 65536 elements) would be the largest value in the gradient
    # program; one 64 x 64 tile over 8 heads has 32768.
    q = jnp.zeros((1, 64, 8, 16))
    kv = jnp.zeros((1, 512, 1, 16))

    def grads(q, k, v):
        return jax.grad(lambda q, k, v: tfx.dot_product_attention(
            q, k, v, implementation="chunked", block_q=64, block_kv=64).sum(),
            argnums=(0, 1, 2))(q, k, v)
    assert _largest_intermediate(jax.make_jaxpr(grads)(q, kv, kv)) <= 64 * 64 * 8
    # The same probe sees a repeat: jnp.repeat of K does produce 65536 elements.
    repeated = jax.make_jaxpr(lambda k: jnp.repeat(k, 8, axis=2))(kv)
    assert _largest_intermediate(repeated) == 512 * 8 * 16


@pytest.mark.parametrize("kwargs,expected", [
    (dict(), "cudnn"),
    (dict(local_window=(128, 0)), "cudnn"),
    (dict(local_window=(128, 16), causal=True), "cudnn"),
    (dict(local_window=(128, 16)), "chunked"),          # cuDNN looks left only
    (dict(q_segment_ids=jnp.ones((1, 512), jnp.int32)), "chunked"),
    (dict(bias=jnp.zeros((1, 1, 512, 512))), "dense"),
])
def test_auto_on_gpu_with_new_arguments(kwargs, expected):
    q = jnp.zeros((1, 512, 8, 64), jnp.bfloat16)
    k = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)  # GQA goes to cuDNN as it is
    assert select_implementation(q, k, platform="gpu", compute_capability="9.0",
                                 **kwargs) == expected


def test_cudnn_refusals_name_cudnn():
    q = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    ids = jnp.ones((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="implementation='cudnn'.*segment ids"):
        tfx.dot_product_attention(q, q, q, q_segment_ids=ids, implementation="cudnn")


def _one_hot_values(b, s, kv_heads):
    """v[b, j, k] = e_j: the output of query i is then its row of (dropped) weights."""
    return jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (b, s, kv_heads, s))


def test_chunked_dropout_is_deterministic_keeps_the_rate_and_the_expectation():
    t, n, kv_heads, rate = 32, 4, 2, 0.3
    q, k, _, _ = inputs(t, t, n, kv_heads, seed=7)
    v = _one_hot_values(2, t, kv_heads)

    @jax.jit
    @jax.vmap
    def dropped_weights(rng):
        return tfx.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=rng,
                                         implementation="chunked", **BLOCKS)
    samples = np.asarray(dropped_weights(jax.random.split(jax.random.key(0), 200)))
    again = np.asarray(dropped_weights(jax.random.split(jax.random.key(0), 2)))
    np.testing.assert_array_equal(samples[:2], again)  # same rng, same mask
    assert not np.array_equal(samples[0], samples[1])  # different rng, different mask
    weights = np.asarray(tfx.attention_weights(q, k)).transpose(0, 2, 1, 3)  # [B, T, N, S]
    kept = samples != 0
    assert abs(kept.mean() - (1 - rate)) < 0.01  # 200 x 8192 draws: sd ~ 0.0006
    # A kept weight is the undropped weight scaled by 1/(1 - rate).
    np.testing.assert_allclose(samples[kept], np.broadcast_to(weights / (1 - rate),
                                                              samples.shape)[kept], rtol=1e-5)
    # E[dropped weights] = the weights: mean over 200 masks within 4 standard errors.
    stderr = weights * np.sqrt(rate / (1 - rate) / samples.shape[0])
    assert np.all(np.abs(samples.mean(0) - weights) <= 4 * stderr + 1e-6)


@pytest.mark.parametrize("blocks", [dict(block_q=8, block_kv=8), dict(block_q=16, block_kv=4)])
def test_chunked_dropout_equals_dense_dropout_values_and_gradients(blocks):
    # The mask is a hash of absolute positions, so every tiling drops the same weights
    # as dense; dense's gradient is jax's autodiff of the materialised formula.
    t, n, kv_heads, rate = 24, 4, 2, 0.25
    q, k, v, d_out = inputs(t, t, n, kv_heads, seed=8)
    kwargs = dict(dropout_rate=rate, dropout_rng=jax.random.key(3), causal=True)
    got = run("chunked", q, k, v, d_out, **kwargs, **blocks)
    expected = run("dense", q, k, v, d_out, **kwargs)
    without = run("dense", q, k, v, d_out, causal=True)
    for name, g, e, w in zip(("out", "d_query", "d_key", "d_value"), got, expected, without):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, e, atol=5e-5, rtol=5e-5, err_msg=name)
        assert not np.allclose(g, w), name  # dropout did change something


def test_auto_with_dropout_picks_chunked_for_long_sequences():
    long = jnp.zeros((1, 1024, 2, 16))
    assert select_implementation(long, long, dropout_rate=0.1, platform="cpu") == "chunked"
    # "auto" really runs chunked with dropout: NaN values in the second half of the
    # keys reach dense's first queries (0 * NaN), but chunked's causal loop never
    # loads them for the first 512 queries.
    v = long.at[:, 512:].set(jnp.nan)
    out = tfx.dot_product_attention(long, long, v, causal=True, dropout_rate=0.1,
                                    dropout_rng=jax.random.key(0))
    assert np.all(np.isfinite(out[:, :512]))


def _kv_lengths_past_the_end(implementation):
    # The reproducer: kv_lengths 6 over 4 keys means all 4; dense gives 1.5.
    q, k = jnp.ones((1, 1, 1, 1)), jnp.zeros((1, 4, 1, 1))
    v = jnp.arange(4.0).reshape(1, 4, 1, 1)
    return tfx.dot_product_attention(q, k, v, kv_lengths=jnp.array([6]), block_kv=2,
                                     q_lengths=jnp.array([9]),
                                     implementation=implementation)


def _empty_batch(implementation):
    x = jnp.zeros((0, 8, 2, 4))
    return tfx.dot_product_attention(x, x, x, kv_lengths=jnp.zeros((0,), jnp.int32),
                                     q_lengths=jnp.zeros((0,), jnp.int32),
                                     implementation=implementation)


def _attend(**kwargs):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 2, 4)), jnp.float32)
    args = dict(query=x, key=x, value=x)
    args.update(kwargs)
    return tfx.dot_product_attention(args.pop("query"), args.pop("key"), args.pop("value"),
                                     **args)


LIST_MASK = [[True, False, False], [True, True, False], [True, True, True]]
BAD_INPUT = {
    # name: (call, exception or None, message or expected value)
    "kv_lengths_past_end_chunked": (lambda: _kv_lengths_past_the_end("chunked"), None, 1.5),
    "kv_lengths_past_end_dense": (lambda: _kv_lengths_past_the_end("dense"), None, 1.5),
    "cudnn_causal_cross": (lambda: _attend(key=jnp.zeros((1, 5, 2, 8), jnp.bfloat16),
                                           value=jnp.zeros((1, 5, 2, 8), jnp.bfloat16),
                                           query=jnp.zeros((1, 3, 2, 8), jnp.bfloat16),
                                           causal=True, implementation="cudnn"),
                           ValueError, r"implementation='cudnn'.*q_length 3 != kv_length 5"),
    "head_dim_zero": (lambda: _attend(query=jnp.zeros((1, 3, 2, 0)), key=jnp.zeros((1, 3, 2, 0)),
                                      value=jnp.zeros((1, 3, 2, 0))),
                      ValueError, "head_dim must be >= 1"),
    "empty_batch_dense": (lambda: _empty_batch("dense").shape, None, (0, 8, 2, 4)),
    "empty_batch_chunked": (lambda: _empty_batch("chunked").shape, None, (0, 8, 2, 4)),
    "dropout_one": (lambda: _attend(dropout_rate=1.0, dropout_rng=jax.random.key(0)),
                    ValueError, r"dropout_rate must be a float in \[0, 1\), got 1.0"),
    "dropout_negative": (lambda: _attend(dropout_rate=-0.1), ValueError, "got -0.1"),
    "dropout_without_rng": (lambda: _attend(dropout_rate=0.1, implementation="chunked"),
                            ValueError, "needs a dropout_rng"),
    "mask_as_list": (lambda: float(jnp.abs(_attend(mask=LIST_MASK) - _attend(causal=True)).max()),
                     None, 0.0),
    "mask_list_of_ints": (lambda: _attend(mask=[[1, 0, 0]] * 3), TypeError, "mask must be boolean"),
    "mask_not_an_array": (lambda: _attend(mask=[[True], [True, False]]), TypeError,
                          "mask must be an array"),
    "gqa_heads_not_divisible": (lambda: _attend(query=jnp.zeros((1, 3, 3, 4)),
                                                key=jnp.zeros((1, 3, 2, 4)),
                                                value=jnp.zeros((1, 3, 2, 4))),
                                ValueError, r"num_heads \(3\) must be a multiple of .* \(2\)"),
    "segment_ids_float": (lambda: _attend(q_segment_ids=jnp.ones((1, 3))), TypeError,
                          "q_segment_ids must be integers"),
    "segment_ids_shape": (lambda: _attend(q_segment_ids=jnp.ones((1, 4), jnp.int32)), ValueError,
                          r"q_segment_ids must have shape \[batch, length\] = \(1, 3\)"),
    "window_negative": (lambda: _attend(local_window=(-1, 2)), ValueError,
                        r"local_window must be \(left, right\).*got \(-1, 2\)"),
    "scale_nan": (lambda: _attend(scale=float("nan")), ValueError, "scale must be a finite"),
    "bias_int": (lambda: _attend(bias=jnp.zeros((1, 1, 3, 3), jnp.int32)), TypeError,
                 "bias must be a floating-point"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_edge_and_bad_inputs(case):
    call, error, expected = BAD_INPUT[case]
    if error is None:
        got = call()
        if isinstance(expected, tuple):
            assert got == expected
        else:
            np.testing.assert_allclose(np.asarray(got).ravel()[0], expected, atol=1e-6)
        return
    with pytest.raises(error, match=expected):
        call()
