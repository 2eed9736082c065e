"""Bad input, table-driven: every case raises an error that names the problem.

A case is (id, call, exception type, message pattern). Cases that take a workdir run
on a copy of a workdir holding a finished 4-step toy run (checkpoint "4"), optionally
damaged first; afterwards every file under its ``checkpoints/`` must be byte-for-byte
what it was before the call: no failure deletes or rewrites a checkpoint.

More bad-input cases live next to the code they test (tests/test_attention.py,
test_models.py, test_multihead.py, test_data_*.py, test_train_*.py); docs/robustness.md
lists them all.
"""
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import tfx_jax as tfx
import train_toy as toy
from tfx_jax import decoding
from tfx_jax import train as tr
from tfx_jax.apps.translation.task import transformer_config
from tfx_jax.data import tokenizer
from tfx_jax.errors import WorkdirError

KEY = jax.random.key(0)
TINY = dict(d_model=8, num_heads=2, d_ff=16)


@dataclasses.dataclass
class Case:
    id: str
    call: Callable  # call(workdir) for workdir cases, call(tmp_path) otherwise
    error: type
    message: str  # regex searched in str(exception)
    workdir: bool = False  # run on a copy of the trained workdir and check it is intact
    damage: Optional[Callable[[Path], None]] = None  # applied to checkpoints/4 first


# --- models --------------------------------------------------------------------------------------

def tiny_lm(**overrides):
    return tfx.CausalLM(tfx.CausalLMConfig(vocab_size=11, num_layers=1, max_len=8,
                                           **{**TINY, **overrides}))


def decode_past_the_cache(jit: bool):
    """A cache for 4 positions: a 4-token prompt fills it, the next token overflows."""
    attention = tfx.MultiHeadAttention(num_heads=2, decode=True)
    variables = attention.init(KEY, jnp.zeros((2, 4, 8)))

    def step(cache, inputs):
        return attention.apply({"params": variables["params"], "cache": cache}, inputs,
                               causal=True, mutable=["cache"])

    if jit:  # under jit the check needs the checked mode (checkify)
        step = decoding.checked(jax.jit(step))
    _, mutated = step(variables["cache"], jnp.ones((2, 4, 8)))
    step(mutated["cache"], jnp.ones((2, 1, 8)))


def decode_wrong_batch():
    attention = tfx.MultiHeadAttention(num_heads=2, decode=True)
    variables = attention.init(KEY, jnp.zeros((2, 4, 8)))
    attention.apply(variables, jnp.ones((3, 1, 8)), mutable=["cache"])


def tiny_vit(num_channels):
    return tfx.ViT(tfx.ViTConfig(image_size=8, patch_size=4, num_channels=num_channels,
                                 num_classes=10, num_layers=1, **TINY))


def tiny_transformer():
    return tfx.Transformer(tfx.TransformerConfig(vocab_size=11, num_encoder_layers=1,
                                                 num_decoder_layers=1, max_len=8, **TINY))


