"""Llama, Mistral, Qwen2/3 and Gemma 1/2/3 checkpoints in and out, against transformers.

The fixtures (tests/fixtures/pretrained/decoders, written by
make_decoder_fixtures.py beside them) are tiny random models saved by
transformers with its float32 logits and greedy tokens; nothing here imports
torch or transformers.
"""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import tfx_jax as tfx
from tfx_jax import decoding, pretrained
from tfx_jax.errors import UserError
from tfx_jax.lm import PRESETS
from tfx_jax.pretrained import hf_decoders

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "pretrained" / "decoders"
GOLDEN = dict(np.load(FIXTURES / "golden.npz"))
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def loaded():
    return {family: pretrained.load_hf(str(FIXTURES / family)) for family in FAMILIES}


def logits_of(cfg, params, tokens, **changes):
    cfg = cfg.replace(attention_implementation="dense", **changes)
    return np.asarray(jax.jit(tfx.CausalLM(cfg).apply)({"params": params}, jnp.asarray(tokens)))


def relative_error(logits, family):
    ref = GOLDEN[f"{family}/logits"]
    return np.abs(logits - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(loaded, family):
    cfg, params = loaded[family]
    logits = logits_of(cfg, params, GOLDEN[f"{family}/tokens"])
    assert relative_error(logits, family) <= 1e-5


def read_fixture_tensors(family):
    tensors = {}
    for path in sorted((FIXTURES / family).glob("*.safetensors")):
        tensors.update({k: np.asarray(v, np.float32) for k, v in load_file(path).items()})
    return tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_writes_the_checkpoint_back_tensor_by_tensor(loaded, family, tmp_path):
    cfg, params = loaded[family]
    pretrained.save_hf(cfg, params, str(tmp_path), max_shard_bytes=100_000)
    written = read_fixture_tensors(family)
    saved = {}
    for path in sorted(tmp_path.glob("*.safetensors")):
        saved.update(load_file(path))
    assert sorted(saved) == sorted(written)
    for name, value in written.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
    assert (tmp_path / "model.safetensors.index.json").is_file()  # > 100 kB: sharded
    config = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((FIXTURES / family / "config.json").read_text())
    assert config["architectures"] == original["architectures"]
    assert pretrained.load_hf(str(tmp_path))[0] == cfg


def test_hub_style_rope_keys_read_as_transformers_5_keys(loaded, tmp_path):
    """The Hub's config.json spells rope settings rope_theta / rope_scaling /
    rope_local_base_freq; transformers 5 writes rope_parameters: same config."""
    for family in ("llama", "gemma3"):
        directory = tmp_path / family
        shutil.copytree(FIXTURES / family, directory)
        config = json.loads((directory / "config.json").read_text())
        rope = config.pop("rope_parameters")
        if family == "gemma3":
            full, local = rope["full_attention"], rope["sliding_attention"]
            config.update(rope_theta=full.pop("rope_theta"), rope_scaling=full,
                          rope_local_base_freq=local["rope_theta"])
        else:
            config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
        (directory / "config.json").write_text(json.dumps(config))
        assert pretrained.load_hf(str(directory))[0] == loaded[family][0]


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_the_sliding_window_changes_the_logits(loaded, family):
    cfg, params = loaded[family]
    tokens = GOLDEN[f"{family}/tokens"]
    assert cfg.sliding_window == 5 and tokens.shape[1] > 5
    unwindowed = logits_of(cfg, params, tokens, sliding_window=None, layer_types=None)
    assert relative_error(unwindowed, family) > 1e-2
    assert relative_error(logits_of(cfg, params, tokens), family) <= 1e-5


def test_llama3_rope_scaling_past_the_original_context(loaded):
    cfg, params = loaded["llama"]
    scaling = dict(cfg.rope_scaling)
    tokens = GOLDEN["llama/tokens"]
    past = tokens.shape[1] > 2 * scaling["original_max_position_embeddings"]
    assert scaling["rope_type"] == "llama3" and past
    logits = logits_of(cfg, params, tokens)
    late = slice(scaling["original_max_position_embeddings"], None)
    ref = GOLDEN["llama/logits"]
    assert np.abs(logits[:, late] - ref[:, late]).max() <= 1e-5 * np.abs(ref).max()
    unscaled = logits_of(cfg, params, tokens, rope_scaling=None)
    assert np.abs(unscaled[:, late] - ref[:, late]).max() > 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_greedy_decoding_with_the_cache_gives_transformers_tokens(loaded, family):
    cfg, params = loaded[family]
    expected = GOLDEN[f"{family}/generated"]
    prompt = jnp.asarray(expected[:, :6])
    steps = expected.shape[1] - prompt.shape[1]
    decoder = tfx.CausalLM(cfg.replace(decode=True, attention_implementation="dense"))
    cache = decoder.init(jax.random.key(0), jnp.zeros((2, expected.shape[1]), jnp.int32))["cache"]

    def step(tokens, cache, **kwargs):
        logits, mutated = decoder.apply({"params": params, "cache": cache}, tokens,
                                        mutable=["cache"], **kwargs)
        return logits, mutated["cache"]

    out = jax.jit(lambda c, p: decoding.sample(step, c, p, steps, temperature=0.0))(cache, prompt)
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_preset_parameter_counts_equal_transformers():
    counts = json.loads((FIXTURES / "param_counts.json").read_text())
    assert sorted(counts) == sorted(PRESETS)

    def count(cfg):
        shapes = jax.eval_shape(lambda: tfx.CausalLM(cfg).init(
            jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
        return sum(x.size for x in jax.tree.leaves(shapes))

    for name, expected in counts.items():
        cfg = tfx.CausalLMConfig.preset(name)
        # Every layer has the same parameters (a window or rope base adds none): tracing
        # 1 and 2 layers gives the embedding/head and the per-layer count in seconds.
        one, two = (count(cfg.replace(num_layers=n, layer_types=None)) for n in (1, 2))
        assert one + (cfg.num_layers - 1) * (two - one) == expected, name
    assert count(tfx.CausalLMConfig.preset("gemma3-1b")) == counts["gemma3-1b"]  # all 26


def test_mesh_loading_places_each_block_and_equals_host_loading(loaded):
    import tfx_jax.train as tr
    mesh = tr.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    cfg, params = pretrained.load_hf(str(FIXTURES / "mistral"), mesh=mesh)
    host = loaded["mistral"][1]
    query = params["layers"]["layer_0"]["self_attention"]["query"]["kernel"]
    blocks = {tuple((i.start, i.stop) for i in s.index) for s in query.addressable_shards}
    assert len(blocks) == 8  # split 4 (embed) x 2 (heads)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(host)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # GPT-2 checkpoints are read whole, then placed the same way (lm.py loads with a mesh)
    gpt2 = str(FIXTURES.parent / "hf_gpt2")
    placed = pretrained.load_hf(gpt2, mesh=tr.make_mesh({"data": 1, "fsdp": 8}))[1]
    kernel = placed["layers"]["layer_0"]["ffn"]["wi"]["kernel"]
    assert len({tuple((i.start, i.stop) for i in s.index) for s in kernel.addressable_shards}) > 1
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(pretrained.load_hf(gpt2)[1])):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_read_block_of_each_layout_is_that_block_of_the_whole_tensor():
    rng = np.random.default_rng(0)
    for layout, shape in (("t", (6, 4)), ("heads_in", (6, 4, 8)), ("heads_out", (4, 8, 6)),
                          ("head_bias", (4, 8)), ("head_vec", (8,))):
        spec = hf_decoders.Spec("x", "x", layout, shape,
                                rope=layout in ("heads_in", "head_bias", "head_vec"))
        hf = rng.normal(size=spec.hf_shape).astype(np.float32)
        whole = hf_decoders.read_block(spec, lambda index: hf[index])
        np.testing.assert_array_equal(hf_decoders.to_hf(spec, whole), hf)
        index = tuple(slice(s // 2, s) for s in shape)
        np.testing.assert_array_equal(
            hf_decoders.read_block(spec, lambda i: hf[i], index), whole[index])


def edited(tmp_path, family, edit=None, remove=None):
    directory = tmp_path / family
    shutil.copytree(FIXTURES / family, directory)
    if edit:
        config = json.loads((directory / "config.json").read_text())
        edit(config)
        (directory / "config.json").write_text(json.dumps(config))
    if remove:
        (directory / remove).unlink()
    return str(directory)


@pytest.mark.parametrize("problem,match", [
    (lambda d: edited(d, "llama", remove="config.json"), "no config.json"),
    (lambda d: edited(d, "llama", edit=lambda c: c.update(architectures=["MambaForCausalLM"],
                                                         model_type="mamba")),
     "MambaForCausalLM.*is not supported"),
    (lambda d: edited(d, "llama", edit=lambda c: c["rope_parameters"].update(rope_type="yarn")),
     "rope type 'yarn' is not supported"),
    (lambda d: edited(d, "qwen2", edit=lambda c: c.update(intermediate_size=96)),
     r"mlp.gate_proj.weight' has shape \(128, 64\), config.json implies \(96, 64\)"),
    (lambda d: edited(d, "mistral", remove="model-00003-of-00006.safetensors"),
     "names shard model-00003-of-00006.safetensors, which is not in"),
    (lambda d: edited(d, "llama", edit=lambda c: c.update(attention_bias=True)),
     "attention_bias=True"),
])
def test_bad_checkpoints_are_refused_in_one_line_before_any_tensor_is_read(
        tmp_path, monkeypatch, problem, match):
    directory = problem(tmp_path)
    read = []
    monkeypatch.setattr(pretrained.hf_files.LazyCheckpoint, "block",
                        lambda self, name, index: read.append(name))
    with pytest.raises(UserError, match=match) as error:
        pretrained.load_hf(directory)
    assert "\n" not in str(error.value) and not read


def test_save_hf_refuses_a_config_its_family_cannot_express(loaded, tmp_path):
    cfg, params = loaded["llama"]
    with pytest.raises(UserError, match="no LlamaForCausalLM equivalent: sandwich_norm=True"):
        pretrained.save_hf(cfg.replace(sandwich_norm=True, use_bias=False), params,
                           str(tmp_path))


def test_soft_capped_chunked_attention_equals_dense_with_gradients():
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (3.0 * jax.random.normal(key, (1, 16, 2, 8)) for key in keys)

    def loss(implementation):
        return lambda q, k, v: jnp.sum(jnp.sin(tfx.dot_product_attention(
            q, k, v, causal=True, logit_soft_cap=2.0, local_window=(5, None),
            implementation=implementation, block_q=8, block_kv=8)))

    dense = jax.jit(jax.value_and_grad(loss("dense"), argnums=(0, 1, 2)))(q, k, v)
    chunked = jax.jit(jax.value_and_grad(loss("chunked"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    uncapped = tfx.dot_product_attention(q, k, v, causal=True, implementation="dense")
    capped = tfx.dot_product_attention(q, k, v, causal=True, logit_soft_cap=2.0,
                                       implementation="dense")
    assert np.abs(np.asarray(uncapped - capped)).max() > 1e-2
    with pytest.raises(ValueError, match="takes no logit_soft_cap"):  # splash takes it (TPU)
        tfx.dot_product_attention(q, k, v, logit_soft_cap=2.0, implementation="cudnn")


def test_checkpoint_tokenizer_and_its_special_ids():
    tokenizer = pretrained.load_tokenizer(str(FIXTURES / "llama"))
    config = json.loads((FIXTURES / "llama" / "config.json").read_text())
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        config["bos_token_id"], config["eos_token_id"], config["pad_token_id"])
    text = "the lazy fox rotates keys"
    ids = tokenizer.encode(text, add_bos=True)
    assert ids[0] == tokenizer.bos_id and tokenizer.bos_id not in ids[1:]
    assert ids == tokenizer.tokenizer.encode(text).ids  # the file's own BOS post-processor
    assert tokenizer.decode(ids) == text and max(ids) < config["vocab_size"]
    with pytest.raises(UserError, match="no tokenizer.json"):
        pretrained.load_tokenizer(str(FIXTURES / "qwen2"))


def test_lora_adapts_every_projection_of_a_gated_decoder(loaded):
    from tfx_jax.train import finetune
    cfg, params = loaded["llama"]
    adapters = finetune.init_lora(jax.random.key(0), params, rank=2)
    adapted = set(adapters["layers"]["layer_0"]["self_attention"]) | set(
        adapters["layers"]["layer_0"]["ffn"])
    assert adapted == {"query", "key", "value", "out", "wi_0", "wi_1", "wo"}
    merged = finetune.merge_lora(params, adapters, alpha=4.0)  # B = 0: the same model
    tokens = GOLDEN["llama/tokens"]
    assert relative_error(logits_of(cfg, merged, tokens), "llama") <= 1e-5


def test_lm_generate_straight_from_a_checkpoint_directory(loaded, tmp_path, capsys):
    """experiments/lm.py --generate --config.init_from=HF_DIR: the checkpoint's tokenizer and
    special ids, greedy tokens = argmax of full forward passes (no cache)."""
    import ml_collections
    from tfx_jax.apps.language_model import experiment
    config = ml_collections.ConfigDict(dict(
        init_from=str(FIXTURES / "llama"), temperature=0.0, top_k=0, top_p=1.0,
        num_generate_tokens=4, num_samples=1, sample_seed=0))
    prompts = ["the quick brown", "keys"]
    samples = experiment.generate(config, str(tmp_path / "unused"), prompts)
    cfg, params = loaded["llama"]
    tokenizer = pretrained.load_tokenizer(str(FIXTURES / "llama"))
    forward = jax.jit(lambda t: tfx.CausalLM(cfg).apply({"params": params}, t))
    for prompt, (text,) in zip(prompts, samples):
        ids = tokenizer.encode(prompt, add_bos=True)
        for _ in range(4):  # right padding is invisible to earlier positions (causal)
            padded = np.zeros((1, 16), np.int32)
            padded[0, :len(ids)] = ids
            ids.append(int(np.argmax(forward(jnp.asarray(padded))[0, len(ids) - 1])))
            if ids[-1] == tokenizer.eos_id:
                ids.pop()
                break
        assert text == tokenizer.decode(ids[1:])
    assert f"--- sample 1 of {prompts[0]!r}" in capsys.readouterr().out


def test_save_hf_of_a_config_built_by_hand(tmp_path):
    """Defaults left implicit (num_kv_heads, head_dim, layer_types) still save and load back."""
    cfg = tfx.CausalLMConfig(vocab_size=64, num_layers=2, max_len=32, d_model=16, num_heads=2,
                             d_ff=32, position="rope", norm="rms_norm", mlp="gated",
                             activation="silu", use_bias=False, sliding_window=4)
    params = tfx.CausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    pretrained.save_hf(cfg, params, str(tmp_path))
    back, back_params = pretrained.load_hf(str(tmp_path))
    tokens = jnp.arange(12)[None] % 64
    np.testing.assert_array_equal(logits_of(back, back_params, tokens),
                                  logits_of(cfg, params, tokens))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "MistralForCausalLM"]
