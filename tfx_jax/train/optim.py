"""The optimizer: Adam as in the paper, or AdamW, with optional clipping and accumulation.

"We used the Adam optimizer with beta_1 = 0.9, beta_2 = 0.98 and epsilon = 1e-9"
(Vaswani et al. 2017, sec. 5.3) -- the defaults of ``default_config()``.
Gradient clipping by global norm and gradient accumulation are not in the
paper; they are off by default.

Also in this module: Learning-rate schedules, built from optax pieces.

Also in this module: Cross-entropy losses (with label smoothing) and accuracies, built on optax.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tfx_jax.errors import ConfigError
from tfx_jax.train.finetune import mask_optimizer


# --- optimizers -------------------------------------------------------------------------
def create_optimizer(config: ml_collections.ConfigDict, trainable: Optional[Callable] = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns ``(optimizer, schedule)`` for the config's optimizer keys.

    ``trainable(params) -> bool tree`` (a fine-tuning Task's): the other parameters
    get zero updates (:func:`tfx_jax.train.finetune.mask_optimizer`).

    The chain is: clip by global norm (if ``grad_clip_norm > 0``), then Adam or
    AdamW driven by the schedule, all wrapped in ``optax.MultiSteps`` when
    ``grad_accum_steps > 1`` (gradients of ``k`` consecutive batches are
    averaged and applied once; the schedule counts those updates).
    """
    schedule = create_learning_rate_schedule(config)
    if config.optimizer == "adam":
        base = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
    elif config.optimizer == "adamw":
        base = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay)
    else:
        raise ValueError(f"config.optimizer must be 'adam' or 'adamw', got {config.optimizer!r}")
    if config.grad_clip_norm > 0:
        base = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), base)
    if config.grad_accum_steps > 1:
        base = optax.MultiSteps(
            base, every_k_schedule=config.grad_accum_steps).gradient_transformation()
    if trainable is not None:
        base = mask_optimizer(base, trainable)
    return base, schedule


# --- schedules --------------------------------------------------------------------------
# Learning-rate schedules, built from optax pieces.
#
# The paper varies the rate over training (Vaswani et al. 2017, sec. 5.3, eq. 3):
#
#     lrate = d_model^-0.5 * min(step_num^-0.5, step_num * warmup_steps^-1.5)
#
# "increasing the learning rate linearly for the first warmup_steps training
# steps, and decreasing it thereafter proportionally to the inverse square root
# of the step number", with warmup_steps = 4000. Written as optax pieces it is a
# linear warm-up from 0 to the peak ``d_model^-0.5 * warmup^-0.5`` joined at
# ``warmup`` to an inverse-square-root decay. Schedules take optax's update
# count, which starts at 0, so the very first update has rate 0 exactly as the
# formula gives for step_num = 0.

def transformer_schedule(d_model: int, warmup_steps: int = 4000,
                         scale: float = 1.0) -> optax.Schedule:
    """The paper's schedule (eq. 3) times ``scale`` (1.0 reproduces the paper)."""
    if warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be positive, got {warmup_steps}")
    if d_model <= 0:
        raise ValueError(f"d_model must be positive, got {d_model}")
    peak = scale * d_model ** -0.5 * warmup_steps ** -0.5
    warmup = optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)

    def inverse_sqrt_decay(steps_after_warmup):
        # step_num = warmup + steps_after_warmup; peak * sqrt(warmup / step_num). join_schedules
        # also evaluates this branch before the boundary, hence the clamp at 0.
        step_num = warmup_steps + jnp.maximum(jnp.asarray(steps_after_warmup, jnp.float32), 0.0)
        return peak * jnp.sqrt(warmup_steps / step_num)

    return optax.join_schedules([warmup, inverse_sqrt_decay], [warmup_steps])


