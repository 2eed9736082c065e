"""The models used from other JAX code: intermediates, recorded attention, presets, NNX.

References are float64 NumPy forward passes written from the papers' equations and
the parameters, closed-form parameter counts, and the Linen apply (for the NNX bridge).
"""
from __future__ import annotations

import math
import os
import pathlib
import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tfx_jax as tfx
from tfx_jax.apps.attention_maps import cls_attention_maps, stack_attention_weights


def tiny_vit(**changes) -> tfx.ViT:
    cfg = tfx.ViTConfig(image_size=8, patch_size=2, num_channels=1, num_classes=10, d_model=16,
                        num_heads=2, num_layers=2, d_ff=32)
    return tfx.ViT(cfg.replace(**changes))


def tiny_transformer(**changes) -> tfx.Transformer:
    cfg = tfx.TransformerConfig(vocab_size=13, d_model=16, num_heads=2, num_encoder_layers=2,
                                num_decoder_layers=2, d_ff=32, max_len=8, dropout_rate=0.0)
    return tfx.Transformer(cfg.replace(**changes))


def tiny_lm(**changes) -> tfx.CausalLM:
    cfg = tfx.CausalLMConfig(vocab_size=13, d_model=16, num_heads=2, num_layers=2, d_ff=32,
                             max_len=8, dropout_rate=0.0)
    return tfx.CausalLM(cfg.replace(**changes))


def random_params(module, *inputs, seed=0, scale=0.3, **kwargs):
    """Every parameter drawn at random (zero-initialised heads would hide mistakes), in
    the shapes ``module.init`` gives (jax.eval_shape: nothing is compiled)."""
    params = jax.eval_shape(partial(module.init, **kwargs), jax.random.key(0), *inputs)["params"]
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [jnp.asarray(rng.normal(0, scale, x.shape), x.dtype)
                                     for x in leaves])


def unscanned(params, num_layers):
    """A scanned stack's parameters (leading layer axis under ``layers``) per ``layer_<i>``."""
    stacked = params.pop("layers")
    return {**params, **{f"layer_{i}": jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
                         for i in range(num_layers)}}


