"""The train state: everything a run needs to continue, as one pytree of arrays.

``step`` counts the batches trained on, ``params`` and ``opt_state`` are the
model and optimizer pytrees, and ``rng`` is the run's base PRNG key (raw
``uint32[2]`` key data, so Orbax saves it like any array). The key used at a
step is ``jax.random.fold_in(rng, step)``: it depends only on the seed and
the step number, so a resumed run draws exactly the dropout masks an
uninterrupted run would have drawn.

Sharded state (:func:`train_state_shardings`): ``init_params`` is traced once
with ``jax.eval_shape`` while the models record their logical axis names
(``tfx_jax.logical_axes``); the rules turn them into a ``NamedSharding`` per
parameter, and the optimizer state gets its parameter's sharding wherever it
mirrors the parameters (Adam's moments, accumulated gradients; found by
``optax.tree_map_params``); scalars (step, counts, the key) are replicated.
:func:`create_sharded_train_state` then runs the initialisation under
``jax.jit(..., out_shardings=...)``: each device computes only its own shards,
so the state is never whole on one device. The state itself holds plain arrays
(no ``LogicallyPartitioned`` boxes).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from tfx_jax.logical_axes import recording_logical_axes
from tfx_jax.train.partitioning import Rules, param_shardings


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
    params = nn.meta.unbox(init_params(params_rng))  # plain arrays, boxed or not
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=step_rng)


def abstract_params_with_axes(init_params: Callable[[jax.Array], Any]) -> Any:
    """``jax.eval_shape(init_params)`` with the models' logical axis names recorded (boxed)."""
    with recording_logical_axes():
        return jax.eval_shape(init_params, jax.random.PRNGKey(0))


def train_state_shardings(init_params: Callable[[jax.Array], Any],
                          optimizer: optax.GradientTransformation, mesh: Mesh,
                          rules: Optional[Rules] = None) -> TrainState:
    """A TrainState of ``NamedSharding``: params by the rules, optimizer state mirroring them.

    Only shapes are traced. Raises ValueError (see
    :func:`tfx_jax.train.partitioning.param_shardings`) when the mesh does not
    fit the model, before any array exists.
    """
    boxed = abstract_params_with_axes(init_params)
    params = param_shardings(boxed, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shapes = jax.eval_shape(optimizer.init, nn.meta.unbox(boxed))
    try:
        opt_state = optax.tree_map_params(optimizer, lambda _, sharding: sharding, opt_shapes,
                                          params, transform_non_params=lambda _: replicated,
                                          is_leaf=lambda x: isinstance(x, NamedSharding))
    except (ValueError, TypeError):  # e.g. multi_transform: frozen (masked) parameters
        opt_state = _shardings_by_parameter_path(opt_shapes, nn.meta.unbox(boxed), params,
                                                 replicated)
    return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated)


def _shardings_by_parameter_path(opt_shapes: Any, param_shapes: Any, param_shardings: Any,
                                 replicated: NamedSharding) -> Any:
    """Optimizer-state shardings matched to parameters by key path, for any optimizer.

    An optimizer keeps per-parameter state (Adam's moments) in subtrees with the
    parameters' structure, so the key path of such a leaf *ends* with its
    parameter's key path; it takes that parameter's sharding when the shapes
    agree. Everything else (counts, scalars) is replicated.
    """
    by_path = {}
    for (path, shape), sharding in zip(
            jax.tree_util.tree_flatten_with_path(param_shapes)[0],
            jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        by_path[tuple(path)] = (shape.shape, sharding)

    def sharding_of(path, leaf):
        for start in range(len(path)):
            match = by_path.get(tuple(path[start:]))
            if match is not None and match[0] == leaf.shape:
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(sharding_of, opt_shapes)


def create_sharded_train_state(init_params: Callable[[jax.Array], Any],
                               optimizer: optax.GradientTransformation, seed: int,
                               shardings: Union[Mesh, TrainState]) -> TrainState:
    """:func:`create_train_state` computed directly into its shards (``out_shardings``).

    ``shardings``: a TrainState of shardings (:func:`train_state_shardings`) or
    a mesh (then the default rules are used).
    """
    if isinstance(shardings, Mesh):
        shardings = train_state_shardings(init_params, optimizer, shardings)
    return jax.jit(lambda: create_train_state(init_params, optimizer, seed),
                   out_shardings=shardings)()


def abstract_train_state(init_params: Callable[[jax.Array], Any],
                         optimizer: optax.GradientTransformation, seed: int,
                         sharding: Union[Sharding, Mesh, TrainState]) -> TrainState:
    """The state's shapes and dtypes (``jax.ShapeDtypeStruct``) placed on ``sharding``.

    ``sharding`` is one Sharding for every leaf (e.g. replicated), a mesh (the
    rules place each leaf, as in training) or a TrainState of shardings. This
    is the restore target for checkpoints: nothing is computed, and the
    restored arrays land directly in their shards on the current mesh, whatever
    mesh wrote them.
    """
    shapes = jax.eval_shape(lambda: create_train_state(init_params, optimizer, seed))
    if isinstance(sharding, Mesh):
        sharding = train_state_shardings(init_params, optimizer, sharding)
    if isinstance(sharding, TrainState):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, sharding)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        shapes)
