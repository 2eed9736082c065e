"""Fine-tuning from released weights: LoRA, frozen parameters, the ViT script's init_from path."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tfx_jax as tfx
from tests.scripts import experiment_config, load_script
from tfx_jax import pretrained
from tfx_jax import train as tr
from tfx_jax.apps.classification import classification_task, load_classifier
from tfx_jax.train import finetune
from tfx_jax.train.finetune import FineTuning
from tfx_jax.train.finetune import count_parameters, mask_optimizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "pretrained"
NPZ = str(FIXTURES / "vit_vision_transformer.npz")


def leaves(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_lora_with_zero_b_is_the_base_model_and_merges_w_plus_scaled_ab():
    cfg, params = pretrained.load_vit_npz(NPZ)
    adapters = finetune.init_lora(jax.random.key(0), params, rank=4)
    adapted = sorted(jax.tree_util.keystr(p) for p, _ in
                     jax.tree_util.tree_flatten_with_path(adapters)[0] if "lora_a" in str(p))
    assert len(adapted) == 2 * 6  # q, k, v, out, wi, wo in each of 2 layers
    merged = finetune.merge_lora(params, adapters, alpha=8.0)
    base, out = leaves(params), leaves(merged)
    assert base.keys() == out.keys()
    for name in base:  # B = 0: bit for bit the pre-trained parameters
        assert base[name].tobytes() == out[name].tobytes(), name
    # With a non-zero B the kernel is W + (alpha / r) A B, checked in float64 per layout.
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                            adapters)
    merged = finetune.merge_lora(params, adapters, alpha=8.0)
    for module, shape in (("query", (32, 2, 16)), ("out", (2, 16, 32)), ("wi", (32, 64))):
        sub = "ffn" if module == "wi" else "self_attention"
        w = np.asarray(params["encoder"]["layer_1"][sub][module]["kernel"], np.float64)
        ad = adapters["encoder"]["layer_1"][sub][module]
        a, b = np.asarray(ad["lora_a"], np.float64), np.asarray(ad["lora_b"], np.float64)
        expected = w + (8.0 / 4) * (a @ b).reshape(shape)
        np.testing.assert_allclose(merged["encoder"]["layer_1"][sub][module]["kernel"],
                                   expected, rtol=1e-5, atol=1e-5)


def test_lora_on_scanned_fused_layers_keeps_the_layer_axis():
    cfg = tfx.CausalLMConfig(vocab_size=16, max_len=8, d_model=16, num_heads=2, num_layers=3,
                             d_ff=32, scan_layers=True, fused_qkv=True)
    shapes = jax.eval_shape(lambda: tfx.CausalLM(cfg).init(jax.random.key(0),
                                                           jnp.ones((1, 8), jnp.int32)))
    adapters = finetune.init_lora(jax.random.key(1), shapes["params"], rank=2)
    qkv = adapters["layers"]["layers"]["self_attention"]["qkv"]
    assert qkv["lora_a"].shape == (3, 16, 2) and qkv["lora_b"].shape == (3, 2, 3 * 16)
    with pytest.raises(ValueError, match="LoRA rank must be a positive int"):
        finetune.init_lora(jax.random.key(1), shapes["params"], rank=0)
    with pytest.raises(ValueError, match=r"LoRA targets \['embedding'\]"):
        finetune.init_lora(jax.random.key(1), shapes["params"], rank=2, targets=("embedding",))


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_frozen_parameters_do_not_change_after_a_step(mode):
    cfg, params = pretrained.load_vit_npz(NPZ, num_classes=3)
    # a non-zero head, so that gradients reach the backbone (and the adapters)
    params["head"]["kernel"] = np.random.default_rng(1).normal(size=(32, 3)).astype(np.float32)
    finetuning = FineTuning(mode=mode, lora_rank=2)
    task = classification_task(cfg, finetuning=finetuning, pretrained_params=params)
    state = task.init_params(jax.random.key(0))
    optimizer = mask_optimizer(optax.adamw(1e-2, weight_decay=0.1), task.trainable)
    opt_state = optimizer.init(state)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
             "label": np.array([0, 1, 2, 1], np.int32), "valid": np.ones(4, bool)}

    @jax.jit
    def step(state, opt_state):
        grads, _ = jax.grad(task.loss_fn, has_aux=True)(state, batch, jax.random.key(1), True)
        updates, _ = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates)

    new = step(state, opt_state)
    before, after = leaves(state), leaves(new)
    mask = leaves(task.trainable(state))
    changed = {name for name in before if before[name].tobytes() != after[name].tobytes()}
    trained = {name for name in mask if mask[name]}
    assert changed and changed <= trained
    assert all("head" in name or "lora" in name for name in trained)
    if mode == "lora":  # B moved off zero: the adapters are training
        assert any("lora_b" in name for name in changed)
    total = count_parameters(state)
    assert 0 < count_parameters(state, task.trainable(state)) < total


@pytest.mark.slow
def test_vit_script_finetunes_a_checkpoint_with_lora_on_digits(tmp_path, capsys):
    script = load_script(str(ROOT / "experiments" / "vit.py"), "vit_experiment")
    config = experiment_config("vit")
    config.update(dict(init_from=NPZ, finetune="lora", lora_rank=2, data_dir=str(tmp_path / "d"),
                       batch_size=16, num_epochs=0, num_train_steps=2, warmup_steps=1,
                       eval_every_epochs=0, eval_every_steps=0, checkpoint_every_steps=0,
                       log_every_steps=1, progress_bar=False, augment=False))
    workdir = str(tmp_path / "run")
    result = script.train(config, workdir, mesh=tr.make_data_mesh(jax.devices()[:1]))
    err = capsys.readouterr().err
    # LoRA rank 2 on 6 kernels x 2 layers + the new 32 x 10 head
    per_layer = 2 * (32 + 32) * 3 + 2 * (32 + 32) + 2 * (32 + 64) + 2 * (64 + 32)
    assert f"parameters: {2 * per_layer + 32 * 10 + 10:,} trainable of" in err
    assert np.isfinite(result.train_metrics["loss"])
    # the backbone is the checkpoint's (gray digits: the RGB patch kernel summed over channels)
    _, params = pretrained.load_vit_npz(NPZ)
    final = result.state.params["model"]
    np.testing.assert_array_equal(final["patch_embedding"]["kernel"],
                                  params["patch_embedding"]["kernel"].sum(2, keepdims=True))
    np.testing.assert_array_equal(final["encoder"]["layer_1"]["ffn"]["wo"]["kernel"],
                                  params["encoder"]["layer_1"]["ffn"]["wo"]["kernel"])
    # the run's config.json rebuilds the fine-tuned classifier (LoRA merged)
    classifier = load_classifier(workdir)
    assert classifier.image_shape == (16, 16, 1)
    labels, probs = classifier.predict(np.zeros((2, 16, 16, 1), np.float32))
    assert labels.shape == (2,) and np.all((probs > 0) & (probs <= 1))