MODEL_CASES = [
    Case("mha_cross_attention_batch_mismatch",
         lambda _: tfx.MultiHeadAttention(num_heads=2).init(
             KEY, jnp.zeros((2, 3, 8)), jnp.zeros((3, 5, 8))),
         ValueError, r"inputs_kv must have shape \[batch=2, length, features\], got \(3, 5, 8\)"),
    Case("mha_decode_with_cross_attention",
         lambda _: tfx.MultiHeadAttention(num_heads=2, decode=True).init(
             KEY, jnp.zeros((2, 3, 8)), jnp.zeros((2, 5, 8))),
         ValueError, "decode=True caches self-attention only"),
    Case("mha_mask_of_wrong_shape",
         lambda _: tfx.MultiHeadAttention(num_heads=2).init(
             KEY, jnp.zeros((2, 3, 8)), mask=jnp.ones((2, 1, 3, 4), bool)),
         ValueError, r"mask of shape \(2, 1, 3, 4\) is not broadcastable to .* \(2, 2, 3, 3\)"),
    Case("attention_query_key_batch_mismatch",
         lambda _: tfx.dot_product_attention(jnp.zeros((1, 3, 2, 4)), jnp.zeros((2, 3, 2, 4)),
                                             jnp.zeros((2, 3, 2, 4))),
         ValueError, r"query \(1, 3, 2, 4\) and key \(2, 3, 2, 4\) must agree in batch"),
    Case("decode_cache_overflow",
         lambda _: decode_past_the_cache(jit=False),
         ValueError, "decode cache overflow: the cache holds max_length=4 positions, 4 are "
                     "filled and this call adds 1"),
    Case("decode_cache_overflow_under_jit_with_checkify",
         lambda _: decode_past_the_cache(jit=True),
         checkify.JaxRuntimeError, "decode cache overflow: the cache holds max_length=4 "
                                   "positions, 4 are filled"),
    Case("decode_batch_differs_from_cache",
         lambda _: decode_wrong_batch(),
         ValueError, r"decode step of shape \(3, 1\) does not fit the cache of shape "
                     r"\[batch=2, max_length=4\]"),
    Case("vit_wrong_number_of_channels",
         lambda _: tiny_vit(3).init(KEY, jnp.zeros((1, 8, 8, 1))),
         ValueError, r"images must have shape \[batch, 8, 8, 3\], got \(1, 8, 8, 1\)"),
    Case("vit_image_without_batch_axis",
         lambda _: tiny_vit(3).init(KEY, jnp.zeros((8, 8, 3))),
         ValueError, r"images must have shape \[batch, 8, 8, 3\], got \(8, 8, 3\)"),
    Case("transformer_source_target_batch_mismatch",
         lambda _: tiny_transformer().init(KEY, jnp.ones((2, 4), jnp.int32),
                                           jnp.ones((3, 4), jnp.int32)),
         ValueError, "source batch 2 != target_in batch 3"),
    Case("lm_float_tokens",
         lambda _: tiny_lm().init(KEY, jnp.zeros((2, 4))),
         TypeError, "tokens must hold integer token ids, got dtype float32"),
    Case("lm_sequence_longer_than_max_len",
         lambda _: tiny_lm().init(KEY, jnp.zeros((2, 9), jnp.int32)),
         ValueError, "tokens length 9 exceeds max_len=8"),
    Case("lm_config_heads_do_not_divide_d_model",
         lambda _: tfx.CausalLMConfig(vocab_size=11, d_model=10, num_heads=4),
         ValueError, "CausalLMConfig.d_model=10 is not divisible by num_heads=4"),
    Case("transformer_config_negative_layers",
         lambda _: tfx.TransformerConfig(vocab_size=11, num_encoder_layers=-1),
         ValueError, "TransformerConfig.num_encoder_layers must be a positive integer, got -1"),
    Case("transformer_config_unknown_field_in_a_config_model_section",
         lambda _: transformer_config({"d_model": 8, "num_heads": 2, "num_layer": 2},
                                      vocab_size=11, max_len=8),
         ValueError, r"config.model has keys \['num_layer'\] that TransformerConfig does not know"),
    Case("vit_config_unknown_dtype",
         lambda _: tfx.ViTConfig(dtype="float16x"),
         ValueError, r"ViTConfig.dtype must be one of \('float32', 'bfloat16', 'float16'\)"),
]


# --- training: configs, data iterators and loss functions on a workdir with a checkpoint ------

def train(workdir, *, task=None, iterator=None, **overrides):
    config = toy.toy_config(**{"num_train_steps": 8, **overrides})
    if iterator is None:
        iterator = toy.make_train_iter(config.batch_size)
    return tr.train(config, str(workdir), task or toy.make_task(), iterator)


def train_without(key):
    def call(workdir):
        config = toy.toy_config(num_train_steps=8)
        del config[key]
        tr.train(config, str(workdir), toy.make_task(), toy.make_train_iter(16))
    return call


