"""Chunked (memory-efficient) attention vs dense vs a float64 NumPy reference."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfx_jax.attention import (CHUNKED_MIN_LENGTH, dot_product_attention, lengths_mask,
                               select_implementation)
from tfx_jax.attention_chunked import DEFAULT_BLOCK_Q, chunked_attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(atol=1e-5, rtol=1e-5)
BLOCKS = dict(block_q=8, block_kv=16)  # small, unequal tiles: every case spans several


def numpy_attention_and_grads(q, k, v, mask, d_out):
    """float64 reference: out = softmax(QK^T/sqrt(d)) V and the gradients of
    sum(out * d_out), written from the softmax Jacobian. mask: [B,N,T,S] bool."""
    q, k, v, d_out = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v, d_out))
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = np.einsum("bnth,bnsh->bnts", q, k) * scale
    scores = np.where(mask, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(mask, np.exp(scores - row_max), 0.0)
    total = e.sum(-1, keepdims=True)
    p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)  # empty rows: zeros
    out = p @ v
    d_v = np.einsum("bnts,bnth->bnsh", p, d_out)
    d_p = d_out @ v.transpose(0, 1, 3, 2)
    d_s = p * (d_p - np.sum(p * d_p, axis=-1, keepdims=True))
    d_q = d_s @ k * scale
    d_k = np.einsum("bnts,bnth->bnsh", d_s, q) * scale
    return tuple(x.transpose(0, 2, 1, 3) for x in (out, d_q, d_k, d_v))


def _inputs(t, s, b=2, n=3, h=8, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = [(b, t, n, h), (b, s, n, h), (b, s, n, h), (b, t, n, h)]
    return [jnp.asarray(rng.standard_normal(x), dtype) for x in shapes]


def _full_mask(b, n, t, s, mask, causal, q_lengths, kv_lengths):
    full = np.ones((b, n, t, s), bool)
    if mask is not None:
        full &= np.broadcast_to(np.asarray(mask), full.shape)
    if causal:
        full &= np.tril(np.ones((t, s), bool))
    lm = lengths_mask(t, s, q_lengths, kv_lengths)
    if lm is not None:
        full &= np.broadcast_to(np.asarray(lm), full.shape)
    return full


def _value_and_grads(implementation, q, k, v, d_out, **kwargs):
    def loss(q, k, v):
        out = dot_product_attention(q, k, v, implementation=implementation, **kwargs)
        return jnp.sum(out * d_out), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out,) + tuple(grads)


rng_masks = np.random.default_rng(1)
CASES = {
    # name: (T, S, mask or None, causal, q_lengths, kv_lengths)
    "no_mask": (40, 40, None, False, None, None),
    "causal": (40, 40, None, True, None, None),
    "padding_mask": (24, 24, np.arange(24)[None, None, None, :] < np.array([24, 9])[:, None, None, None],
                     False, None, None),
    "cross_s_gt_t": (19, 45, None, False, None, None),
    "cross_s_lt_t": (45, 19, None, False, None, None),
    "causal_cross": (21, 35, None, True, None, None),
    "per_head_mask": (33, 29, rng_masks.random((2, 3, 33, 29)) > 0.4, False, None, None),
    "fully_masked_rows": (17, 23, np.concatenate([np.zeros((2, 1, 3, 23), bool),
                                                  rng_masks.random((2, 1, 14, 23)) > 0.5], axis=2),
                          True, None, None),
    "odd_lengths": (37, 53, None, False, None, None),
    "lengths": (37, 53, None, False, np.array([37, 11]), np.array([20, 0])),
    "causal_lengths": (30, 30, None, True, np.array([30, 13]), np.array([25, 30])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_matches_dense_and_float64_reference(case):
    t, s, mask, causal, q_lengths, kv_lengths = CASES[case]
    q, k, v, d_out = _inputs(t, s)
    kwargs = dict(mask=None if mask is None else jnp.asarray(mask), causal=causal,
                  q_lengths=q_lengths, kv_lengths=kv_lengths)
    chunked = _value_and_grads("chunked", q, k, v, d_out, **kwargs, **BLOCKS)
    dense = _value_and_grads("dense", q, k, v, d_out, **kwargs)
    full = _full_mask(2, 3, t, s, mask, causal, q_lengths, kv_lengths)
    reference = numpy_attention_and_grads(q, k, v, full, d_out)
    for name, c, d, r in zip(("out", "d_query", "d_key", "d_value"), chunked, dense, reference):
        assert np.all(np.isfinite(c)), name
        np.testing.assert_allclose(c, d, **TOL, err_msg=f"{case}: {name} chunked vs dense")
        np.testing.assert_allclose(c, r, **TOL, err_msg=f"{case}: {name} chunked vs float64")
    empty_rows = ~full.any(axis=-1)  # [B, N, T]
    if empty_rows.any():  # queries with nothing to attend give exactly zero
        out = np.asarray(chunked[0]).transpose(0, 2, 1, 3)
        assert np.all(out[empty_rows] == 0.0)


def test_chunked_bfloat16_close_to_dense():
    q, k, v, _ = _inputs(48, 48, dtype=jnp.bfloat16)
    dense = dot_product_attention(q, k, v, causal=True, implementation="dense")
    chunked = dot_product_attention(q, k, v, causal=True, implementation="chunked", **BLOCKS)
    assert chunked.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(chunked, np.float32), np.asarray(dense, np.float32),
                               atol=2e-2, rtol=2e-2)


def test_causal_skips_key_blocks_above_the_diagonal():
    # NaN values in keys 8.. poison any query block that visits them (0 * NaN = NaN);
    # queries 0..7 stay finite only if their loop never reaches those blocks.
    q, k, v, _ = _inputs(32, 32)
    v = v.at[:, 8:].set(jnp.nan)
    out = chunked_attention(q, k, v, causal=True, block_q=8, block_kv=8)
    assert np.all(np.isfinite(out[:, :8])) and np.all(np.isnan(out[:, 8:]))


def test_kv_lengths_skip_key_blocks_past_the_longest_sequence():
    q, k, v, _ = _inputs(16, 32)
    v = v.at[:, 8:].set(jnp.nan)
    out = chunked_attention(q, k, v, kv_lengths=jnp.array([8, 5]), block_q=8, block_kv=8)
    assert np.all(np.isfinite(out))


def test_chunked_rejects_bad_blocks_and_lengths():
    q, k, v, _ = _inputs(8, 8)
    with pytest.raises(ValueError, match="block_q"):
        dot_product_attention(q, k, v, implementation="chunked", block_q=0)
    with pytest.raises(ValueError, match=r"kv_lengths must have shape \[batch\]"):
        dot_product_attention(q, k, v, kv_lengths=jnp.array([1, 2, 3]))
    with pytest.raises(TypeError, match="q_lengths must be integers"):
        dot_product_attention(q, k, v, q_lengths=jnp.array([1.0, 2.0]))


def test_auto_on_cpu_picks_dense_short_chunked_long():
    short = jnp.zeros((1, 64, 2, 8))
    long = jnp.zeros((1, CHUNKED_MIN_LENGTH, 2, 8))
    assert select_implementation(short, short) == "dense"
    assert select_implementation(long, long, causal=True) == "chunked"
    assert select_implementation(short, long) == "chunked"  # cross-attention to a long source
    assert select_implementation(long, long, dropout_rate=0.1) == "chunked"
    assert select_implementation(short, short, dropout_rate=0.1) == "dense"
    # "auto" really runs chunked: NaN values in the second query block's keys reach
    # dense's first queries (0 * NaN), but chunked's first block never loads them.
    q, k, v, _ = _inputs(2 * DEFAULT_BLOCK_Q, 2 * DEFAULT_BLOCK_Q, b=1, n=1)
    v = v.at[:, DEFAULT_BLOCK_Q:].set(jnp.nan)
    auto = dot_product_attention(q, k, v, causal=True)
    dense = dot_product_attention(q, k, v, causal=True, implementation="dense")
    assert np.all(np.isfinite(auto[:, :DEFAULT_BLOCK_Q])) and np.all(np.isnan(dense))


@pytest.mark.parametrize("dtype,head_dim,capability,mask,causal_cross,expected", [
    (jnp.bfloat16, 64, "9.0", False, False, "cudnn"),
    (jnp.float16, 128, "8.0", False, False, "cudnn"),
    (jnp.bfloat16, 256, "9.0", False, False, "cudnn"),
    (jnp.bfloat16, 256, "8.6", False, False, "chunked"),  # > 128 before Hopper
    (jnp.bfloat16, 60, "9.0", False, False, "chunked"),   # not a multiple of 8
    (jnp.float32, 64, "9.0", False, False, "chunked"),
    (jnp.bfloat16, 64, "7.5", False, False, "chunked"),   # Turing: no flash kernel
    (jnp.bfloat16, 64, "9.0", True, False, "chunked"),    # a mask array would be a T x S bias
    (jnp.bfloat16, 64, "9.0", False, True, "chunked"),
])
def test_auto_on_gpu(dtype, head_dim, capability, mask, causal_cross, expected):
    q = jnp.zeros((1, CHUNKED_MIN_LENGTH, 2, head_dim), dtype)
    k = jnp.zeros((1, CHUNKED_MIN_LENGTH * (2 if causal_cross else 1), 2, head_dim), dtype)
    m = jnp.ones((1, 1, 1, k.shape[1]), bool) if mask else None
    got = select_implementation(q, k, m, causal_cross, platform="gpu",
                                compute_capability=capability)
    assert got == expected
    # cuDNN has no dropout here: long sequences with dropout go to chunked
    assert select_implementation(q, k, m, causal_cross, 0.1, platform="gpu",
                                 compute_capability=capability) == "chunked"


def test_auto_on_gpu_keeps_odd_lengths_off_cudnn():
    """ViT-B/16 at 224 has 197 tokens: jax's cuDNN training call refuses odd lengths
    (the deviceless H100 compile of vit.py failed with "Unsupported sequence length")."""
    vit = jnp.zeros((1, 197, 12, 64), jnp.bfloat16)
    assert select_implementation(vit, vit, platform="gpu", compute_capability="9.0") != "cudnn"
    even = jnp.zeros((1, 198, 12, 64), jnp.bfloat16)
    assert select_implementation(even, even, platform="gpu", compute_capability="9.0") == "cudnn"


def test_auto_on_gpu_keeps_value_head_dim_other_than_query_off_cudnn():
    q = jnp.zeros((1, CHUNKED_MIN_LENGTH, 2, 64), jnp.bfloat16)
    assert select_implementation(q, q, platform="gpu", compute_capability="9.0",
                                 value_head_dim=64) == "cudnn"
    assert select_implementation(q, q, platform="gpu", compute_capability="9.0",
                                 value_head_dim=32) == "chunked"


def test_auto_on_tpu_and_rocm_never_picks_cudnn():
    q = jnp.zeros((1, CHUNKED_MIN_LENGTH, 2, 64), jnp.bfloat16)
    assert select_implementation(q, q, platform="tpu") == "splash"  # the Pallas TPU kernel
    assert select_implementation(q, q, jnp.ones((1, 1, 1, q.shape[1]), bool),
                                 platform="tpu") == "chunked"
    assert select_implementation(q, q, platform="gpu", compute_capability=None) == "chunked"


def test_cudnn_on_cpu_is_a_clear_error():
    q, k, v, _ = _inputs(8, 8)
    with pytest.raises(ValueError, match="implementation='cudnn' cannot run here.*NVIDIA GPU"):
        dot_product_attention(q, k, v, implementation="cudnn")


_MEMORY_PROBE = textwrap.dedent("""
    import json, jax, jax.numpy as jnp
    from tfx_jax.attention import dot_product_attention

    def temp_bytes(implementation, t):
        x = jnp.zeros((1, t, 2, 32))
        def grads(q, k, v, d_out):
            attend = lambda q, k, v: dot_product_attention(
                q, k, v, causal=True, implementation=implementation, block_q=128, block_kv=128)
            return jax.vjp(attend, q, k, v)[1](d_out)
        compiled = jax.jit(grads).lower(x, x, x, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    print(json.dumps({impl: [temp_bytes(impl, t) for t in (512, 2048)]
                      for impl in ("chunked", "dense")}))
""")


def test_chunked_gradient_memory_grows_linearly():
    # YNN fusion hides temp buffers; the flag must be set before the backend starts.
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=")
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    temp = json.loads(done.stdout.strip().splitlines()[-1])
    chunked_growth = temp["chunked"][1] / temp["chunked"][0]
    dense_growth = temp["dense"][1] / temp["dense"][0]
    assert chunked_growth < 5.0, temp   # 4x length: linear plus a constant tile
    assert dense_growth > 12.0, temp    # the T x S matrices: ~16x
    assert temp["dense"][1] > 8 * temp["chunked"][1], temp


def test_value_head_dim_may_differ_from_query_head_dim():
    q, k, _, _ = _inputs(20, 26)
    v = jnp.asarray(np.random.default_rng(5).standard_normal((2, 26, 3, 12)), jnp.float32)
    d_out = jnp.ones((2, 20, 3, 12))
    chunked = _value_and_grads("chunked", q, k, v, d_out, causal=True, **BLOCKS)
    dense = _value_and_grads("dense", q, k, v, d_out, causal=True)
    for c, d in zip(chunked, dense):
        assert c.shape == d.shape
        np.testing.assert_allclose(c, d, **TOL)


def test_chunked_under_a_data_parallel_mesh():
    # The training loop shards the batch over a `data` axis; chunked must follow.
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    q, k, v, d_out = (jax.device_put(x, batch) for x in _inputs(24, 24, b=jax.device_count()))
    chunked = _value_and_grads("chunked", q, k, v, d_out, causal=True, **BLOCKS)
    dense = _value_and_grads("dense", q, k, v, d_out, causal=True)
    for c, d in zip(chunked, dense):
        np.testing.assert_allclose(c, d, **TOL)
    assert chunked[1].sharding.spec[0] == "data"
