"""experiments/lm.py from a Hugging Face checkpoint: LoRA on a prompt/response JSONL task.

The tiny Llama fixture (tests/fixtures/pretrained/decoders/llama, with its tokenizer.json) is
fine-tuned for a few steps; held-out losses, the loss mask and generation are checked against
computations written here (tokenizers' own encoding, a float64 log-softmax, argmax decoding).
"""
import contextlib
import io
import json
import pathlib
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from absl import flags

from tests.scripts import experiment_config
from tfx_jax import pretrained
from tfx_jax import train as tr
from tfx_jax.apps.language_model import experiment, pipeline
from tfx_jax.apps.language_model.task import make_loss_fn
from tfx_jax.errors import WorkdirError
from tfx_jax.lm import CausalLM

flags.FLAGS.mark_as_parsed()  # Grain reads absl flags
pytestmark = pytest.mark.slow  # end-to-end runs (small, still part of CI)

LLAMA = pathlib.Path(__file__).parent / "fixtures" / "pretrained" / "decoders" / "llama"
WORDS = ("apple", "river", "stone", "cloud", "green", "music", "table", "light")


def write_task(path, count=64, seed=0):
    """'repeat WORD N times:' -> ' WORD WORD ...' (N in 1..3)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            word, n = rng.choice(WORDS), rng.randint(1, 3)
            f.write(json.dumps({"prompt": f"repeat {word} {n} times:",
                                "response": " " + " ".join([word] * n)}) + "\n")
    return [json.loads(line) for line in open(path)]


def config_for(dataset, init_from, **overrides):
    config = experiment_config("lm")
    config.update(init_from=str(init_from), dataset=str(dataset), finetune="lora", max_len=48,
                  batch_size=8, eval_batch_size=8, num_train_steps=24, schedule="constant",
                  warmup_steps=0, learning_rate=3e-2, eval_every_steps=0, log_every_steps=8,
                  checkpoint_every_steps=24, progress_bar=False, sample_prompts=(),
                  eval_fraction=0.25, num_generate_tokens=6, temperature=0.0, top_p=1.0)
    config.update(overrides)
    return config


def one_device_mesh():
    return tr.make_data_mesh(jax.devices()[:1])


def encode(text):
    """tokenizers' own encoding of the fixture's tokenizer.json (no special tokens)."""
    return tokenizers.Tokenizer.from_file(str(LLAMA / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids


def response_nll(cfg, params, examples):
    """Mean NLL (float64) of the response tokens and EOS given BOS + prompt, token-weighted."""
    forward = jax.jit(lambda t: CausalLM(cfg).apply({"params": params}, t))
    total, count = 0.0, 0
    for example in examples:
        prompt, response = encode(example["prompt"]), encode(example["response"])
        ids = [1, *prompt, *response, 2]  # the fixture's <s> = 1, </s> = 2
        row = np.zeros((1, 48), np.int32)  # right padding: invisible to earlier positions
        row[0, :len(ids) - 1] = ids[:-1]
        logits = np.asarray(forward(jnp.asarray(row)), np.float64)[0, :len(ids) - 1]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)
                               )[:, None] - logits.max(-1, keepdims=True)
        for position in range(len(prompt), len(ids) - 1):  # predicting response[0] .. EOS
            total -= logp[position, ids[position + 1]]
            count += 1
    return total / count


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """LoRA for 24 steps from a copy of the fixture that is deleted afterwards."""
    root = tmp_path_factory.mktemp("lm_finetune")
    examples = write_task(root / "task.jsonl")
    checkpoint = root / "llama"
    shutil.copytree(LLAMA, checkpoint)
    config = config_for(root / "task.jsonl", checkpoint)
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        experiment.train(config, str(root / "w"), mesh=one_device_mesh())
    shutil.rmtree(checkpoint)  # the workdir must not need it any more
    return dict(workdir=root / "w", config=config, examples=examples, said=said.getvalue())


def test_lora_lowers_held_out_loss_and_leaves_the_frozen_weights_bitwise(finetuned):
    cfg, base = pretrained.load_hf(str(LLAMA))
    held_out = finetuned["examples"][-16:]  # eval_fraction 0.25 of 64: the last 16
    trained = experiment.load_trained_lm(str(finetuned["workdir"]))
    before = response_nll(cfg, base, held_out)
    after = response_nll(trained.model.config, trained.params, held_out)
    print(f"held-out response NLL: {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before
    evaluation = tr.read_metrics(str(finetuned["workdir"]), "eval")[-1]
    assert evaluation["loss"] == pytest.approx(after, rel=1e-4)  # the loop's eval agrees
    # the raw checkpoint: frozen model weights bitwise the fixture's, adapters trained
    finetuning = experiment.finetuning_of(finetuned["config"])
    task = experiment.lm_task(cfg, max_len=48, finetuning=finetuning)
    raw = tr.restore_params(str(finetuned["workdir"]), task.init_params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), raw["model"], base)
    assert all(np.abs(np.asarray(b)).max() > 0
               for b in jax.tree.leaves(raw["lora"]) if b.shape[-2] == finetuning.lora_rank)
    assert "parameters: 16,384 trainable of 155,968" in finetuned["said"]  # r (in + out) x 14
    assert "finetune=lora" in finetuned["said"]


def test_a_resume_needs_only_the_workdir(finetuned, tmp_path):
    """The checkpoint directory is gone (the fixture deleted it): 4 more steps resume from the
    workdir's checkpoint and its init_from/ copy of config.json and the tokenizer."""
    workdir = tmp_path / "w"
    shutil.copytree(finetuned["workdir"], workdir)
    config = finetuned["config"].copy_and_resolve_references()
    config.num_train_steps = 28
    assert not pathlib.Path(config.init_from).exists()
    other = config.copy_and_resolve_references()
    other.finetune = "full"
    with pytest.raises(WorkdirError, match="was fine-tuned with config.finetune = 'lora'"):
        experiment.train(other, str(workdir), mesh=one_device_mesh())
    with contextlib.redirect_stderr(io.StringIO()):
        experiment.train(config, str(workdir), mesh=one_device_mesh())
    assert [r["step"] for r in tr.read_metrics(str(workdir), "train")] == [8, 16, 24, 28]
    _, base = pretrained.load_hf(str(LLAMA))
    task = experiment.lm_task(experiment.load_trained_lm(str(workdir)).model.config,
                              max_len=48, finetuning=experiment.finetuning_of(config))
    raw = tr.restore_params(str(workdir), task.init_params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), raw["model"], base)


