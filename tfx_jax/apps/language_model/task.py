"""Training and evaluating a GPT-style causal LM: next-token loss, perplexity, the Task.

The model reads ``inputs`` (the sequence shifted right behind BOS) and is
trained to predict ``targets`` at every position; the loss is the mean
negative log-likelihood (NLL, nats) over the targets of ``weights`` 1 (padding,
and the prompts of prompt/response examples, have weight 0; a batch without
``weights`` counts its non-zero targets). On held-out text

    perplexity = exp(sum of token NLLs / number of tokens)

i.e. ``exp`` of the token-weighted mean loss (never a mean of per-batch
perplexities). ``accuracy`` is the fraction of target tokens that are the
model's argmax.

A packed batch (``inputs_segmentation``, ``inputs_position``) passes them to
:class:`tfx_jax.CausalLM` as ``segment_ids`` and ``positions``, so each packed
example sees only itself and starts at position 0.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from tfx_jax import train as tr
from tfx_jax.errors import ConfigError
from tfx_jax.lm import CausalLM, CausalLMConfig, output_logits
from tfx_jax.model_config import from_config_dict, model_section
from tfx_jax import pretrained
from tfx_jax.train.finetune import FineTuning
from tfx_jax.train.perf import causal_lm_forward_flops, training_flops


# The default config's model section (experiments/configs/lm.py). A run from a checkpoint
# takes the checkpoint's architecture: a key of config.model that differs from this
# default was set by the user, and is refused when the checkpoint disagrees.
def default_model_section():
    """The default config's ``model`` section: every CausalLMConfig field but vocab_size
    and max_len (:func:`tfx_jax.model_config.model_section`), a small GPT by default."""
    return model_section(CausalLMConfig, dict(
        num_layers=4, d_model=128, num_heads=4, d_ff=512, dropout_rate=0.0),
        derived=("vocab_size", "max_len"))


DEFAULT_MODEL = default_model_section().to_dict()


def lm_config(model: Mapping[str, Any], *, vocab_size: int, max_len: int) -> CausalLMConfig:
    """A :class:`CausalLMConfig` from a config's ``model`` section (ConfigDict or dict).

    ``vocab_size`` comes from the tokenizer and ``max_len`` from ``config.max_len``;
    fields set to None keep CausalLMConfig's default. Unknown, derived or bad keys
    are refused by :func:`tfx_jax.model_config.from_config_dict`.
    """
    fields = dict(model.to_dict() if hasattr(model, "to_dict") else model)
    fields = {k: v for k, v in fields.items() if v is not None}
    return from_config_dict(CausalLMConfig, fields, vocab_size=vocab_size, max_len=max_len)


def packing_kwargs(batch: Mapping[str, Any]) -> dict:
    """``CausalLM.__call__``'s ``segment_ids`` / ``positions`` of a packed batch ({} if unpacked)."""
    if "inputs_segmentation" not in batch:
        return {}
    return dict(segment_ids=batch["inputs_segmentation"], positions=batch["inputs_position"])


# Logits one loss chunk holds on a device: rows x positions x vocabulary, 2^23 float32s
# (32 MiB, and as much again for their gradient).
LOGITS_CHUNK_ELEMENTS = 2 ** 23


