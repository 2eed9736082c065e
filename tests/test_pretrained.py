"""Pretrained checkpoints: golden logits of reference implementations, round trips, bad files.

The fixtures in tests/fixtures/pretrained/ were written and scored by timm and
transformers (make_fixtures.py); these tests need neither.
"""
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tfx_jax as tfx
from tfx_jax import pretrained

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "pretrained"
GOLDEN = dict(np.load(FIXTURES / "golden.npz"))
TOL = dict(rtol=1e-5, atol=1e-5)


def vit_logits(cfg, params, images=None):
    images = GOLDEN["images"] if images is None else images
    return np.asarray(tfx.ViT(cfg).apply({"params": params}, images))


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def assert_bitwise_equal(a, b):
    a, b = flat(a), flat(b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


# --- golden logits ---------------------------------------------------------------------------

def test_vision_transformer_npz_with_pre_logits_matches_timm():
    cfg, params = pretrained.load_vit_npz(str(FIXTURES / "vit_vision_transformer.npz"))
    assert (cfg.image_size, cfg.patch_size, cfg.d_model, cfg.num_heads, cfg.num_layers,
            cfg.d_ff, cfg.pool, cfg.representation_size, cfg.num_classes) == \
        (16, 4, 32, 2, 2, 64, "cls", 24, 5)
    assert (cfg.activation, cfg.layer_norm_epsilon) == ("gelu", 1e-6)
    np.testing.assert_allclose(vit_logits(cfg, params), GOLDEN["vit_vision_transformer_logits"],
                               **TOL)


def test_big_vision_npz_scanned_gap_matches_timm_in_both_layer_layouts():
    cfg, params = pretrained.load_vit_npz(str(FIXTURES / "vit_big_vision.npz"))
    assert (cfg.pool, cfg.representation_size, cfg.num_layers) == ("gap", None, 2)
    expected = GOLDEN["vit_big_vision_logits"]
    np.testing.assert_allclose(vit_logits(cfg, params), expected, **TOL)
    scanned = pretrained.to_scan(params, "encoder", cfg.num_layers)
    np.testing.assert_allclose(vit_logits(cfg.replace(scan_layers=True), scanned), expected,
                               **TOL)


def test_hf_vit_classifier_matches_transformers():
    cfg, params = pretrained.load_hf(str(FIXTURES / "hf_vit_classifier"))
    assert (cfg.activation, cfg.layer_norm_epsilon, cfg.num_classes) == ("gelu_exact", 1e-12, 5)
    np.testing.assert_allclose(vit_logits(cfg, params), GOLDEN["hf_vit_classifier_logits"],
                               **TOL)


def test_hf_vit_model_pooler_is_the_representation_layer():
    cfg, params = pretrained.load_hf(str(FIXTURES / "hf_vit_model"))
    assert cfg.representation_size == 32 and not params["head"]["kernel"].any()
    # An identity head exposes the pooled (pre_logits) vector as the logits.
    cfg = cfg.replace(num_classes=32)
    params = {**params, "head": {"kernel": np.eye(32, dtype=np.float32),
                                 "bias": np.zeros(32, np.float32)}}
    np.testing.assert_allclose(vit_logits(cfg, params), GOLDEN["hf_vit_model_pooled"], **TOL)


def test_hf_gpt2_matches_transformers_with_and_without_scan():
    cfg, params = pretrained.load_hf(str(FIXTURES / "hf_gpt2"))
    assert (cfg.activation, cfg.layer_norm_epsilon, cfg.tie_embeddings, cfg.max_len) == \
        ("gelu", 1e-5, True, 16)
    tokens = GOLDEN["tokens"].astype(np.int32)
    logits = tfx.CausalLM(cfg).apply({"params": params}, tokens)
    np.testing.assert_allclose(logits, GOLDEN["hf_gpt2_logits"], **TOL)
    scanned = pretrained.to_scan(params, "layers", cfg.num_layers)
    logits = tfx.CausalLM(cfg.replace(scan_layers=True)).apply({"params": scanned}, tokens)
    np.testing.assert_allclose(logits, GOLDEN["hf_gpt2_logits"], **TOL)


# --- save_hf ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hf_gpt2", "hf_vit_classifier"])
def test_save_hf_writes_the_reference_files_tensors_and_round_trips_bitwise(name, tmp_path):
    cfg, params = pretrained.load_hf(str(FIXTURES / name))
    pretrained.save_hf(cfg, params, str(tmp_path))
    cfg2, params2 = pretrained.load_hf(str(tmp_path))
    assert cfg2 == cfg
    assert_bitwise_equal(params2, params)
    # The same tensors, bit for bit, as transformers' own save_pretrained wrote.
    ours, theirs = load_file(tmp_path / "model.safetensors"), \
        load_file(FIXTURES / name / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].tobytes() == theirs[key].tobytes() and \
            ours[key].shape == theirs[key].shape, key


@pytest.mark.parametrize("model_kind", ["lm", "vit"])
def test_save_hf_accepts_scanned_and_fused_parameters(model_kind, tmp_path):
    if model_kind == "lm":
        cfg = tfx.CausalLMConfig(vocab_size=20, max_len=8, d_model=16, num_heads=2,
                                 num_layers=2, d_ff=32, scan_layers=True, fused_qkv=True)
        model, dummy, stack = tfx.CausalLM(cfg), jnp.ones((1, 8), jnp.int32), "layers"
    else:
        cfg = tfx.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_classes=3,
                            d_model=16, num_heads=2, num_layers=2, d_ff=32, scan_layers=True,
                            fused_qkv=True, activation="gelu_exact")
        model, dummy, stack = tfx.ViT(cfg), jnp.zeros((1, 8, 8, 3)), "encoder"
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    pretrained.save_hf(cfg, params, str(tmp_path))
    loaded_cfg, loaded = pretrained.load_hf(str(tmp_path))
    assert loaded_cfg.scan_layers is False and loaded_cfg.fused_qkv is False
    reference = loaded_cfg.replace(scan_layers=True, fused_qkv=True)
    back = pretrained.to_scan(loaded, stack, cfg.num_layers)
    attn = back[stack]["layers"]["self_attention"]
    for part in ("kernel", "bias"):
        axis = 2 if part == "kernel" else 1  # [layers, D, 3, N, H] / [layers, 3, N, H]
        attn["qkv"] = dict(attn.get("qkv", {}))
        attn["qkv"][part] = np.stack([attn[p][part] for p in ("query", "key", "value")], axis)
    for p in ("query", "key", "value"):
        del attn[p]
    assert_bitwise_equal(back, params)
    assert reference == cfg.replace(dropout_rate=loaded_cfg.dropout_rate,
                                    attention_dropout_rate=loaded_cfg.attention_dropout_rate)