def test_full_finetuning_trains_every_weight(tmp_path):
    write_task(tmp_path / "task.jsonl", count=16)
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        experiment.train(config_for(tmp_path / "task.jsonl", LLAMA, finetune="full",
                                    num_train_steps=2, checkpoint_every_steps=2),
                         str(tmp_path / "w"), mesh=one_device_mesh())
    assert "parameters: 139,584 trainable of 139,584" in said.getvalue()
    _, base = pretrained.load_hf(str(LLAMA))
    trained = experiment.load_trained_lm(str(tmp_path / "w")).params
    for path in (("layers", "layer_0", "self_attention", "query", "kernel"),
                 ("layers", "final_norm", "scale"), ("logits", "kernel")):
        before, after = base, trained
        for key in path:
            before, after = before[key], after[key]
        assert not np.array_equal(np.asarray(after), before), path


def test_text_files_are_tokenized_with_the_checkpoint_tokenizer(tmp_path):
    """No SentencePiece model is trained; every held-out token (and EOS) is scored once."""
    texts = tmp_path / "texts"
    texts.mkdir()
    rng = random.Random(1)
    for i in range(3):
        (texts / f"notes{i}.txt").write_text("\n\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(10)))
    workdir = tmp_path / "w"
    with contextlib.redirect_stderr(io.StringIO()):
        experiment.train(config_for(texts, LLAMA, num_train_steps=2, checkpoint_every_steps=2,
                                    eval_fraction=0.2, packing="true"),
                         str(workdir), mesh=one_device_mesh())
    held_out = experiment.open_corpus(str(texts), eval_fraction=0.2).eval
    evaluation = tr.read_metrics(str(workdir), "eval")[-1]
    assert evaluation["num_tokens"] == sum(len(encode(text)) + 1 for text in held_out)
    assert sorted(p.name for p in (workdir / "init_from").iterdir()) == [
        "config.json", "tokenizer.json", "tokenizer_config.json"]
    assert not list(workdir.glob("sentencepiece*"))


def test_the_loss_mask_covers_the_response_tokens_only(tmp_path):
    examples = write_task(tmp_path / "task.jsonl", count=12)
    tokenizer = pretrained.load_tokenizer(str(LLAMA))
    items = [pipeline.PromptResponse(e["prompt"], e["response"]) for e in examples]
    batch = next(pipeline.train_batches(items, tokenizer, global_batch_size=2, max_len=96,
                                        packing_enabled=True))
    rows = 0
    for row in range(2):
        segments = batch["targets_segmentation"][row]
        assert segments.max() >= 2  # several examples share the row, each kept apart
        for segment in range(1, segments.max() + 1):
            targets = batch["targets"][row][segments == segment]
            weights = batch["weights"][row][segments == segment]
            inputs = batch["inputs"][row][segments == segment]
            assert inputs[0] == 1 and targets[-1] == 2  # BOS ... EOS of the fixture
            text = tokenizer.tokenizer.decode(targets[:-1].tolist())
            example = next(e for e in examples if e["prompt"] + e["response"] == text)
            n = len(encode(example["prompt"]))
            assert (weights[:n] == 0).all() and (weights[n:] == 1).all()
            np.testing.assert_array_equal(targets[n:-1], encode(example["response"]))
            rows += 1
    assert rows >= 4
    # the loss honours the mask: the mean NLL over the weighted targets, by hand
    cfg, params = pretrained.load_hf(str(LLAMA))
    model = CausalLM(cfg)
    loss, metrics = jax.jit(make_loss_fn(model), static_argnums=3)(params, batch,
                                                                    jax.random.key(0), False)
    logits = np.asarray(model.apply({"params": params}, batch["inputs"],
                                    segment_ids=batch["inputs_segmentation"],
                                    positions=batch["inputs_position"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["weights"] == 1
    assert metrics["weight"] == mask.sum()
    assert float(loss) == pytest.approx(nll[mask].mean(), rel=1e-5)


def test_generate_after_finetuning_uses_the_checkpoint_tokenizer(finetuned, capsys):
    """Greedy text = argmax of full forward passes, ids through tokenizers' own encoding."""
    prompt = "repeat river 2 times:"
    config = experiment_config("lm")
    config.update(temperature=0.0, top_p=1.0, num_generate_tokens=6)
    (text,), = experiment.generate(config, str(finetuned["workdir"]), [prompt])
    trained = experiment.load_trained_lm(str(finetuned["workdir"]))
    forward = jax.jit(lambda t: trained.model.apply({"params": trained.params}, t))
    ids = [1, *encode(prompt)]
    for _ in range(6):
        padded = np.zeros((1, 48), np.int32)
        padded[0, :len(ids)] = ids
        ids.append(int(np.argmax(forward(jnp.asarray(padded))[0, len(ids) - 1])))
        if ids[-1] == 2:
            ids.pop()
            break
    expected = tokenizers.Tokenizer.from_file(str(LLAMA / "tokenizer.json")).decode(ids[1:])
    assert text == expected and text.startswith(prompt)
    assert f"--- sample 1 of {prompt!r}" in capsys.readouterr().out


def _one_line_exit_2(capsys, fn, *args, **kwargs):
    with pytest.raises(SystemExit) as exit_info, tr.launch.user_errors():
        fn(*args, **kwargs)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    write_task(tmp_path / "task.jsonl", count=8)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n'
                                        '{"prompt": "no response"}\n')
    workdir = tmp_path / "w"
    run = lambda **kw: experiment.train(  # noqa: E731
        config_for(kw.pop("dataset", tmp_path / "task.jsonl"), kw.pop("init_from", LLAMA),
                   **kw), str(workdir), mesh=one_device_mesh())
    line = _one_line_exit_2(capsys, run, init_from=tmp_path / "task.jsonl")
    assert "config.init_from must be a Hugging Face model directory" in line
    line = _one_line_exit_2(capsys, run, dataset=tmp_path / "bad.jsonl")
    assert "bad.jsonl:2: expected an object with string \"prompt\" and \"response\"" in line
    line = _one_line_exit_2(capsys, run, finetune="partial")
    assert "config.finetune must be one of ('full', 'lora')" in line
    config = config_for(tmp_path / "task.jsonl", LLAMA)
    config.model.num_layers = 3
    line = _one_line_exit_2(capsys, experiment.train, config, str(workdir),
                            mesh=one_device_mesh())
    assert "config.model.num_layers = 3 conflicts with config.init_from's num_layers = 2" in line
    assert not workdir.exists()


def test_released_weights_enter_the_state_as_arguments_in_their_shards():
    """Fine-tuning from a checkpoint: the weights, read shard by shard onto the mesh, are
    an argument of the jit that builds the train state, not constants of its program (an
    8B model would be 32 GB of literals), and the state holds them bitwise, stacked for
    scan_layers inside that jit."""
    import dataclasses

    from tfx_jax.apps.language_model.task import lm_task
    from tfx_jax.train.finetune import FineTuning
    from tfx_jax.train.state import state_initializer
    cfg, host = pretrained.load_hf(str(LLAMA))
    cfg = dataclasses.replace(cfg, scan_layers=True)
    mesh = tr.make_mesh({"data": 1, "fsdp": 2}, devices=jax.devices()[:2])
    _, placed = pretrained.load_hf(str(LLAMA), mesh=mesh)
    kernel = placed["embedding"]["embedding"]
    assert isinstance(kernel, jax.Array) and len(kernel.sharding.device_set) == 2
    task = lm_task(cfg, max_len=16, finetuning=FineTuning(mode="lora", new=(), lora_rank=2,
                                                          lora_alpha=4.0),
                   pretrained_params=placed)
    optimizer, _ = tr.create_optimizer(experiment_config("lm"), task.trainable)
    shardings = tr.train_state_shardings(task.init_params, optimizer, mesh)
    create, args = state_initializer(task.init_params, optimizer, 0, shardings)
    assert args == (placed,)
    program = create.lower(*args).as_text()
    assert 'dense<"0x' not in program  # no weight is a literal of the program
    state = create(*args)
    want = pretrained.to_scan(host, "layers", cfg.num_layers)
    for got, ref in zip(jax.tree.leaves(state.params["model"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize("scan", [False, True])
def test_lora_beside_the_kernels_equals_the_merged_kernels(scan):
    """A LoRA step computes x W + (alpha / r) (x A) B in the adapted layers (no merged
    copy of W, no gradient for the frozen weights): its loss and its gradients for A and
    B equal those of the merged kernels W + (alpha / r) A B (the export path), on every
    adapted kernel (GQA query/key/value, out, gated MLP), scanned or not; the frozen
    weights get exactly zero gradient."""
    import dataclasses

    from tfx_jax.apps.language_model.task import lm_task
    from tfx_jax.train.finetune import FineTuning
    cfg, host = pretrained.load_hf(str(LLAMA))
    cfg = dataclasses.replace(cfg, scan_layers=scan)
    finetuning = FineTuning(mode="lora", new=(), lora_rank=2, lora_alpha=4.0)
    task = lm_task(cfg, max_len=16, finetuning=finetuning, pretrained_params=host)
    params = jax.jit(task.init_params)(jax.random.key(0))
    # B = 0 at the start: give it values, so that the adapters change the model
    params["lora"] = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(
        jax.random.key(x.size), x.shape, x.dtype), params["lora"])
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=(2, 16)).astype(np.int32)
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1)}

    def merged_loss(params):
        logits = CausalLM(cfg).apply({"params": finetuning.model_params(params)},
                                     batch["inputs"])
        return tr.token_cross_entropy(logits, batch["targets"])[0]

    (loss, _), grads = jax.jit(jax.value_and_grad(
        lambda p: task.loss_fn(p, batch, jax.random.key(1), False), has_aux=True))(params)
    want, want_grads = jax.jit(jax.value_and_grad(merged_loss))(params)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    for got, ref in zip(jax.tree.leaves(grads["lora"]), jax.tree.leaves(want_grads["lora"])):
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-6)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["model"]))
    assert len(jax.tree.leaves(grads["lora"])) == 2 * 7 * (1 if scan else cfg.num_layers)