def logits_chunk_length(max_len: int, vocab_size: int, requested: int = 0, *,
                        rows: int = 1) -> int:
    """Positions of each row whose logits the loss computes at once
    (:func:`tfx_jax.train.chunked_token_losses`): ``requested`` if > 0, else the whole
    row when the ``rows`` rows a device holds have at most LOGITS_CHUNK_ELEMENTS logits,
    else the largest power of two that keeps ``rows x positions x vocab_size`` under
    it (at least 16 positions)."""
    if requested > 0:
        return min(requested, max_len)
    per_row = LOGITS_CHUNK_ELEMENTS // max(rows, 1)
    if max_len * vocab_size <= per_row:
        return max_len
    return max(16, 2 ** int(math.log2(max(per_row // vocab_size, 1))))


def make_loss_fn(model: CausalLM, finetuning: Optional[FineTuning] = None, *,
                 logits_chunk: Optional[int] = 0):
    """``loss_fn(params, batch, rng, train) -> (mean token NLL, {"accuracy", "weight"})``
    (:func:`tfx_jax.train.token_cross_entropy` / ``token_accuracy`` on ``batch["weights"]``,
    without them padding 0 ignored). ``finetuning``: how the parameters of a run from a
    checkpoint apply (:meth:`tfx_jax.train.finetune.FineTuning.applying`: frozen weights
    without gradients, LoRA adapters beside their kernels).

    ``logits_chunk`` (:func:`logits_chunk_length`'s ``requested``; 0: decided while
    tracing, from the rows each device holds of the batch; None: never chunk): when
    shorter than the rows, the model returns its hidden states and the loss projects
    them to logits that many positions at a time (:func:`tfx_jax.train.chunked_token_losses`;
    the same values, far less memory)."""

    def loss_fn(params, batch, rng, train):
        applied, context = ((params, contextlib.nullcontext()) if finetuning is None
                            else finetuning.applying(params))
        tokens, targets, weights = batch["inputs"], batch["targets"], batch.get("weights")
        rows, length = tokens.shape
        chunk_length = length if logits_chunk is None else logits_chunk_length(
            length, model.config.vocab_size, logits_chunk, rows=tr.rows_per_device(rows))
        chunked = chunk_length < length
        with context:
            out = model.apply({"params": applied}, tokens, **packing_kwargs(batch),
                              deterministic=not train, rngs={"dropout": rng},
                              return_hidden=chunked)
        if chunked:
            loss, accuracy, num_tokens = tr.chunked_token_losses(
                out, targets, functools.partial(output_logits, model.config, applied),
                chunk_length=chunk_length, weights=weights)
        else:
            loss, num_tokens = tr.token_cross_entropy(out, targets, weights=weights)
            accuracy, _ = tr.token_accuracy(out, targets, weights=weights)
        return loss, {"accuracy": accuracy, "weight": num_tokens}

    return loss_fn


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real tokens of a batch: its weighted targets (each is one prediction), without
    ``weights`` its non-padding targets."""
    if "weights" in batch:
        return int(np.count_nonzero(batch["weights"]))
    return int(np.count_nonzero(batch["targets"]))


def make_init_params(config: CausalLMConfig, *, max_len: int):
    """``init_params(rng) -> params`` of the LM on rows of ``max_len`` tokens."""
    model = CausalLM(config)

    def init_params(rng):
        return model.init({"params": rng}, jnp.ones((1, max_len), jnp.int32))["params"]

    return init_params


def lm_task(config: CausalLMConfig, *, max_len: int, num_eval_examples: Optional[int] = None,
            evaluate=None, finetuning: Optional[FineTuning] = None,
            pretrained_params: Any = None, logits_chunk: int = 0) -> tr.Task:
    """The :class:`tfx_jax.train.Task` of next-token prediction on rows of ``max_len`` tokens.

    With ``finetuning`` the run starts from ``pretrained_params`` (None: parameters of
    the same structure, to restore a fine-tuned checkpoint) and trains what its mode
    marks trainable (:class:`tfx_jax.train.finetune.FineTuning`; LoRA adapts the
    attention and MLP kernels). Evaluation is the loop's common path (its eval batches
    through ``loss_fn``: token-weighted ``loss`` and ``accuracy``); ``eval_summary`` adds
    ``perplexity = exp(loss)``, ``num_tokens`` and, if given, ``num_examples``.
    ``logits_chunk``: positions whose logits the loss holds at once (0: chosen by
    :func:`logits_chunk_length`).
    """
    if max_len > config.max_len:
        raise ConfigError(f"rows of max_len={max_len} tokens do not fit the model's context "
                          f"max_len={config.max_len}")
    model = CausalLM(config)

    def eval_summary(averaged):
        summary = {"perplexity": float(np.exp(averaged["loss"])),
                   "num_tokens": int(averaged["weight"])}
        if num_eval_examples is not None:
            summary["num_examples"] = num_eval_examples
        return summary

    init_params, trainable = make_init_params(config, max_len=max_len), None
    if finetuning is not None:
        layout = None
        if config.scan_layers:  # a checkpoint's layers, stacked for nn.scan (in the jit)
            layout = functools.partial(pretrained.to_scan, stack="layers", num_layers=config.num_layers)
        init_params = finetuning.init_params(init_params, pretrained_params, layout)
        trainable = finetuning.trainable
    return tr.Task(init_params=init_params, trainable=trainable,
                   loss_fn=make_loss_fn(model, finetuning, logits_chunk=logits_chunk),
                   evaluate=evaluate,
                   flops_per_example=training_flops(causal_lm_forward_flops(config, max_len)),
                   count_tokens=count_tokens, eval_summary=eval_summary)
