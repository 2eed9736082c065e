"""Packing and left padding: a packed or padded row gives every token the logits it has alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfx_jax as tfx
from tfx_jax import decoding

TINY = dict(d_model=16, num_heads=4, d_ff=32, dropout_rate=0.0)
VARIANTS = [dict(), dict(position="rope", num_kv_heads=2)]


def tiny_lm(**overrides):
    return tfx.CausalLM(tfx.CausalLMConfig(vocab_size=30, num_layers=1, max_len=12,
                                           **{**TINY, **overrides}))


def tiny_transformer(**overrides):
    return tfx.Transformer(tfx.TransformerConfig(
        vocab_size=30, num_encoder_layers=1, num_decoder_layers=1, max_len=12,
        **{**TINY, **overrides}))


def ids(seed, n):
    return jax.random.randint(jax.random.key(seed), (n,), 3, 30)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_packed_lm_row_equals_its_documents_run_alone(overrides):
    model = tiny_lm(**overrides)
    a, b = ids(0, 3), ids(1, 4)
    row = jnp.concatenate([a, b, jnp.zeros(1, a.dtype)])[None]
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    variables = model.init(jax.random.key(0), row)
    packed = model.apply(variables, row, segment_ids=segment_ids)
    np.testing.assert_allclose(packed[0, :3], model.apply(variables, a[None])[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:7], model.apply(variables, b[None])[0], atol=1e-5)
    explicit = model.apply(variables, row, segment_ids=segment_ids,
                           positions=jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]]))
    np.testing.assert_allclose(explicit, packed, atol=1e-6)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_packed_translation_row_equals_its_pairs_run_alone(overrides):
    model = tiny_transformer(**overrides)
    s1, s2, t1, t2 = ids(2, 3), ids(3, 2), ids(4, 3), ids(5, 4)
    zero = jnp.zeros(1, s1.dtype)
    src = jnp.concatenate([s1, s2, zero])[None]
    tgt = jnp.concatenate([t1, t2, zero])[None]
    src_seg, tgt_seg = jnp.array([[1, 1, 1, 2, 2, 0]]), jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    variables = model.init(jax.random.key(0), src, tgt)
    packed = model.apply(variables, src, tgt, src_segment_ids=src_seg, tgt_segment_ids=tgt_seg)
    np.testing.assert_allclose(packed[0, :3], model.apply(variables, s1[None], t1[None])[0],
                               atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:7], model.apply(variables, s2[None], t2[None])[0],
                               atol=1e-5)
    with pytest.raises(ValueError, match="needs both src_segment_ids and tgt_segment_ids"):
        model.apply(variables, src, tgt, src_segment_ids=src_seg)


def test_no_token_depends_on_another_segment():
    """Gradient check on a decoder stack (causal self-attention + cross-attention)."""
    cfg = tfx.StackConfig(num_kv_heads=2, **TINY)
    stack = tfx.BlockStack(cfg, 1, causal=True, cross_attention=True)
    x = jax.random.normal(jax.random.key(6), (1, 6, 16))
    encoded = jax.random.normal(jax.random.key(7), (1, 5, 16))
    tgt_seg, src_seg = jnp.array([[1, 1, 1, 2, 2, 2]]), jnp.array([[1, 1, 2, 2, 2]])
    kwargs = dict(attention_args=dict(q_segment_ids=tgt_seg),
                  cross_attention_args=dict(q_segment_ids=tgt_seg, kv_segment_ids=src_seg))
    params = stack.init(jax.random.key(0), x, None, encoded, **kwargs)
    f = lambda x, e: stack.apply(params, x, None, e, **kwargs)[0]  # noqa: E731
    on_x = np.abs(np.asarray(jax.jacobian(f, 0)(x, encoded)[:, :, 0])).max(axis=(1, 3))
    on_encoded = np.abs(np.asarray(jax.jacobian(f, 1)(x, encoded)[:, :, 0])).max(axis=(1, 3))
    t, s = np.asarray(tgt_seg[0]), np.asarray(src_seg[0])
    may_see = (t[:, None] == t[None, :]) & np.tril(np.ones((6, 6), bool))
    assert (on_x[~may_see] == 0).all() and (on_x[may_see] > 0).all()
    same = t[:, None] == s[None, :]
    assert (on_encoded[~same] == 0).all() and (on_encoded[same] > 0).all()


@pytest.mark.parametrize("overrides", VARIANTS)
def test_left_padded_prompts_match_each_prompt_alone_full_and_cached(overrides):
    model, decoder = tiny_lm(**overrides), tiny_lm(decode=True, **overrides)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    tokens, positions, segment_ids = decoding.left_pad(prompts)
    np.testing.assert_array_equal(segment_ids, [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    params = model.init(jax.random.key(0), tokens)["params"]
    full = model.apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)
    continuation = jnp.array([[3, 4], [13, 14]])
    alone = [model.apply({"params": params}, jnp.array([p + list(map(int, c))]))[0]
             for p, c in zip(prompts, continuation)]
    for row, prompt in enumerate(prompts):
        np.testing.assert_allclose(full[row, -len(prompt):], alone[row][:len(prompt)], atol=1e-5)

    cache = decoder.init(jax.random.key(0), jnp.zeros((2, 7), jnp.int32))["cache"]
    apply = jax.jit(lambda c, t, **kw: decoder.apply({"params": params, "cache": c}, t,
                                                      mutable=["cache"], **kw))
    logits, mutated = apply(cache, tokens, positions=positions, segment_ids=segment_ids)
    steps = [logits[:, -1]]
    for i in range(2):  # later tokens carry no positions or segment ids: the cache continues
        logits, mutated = apply(mutated["cache"], continuation[:, i:i + 1])
        steps.append(logits[:, -1])
    for row, prompt in enumerate(prompts):
        expected = alone[row][len(prompt) - 1:]
        np.testing.assert_allclose(jnp.stack(steps)[:, row], expected, atol=1e-4)


def test_sampling_left_padded_prompts_greedily_continues_each_prompt():
    model, decoder = tiny_lm(position="rope"), tiny_lm(position="rope", decode=True)
    prompts = [[5, 6], [8, 9, 10, 11]]
    tokens, positions, segment_ids = decoding.left_pad(prompts)
    params = model.init(jax.random.key(0), tokens)["params"]
    cache = decoder.init(jax.random.key(0), jnp.zeros((2, 6), jnp.int32))["cache"]

    def step(t, c, **kw):
        logits, mutated = decoder.apply({"params": params, "cache": c}, t, mutable=["cache"], **kw)
        return logits, mutated["cache"]

    out = decoding.sample(step, cache, tokens, 3, temperature=0.0,
                          prompt_kwargs=dict(positions=positions, segment_ids=segment_ids))
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(3):  # greedy = argmax of a full pass over the prompt alone
            seq.append(int(jnp.argmax(model.apply({"params": params}, jnp.array([seq]))[0, -1])))
        np.testing.assert_array_equal(out[row, -3:], seq[-3:])