class EmptyIterator:
    """Checkpointable, but out of batches at once (a finite pipeline by mistake)."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        raise StopIteration

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def task_with_loss(loss_fn):
    return tr.Task(init_params=toy.make_task().init_params, loss_fn=loss_fn)


TRAIN_CASES = [
    Case("batch_size_not_divisible_by_devices", lambda w: train(w, batch_size=12),
         ValueError, r"config.batch_size = 12 must be divisible by the number of devices in "
                     r"the mesh \(8\)", workdir=True),
    Case("negative_num_train_steps", lambda w: train(w, num_train_steps=-5),
         ValueError, "config.num_train_steps must be a positive integer, got -5", workdir=True),
    Case("unknown_schedule", lambda w: train(w, schedule="linear_decay"),
         ValueError, r"config.schedule must be one of \('transformer', 'warmup_cosine', "
                     r"'constant'\), got 'linear_decay'", workdir=True),
    Case("transformer_schedule_without_warmup",
         lambda w: train(w, schedule="transformer", warmup_steps=0),
         ValueError, "config.warmup_steps must be positive for the 'transformer' schedule, "
                     "got 0", workdir=True),
    Case("config_missing_a_training_key", train_without("seed"),
         ValueError, r"config is missing the training keys \['seed'\]", workdir=True),
    Case("train_batches_of_wrong_size", lambda w: train(w, iterator=toy.make_train_iter(8)),
         ValueError, r"train batch at step 5: batch\['inputs'\] has shape \(8, 6\), expected "
                     r"leading dim config.batch_size / process_count = 16 / 1 = 16",
         workdir=True),
    Case("train_iterator_runs_out",
         lambda w: train(w, iterator=EmptyIterator(toy.make_train_iter(16))),
         ValueError, "the train iterator ended before step 5; it must repeat epochs",
         workdir=True),
    Case("loss_fn_returns_no_metrics",
         lambda w: train(w, task=task_with_loss(lambda p, b, r, t: jnp.float32(0.0))),
         TypeError, r"loss_fn must return \(loss, metrics_dict\), got an array of shape \(\)",
         workdir=True),
    Case("loss_fn_returns_per_example_loss",
         lambda w: train(w, task=task_with_loss(
             lambda p, b, r, t: (jnp.zeros(b["inputs"].shape[0]), {}))),
         ValueError, r"loss_fn must return a scalar loss, got shape \(16,\)", workdir=True),
]


# --- checkpoints: another model, damaged directories, foreign iterator states ---------------------

def remove(name):
    return lambda step_dir: shutil.rmtree(step_dir / name)


def overwrite(pattern, content: bytes):
    def damage(step_dir):
        paths = sorted(step_dir.glob(pattern))
        assert paths, f"nothing matches {pattern} in {step_dir}"
        for path in paths:
            path.write_bytes(content)
    return damage


def rename_iterator_state(new_name):
    def damage(step_dir):
        folder = step_dir / "data_iterator"
        (folder / "process_0-of-1.json").rename(folder / new_name)
    return damage


UNREADABLE = r"cannot read the checkpoint at step 4 in \S+/checkpoints/4 \(workdir .*\): "
CHECKPOINT_CASES = [
    Case("checkpoint_of_another_model_shape", lambda w: train(w, task=toy.make_task(2)),
         ValueError, r"params/Embed_0/embedding: checkpoint has shape \(11, 8\), model "
                     r"expects \(11, 16\)", workdir=True),
    Case("checkpoint_without_its_state", lambda w: train(w),
         ValueError, UNREADABLE + "KeyError", workdir=True, damage=remove("state")),
    Case("checkpoint_with_truncated_metadata", lambda w: train(w),
         ValueError, UNREADABLE + "JSONDecodeError", workdir=True,
         damage=overwrite("state/_METADATA", b'{"tree_metadata": ')),
    Case("checkpoint_with_corrupt_array_data", lambda w: train(w),
         ValueError, UNREADABLE + ".*Error reading", workdir=True,
         damage=overwrite("state/**/d/*", b"not an array")),
    Case("checkpoint_with_corrupt_iterator_state", lambda w: train(w),
         ValueError, UNREADABLE + "JSONDecodeError", workdir=True,
         damage=overwrite("data_iterator/process_0-of-1.json", b"{not json")),
    Case("checkpoint_with_iterator_state_of_another_pipeline", lambda w: train(w),
         ValueError, r"the data iterator state in the checkpoint at step 4 .* does not fit "
                     r"this data pipeline", workdir=True,
         damage=overwrite("data_iterator/process_0-of-1.json",
                          json.dumps({"format": "json", "state": {"bogus": 1}}).encode())),
    Case("checkpoint_written_by_two_processes", lambda w: train(w),
         FileNotFoundError, r"no data iterator state for process 0 of 1 \(was it written with "
                            r"a different number of processes\?\)", workdir=True,
         damage=rename_iterator_state("process_0-of-2.json")),
]


# --- files and directories ----------------------------------------------------------------------

def workdir_is_a_file(tmp_path):
    path = tmp_path / "not_a_directory"
    path.write_text("a file")
    train(path)


def gcs_workdir_without_gcsfs(tmp_path):
    """A gs:// workdir stays a URL (it once became a local ./gs:/bucket/run directory)."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        train("gs://tfx-jax-test-bucket/run")
    finally:
        os.chdir(cwd)
        assert not (tmp_path / "gs:").exists()


