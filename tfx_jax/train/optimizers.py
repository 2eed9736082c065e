"""The optimizer: Adam as in the paper, or AdamW, with optional clipping and accumulation.

"We used the Adam optimizer with beta_1 = 0.9, beta_2 = 0.98 and epsilon = 1e-9"
(Vaswani et al. 2017, sec. 5.3) -- the defaults of ``default_config()``.
Gradient clipping by global norm and gradient accumulation are not in the
paper; they are off by default.
"""
from __future__ import annotations

import ml_collections
import optax

from tfx_jax.train.schedules import create_learning_rate_schedule


def create_optimizer(config: ml_collections.ConfigDict
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns ``(optimizer, schedule)`` for the config's optimizer keys.

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
    return base, schedule
