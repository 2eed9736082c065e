"""Training only part of the parameters: masks, the masked optimizer, parameter counts.

Fine-tuning often freezes most of a pre-trained model (a linear probe trains
the new head only; LoRA trains its adapters and the head). The frozen
parameters get exactly zero updates: the optimizer is
``optax.multi_transform`` with ``optax.set_to_zero()`` for them, so neither
the gradient step nor weight decay touches them, and they need no optimizer
state (Adam's two moments exist for the trained parameters only).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import optax

Mask = Any  # a pytree of bools with the parameters' structure (True = trained)


def mask_optimizer(optimizer: optax.GradientTransformation,
                   trainable: Callable[[Any], Mask]) -> optax.GradientTransformation:
    """``optimizer`` on the parameters ``trainable(params)`` marks True; zero updates elsewhere."""
    def labels(params):
        return jax.tree.map(lambda t: "train" if t else "freeze", trainable(params))

    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def count_parameters(params: Any, mask: Mask = None) -> int:
    """Number of scalars in ``params`` (only where ``mask`` is True, if given)."""
    sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), params)
    if mask is not None:
        sizes = jax.tree.map(lambda s, t: s if t else 0, sizes, mask)
    return int(sum(jax.tree.leaves(sizes)))


def mask_by_top_level(params: Any, trained: tuple[str, ...]) -> Mask:
    """True for every leaf under a top-level key in ``trained``, False elsewhere."""
    return {name: jax.tree.map(lambda _, t=name in trained: t, value)
            for name, value in params.items()}


def parameter_counts(task: Any, rng: Any = None) -> tuple[int, int]:
    """(trained, total) scalar counts of a Task's parameters (shapes only, nothing computed)."""
    shapes = jax.eval_shape(task.init_params, jax.random.key(0) if rng is None else rng)
    trained = count_parameters(shapes, None if task.trainable is None else task.trainable(shapes))
    return trained, count_parameters(shapes)