# ---------------------------------------------------------------- float64 NumPy ViT
def layer_norm(x, p, eps=1e-6):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * \
        p["scale"] + p["bias"]


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def numpy_vit(p, images, num_layers, patch):
    """Logits, the intermediates and each layer's attention probabilities [B, L, N, T, T]."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
    b, h, w, c = images.shape
    g = h // patch
    x = images.astype(np.float64).reshape(b, g, patch, g, patch, c).transpose(
        0, 1, 3, 2, 4, 5).reshape(b, g * g, patch * patch * c)
    kernel = p["patch_embedding"]["kernel"]
    patches = x @ kernel.reshape(-1, kernel.shape[-1]) + p["patch_embedding"]["bias"]
    x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, patches.shape[-1])), patches], 1)
    x = x + p["position"]["embedding"][:x.shape[1]]
    layers, probabilities = [], []
    for i in range(num_layers):
        lp = p["encoder"][f"layer_{i}"]
        a, y = lp["self_attention"], layer_norm(x, lp["self_attention_norm"])
        q, k, v = (np.einsum("btd,dnh->btnh", y, a[n]["kernel"]) + a[n]["bias"]
                   for n in ("query", "key", "value"))
        scores = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        probabilities.append(weights)
        heads = np.einsum("bnts,bsnh->btnh", weights, v)
        x = x + np.einsum("btnh,nhd->btd", heads, a["out"]["kernel"]) + a["out"]["bias"]
        f, y = lp["ffn"], layer_norm(x, lp["ffn_norm"])
        x = x + gelu_tanh(y @ f["wi"]["kernel"] + f["wi"]["bias"]) @ f["wo"]["kernel"] + \
            f["wo"]["bias"]
        layers.append(x)
    encoded = layer_norm(x, p["encoder"]["final_norm"])
    logits = encoded[:, 0] @ p["head"]["kernel"] + p["head"]["bias"]
    out = {"patches": patches, "layers": np.stack(layers), "encoded": encoded,
           "pre_logits": encoded[:, 0]}
    return logits, out, np.stack(probabilities, axis=1)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_vit_intermediates_and_recorded_attention_match_numpy(scan_layers):
    # "chunked" asked for: recording runs the dense path and returns its own weights.
    model = tiny_vit(scan_layers=scan_layers, attention_implementation="chunked")
    images = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    params = random_params(model, images)
    reference = dict(params, encoder=unscanned(dict(params["encoder"]), 2)) if scan_layers \
        else params
    want_logits, want_out, want_weights = numpy_vit(reference, images, 2, 2)

    logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x, return_intermediates=True)
                          )(params, images)
    assert sorted(out) == ["encoded", "layers", "patches", "pre_logits"]
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    for name, want in want_out.items():
        np.testing.assert_allclose(out[name], want, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(logits, jax.jit(model.apply)({"params": params}, images))

    recorded, state = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                       mutable=["intermediates"]))(params, images)
    weights = stack_attention_weights(state["intermediates"]["encoder"])
    assert weights.shape == (2, 2, 2, 17, 17)  # [B, layers, heads, T, T]
    np.testing.assert_allclose(weights, want_weights, atol=1e-5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(recorded, want_logits, rtol=1e-4, atol=1e-4)
    maps = cls_attention_maps(model, params, images)
    np.testing.assert_allclose(maps, want_weights[:, :, :, 0, 1:].reshape(2, 2, 2, 4, 4),
                               atol=1e-5)


def test_recording_computes_the_attention_softmax_once():
    # One softmax per attention when the weights are recorded: the weights the output
    # is computed from, not a second dense pass beside the forward one.
    mha = tfx.MultiHeadAttention(num_heads=2)
    x = jnp.ones((1, 4, 8))
    variables = jax.eval_shape(mha.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v: mha.apply(v, x, mutable=["intermediates"]))(variables)
    exps = str(jaxpr).count(" exp ")
    assert exps == 1, f"{exps} exp ops in the recorded attention"


def test_transformer_intermediates_are_the_encoder_memory_and_decoder_states():
    model = tiny_transformer()
    source = np.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 2]], np.int32)
    target = np.array([[1, 5, 6, 0], [1, 9, 0, 0]], np.int32)
    params = random_params(model, source, target)
    logits, out = jax.jit(lambda p: model.apply({"params": p}, source, target,
                                                return_intermediates=True))(params)
    assert sorted(out) == ["decoder_layers", "encoded", "encoder_layers", "pre_logits"]
    assert out["encoder_layers"].shape == (2, 2, 5, 16)
    assert out["decoder_layers"].shape == (2, 2, 4, 16)
    # Post-LN stacks (the paper) have no final norm: the last layer is the stack's output.
    np.testing.assert_array_equal(out["encoder_layers"][-1], out["encoded"])
    np.testing.assert_array_equal(out["decoder_layers"][-1], out["pre_logits"])
    embedding = np.asarray(params["embedding"]["embedding"], np.float64)
    np.testing.assert_allclose(logits, np.asarray(out["pre_logits"], np.float64) @ embedding.T,
                               rtol=1e-5, atol=1e-5)  # shared embedding (sec. 3.4)
    np.testing.assert_array_equal(logits, jax.jit(model.apply)({"params": params}, source,
                                                              target))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_lm_intermediates_feed_the_final_norm_and_the_tied_embedding(scan_layers):
    model = tiny_lm(scan_layers=scan_layers)
    tokens = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], np.int32)
    params = random_params(model, tokens)
    logits, out = jax.jit(lambda p: model.apply({"params": p}, tokens,
                                                return_intermediates=True))(params)
    assert sorted(out) == ["layers", "pre_logits"] and out["layers"].shape == (2, 2, 5, 16)
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    last = np.asarray(out["layers"][-1], np.float64)
    np.testing.assert_allclose(out["pre_logits"], layer_norm(last, p["layers"]["final_norm"]),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, np.asarray(out["pre_logits"], np.float64) @
                               p["embedding"]["embedding"].T, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(logits, jax.jit(model.apply)({"params": params}, tokens))


# ---------------------------------------------------------------- named variants
def parameter_count(model, *inputs) -> int:
    """Counted from shapes only (jax.eval_shape): no memory for the weights."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def vit_formula(d, layers, mlp, patch, image=224, channels=3, classes=1000):
    """ViT parameters from the architecture (Dosovitskiy et al. sec. 3.1)."""
    tokens = (image // patch) ** 2 + 1
    block = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 2 * 2 * d
    return (patch * patch * channels * d + d) + d + tokens * d + layers * block + 2 * d + \
        (d * classes + classes)


@pytest.mark.parametrize("name,size,paper_millions", [
    ("Ti/16", (192, 12, 768), 5), ("S/16", (384, 12, 1536), 22),  # DeiT, Table 1
    ("B/16", (768, 12, 3072), 86), ("L/32", (1024, 24, 4096), 307),  # ViT, Table 1
    ("H/14", (1280, 32, 5120), 632), ("L/16", (1024, 24, 4096), None)])
def test_vit_presets_have_the_papers_parameter_counts(name, size, paper_millions):
    cfg = tfx.ViTConfig.preset(name, scan_layers=True)  # one traced layer: fast
    assert (cfg.d_model, cfg.num_layers, cfg.d_ff, cfg.patch_size) == (*size, int(name[-2:]))
    count = parameter_count(tfx.ViT(cfg), jnp.zeros((1, 224, 224, 3)))
    assert count == vit_formula(*size, patch=cfg.patch_size)
    if paper_millions is not None:  # the papers print whole millions
        assert abs(count - paper_millions * 1e6) < 1e6, count
    else:  # ViT-L/16: 304.3M; Table 1's 307M is the L/32 count
        assert round(count / 1e5) == 3043


def test_vit_preset_takes_overrides_and_names_a_bad_name():
    cfg = tfx.ViTConfig.preset("B/32", image_size=64, num_classes=10)
    assert (cfg.patch_size, cfg.image_size, cfg.num_classes, cfg.num_heads) == (32, 64, 10, 12)
    for bad in ("B", "X/16", "B/x"):
        with pytest.raises(ValueError, match="ViT preset must be '<size>/<patch>'"):
            tfx.ViTConfig.preset(bad)


def transformer_formula(d, ff, vocab, layers=6):
    """Encoder-decoder parameters from the architecture (Vaswani et al. sec. 3)."""
    attention, ffn, norm = 4 * (d * d + d), d * ff + ff + ff * d + d, 2 * d
    encoder = attention + ffn + 2 * norm
    decoder = 2 * attention + ffn + 3 * norm
    return layers * (encoder + decoder) + vocab * d  # one shared embedding, no final norm


def test_transformer_presets_have_the_papers_parameter_counts():
    counts = {}
    for name, d, ff, paper in (("base", 512, 2048, 65e6), ("big", 1024, 4096, 213e6)):
        cfg = tfx.TransformerConfig.preset(name, scan_layers=True)
        assert (cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.pre_norm) == (d, ff, 37000, False)
        tokens = jnp.zeros((1, 8), jnp.int32)
        counts[name] = parameter_count(tfx.Transformer(cfg), tokens, tokens)
        assert counts[name] == transformer_formula(d, ff, 37000)
        assert abs(counts[name] - paper) / paper < 0.03  # 63.1M / 214.2M
    # Table 3's 65M and 213M need vocabularies that do not overlap (base >= 39.7k tokens,
    # big < 36.3k): no one shared vocabulary reproduces both printed counts.
    base_needs = (64.5e6 - transformer_formula(512, 2048, 0)) / 512
    big_allows = (213.5e6 - transformer_formula(1024, 4096, 0)) / 1024
    assert big_allows < 37000 < base_needs
    assert tfx.TransformerConfig.preset("big").dropout_rate == 0.3
    assert tfx.TransformerConfig.preset("base", vocab_size=100).vocab_size == 100
    with pytest.raises(ValueError, match="Transformer preset must be one of"):
        tfx.TransformerConfig.preset("large")


# ---------------------------------------------------------------- Flax NNX
def to_nnx(module: nn.Module, params, *inputs, **kwargs) -> nnx.Module:
    """The Linen ``module`` as an NNX module holding ``params`` (the README's recipe):
    variables shaped abstractly from the inputs (no initialisation), then filled."""
    model = nnx.eval_shape(lambda: nnx.bridge.lazy_init(
        nnx.bridge.ToNNX(module), *inputs, rngs=jax.random.key(0), **kwargs))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def nnx_cases():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 13, (2, 5)).astype(np.int32)
    target = rng.integers(1, 13, (2, 4)).astype(np.int32)
    images = rng.uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    return {"attention": (tfx.MultiHeadAttention(num_heads=2), (x,), {"causal": True}),
            "transformer": (tiny_transformer(num_encoder_layers=1, num_decoder_layers=1),
                            (tokens, target), {}),
            "vit": (tiny_vit(scan_layers=True), (images,), {}),
            "lm": (tiny_lm(), (tokens,), {})}


