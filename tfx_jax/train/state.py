"""The train state: everything a run needs to continue, as one pytree of arrays.

``step`` counts the batches trained on, ``params`` and ``opt_state`` are the
model and optimizer pytrees, and ``rng`` is the run's base PRNG key (raw
``uint32[2]`` key data, so Orbax saves it like any array). The key used at a
step is ``jax.random.fold_in(rng, step)``: it depends only on the seed and
the step number, so a resumed run draws exactly the dropout masks an
uninterrupted run would have drawn.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    def step_rng(self) -> jax.Array:
        """The PRNG key for the current step (dropout and any other randomness)."""
        return jax.random.fold_in(self.rng, self.step)


def create_train_state(init_params: Callable[[jax.Array], Any],
                       optimizer: optax.GradientTransformation,
                       seed: int) -> TrainState:
    """Initial state at step 0: ``params = init_params(key)`` with keys derived from ``seed``."""
    params_rng, step_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(params_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=step_rng)


def abstract_train_state(init_params: Callable[[jax.Array], Any],
                         optimizer: optax.GradientTransformation, seed: int,
                         sharding: Sharding) -> TrainState:
    """The state's shapes and dtypes (``jax.ShapeDtypeStruct``) placed on ``sharding``.

    This is the restore target for checkpoints: nothing is computed, and the
    restored arrays land directly on the current mesh.
    """
    shapes = jax.eval_shape(lambda: create_train_state(init_params, optimizer, seed))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        shapes)
