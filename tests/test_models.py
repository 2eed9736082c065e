"""Transformer, ViT and causal LM: sizes, properties, decoding, dtypes, knobs."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfx_jax as tfx

TINY = dict(d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0)


def param_count(model, *args):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def tiny_transformer(**overrides):
    cfg = tfx.TransformerConfig(vocab_size=50, max_len=16, **{
        "num_encoder_layers": 2, "num_decoder_layers": 2, **TINY, **overrides})
    return tfx.Transformer(cfg)


def tokens(seed, shape, low=3, high=50):
    return jax.random.randint(jax.random.key(seed), shape, low, high)


def init(model, *args):
    return model.init(jax.random.key(0), *args)


# --- sizes the papers state ------------------------------------------------------------------

def test_vit_b16_has_the_papers_parameter_count():
    assert param_count(tfx.ViT(tfx.ViTConfig()), jnp.zeros((1, 224, 224, 3))) == 86_567_656


def test_transformer_base_is_within_5_percent_of_65m():
    model = tfx.Transformer(tfx.TransformerConfig(vocab_size=37_000))
    n = param_count(model, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    assert abs(n - 65e6) / 65e6 < 0.05, n


# --- encoder-decoder properties --------------------------------------------------------------

def test_decoder_is_causal():
    model = tiny_transformer()
    src, tgt = tokens(1, (2, 7)), tokens(2, (2, 6))
    variables = init(model, src, tgt)
    logits = model.apply(variables, src, tgt)
    changed = model.apply(variables, src, tgt.at[:, 4:].set(tokens(3, (2, 2))))
    np.testing.assert_allclose(changed[:, :4], logits[:, :4], atol=1e-5)
    assert np.abs(np.asarray(changed[:, 4:] - logits[:, 4:])).max() > 1e-3


def test_encoder_output_ignores_padding():
    model = tiny_transformer()
    src = tokens(4, (2, 5))
    padded = jnp.concatenate([src, jnp.zeros((2, 4), src.dtype)], axis=1)
    tgt = tokens(5, (2, 6))
    variables = init(model, padded, tgt)
    enc = model.apply(variables, src, method=tfx.Transformer.encode)
    enc_padded = model.apply(variables, padded, method=tfx.Transformer.encode)
    np.testing.assert_allclose(enc_padded[:, :5], enc, atol=1e-5)
    np.testing.assert_allclose(model.apply(variables, padded, tgt), model.apply(variables, src, tgt),
                               atol=1e-5)


def test_decoder_depends_on_source():
    model = tiny_transformer()
    src, tgt = tokens(6, (1, 5)), tokens(7, (1, 4))
    variables = init(model, src, tgt)
    other = model.apply(variables, tokens(8, (1, 5)), tgt)
    assert np.abs(np.asarray(model.apply(variables, src, tgt) - other)).max() > 1e-3


def cached_decode(model_decode, variables, step, prompt, total):
    """Feeds `prompt` tokens at once, then one token at a time; returns all logits."""
    cache = variables["cache"]
    apply = jax.jit(lambda v, *args: model_decode.apply(v, *args, mutable=["cache"]))
    pieces, start = [], 0
    for stop in [prompt] + list(range(prompt + 1, total + 1)):
        out, mutated = apply({"params": variables["params"], "cache": cache}, *step(start, stop))
        cache, start = mutated["cache"], stop
        pieces.append(out)
    return jnp.concatenate(pieces, axis=1)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("prompt", [1, 3])
def test_transformer_kv_cache_decoding_equals_full_pass(prompt, scan_layers):
    model = tiny_transformer(scan_layers=scan_layers)
    src, tgt = tokens(9, (2, 5)).at[1, 3:].set(0), tokens(10, (2, 6))
    variables = init(model, src, tgt)
    full = model.apply(variables, src, tgt)
    decoder = tiny_transformer(scan_layers=scan_layers, decode=True)
    encoded = model.apply(variables, src, method=tfx.Transformer.encode)
    cache = decoder.init(jax.random.key(0), src, jnp.zeros((2, 6), jnp.int32))["cache"]
    step = lambda a, b: (encoded, src, tgt[:, a:b])  # noqa: E731
    got = cached_decode(
        _Method(decoder, tfx.Transformer.decode),
        {"params": variables["params"], "cache": cache}, step, prompt, 6)
    np.testing.assert_allclose(got, full, atol=1e-4)


def test_transformer_with_gqa_and_rope_cache_decoding_equals_full_pass():
    model = tiny_transformer(num_encoder_layers=1, num_decoder_layers=1, position="rope",
                             num_kv_heads=2)
    src, tgt = tokens(22, (2, 5)).at[1, 3:].set(0), tokens(23, (2, 6))
    variables = init(model, src, tgt)
    assert "position" not in variables["params"]["decoder"]  # nothing added to embeddings
    full = model.apply(variables, src, tgt)
    decoder = tiny_transformer(num_encoder_layers=1, num_decoder_layers=1, position="rope",
                               num_kv_heads=2, decode=True)
    encoded = model.apply(variables, src, method=tfx.Transformer.encode)
    cache = decoder.init(jax.random.key(0), src, jnp.zeros((2, 6), jnp.int32))["cache"]
    layer_cache = cache["decoder"]["layers"]["layer_0"]["self_attention"]
    assert layer_cache["cached_key"].shape == (2, 6, 2, 8)  # num_kv_heads, not num_heads
    step = lambda a, b: (encoded, src, tgt[:, a:b])  # noqa: E731
    got = cached_decode(_Method(decoder, tfx.Transformer.decode),
                        {"params": variables["params"], "cache": cache}, step, 2, 6)
    np.testing.assert_allclose(got, full, atol=1e-4)


class _Method:
    """Binds a module method so `apply` calls it (keeps cached_decode model-agnostic)."""

    def __init__(self, module, method):
        self.module, self.method = module, method

    def apply(self, variables, *args, **kwargs):
        return self.module.apply(variables, *args, method=self.method, **kwargs)


# --- decoder-only LM ---------------------------------------------------------------------------

def tiny_lm(**overrides):
    return tfx.CausalLM(tfx.CausalLMConfig(vocab_size=40, max_len=12,
                                           **{"num_layers": 2, **TINY, **overrides}))


@pytest.mark.parametrize("overrides", [dict(), dict(num_layers=1, num_kv_heads=2),
                                       dict(num_layers=1, position="rope")])
def test_lm_is_causal_and_cache_matches_full_pass(overrides):
    model = tiny_lm(**overrides)
    seq = tokens(11, (2, 8), high=40)
    variables = init(model, seq)
    full = model.apply(variables, seq)
    changed = model.apply(variables, seq.at[:, 5:].set(7))
    np.testing.assert_allclose(changed[:, :5], full[:, :5], atol=1e-5)
    decoder = tiny_lm(decode=True, **overrides)
    cache = decoder.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))["cache"]
    got = cached_decode(decoder, {"params": variables["params"], "cache": cache},
                        lambda a, b: (seq[:, a:b],), 4, 8)
    np.testing.assert_allclose(got, full, atol=1e-4)


# --- ViT ---------------------------------------------------------------------------------------

def tiny_vit(**overrides):
    return tfx.ViT(tfx.ViTConfig(image_size=8, patch_size=4, num_channels=1, num_classes=10,
                                 **{"num_layers": 2, **TINY, **overrides}))


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_vit_shapes_and_patch_permutation_sensitivity(pool):
    model = tiny_vit(pool=pool)
    images = jax.random.normal(jax.random.key(12), (3, 8, 8, 1))
    variables = init(model, images)
    assert variables["params"]["position"]["embedding"].shape == (4 + (pool == "cls"), 32)
    # zero-initialised head (ViT paper): give it weights so the check is meaningful
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(jax.random.key(1), x.shape)
        if "head" in jax.tree_util.keystr(path) else x, variables)
    logits = model.apply(variables, images)
    chex.assert_shape(logits, (3, 10))
    chex.assert_tree_all_finite(logits)
    swapped = images[:, ::-1]  # moves patches around: positions make it matter
    assert np.abs(np.asarray(model.apply(variables, swapped) - logits)).max() > 1e-4


def test_vit_rejects_wrong_image_shape_and_dtype():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"images must have shape \[batch, 8, 8, 1\]"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(TypeError, match="floating point"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.uint8))


# --- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda: tfx.TransformerConfig(vocab_size=10, d_model=30, num_heads=4), "d_model=30"),
    (lambda: tfx.TransformerConfig(vocab_size=0), "vocab_size"),
    (lambda: tfx.TransformerConfig(vocab_size=10, dropout_rate=1.5), "dropout_rate"),
    (lambda: tfx.TransformerConfig(vocab_size=10, position="rotary"), "position"),
    (lambda: tfx.TransformerConfig(vocab_size=10, dtype="int8"), "dtype"),
    (lambda: tfx.TransformerConfig(vocab_size=10, attention_implementation="x"),
     "attention_implementation"),
    (lambda: tfx.ViTConfig(image_size=30, patch_size=16), "patch_size=16 does not divide"),
    (lambda: tfx.ViTConfig(pool="max"), "pool"),
    (lambda: tfx.CausalLMConfig(vocab_size=10, remat_policy="some"), "remat_policy"),
    (lambda: tfx.CausalLMConfig(vocab_size=10, num_kv_heads=3), "num_heads=8 is not divisible "
                                                               "by num_kv_heads=3"),
    (lambda: tfx.CausalLMConfig(vocab_size=10, num_kv_heads=0), "num_kv_heads"),
    (lambda: tfx.CausalLMConfig(vocab_size=10, num_kv_heads=2, fused_qkv=True), "fused_qkv"),
    (lambda: tfx.TransformerConfig(vocab_size=10, rope_base=1.0), "rope_base"),
])
def test_bad_configs_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_token_inputs_are_checked():
    model = tiny_transformer()
    with pytest.raises(TypeError, match="integer token ids"):
        model.init(jax.random.key(0), jnp.ones((1, 4)), jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        model.init(jax.random.key(0), jnp.ones((1, 17), jnp.int32), jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"source must have shape \[batch, length\]"):
        model.init(jax.random.key(0), jnp.ones((4,), jnp.int32), jnp.ones((1, 4), jnp.int32))


# --- transformations, dtypes and performance knobs -----------------------------------------------

def np_transformer(params, src, tgt, num_heads, eps=1e-6):
    """A float64 NumPy forward pass of the paper's post-LN encoder-decoder (shared, sqrt(d)-scaled
    embeddings, interleaved sinusoids, ReLU FFN, key padding 0, causal decoder, tied output)."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    table = p["embedding"]["embedding"]
    d = table.shape[1]

    def embed(ids):
        pos = np.arange(ids.shape[1])[:, None] / 10000.0 ** (np.arange(0, d, 2) / d)
        pe = np.zeros((ids.shape[1], d))
        pe[:, 0::2], pe[:, 1::2] = np.sin(pos), np.cos(pos)
        return table[ids] * np.sqrt(d) + pe

    def norm(x, q):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
        return x * q["scale"] + q["bias"]

    def attention(q, x, kv, mask):  # mask [B or 1, T, S]: True = may attend
        def proj(name, h):
            return np.einsum("btd,dnh->btnh", h, q[name]["kernel"]) + q[name]["bias"]
        scores = np.einsum("btnh,bsnh->bnts", proj("query", x), proj("key", kv))
        scores = np.where(mask[:, None], scores / np.sqrt(d // num_heads), -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("bnts,bsnh->btnh", weights, proj("value", kv))
        return np.einsum("btnh,nhd->btd", out, q["out"]["kernel"]) + q["out"]["bias"]

    def ffn(x, q):
        h = np.maximum(x @ q["wi"]["kernel"] + q["wi"]["bias"], 0.0)
        return h @ q["wo"]["kernel"] + q["wo"]["bias"]

    src, tgt = np.asarray(src), np.asarray(tgt)
    src_keys = (src != 0)[:, None, :]
    x = embed(src)
    for layer in p["encoder"]["layers"].values():
        x = norm(x + attention(layer["self_attention"], x, x, src_keys),
                 layer["self_attention_norm"])
        x = norm(x + ffn(x, layer["ffn"]), layer["ffn_norm"])
    causal = np.tril(np.ones((tgt.shape[1],) * 2, bool))[None] & (tgt != 0)[:, None, :]
    y = embed(tgt)
    for layer in p["decoder"]["layers"].values():
        y = norm(y + attention(layer["self_attention"], y, y, causal),
                 layer["self_attention_norm"])
        y = norm(y + attention(layer["cross_attention"], y, x, src_keys),
                 layer["cross_attention_norm"])
        y = norm(y + ffn(y, layer["ffn"]), layer["ffn_norm"])
    return y @ table.T


class TransformVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_match_a_numpy_reference(self):
        model = tiny_transformer()
        src = tokens(13, (2, 5)).at[1, 3:].set(0)  # padded source keys are masked
        tgt = tokens(14, (2, 4))
        variables = init(model, src, tgt)
        reference = np_transformer(variables["params"], src, tgt, num_heads=TINY["num_heads"])
        np.testing.assert_allclose(self.variant(model.apply)(variables, src, tgt), reference,
                                   atol=1e-4, rtol=1e-4)


def test_vmap_over_examples_equals_batched_call():
    model = tiny_lm()
    seq = tokens(15, (3, 6), high=40)
    variables = init(model, seq)
    per_example = jax.vmap(lambda s: model.apply(variables, s[None])[0])(seq)
    np.testing.assert_allclose(per_example, model.apply(variables, seq), atol=1e-5)


def test_bfloat16_compute_with_float32_params_is_finite_and_close():
    model32, model16 = tiny_transformer(), tiny_transformer(dtype="bfloat16")
    src, tgt = tokens(16, (2, 5)), tokens(17, (2, 4))
    variables = init(model16, src, tgt)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    logits16 = jax.jit(model16.apply)(variables, src, tgt)
    chex.assert_tree_all_finite(logits16)
    np.testing.assert_allclose(logits16, model32.apply(variables, src, tgt), atol=0.15)
    grads = jax.jit(jax.grad(lambda p: model16.apply({"params": p}, src, tgt,
                                             deterministic=False,
                                             rngs={"dropout": jax.random.key(1)}).mean()))(
        variables["params"])
    chex.assert_tree_all_finite(grads)


def stack_layers(params, num_layers):
    """Loop-form parameters {layer_0: t, layer_1: t, ...} -> scan form {layers: stacked}."""
    if not isinstance(params, dict):
        return params
    if "layer_0" in params:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params[f"layer_{i}"] for i in range(num_layers)])
        rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
        return {**rest, "layers": stacked}
    return {k: stack_layers(v, num_layers) for k, v in params.items()}


