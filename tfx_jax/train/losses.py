"""Cross-entropy losses (with label smoothing) and accuracies, built on optax.

"During training, we employed label smoothing of value eps_ls = 0.1. This hurts
perplexity, as the model learns to be more unsure, but improves accuracy and
BLEU score." (Vaswani et al. 2017, sec. 5.4). Smoothing follows
``optax.smooth_labels``: the target distribution is ``(1 - alpha) * one_hot +
alpha / num_classes``, and the reported loss is the cross-entropy against that
distribution (so its minimum is the entropy of the smoothed target, not 0).

Sequence losses ignore padding: token id ``pad_id`` (0 in this project) gets
weight 0, and the mean runs over real tokens only. Because the train step is
one ``jax.jit`` over the *global* batch, these means are already means over
every real token on every device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
                        label_smoothing: float = 0.0,
                        pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Mean (label-smoothed) cross-entropy over the real tokens of a padded batch.

    Args:
      logits: ``[batch, length, vocab]``.
      targets: ``[batch, length]`` integer token ids; ``pad_id`` marks padding.
      label_smoothing: ``alpha`` of ``optax.smooth_labels`` (paper: 0.1).
      pad_id: the padding id, ignored by the loss.

    Returns:
      ``(mean_loss, num_tokens)``: the loss averaged over non-pad positions
      (0 if there are none) and the number of non-pad positions (float32), the
      weight to use when averaging this loss with others.
    """
    _check_logits_and_labels(logits, targets, "targets")
    weights = (targets != pad_id).astype(jnp.float32)
    losses = _smoothed_cross_entropy(logits, targets, label_smoothing)
    num_tokens = weights.sum()
    return (losses * weights).sum() / jnp.maximum(num_tokens, 1.0), num_tokens


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


def token_accuracy(logits: jax.Array, targets: jax.Array, *,
                   pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(fraction of non-pad positions whose argmax is the target, num_tokens)``."""
    _check_logits_and_labels(logits, targets, "targets")
    weights = (targets != pad_id).astype(jnp.float32)
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
