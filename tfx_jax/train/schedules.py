"""Learning-rate schedules, built from optax pieces.

The paper varies the rate over training (Vaswani et al. 2017, sec. 5.3, eq. 3):

    lrate = d_model^-0.5 * min(step_num^-0.5, step_num * warmup_steps^-1.5)

"increasing the learning rate linearly for the first warmup_steps training
steps, and decreasing it thereafter proportionally to the inverse square root
of the step number", with warmup_steps = 4000. Written as optax pieces it is a
linear warm-up from 0 to the peak ``d_model^-0.5 * warmup^-0.5`` joined at
``warmup`` to an inverse-square-root decay. Schedules take optax's update
count, which starts at 0, so the very first update has rate 0 exactly as the
formula gives for step_num = 0.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


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
    raise ValueError(
        f"config.schedule must be 'transformer', 'warmup_cosine' or 'constant', "
        f"got {config.schedule!r}")