def corrupt_sentencepiece_model(tmp_path):
    path = tmp_path / "vocab.model"
    path.write_bytes(b"\x00\x01 these are not protobuf bytes")
    tokenizer.SentencePieceTokenizer(path)


FILE_CASES = [
    Case("workdir_is_a_file", workdir_is_a_file,
         WorkdirError, r"workdir '\S+/not_a_directory' is a file, not a directory"),
    Case("gcs_workdir_without_gcsfs", gcs_workdir_without_gcsfs,
         ImportError, "install gcsfs"),
    Case("corrupt_sentencepiece_model", corrupt_sentencepiece_model,
         ValueError, r"vocab.model: not a SentencePiece model file \(.*could not parse "
                     r"ModelProto"),
]

CASES = MODEL_CASES + TRAIN_CASES + CHECKPOINT_CASES + FILE_CASES


def test_every_case_of_the_table_is_listed_in_docs_robustness():
    """The docs' tables are the user's view of this table: a case must not go missing there."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "robustness.md").read_text()
    missing = [case.id for case in CASES if f"`{case.id}`" not in docs]
    assert not missing, f"add these bad_input cases to docs/robustness.md: {missing}"


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A finished 4-step run with its checkpoint at step 4."""
    toy.use_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
    workdir = tmp_path_factory.mktemp("trained")
    tr.train(toy.toy_config(num_train_steps=4), str(workdir), toy.make_task(),
             toy.make_train_iter(16))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
    return workdir


def file_digests(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_raises_an_error_naming_the_problem(case, tmp_path, trained_workdir):
    if not case.workdir:
        with pytest.raises(case.error, match=case.message):
            case.call(tmp_path)
        return
    workdir = tmp_path / "workdir"
    shutil.copytree(trained_workdir, workdir)
    if case.damage is not None:
        case.damage(workdir / "checkpoints" / "4")
    before = file_digests(workdir / "checkpoints")
    with pytest.raises(case.error, match=case.message):
        case.call(workdir)
    assert file_digests(workdir / "checkpoints") == before  # nothing deleted or rewritten


# --- a bug is not the user's fault: only tfx_jax.errors.UserError becomes "error:" + exit 2 -----

def test_a_bug_while_tracing_keeps_its_traceback_and_a_user_error_is_one_line(
        tmp_path, monkeypatch, capsys):
    from tfx_jax.errors import ConfigError
    from tfx_jax.train import launch

    def broken_loss(logits, targets, **kwargs):  # a shape bug inside the traced loss
        raise ValueError(f"bug: logits {logits.shape} vs targets {targets.shape}")

    monkeypatch.setattr(tr, "token_cross_entropy", broken_loss)
    with pytest.raises(ValueError, match="bug: logits") as raised:
        with launch.user_errors():
            train(tmp_path / "bug", num_train_steps=2)
    assert not isinstance(raised.value, ConfigError)
    frames = [frame.name for frame in raised.traceback]
    assert "broken_loss" in frames and "loss_fn" in frames  # the traceback reaches the bug
    assert "error:" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # the user's mistake: one line, exit 2
        with launch.user_errors():
            train(tmp_path / "user", learning_rate=0)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config.learning_rate must be a positive number, got 0.0"]