def test_save_hf_names_what_the_target_cannot_express(tmp_path):
    cfg = tfx.ViTConfig(image_size=8, patch_size=4, num_classes=3, d_model=16, num_heads=2,
                        num_layers=1, d_ff=32, pool="gap")
    with pytest.raises(ValueError, match=r"pool='gap'"):
        pretrained.save_hf(cfg, {}, str(tmp_path))
    lm = tfx.CausalLMConfig(vocab_size=10, d_model=16, num_heads=2, num_layers=1, d_ff=32,
                            tie_embeddings=False)
    with pytest.raises(ValueError, match="tie_embeddings=False"):
        pretrained.save_hf(lm, {}, str(tmp_path))
    with pytest.raises(TypeError, match="TransformerConfig"):
        pretrained.save_hf(tfx.TransformerConfig(vocab_size=10), {}, str(tmp_path))


# --- fine-tuning options: new head, new resolution --------------------------------------------

def bilinear_matrix(n_in, n_out):
    """[n_out, n_in] weights of half-pixel bilinear resampling; a triangle filter widened by
    n_in / n_out when shrinking (anti-aliasing), normalised per output (float64 NumPy)."""
    scale = n_in / n_out
    support = max(1.0, scale)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale - 0.5
        w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in) - center) / support)
        weights[i] = w / w.sum()
    return weights


