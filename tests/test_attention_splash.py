"""The Pallas TPU splash-attention path: routing, refusals, and (in TPU interpret
mode on the CPU) forward and gradients against dense attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import tfx_jax as tfx
from tfx_jax.attention import select_implementation
from tfx_jax.model_config import ATTENTION_IMPLEMENTATIONS

T = 256  # two 128-wide tiles each way: the smallest shape where tiles are skipped


@pytest.mark.parametrize("kwargs,expected", [
    (dict(causal=True), "splash"),
    (dict(local_window=(100, 0)), "splash"),
    (dict(q_segment_ids=jnp.ones((1, T), jnp.int32), causal=True), "splash"),
    (dict(q_lengths=np.array([200]), kv_lengths=np.array([200])), "splash"),
    (dict(kv_lengths=np.array([200])), "splash"),                 # keys-only padding
    (dict(kv_lengths=np.array([200]), local_window=(8, 8)), "dense"),  # may leave no key
    (dict(mask=jnp.ones((1, 1, T, T), bool)), "dense"),            # an array mask
    (dict(dropout_rate=0.1), "dense"),
    (dict(bias=jnp.zeros((1, 1, T, T))), "dense"),
    (dict(causal=True, logit_soft_cap=50.0), "splash"),  # Gemma 2's attention soft-cap
])
def test_auto_on_tpu_picks_splash_when_it_can(kwargs, expected):
    q = jnp.zeros((1, T, 8, 128), jnp.bfloat16)
    k = jnp.zeros((1, T, 2, 128), jnp.bfloat16)
    mask = kwargs.pop("mask", None)
    dropout = kwargs.pop("dropout_rate", 0.0)
    assert select_implementation(q, k, mask, dropout_rate=dropout, platform="tpu",
                                 **kwargs) == expected
    long_q, long_k = jnp.zeros((1, 1000, 8, 128)), jnp.zeros((1, 1000, 2, 128))
    assert select_implementation(long_q, long_k, platform="tpu") == "splash"  # padded to 1024
    vit = jnp.zeros((1, 197, 8, 64))  # ViT-B/16: 197 -> 256 tokens adds 30%
    assert select_implementation(vit, vit, platform="tpu") == "splash"
    short = jnp.zeros((1, 130, 8, 64))  # 130 -> 256 would double the work: not splash
    assert select_implementation(short, short, platform="tpu") == "dense"
    assert "splash" in ATTENTION_IMPLEMENTATIONS


def test_splash_refusals_name_splash():
    x = jnp.zeros((1, T, 2, 128))
    with pytest.raises(ValueError, match="implementation='splash'.*TPU kernel.*'cpu'"):
        tfx.dot_product_attention(x, x, x, implementation="splash")
    with pytest.raises(ValueError, match="implementation='splash'.*queries and keys share"):
        tfx.dot_product_attention(x, x, x, kv_lengths=jnp.array([100]), local_window=(4, 4),
                                  implementation="splash")
    with pytest.raises(ValueError, match="implementation='splash'.*bias"):
        tfx.dot_product_attention(x, x, x, bias=jnp.zeros((1, 1, T, T)),
                                  implementation="splash")


PACKED = np.array([[1] * 100 + [2] * 120 + [0] * 36])


KV_PACKED = np.array([[2] * 60 + [1] * 150 + [0] * 46])  # segment 2 first; no segment 3


@pytest.mark.parametrize("kwargs", [
    dict(causal=True, q_segment_ids=PACKED),
    dict(local_window=(40, 8), scale=0.3),
    dict(q_segment_ids=np.array([[1] * 100 + [3] * 50 + [2] * 106]), kv_segment_ids=KV_PACKED),
    dict(kv_lengths=np.array([150])),
    dict(causal=True, q_lengths=np.array([230]), kv_lengths=np.array([0])),
    dict(causal=True, length=200),         # padded to the 256 tile, cut back
    dict(kv_lengths=np.array([150]), length=200),
    dict(causal=True, logit_soft_cap=0.7, scale=1.0),  # Gemma 2: the kernel's soft-cap
], ids=["causal_segments", "window_scale", "cross_segments", "kv_lengths", "no_keys",
        "tile_padding", "tile_and_kv_padding", "soft_cap"])
def test_splash_in_interpret_mode_matches_dense(kwargs):
    rng = np.random.default_rng(0)
    kwargs = dict(kwargs)
    length = kwargs.pop("length", T)
    b, n, kv_heads, h = 1, 2, 1, 8  # MQA: both query heads share one key/value head
    q, d_out = (jnp.asarray(rng.standard_normal((b, length, n, h)), jnp.float32)
                for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, length, kv_heads, h)), jnp.float32)
            for _ in range(2))

    def value_and_grads(implementation):
        def loss(q, k, v):
            out = tfx.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
            return jnp.sum(out * d_out), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    with pltpu.force_tpu_interpret_mode():
        (_, out), grads = value_and_grads("splash")
    (_, expected), expected_grads = value_and_grads("dense")
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4)
    if kwargs.get("q_segment_ids") is PACKED:  # padding queries return zeros, as elsewhere
        assert np.all(np.asarray(out)[0, 220:] == 0)
    if "kv_segment_ids" in kwargs:  # segment 3 has no key: zeros
        assert np.all(np.asarray(out)[0, 100:150] == 0) and np.any(np.asarray(out)[0, :100])