def create_learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The schedule named by ``config.schedule``, counted in optimizer updates."""
    if config.schedule == "transformer":
        return transformer_schedule(config.schedule_d_model, config.warmup_steps,
                                    scale=config.learning_rate)
    if config.schedule == "warmup_cosine":
        num_updates = config.num_train_steps // config.grad_accum_steps
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=config.learning_rate,
            warmup_steps=config.warmup_steps, decay_steps=num_updates,
            end_value=config.end_learning_rate)
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    raise ConfigError(
        f"config.schedule must be 'transformer', 'warmup_cosine' or 'constant', "
        f"got {config.schedule!r}")


# --- losses -----------------------------------------------------------------------------
# Cross-entropy losses (with label smoothing) and accuracies, built on optax.
#
# "During training, we employed label smoothing of value eps_ls = 0.1. This hurts
# perplexity, as the model learns to be more unsure, but improves accuracy and
# BLEU score." (Vaswani et al. 2017, sec. 5.4). Smoothing follows
# ``optax.smooth_labels``: the target distribution is ``(1 - alpha) * one_hot +
# alpha / num_classes``, and the reported loss is the cross-entropy against that
# distribution (so its minimum is the entropy of the smoothed target, not 0).
#
# Sequence losses ignore padding: token id ``pad_id`` (0 in this project) gets
# weight 0, and the mean runs over real tokens only. Because the train step is
# one ``jax.jit`` over the *global* batch, these means are already means over
# every real token on every device.

def _check_logits_and_labels(logits, labels, name: str) -> None:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be {name} {tuple(labels.shape)} plus a "
            f"trailing class axis")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer class ids, got dtype {labels.dtype}")


def _smoothed_cross_entropy(logits, labels, label_smoothing: float):
    """Per-position cross-entropy in float32 against (smoothed) one-hot labels."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logits = logits.astype(jnp.float32)
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, *,
                        label_smoothing: float = 0.0, pad_id: int = 0,
                        weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean (label-smoothed) cross-entropy over the real tokens of a padded batch.

    Args:
      logits: ``[batch, length, vocab]``.
      targets: ``[batch, length]`` integer token ids; ``pad_id`` marks padding.
      label_smoothing: ``alpha`` of ``optax.smooth_labels`` (paper: 0.1).
      pad_id: the padding id, ignored by the loss.
      weights: ``[batch, length]`` 0/1 per target instead of ``targets != pad_id``
        (a loss mask: e.g. the response tokens of prompt/response examples).

    Returns:
      ``(mean_loss, num_tokens)``: the loss averaged over non-pad positions
      (0 if there are none) and the number of non-pad positions (float32), the
      weight to use when averaging this loss with others.
    """
    _check_logits_and_labels(logits, targets, "targets")
    weights = _token_weights(targets, pad_id, weights)
    losses = _smoothed_cross_entropy(logits, targets, label_smoothing)
    num_tokens = weights.sum()
    return (losses * weights).sum() / jnp.maximum(num_tokens, 1.0), num_tokens


def chunked_token_losses(hidden: jax.Array, targets: jax.Array,
                         logits_fn: Callable[[jax.Array], jax.Array], *, chunk_length: int,
                         label_smoothing: float = 0.0, pad_id: int = 0,
                         weights: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`token_cross_entropy` and :func:`token_accuracy` of ``logits_fn(hidden)``,
    computed ``chunk_length`` positions at a time: the ``[batch, length, vocab]`` logits
    are never held at once, in the forward or the backward pass.

    A row of logits is ``length x vocab`` float32s (2048 x 32768: 256 MiB, and as much
    again for its gradient): the largest activation of a language model. Here each
    chunk's logits are made, reduced to its loss and accuracy sums, and dropped; the
    backward pass recomputes them a chunk at a time (``jax.checkpoint`` inside a
    ``lax.scan``), so the peak is one chunk's, ``batch x chunk_length x vocab``.

    Args:
      hidden: ``[batch, length, d]`` final hidden states (the model's ``pre_logits``).
      targets / weights / pad_id / label_smoothing: as :func:`token_cross_entropy`.
      logits_fn: ``[batch, chunk, d] -> [batch, chunk, vocab]``, the output layer.
      chunk_length: positions per chunk; a last partial chunk is padded with weight 0.

    Returns:
      ``(mean_loss, accuracy, num_tokens)``: equal to the unchunked functions' values
      up to the order of float32 sums.
    """
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be targets "
                         f"{tuple(targets.shape)} plus a trailing feature axis")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    weights = _token_weights(targets, pad_id, weights)
    batch, length = targets.shape
    chunks = -(-length // chunk_length)
    pad = chunks * chunk_length - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=pad_id)
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    def by_chunk(x):  # [batch, chunks * chunk_length, ...] -> [chunks, batch, chunk_length, ...]
        return jnp.moveaxis(x.reshape((batch, chunks, chunk_length) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_sums(h, t, w):
        logits = logits_fn(h)
        losses = _smoothed_cross_entropy(logits, t, label_smoothing)
        correct = (jnp.argmax(logits, axis=-1) == t).astype(jnp.float32)
        return (losses * w).sum(), (correct * w).sum()

    def step(sums, chunk):
        loss, correct = chunk_sums(*chunk)
        return (sums[0] + loss, sums[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss, correct), _ = jax.lax.scan(step, (zero, zero),
                                      (by_chunk(hidden), by_chunk(targets), by_chunk(weights)))
    num_tokens = weights.sum()
    denominator = jnp.maximum(num_tokens, 1.0)
    return loss / denominator, correct / denominator, num_tokens


def _example_mean(values: jax.Array, weights) -> jax.Array:
    """Mean of per-example ``values``, weighted by ``weights`` [batch] when given (0 if all 0)."""
    if weights is None:
        return values.mean()
    if weights.shape != values.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have the labels' shape "
                         f"{tuple(values.shape)}")
    weights = weights.astype(jnp.float32)
    return (values * weights).sum() / jnp.maximum(weights.sum(), 1e-9)


def classification_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                                 label_smoothing: float = 0.0,
                                 weights: jax.Array | None = None) -> jax.Array:
    """Mean (label-smoothed) cross-entropy of ``logits [batch, classes]`` vs ``labels [batch]``.

    ``weights`` [batch] (e.g. the pipelines' ``"valid"`` mask, which is False on
    the padding of the last eval batch) turns the mean into a weighted mean.
    """
    _check_logits_and_labels(logits, labels, "labels")
    return _example_mean(_smoothed_cross_entropy(logits, labels, label_smoothing), weights)


def _token_weights(targets: jax.Array, pad_id: int, weights) -> jax.Array:
    if weights is None:
        return (targets != pad_id).astype(jnp.float32)
    if weights.shape != targets.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have the targets' shape "
                         f"{tuple(targets.shape)}")
    return weights.astype(jnp.float32)


def token_accuracy(logits: jax.Array, targets: jax.Array, *, pad_id: int = 0,
                   weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(fraction of non-pad positions (or of ``weights``) whose argmax is the target,
    num_tokens)``."""
    _check_logits_and_labels(logits, targets, "targets")
    weights = _token_weights(targets, pad_id, weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    num_tokens = weights.sum()
    return (correct * weights).sum() / jnp.maximum(num_tokens, 1.0), num_tokens


def classification_accuracy(logits: jax.Array, labels: jax.Array, *,
                            weights: jax.Array | None = None) -> jax.Array:
    """Fraction of examples whose argmax over ``logits [batch, classes]`` is the label.

    With ``weights`` [batch] (e.g. ``"valid"``) the fraction counts weighted examples.
    """
    _check_logits_and_labels(logits, labels, "labels")
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _example_mean(correct, weights)
