"""Training the encoder-decoder by teacher forcing: shifted-right inputs, smoothed loss.

"During training the decoder is given the correct previous word, not its own
guess" (teacher forcing): the decoder input is the target shifted one position
to the right behind a start token (BOS), so position ``t`` predicts target
token ``t`` from the source and the correct tokens ``0 .. t-1``, and every
position is trained in one parallel pass (the causal mask hides the future).

The loss is the cross-entropy over real target tokens (padding 0 ignored),
with label smoothing 0.1 as in the paper (sec. 5.4). Dropout (sec. 5.4,
P_drop = 0.1 on sub-layer outputs and embedding sums) draws its masks from the
``rng`` the training loop passes, a function of the seed and the step.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.data.tokenizer import BOS_ID
from tfx_jax.model_config import from_config_dict
from tfx_jax.train import Task, token_accuracy, token_cross_entropy
from tfx_jax.train.perf import training_flops, transformer_forward_flops
from tfx_jax.train.state import EvaluateFn
from tfx_jax.transformer import Transformer, TransformerConfig


def shift_right(targets: jax.Array, bos_id: int = BOS_ID, *,
                segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Decoder inputs for teacher forcing: ``[BOS, y_0, ..., y_{T-2}]`` for each row.

    ``targets`` [batch, T] holds ``y_0 .. y_{n-1}``, EOS, then padding; the last
    column drops out, so the input never contains the token it must predict.
    With packed rows (``segment_ids`` [batch, T], 0 = padding) every example is
    shifted on its own: its first position gets BOS (not the previous example's
    last token) and padding stays 0.
    """
    if targets.ndim != 2:
        raise ValueError(f"targets must have shape [batch, length], got {tuple(targets.shape)}")
    start = jnp.full((targets.shape[0], 1), bos_id, targets.dtype)
    shifted = jnp.concatenate([start, targets[:, :-1]], axis=1)
    if segment_ids is None:
        return shifted
    previous = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1]), segment_ids[:, :-1]], 1)
    starts = (segment_ids != previous) & (segment_ids != 0)
    return jnp.where(segment_ids == 0, 0, jnp.where(starts, bos_id, shifted)).astype(
        targets.dtype)


def packing_kwargs(batch: Mapping[str, jax.Array]) -> dict:
    """``Transformer.__call__``'s segment and position arguments of a packed batch ({} if
    the batch is not packed; see :mod:`tfx_jax.data.packing`)."""
    if "inputs_segmentation" not in batch:
        return {}
    return dict(src_segment_ids=batch["inputs_segmentation"],
                tgt_segment_ids=batch["targets_segmentation"],
                src_positions=batch["inputs_position"], tgt_positions=batch["targets_position"])


def decoder_inputs(batch: Mapping[str, jax.Array]) -> jax.Array:
    """The teacher-forcing decoder input of a (packed or padded) batch."""
    return shift_right(batch["targets"], segment_ids=batch.get("targets_segmentation"))


def transformer_config(model: Mapping[str, Any], *, vocab_size: int,
                       max_len: int) -> TransformerConfig:
    """A :class:`TransformerConfig` from a config's ``model`` section (a ConfigDict or dict).

    ``vocab_size`` comes from the trained tokenizer and ``max_len`` from the
    longest source or target row, so they are not part of that section.
    """
    return from_config_dict(TransformerConfig, model, vocab_size=vocab_size, max_len=max_len)


def make_loss_fn(config: TransformerConfig, *, label_smoothing: float = 0.1):
    """``loss_fn(params, batch, rng, train) -> (loss, {"accuracy", "weight"})`` for the loop.

    ``batch["inputs"]`` [B, S] are source ids and ``batch["targets"]`` [B, T]
    target ids (EOS-terminated, 0-padded); ``weight`` is the number of real
    target tokens, so batch means combine into a mean per token. A packed batch
    (``inputs_segmentation`` etc.) passes its segment ids and positions to the
    model; its padding is 0 as well, so the loss weights are the same.
    """
    model = Transformer(config)

    def loss_fn(params, batch, rng, train):
        logits = model.apply({"params": params}, batch["inputs"], decoder_inputs(batch),
                             **packing_kwargs(batch),
                             deterministic=not train, rngs={"dropout": rng})
        loss, num_tokens = token_cross_entropy(logits, batch["targets"],
                                               label_smoothing=label_smoothing)
        accuracy, _ = token_accuracy(logits, batch["targets"])
        return loss, {"accuracy": accuracy, "weight": num_tokens}

    return loss_fn


def make_init_params(config: TransformerConfig, *, max_source_length: int,
                     max_target_length: int):
    """``init_params(rng) -> params`` for sources [1, S] and targets [1, T]."""
    model = Transformer(config)

    def init_params(rng):
        source = jnp.ones((1, max_source_length), jnp.int32)
        target = jnp.ones((1, max_target_length), jnp.int32)
        return model.init({"params": rng}, source, target)["params"]

    return init_params


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real tokens of a (packed or padded) batch: its non-padding source and target ids."""
    return int(np.count_nonzero(batch["inputs"]) + np.count_nonzero(batch["targets"]))


def translation_task(config: TransformerConfig, *, max_source_length: int,
                     max_target_length: int, label_smoothing: float = 0.1,
                     evaluate: Optional[EvaluateFn] = None) -> Task:
    """The :class:`tfx_jax.train.Task` of sequence transduction with ``config``'s model."""
    return Task(init_params=make_init_params(config, max_source_length=max_source_length,
                                             max_target_length=max_target_length),
                loss_fn=make_loss_fn(config, label_smoothing=label_smoothing),
                evaluate=evaluate,
                flops_per_example=training_flops(transformer_forward_flops(
                    config, max_source_length, max_target_length)),
                count_tokens=count_tokens)