@pytest.mark.parametrize("knobs", [dict(scan_layers=True), dict(remat_policy="full"),
                                   dict(remat_policy="dots", scan_layers=True),
                                   dict(remat_policy="full_nested", scan_layers=True)])
def test_scan_and_remat_leave_outputs_and_gradients_unchanged(knobs):
    base, knobbed = tiny_transformer(pre_norm=True), tiny_transformer(pre_norm=True, **knobs)
    src, tgt = tokens(18, (2, 5)), tokens(19, (2, 4))
    params = init(base, src, tgt)["params"]
    converted = stack_layers(params, 2) if knobs.get("scan_layers") else params
    chex.assert_trees_all_equal_shapes(init(knobbed, src, tgt)["params"], converted)
    loss = lambda model, p: model.apply({"params": p}, src, tgt).sum()  # noqa: E731
    np.testing.assert_allclose(loss(knobbed, converted), loss(base, params), rtol=1e-5)
    g_base = jax.jit(jax.grad(lambda p: loss(base, p)))(params)
    g_knob = jax.jit(jax.grad(lambda p: loss(knobbed, p)))(converted)
    expected = stack_layers(g_base, 2) if knobs.get("scan_layers") else g_base
    chex.assert_trees_all_close(g_knob, expected, atol=1e-4, rtol=1e-4)


