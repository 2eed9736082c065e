"""Language modelling: corpus, pipeline, loss/perplexity, top-p sampling, bad input."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from tfx_jax import decoding
from tfx_jax import train as tr
from tfx_jax.apps.language_model import corpus as corpus_lib
from tfx_jax.apps.language_model import experiment, pipeline, sampling
from tfx_jax.apps.language_model.task import lm_config, lm_task
from tfx_jax.data.tokenizer import BOS_ID, EOS_ID
from tfx_jax.lm import CausalLM, CausalLMConfig
from tests.scripts import experiment_config

flags.FLAGS.mark_as_parsed()  # Grain reads absl flags

TINY = dict(num_layers=1, d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0)


class CharTokenizer:
    """ids 4.. for 'a'.. (no SentencePiece needed)."""
    vocab_size = 32

    def encode(self, text):
        return [4 + (ord(c) - ord("a")) % 26 for c in text]

    def decode(self, ids):
        out = []
        for i in np.asarray(ids).tolist():
            if i == EOS_ID:
                break
            if i >= 4:
                out.append(chr(ord("a") + i - 4))
        return "".join(out)


# ------------------------------------------------------------------------ corpus

def test_stdlib_split_is_by_file_and_deterministic():
    files = corpus_lib.stdlib_files()
    assert files == sorted(files) and len(files) > 300
    assert not any(part in corpus_lib.TEST_DIRS for f in files for part in f.split(os.sep)[:-1])
    held_out = [f for f in files if corpus_lib.is_held_out(f, 0.02)]
    assert 0 < len(held_out) < 0.06 * len(files)
    assert held_out == [f for f in corpus_lib.stdlib_files() if corpus_lib.is_held_out(f, 0.02)]


def test_blocks_are_the_blank_line_separated_parts():
    text = "import os\nimport sys\n\n\ndef f():\n    return 1\n   \nx = 2\n"
    assert corpus_lib.split_blocks(text) == ["import os\nimport sys", "def f():\n    return 1",
                                             "x = 2"]


def test_directory_corpus_and_empty_corpus_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        corpus_lib.open_corpus(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="empty corpus"):
        corpus_lib.stdlib_corpus(max_files=0)
    with pytest.raises(ValueError, match="config.dataset must be"):
        corpus_lib.open_corpus("")
    with pytest.raises(ValueError, match="empty corpus"):
        pipeline.eval_windows([], CharTokenizer(), max_len=8)
    with pytest.raises(ValueError, match="empty corpus"):
        pipeline.train_batches([], CharTokenizer(), global_batch_size=2, max_len=8)


# ---------------------------------------------------------------------- pipeline

def test_rows_are_bos_shifted_targets_and_long_texts_are_cropped():
    texts = ["abc", "defghijklmnopq"]
    batch = next(pipeline.train_batches(texts, CharTokenizer(), global_batch_size=2, max_len=6,
                                        seed=0, packing_enabled=False))
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
        n = int((targets != 0).sum())
        assert (inputs[1:n] == targets[:n - 1]).all()  # teacher forcing: shifted by one
        if n < 6:  # a whole short text: BOS ... / ... EOS
            assert inputs[0] == BOS_ID and targets[n - 1] == EOS_ID
    windows = pipeline.eval_windows(texts, CharTokenizer(), max_len=6)
    # every target token of every text is predicted exactly once
    targets = np.concatenate([ids[1:] for ids, _ in windows])
    expected = np.concatenate([pipeline.sequence_ids(t, CharTokenizer())[1:] for t in texts])
    np.testing.assert_array_equal(targets, expected)


def test_packed_lm_rows_hold_whole_short_texts():
    texts = ["ab", "cde", "f", "ghij", "kl", "m", "nop", "q"]
    batch = next(pipeline.train_batches(texts, CharTokenizer(), global_batch_size=2, max_len=12,
                                        seed=1, packing_enabled=True))
    assert batch["inputs"].shape == (2, 12)
    np.testing.assert_array_equal(batch["inputs_segmentation"], batch["targets_segmentation"])
    for inputs, targets, seg in zip(batch["inputs"], batch["targets"],
                                    batch["inputs_segmentation"]):
        assert seg.max() >= 2  # several texts per row
        for s in range(1, seg.max() + 1):
            text_in, text_out = inputs[seg == s], targets[seg == s]
            assert text_in[0] == BOS_ID and text_out[-1] == EOS_ID
            assert CharTokenizer().decode(text_out) in texts


def test_sentencepiece_keeps_code_verbatim(tmp_path):
    code = corpus_lib.stdlib_corpus(max_files=30).train[:300]
    tokenizer = pipeline.load_or_train_lm_tokenizer(code, str(tmp_path), vocab_size=400,
                                                    max_chars=20_000)
    for block in code[:20]:
        assert tokenizer.decode(tokenizer.encode(block)) == block  # indentation, newlines kept


# ------------------------------------------------------------ loss and perplexity

def _tiny_model(max_len=8, vocab=32):
    return CausalLM(CausalLMConfig(vocab_size=vocab, max_len=max_len, **TINY))


def _init(model):
    """Parameters (jitted: eager Flax init costs seconds on a loaded CPU)."""
    return jax.jit(model.init)(jax.random.key(0),
                               jnp.ones((1, model.config.max_len), jnp.int32))["params"]


@pytest.mark.parametrize("logits_chunk", [0, 3])  # 3: the loss projects 3 positions at a time
def test_eval_perplexity_is_exp_of_mean_token_nll(logits_chunk):
    model = _tiny_model()
    params = _init(model)
    texts = ["abcdefghijk", "xyz", "mnop", "q"]
    windows = pipeline.eval_windows(texts, CharTokenizer(), max_len=8)
    data = pipeline.eval_batches(windows, global_batch_size=2, max_len=8)
    windows = [ids for ids, _ in windows]  # every target of a text window counts
    mesh = tr.make_data_mesh(jax.devices()[:1])
    # the loop's eval path: loss_fn + eval_summary
    task = lm_task(model.config, max_len=8, logits_chunk=logits_chunk)
    metrics = tr.evaluate_batches(tr.make_eval_step(task.loss_fn, mesh), params, data, mesh,
                                  jax.random.key(0), task)
    # by hand in float64: log-softmax of each window's logits at its real targets
    nlls, correct = [], []
    # every window's logits in one call: right padding changes no earlier logit (causality)
    rows = np.zeros((len(windows), 8), np.int32)
    for row, w in zip(rows, windows):
        row[:len(w) - 1] = w[:-1]
    all_logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(rows)),
                            np.float64)
    for w, logits in zip(windows, all_logits):
        logits = logits[:len(w) - 1]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                               keepdims=True)) - logits.max(-1, keepdims=True)
        nlls += [-logp[i, t] for i, t in enumerate(w[1:])]
        correct += [logits[i].argmax() == t for i, t in enumerate(w[1:])]
    assert metrics["num_tokens"] == len(nlls)
    assert metrics["loss"] == pytest.approx(np.mean(nlls), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(np.mean(nlls)), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(np.mean(correct))


def test_the_loss_chunk_keeps_each_devices_logits_within_the_budget(monkeypatch):
    from tfx_jax.apps.language_model import task as task_lib
    monkeypatch.setattr(task_lib, "LOGITS_CHUNK_ELEMENTS", 2048)  # a row's logits: 128 x 32
    model = CausalLM(lm_config(dict(TINY), vocab_size=32, max_len=128))
    params = _init(model)
    chunks, chunked_losses = [], tr.chunked_token_losses
    monkeypatch.setattr(tr, "chunked_token_losses", lambda *args, **kwargs: (
        chunks.append(kwargs["chunk_length"]), chunked_losses(*args, **kwargs))[1])
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 129), 1, 32))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    whole_rows = task_lib.make_loss_fn(model, logits_chunk=None)
    expected = float(jax.jit(whole_rows, static_argnums=3)(params, batch, jax.random.key(0),
                                                          False)[0])
    for devices, chunk in ((1, 16), (4, 64)):  # 4 rows on one device; 1 row on each of 4
        mesh = tr.make_data_mesh(jax.devices()[:devices])
        step = tr.make_eval_step(task_lib.make_loss_fn(model), mesh)
        loss, _ = step(params, tr.shard_batch(batch, mesh), jax.random.key(0))
        assert chunks[-1] == chunk and (4 // devices) * chunk * 32 <= 2048
        assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert tr.rows_per_device(4) == 4  # no mesh in context: all rows


@pytest.mark.parametrize("fields", [dict(), dict(tie_embeddings=False, use_bias=True,
                                                 final_logit_soft_cap=5.0)])
def test_hidden_states_and_output_logits_are_the_models_logits(fields):
    """``return_hidden`` + ``output_logits`` (what a chunked loss applies) give the model's
    own logits: tied, and untied with a bias and a final soft-cap."""
    from tfx_jax.lm import output_logits
    model = CausalLM(CausalLMConfig(vocab_size=32, max_len=8, **{**TINY, **fields}))
    tokens = jnp.asarray([[2, 5, 9, 4, 7, 3]])
    params = _init(model)
    logits = jax.jit(model.apply)({"params": params}, tokens)
    hidden = jax.jit(lambda p, t: model.apply({"params": p}, t, return_hidden=True))(
        params, tokens)
    assert hidden.shape == (1, 6, 16)
    np.testing.assert_allclose(output_logits(model.config, params, hidden[:, 2:4]),
                               logits[:, 2:4], rtol=1e-6, atol=1e-6)
    if fields:
        assert np.abs(np.asarray(logits)).max() < 5.0 and "logits" in params


def test_lm_config_model_section_takes_every_causal_lm_field():
    """``--config.model.<any CausalLMConfig field>`` is a known key (vocab_size and
    max_len come from the tokenizer and config.max_len; decode from inference)."""
    import dataclasses
    section = experiment_config("lm").model
    fields = {f.name for f in dataclasses.fields(CausalLMConfig)}
    assert set(section) == fields - {"vocab_size", "max_len", "decode"}
    section.update(fused_qkv=True, num_kv_heads=4, norm="rms_norm", mlp="gated",
                   layer_types=("full",) * 4, rope_scaling=None)
    assert lm_config(section, vocab_size=64, max_len=16).fused_qkv


def test_lm_config_rejects_derived_and_unknown_keys():
    with pytest.raises(ValueError, match="config.model.vocab_size is derived"):
        lm_config({"vocab_size": 3}, vocab_size=10, max_len=8)
    with pytest.raises(ValueError, match="does not know"):
        lm_config({"num_layerz": 3}, vocab_size=10, max_len=8)
    assert lm_config({"num_layers": 1, "d_model": 16, "num_heads": 2, "d_ff": 8,
                      "unset_option": None}, vocab_size=10, max_len=8).num_layers == 1
    with pytest.raises(ValueError, match="do not fit the model's context"):
        lm_task(_tiny_model(max_len=8).config, max_len=16)


# ---------------------------------------------------------------------- sampling

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize("top_p, kept", [(0.5, [0]), (0.7, [0, 1]), (0.8, [0, 1]),
                                         (0.81, [0, 1, 2]), (0.99, [0, 1, 2, 3]),
                                         (1.0, [0, 1, 2, 3]), (0.01, [0])])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    logits = jnp.log(jnp.asarray(PROBS[[2, 0, 3, 1]]))  # shuffled: ranks are not positions
    mask = np.asarray(decoding.top_k_top_p_mask(logits, top_p=top_p))
    assert sorted(np.flatnonzero(mask)) == sorted([2, 0, 3, 1].index(i) for i in kept)


def test_top_k_then_top_p_renormalises_what_top_k_kept():
    logits = jnp.log(jnp.asarray(PROBS))
    # top-2 leaves 0.5 / 0.8 = 0.625 and 0.375: p = 0.6 keeps only the first
    assert np.asarray(decoding.top_k_top_p_mask(logits, top_k=2, top_p=0.6)).tolist() == [
        True, False, False, False]
    assert np.asarray(decoding.top_k_top_p_mask(logits, top_k=3)).tolist() == [
        True, True, True, False]
    assert np.asarray(decoding.top_k_top_p_mask(logits, top_k=50)).all()  # k > vocabulary


def test_nucleus_sampling_draws_only_the_nucleus_with_renormalised_frequencies():
    logits = jnp.log(jnp.asarray(PROBS))[None]

    def step_fn(tokens, cache):  # a "model" whose next-token distribution is fixed
        return jnp.broadcast_to(logits, (tokens.shape[0], tokens.shape[1], 4)), cache

    out = decoding.sample(step_fn, None, jnp.zeros((4000, 1), jnp.int32), 1,
                          rng=jax.random.key(0), temperature=1.0, top_p=0.7)
    draws = np.asarray(out[:, 1])
    assert set(draws.tolist()) == {0, 1}
    assert np.mean(draws == 0) == pytest.approx(0.5 / 0.8, abs=0.03)  # 0.625, 4000 draws


def test_sampling_rejects_bad_options_and_overlong_prompts():
    model = _tiny_model(max_len=8)
    params = _init(model)
    with pytest.raises(ValueError, match=r"prompt 2 'abcdefghij' is 11 tokens .*max_len=8"):
        sampling.generate_texts(model, params, CharTokenizer(), ["ab", "abcdefghij"],
                                num_tokens=4)
    for bad, match in (({"top_p": 0.0}, "top_p must be in"), ({"top_k": 0}, "top_k must be"),
                       ({"temperature": -1.0}, "temperature must be")):
        with pytest.raises(ValueError, match=match):
            sampling.generate_texts(model, params, CharTokenizer(), ["ab"], num_tokens=4, **bad)


def test_generation_fills_the_context_at_most_and_is_seeded():
    model = _tiny_model(max_len=8)
    params = _init(model)
    kwargs = dict(num_tokens=50, num_samples=3, seed=1, temperature=1.0, top_p=0.9, top_k=10)
    first = sampling.generate_texts(model, params, CharTokenizer(), ["abc"], **kwargs)
    assert first == sampling.generate_texts(model, params, CharTokenizer(), ["abc"], **kwargs)
    assert len(first[0]) == 3
    for text in first[0]:
        assert text.startswith("abc") and len(text) <= 7  # BOS + 7 tokens fill max_len = 8


# ------------------------------------------------------------ batched generation

def _model_and_params(position, max_len=12):
    model = CausalLM(CausalLMConfig(vocab_size=32, max_len=max_len, position=position, **TINY))
    return model, _init(model)


# prompts (with BOS) of 1 token, several tokens, and one that leaves 2 positions of max_len 12
PROMPTS = [[BOS_ID], [BOS_ID, 5, 6, 7], [BOS_ID, *range(4, 13)], [BOS_ID, 9]]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_batched_greedy_generation_continues_each_prompt_as_alone(position):
    model, params = _model_and_params(position)
    batch = sampling.generate_ids(model, params, PROMPTS, num_tokens=8, temperature=0.0)
    # independent reference: each prompt alone, argmax of full (uncached) passes; a
    # right-padded row of max_len gives the same logits up to its end (causality)
    full_pass = jax.jit(lambda row: model.apply({"params": params}, row[None])[0])
    for prompt, (row,) in zip(PROMPTS, batch):
        seq, budget = list(prompt), min(8, 12 - len(prompt))
        for _ in range(budget):
            padded = jnp.asarray(seq + [0] * (12 - len(seq)), jnp.int32)
            seq.append(int(jnp.argmax(full_pass(padded)[len(seq) - 1])))
        expected = np.asarray(seq[len(prompt):])
        eos = np.flatnonzero(expected == EOS_ID)
        np.testing.assert_array_equal(row, expected[:eos[0]] if len(eos) else expected)
    assert len(batch[2][0]) <= 2  # cut where its context (max_len 12) ends
    assert len(batch[0][0]) == 8 or EOS_ID in batch[0][0]


def test_sampled_rows_do_not_depend_on_the_other_prompts_of_the_batch():
    model, params = _model_and_params("learned")
    kwargs = dict(num_tokens=6, num_samples=2, seed=7, temperature=1.0, top_k=20, top_p=0.95)
    batch = sampling.generate_ids(model, params, PROMPTS, **kwargs)
    # other company, less left padding: prompts 1 and 3 alone in a batch of their own
    fewer = sampling.generate_ids(model, params, [PROMPTS[1], PROMPTS[3]], **kwargs)
    reordered = sampling.generate_ids(model, params, PROMPTS[::-1], **kwargs)[::-1]
    for expected, got in [(batch[1], fewer[0]), (batch[3], fewer[1])] + list(zip(batch,
                                                                                 reordered)):
        for row, single in zip(expected, got):
            np.testing.assert_array_equal(row, single)
    assert any(not np.array_equal(a, b) for a, b in batch)  # samples of a prompt differ
    other_seed = sampling.generate_ids(model, params, PROMPTS, **{**kwargs, "seed": 8})
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(batch, other_seed))


# ------------------------------------------------------------------ the run's config

@pytest.mark.parametrize("key, value, message", [
    ("max_len", 1, "config.max_len must be an integer >= 2"),
    ("vocab_size", 300, "config.vocab_size must be an integer >= 384"),
    ("batch_size", 12, r"config.batch_size = 12 must be divisible by the number of devices"),
    ("eval_batch_size", 4, r"config.eval_batch_size = 4 must be divisible"),
    ("temperature", -0.5, "config.temperature must be a number >= 0"),
    ("top_k", -1, "config.top_k must be an integer >= 0"),
    ("top_p", 0.0, r"config.top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"config.top_p must be in \(0, 1\]"),
    ("num_generate_tokens", 0, "config.num_generate_tokens must be an integer >= 1"),
    ("num_samples", 0, "config.num_samples must be an integer >= 1"),
    ("packing", "yes", "config.packing must be 'auto', 'true' or 'false', got 'yes'"),
    ("eval_fraction", 1.0, r"config.eval_fraction must be in \(0, 1\)"),
    ("sample_prompts", ("def ", 3), "config.sample_prompts must be a tuple of strings"),
    ("model.num_heads", 3, "num_heads"),
    ("num_train_steps", 0, "config.num_train_steps"),
    ("max_len", 2, "config.max_len = 2 leaves no room for the samples of config.sample_prompts"),
])
def test_check_config_names_the_bad_key_in_one_line(key, value, message):
    mesh = tr.make_data_mesh(jax.devices()[:8])
    config = experiment_config("lm")
    experiment.check(config, mesh)  # the defaults pass on 8 devices
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=message) as error:
        experiment.check(config, mesh)
    assert "\n" not in str(error.value)