@pytest.mark.parametrize("name", ["attention", "transformer", "vit", "lm"])
def test_nnx_bridge_gives_the_linen_outputs_and_the_same_optimizer_step(name):
    module, inputs, kwargs = nnx_cases()[name]
    params = random_params(module, *inputs, **kwargs)
    model = to_nnx(module, params, *inputs, **kwargs)

    def loss(outputs):  # any scalar of the outputs; squares weigh every output element
        return jnp.mean(jnp.square(outputs)), outputs

    tx = optax.sgd(0.1, momentum=0.9)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        (value, outputs), grads = nnx.value_and_grad(lambda m: loss(m(*inputs, **kwargs)),
                                                     has_aux=True)(model)
        optimizer.update(model, grads)
        return value, outputs

    @jax.jit
    def linen_step(params):
        (value, outputs), grads = jax.value_and_grad(
            lambda p: loss(module.apply({"params": p}, *inputs, **kwargs)), has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return value, outputs, optax.apply_updates(params, updates)

    want_loss, want_outputs, want_params = linen_step(params)
    got_loss, got_outputs = nnx_step(model, optimizer)
    np.testing.assert_allclose(got_outputs, want_outputs, atol=1e-6)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want_params)
    moved = jax.tree_util.tree_map_with_path(
        lambda path, a, b: bool(np.any(a != b)) or jax.tree_util.keystr(path), got, params)
    # Every parameter took the step, but key biases: the softmax ignores a shift of all
    # of a query's scores, so their gradient is zero.
    assert [m for m in jax.tree.leaves(moved) if m is not True and "['key']['bias']" not in m] \
        == []