@pytest.mark.parametrize("new_grid", [6, 3])
def test_position_embedding_resize_keeps_cls_and_matches_numpy_bilinear(new_grid):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(1 + 16, 8)).astype(np.float32)
    out = pretrained.resize_position_embedding(table, new_grid)
    assert out.shape == (1 + new_grid ** 2, 8)
    np.testing.assert_array_equal(out[0], table[0])
    w = bilinear_matrix(4, new_grid)
    expected = np.einsum("ij,kl,jlc->ikc", w, w, table[1:].reshape(4, 4, 8).astype(np.float64))
    np.testing.assert_allclose(out[1:], expected.reshape(-1, 8), rtol=1e-5, atol=1e-6)


def test_load_vit_npz_new_head_and_image_size():
    cfg0, params0 = pretrained.load_vit_npz(str(FIXTURES / "vit_vision_transformer.npz"))
    cfg, params = pretrained.load_vit_npz(str(FIXTURES / "vit_vision_transformer.npz"),
                                          num_classes=7, image_size=24)
    assert (cfg.num_classes, cfg.representation_size, cfg.image_size) == (7, None, 24)
    assert "pre_logits" not in params and params["head"]["kernel"].shape == (32, 7)
    assert not params["head"]["kernel"].any() and not params["head"]["bias"].any()
    table0, table = params0["position"]["embedding"], params["position"]["embedding"]
    assert table.shape == (1 + 36, 32)
    np.testing.assert_array_equal(table[0], table0[0])
    np.testing.assert_array_equal(params["encoder"]["layer_1"]["ffn"]["wi"]["kernel"],
                                  params0["encoder"]["layer_1"]["ffn"]["wi"]["kernel"])
    logits = jax.eval_shape(  # the model takes the new size (shapes only)
        lambda p: tfx.ViT(cfg).apply({"params": p}, jnp.zeros((2, 24, 24, 3))), params)
    assert logits.shape == (2, 7)
    # a gap model has no [CLS]: every row is a patch
    cfg, params = pretrained.load_vit_npz(str(FIXTURES / "vit_big_vision.npz"), image_size=8)
    assert params["position"]["embedding"].shape == (4, 32)


def test_hf_vit_new_head():
    cfg, params = pretrained.load_hf(str(FIXTURES / "hf_vit_classifier"), num_classes=3)
    assert cfg.num_classes == 3 and not params["head"]["kernel"].any()


# --- bad files -------------------------------------------------------------------------------

def edited_npz(tmp_path, source, edit):
    arrays = dict(np.load(FIXTURES / source))
    edit(arrays)
    path = tmp_path / "edited.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_missing_tensor_names_it_and_the_expected_shape(tmp_path):
    name = "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"
    path = edited_npz(tmp_path, "vit_vision_transformer.npz", lambda a: a.pop(name))
    with pytest.raises(ValueError, match=rf"'{name}' is missing; expected shape \(64, 32\)"):
        pretrained.load_vit_npz(path)


def test_npz_wrong_shape_names_the_tensor_and_the_expected_shape(tmp_path):
    name = "Transformer/encoderblock_0/LayerNorm_2/bias"
    path = edited_npz(tmp_path, "vit_vision_transformer.npz",
                      lambda a: a.__setitem__(name, np.zeros(31, np.float32)))
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(31,\), expected \(32,\)"):
        pretrained.load_vit_npz(path)