def count_checkpoints(jaxpr) -> int:
    """jax.checkpoint equations in ``jaxpr``, nested ones included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("checkpoint", "remat", "remat2")
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    count += count_checkpoints(inner)
    return count


def test_full_nested_remat_checkpoints_each_attention_inside_its_layer():
    """"full_nested": the layer's checkpoint holds one more per attention sub-layer
    (self- and cross-attention in a decoder layer, self-attention in an encoder layer)."""
    src, tgt = tokens(18, (2, 5)), tokens(19, (2, 4))

    def checkpoints(policy):
        model = tiny_transformer(pre_norm=True, remat_policy=policy)
        params = init(tiny_transformer(pre_norm=True), src, tgt)["params"]
        return count_checkpoints(
            jax.make_jaxpr(lambda p: model.apply({"params": p}, src, tgt))(params).jaxpr)

    layers = 2 * 2  # tiny_transformer: 2 encoder + 2 decoder layers
    assert checkpoints("full") == layers
    assert checkpoints("full_nested") == layers + 2 + 2 * 2


def test_unshared_embeddings_have_separate_tables_and_output_layer():
    model = tiny_transformer(share_embeddings=False)
    params = init(model, tokens(20, (1, 3)), tokens(21, (1, 3)))["params"]
    assert {"source_embedding", "target_embedding"} <= set(params)
    assert "logits" in params["decoder"]


# --- which attention kernel the models reach on a GPU ------------------------------------------

def record_gpu_choices(monkeypatch):
    """Records what "auto" would pick on an H100 for every attention call the models make
    (the very arguments they pass), while running the CPU choice here."""
    import tfx_jax.attention as attention
    original, seen = attention.select_implementation, []

    def on_h100(*args, **kwargs):
        seen.append(original(*args, **{**kwargs, "platform": "gpu", "compute_capability": "9.0"}))
        return original(*args, **kwargs)
    monkeypatch.setattr(attention, "select_implementation", on_h100)
    return seen


def test_every_model_attention_resolves_to_cudnn_on_a_gpu_in_bfloat16(monkeypatch):
    seen = record_gpu_choices(monkeypatch)

    def choices(model, *inputs, **kwargs):  # tracing is enough: nothing is computed
        variables = jax.eval_shape(lambda: init(model, *inputs))
        seen.clear()
        jax.eval_shape(lambda v: model.apply(v, *inputs, **kwargs), variables)
        return list(seen)

    bf16 = dict(TINY, dtype="bfloat16", num_encoder_layers=1, num_decoder_layers=1)
    # even lengths: jax's cuDNN training call refuses odd ones (tests/test_attention_chunked)
    src, tgt = tokens(24, (2, 6)).at[1, 3:].set(0), tokens(25, (2, 4)).at[0, 3:].set(0)
    for overrides in (dict(), dict(position="rope", num_kv_heads=2)):
        # encoder self-attention, decoder causal self-attention, cross-attention
        assert choices(tiny_transformer(**bf16, **overrides), src, tgt) == ["cudnn"] * 3
    images = jnp.zeros((2, 8, 8, 1))  # 4 patches: [CLS] + 4 = 5 tokens, odd; pooled: 4
    assert choices(tiny_vit(num_layers=1, dtype="bfloat16", pool="gap"), images) == ["cudnn"]
    assert choices(tiny_vit(num_layers=1, dtype="bfloat16"), images) != ["cudnn"]
    lm = tiny_lm(num_layers=1, dtype="bfloat16", position="rope", num_kv_heads=1)
    seq = tokens(26, (2, 6), high=40)
    assert choices(lm, seq) == ["cudnn"]
    # packed rows need segment ids, which cuDNN cannot take through jax
    assert choices(lm, seq, segment_ids=jnp.array([[1, 1, 1, 2, 2, 2]] * 2)) == ["dense"]