def test_nnx_module_composes_a_bridged_backbone_with_its_intermediates():
    images = np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)

    class Probe(nnx.Module):  # a linear probe on a ViT's pre-logits, written in NNX
        def __init__(self, rngs: nnx.Rngs):
            self.backbone = nnx.bridge.ToNNX(tiny_vit(), rngs=rngs)
            self.linear = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            _, out = self.backbone(x, return_intermediates=True)
            return self.linear(out["pre_logits"])

    model = nnx.jit(lambda: nnx.bridge.lazy_init(Probe(nnx.Rngs(0)), images))()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    _, out = jax.jit(lambda p: tiny_vit().apply({"params": p}, images,
                                                return_intermediates=True))(params["backbone"])
    want = np.asarray(out["pre_logits"]) @ params["linear"]["kernel"] + params["linear"]["bias"]
    np.testing.assert_allclose(nnx.jit(lambda m: m(images))(model), want, atol=1e-5)
    # Methods of a bridged module (here Transformer.encode) are its methods in NNX.
    transformer, (tokens, target), _ = nnx_cases()["transformer"]
    weights = random_params(transformer, tokens, target)
    bridged = to_nnx(transformer, weights, tokens, target)
    np.testing.assert_allclose(
        nnx.jit(lambda m: m.encode(tokens))(bridged),
        jax.jit(lambda p: transformer.apply({"params": p}, tokens, method="encode"))(weights),
        atol=1e-6)


def test_readme_section_runs():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Use the modules in your own JAX code"):]
    section = section[:section.index("\n## ", 3)]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))
    assert code.count('"Ti/16", image_size=32') == 1
    code = code.replace('"Ti/16", image_size=32', '"Ti/16", num_layers=2, image_size=32')  # fast
    namespace = {}
    exec(compile(code, "<README>", "exec"), namespace)
    weights = np.asarray(namespace["weights"])
    assert weights.shape == (2, 3, 5, 5)  # [B, heads, 4 patches + CLS, ...]
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert namespace["out"]["layers"].shape == (2, 2, 16, 64)
    assert np.isfinite(float(namespace["loss"]))
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), namespace["params"],
                         namespace["linen_params"])
    assert any(jax.tree.leaves(moved))


def test_a_run_loads_its_own_model_and_kernels_and_every_public_name_still_resolves():
    """``import tfx_jax`` is lazy (PEP 562): a translation run's imports leave out the ViT, the
    LM, the TPU and GPU kernels, the compile-only module and the checkpoint converters;
    ``tfx.X`` and ``from tfx_jax import X`` still give every exported name and submodule."""
    import subprocess
    import sys
    probe = (
        "import sys, tfx_jax as tfx\n"
        "assert [m for m in sys.modules if m.startswith('tfx_jax.')] == [], 'eager'\n"
        "import tfx_jax.apps.translation\n"
        "loaded = {m for m in sys.modules if m.startswith('tfx_jax')}\n"
        "unused = {'tfx_jax.vit', 'tfx_jax.lm', 'tfx_jax.attention_splash',\n"
        "          'tfx_jax.attention_cudnn', 'tfx_jax.train.topology', 'tfx_jax.pretrained',\n"
        "          'tfx_jax.data.number_words', 'tfx_jax.apps.classification'}\n"
        "assert not loaded & unused, sorted(loaded & unused)\n"
        "for name in tfx.__all__: getattr(tfx, name)\n"
        "for name in tfx._SUBMODULES: getattr(tfx, name)\n"
        "from tfx_jax import ViTConfig, decoding\n"
        "from tfx_jax import train as tr\n"
        "assert tr.compile_plan and tr.parse_target and 'compile_plan' in dir(tr)\n"
        "try:\n    tfx.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "module 'tfx_jax' has no attribute 'no_such_name'" in done.stdout
    assert sorted(tfx._SUBMODULES) == sorted(
        [p.stem for p in (root / "tfx_jax").glob("*.py") if p.stem != "__init__"]
        + [p.name for p in (root / "tfx_jax").iterdir() if (p / "__init__.py").exists()])