def test_npz_of_another_model_is_refused(tmp_path):
    path = tmp_path / "resnet.npz"
    np.savez(path, **{"conv_root/kernel": np.zeros((7, 7, 3, 8), np.float32),
                      "head/kernel": np.zeros((8, 2), np.float32)})
    with pytest.raises(ValueError, match="ResNet stem"):
        pretrained.load_vit_npz(str(path))
    path = tmp_path / "other.npz"
    np.savez(path, **{"encoder/kernel": np.zeros((7, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'embedding/kernel' is missing \(the file has"):
        pretrained.load_vit_npz(str(path))
    path = edited_npz(tmp_path, "vit_vision_transformer.npz",
                      lambda a: a.__setitem__("MAPHead_0/probe", np.zeros((1, 1, 32))))
    with pytest.raises(ValueError, match="multihead attention pooling"):
        pretrained.load_vit_npz(path)
    path = edited_npz(tmp_path, "vit_vision_transformer.npz",
                      lambda a: a.__setitem__("Transformer/encoderblock_0/extra/kernel",
                                              np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"encoderblock_0/extra/kernel'\] have no place"):
        pretrained.load_vit_npz(path)
    with pytest.raises(FileNotFoundError, match="no .npz checkpoint"):
        pretrained.load_vit_npz(str(tmp_path / "absent.npz"))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        pretrained.load_vit_npz(str(FIXTURES / "vit_big_vision.npz"), num_classes=0)


def test_npz_in_bfloat16_or_without_head(tmp_path):
    import ml_dtypes
    as_bf16 = lambda a: a.update({k: v.astype(ml_dtypes.bfloat16) for k, v in a.items()})  # noqa
    cfg, params = pretrained.load_vit_npz(edited_npz(tmp_path, "vit_big_vision.npz", as_bf16))
    stored = np.load(FIXTURES / "vit_big_vision.npz")["params/embedding/kernel"]
    np.testing.assert_array_equal(params["patch_embedding"]["kernel"],
                                  stored.astype(ml_dtypes.bfloat16).astype(np.float32))
    headless = edited_npz(tmp_path, "vit_big_vision.npz",
                          lambda a: [a.pop(f"params/head/{n}") for n in ("kernel", "bias")])
    with pytest.raises(ValueError, match="'head/kernel' is missing"):
        pretrained.load_vit_npz(headless)
    cfg, params = pretrained.load_vit_npz(headless, num_classes=4)
    assert params["head"]["kernel"].shape == (32, 4) and cfg.num_classes == 4


def copied_hf(tmp_path, name, edit_tensors=None, edit_config=None):
    directory = tmp_path / name
    shutil.copytree(FIXTURES / name, directory)
    if edit_tensors:
        tensors = load_file(directory / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((directory / "config.json").read_text())
        edit_config(config)
        (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def test_hf_missing_and_misshapen_tensors_are_named(tmp_path):
    name = "transformer.h.1.mlp.c_fc.weight"
    directory = copied_hf(tmp_path, "hf_gpt2", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"'h.1.mlp.c_fc.weight' is missing; expected shape "
                                         r"\(32, 128\)"):
        pretrained.load_hf(directory)
    name = "vit.encoder.layer.0.attention.attention.key.weight"
    directory = copied_hf(tmp_path, "hf_vit_classifier",
                          lambda t: t.__setitem__(name, np.zeros((32, 16), np.float32)))
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.attention.key.weight' has "
                                         r"shape \(32, 16\), expected \(32, 32\)"):
        pretrained.load_hf(directory)


def test_hf_gpt2_in_the_original_layout_unprefixed_with_mask_buffers(tmp_path):
    def original_layout(t):
        for key in list(t):
            t[key.replace("transformer.", "")] = t.pop(key)
        for i in range(2):
            t[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    cfg, params = pretrained.load_hf(str(FIXTURES / "hf_gpt2"))
    cfg2, params2 = pretrained.load_hf(copied_hf(tmp_path, "hf_gpt2", original_layout))
    assert cfg2 == cfg
    assert_bitwise_equal(params2, params)
    untied = copied_hf(tmp_path / "b", "hf_gpt2", lambda t: t.__setitem__(
        "lm_head.weight", t["transformer.wte.weight"] + 1))
    with pytest.raises(ValueError, match="'lm_head.weight' differs from 'wte.weight'"):
        pretrained.load_hf(untied)


def test_hf_bfloat16_safetensors_load_as_float32(tmp_path):
    import ml_dtypes
    from safetensors.flax import save_file as save_jax
    directory = copied_hf(tmp_path, "hf_vit_classifier")
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    save_jax({k: jnp.asarray(v, jnp.bfloat16) for k, v in tensors.items()},
             os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    cfg, params = pretrained.load_hf(directory)
    expected = tensors["classifier.weight"].astype(ml_dtypes.bfloat16).astype(np.float32).T
    np.testing.assert_array_equal(params["head"]["kernel"], expected)
    assert params["head"]["kernel"].dtype == np.float32


def test_hf_unknown_architecture_and_unsupported_options(tmp_path):
    directory = copied_hf(tmp_path, "hf_gpt2",
                          edit_config=lambda c: c.update(architectures=["MambaForCausalLM"],
                                                         model_type="mamba"))
    with pytest.raises(ValueError, match=r"architectures=\['MambaForCausalLM'\].*not supported"):
        pretrained.load_hf(directory)
    directory = copied_hf(tmp_path / "b", "hf_gpt2",
                          edit_config=lambda c: c.update(activation_function="silu"))
    with pytest.raises(ValueError, match="activation_function='silu'"):
        pretrained.load_hf(directory)
    os.remove(os.path.join(directory, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        pretrained.load_hf(directory)


# --- model options ---------------------------------------------------------------------------

def test_gelu_exact_is_the_erf_gelu():
    cfg = tfx.StackConfig(d_model=4, num_heads=1, d_ff=6, activation="gelu_exact",
                          use_bias=False)
    ffn = tfx.FeedForward(cfg)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    params = ffn.init(jax.random.key(0), x)["params"]
    h = x.astype(np.float64) @ np.asarray(params["wi"]["kernel"], np.float64)
    erf = np.vectorize(__import__("math").erf)
    expected = (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ np.asarray(params["wo"]["kernel"],
                                                                  np.float64)
    np.testing.assert_allclose(ffn.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


# --- the documented snippets run -------------------------------------------------------------

ROOT = FIXTURES.parent.parent.parent


def python_blocks(text):
    import re
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.slow
def test_readme_and_docs_snippets_run_and_cached_sampling_matches_full_forward(monkeypatch,
                                                                            tmp_path):
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Pretrained weights"):]
    section = section[:section.index("\n## ", 3)]
    blocks = python_blocks(section) + python_blocks((ROOT / "docs" / "pretrained.md").read_text())
    blocks = [b.replace("/tmp/tfx_gpt2", str(tmp_path / "gpt2")).replace(
        "/tmp/tfx_llama", str(tmp_path / "llama")) for b in blocks
              if "path, *," not in b  # the API summary is a signature, not code
              and "not run by the tests" not in b]
    assert len(blocks) >= 6
    namespace = {}
    for block in blocks:
        exec(compile(block, "<snippet>", "exec"), namespace)
    assert (tmp_path / "gpt2" / "model.safetensors").is_file()
    assert pretrained.load_hf(str(tmp_path / "llama"))[0] == namespace["lm_cfg"]
    assert namespace["lm_logits"].shape[-1] == namespace["lm_cfg"].vocab_size
    tokens, prompt = np.asarray(namespace["tokens"]), np.asarray(namespace["prompt"])
    assert tokens.shape == (2, 11) and (tokens[:, :3] == prompt).all()
    # greedy decoding through the cache == argmax of full forward passes (causal: pad freely)
    decoding, cfg, params = namespace["decoding"], namespace["cfg"], namespace["params"]
    greedy = np.asarray(decoding.sample(namespace["step_fn"], namespace["cache"], prompt,
                                        num_steps=8, temperature=0.0))
    forward = jax.jit(lambda t: tfx.CausalLM(cfg).apply({"params": params}, t))
    expected = np.ones((2, cfg.max_len), np.int32)
    expected[:, :3] = prompt
    for t in range(3, 11):
        expected[:, t] = np.asarray(forward(expected))[:, t - 1].argmax(-1)
    np.testing.assert_array_equal(greedy, expected[:, :11])


def test_the_lazy_package_imports_nothing_until_a_name_or_submodule_is_used():
    import subprocess
    import sys
    probe = (
        "import sys, tfx_jax.pretrained as p\n"
        "loaded = [m for m in sys.modules if m.startswith('tfx_jax.pretrained.')]\n"
        "assert not loaded, loaded\n"
        "assert p.hf_files.LazyCheckpoint and p.hf_decoders.to_hf and p.load_hf\n"
        "for name in p._SUBMODULES: getattr(p, name)\n"
        "try:\n    p.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "has no attribute 'no_such_name'" in done.stdout
    assert sorted(pretrained._SUBMODULES) == sorted(
        p.stem for p in pathlib.Path(pretrained.__file__).parent.glob("*.py")
        if p.stem != "__init__")
