"""Per-device memory of a training run, planned without allocating it.

Two numbers per mesh shape, both from shapes alone (no array is created, so a
1.3B-parameter model can be planned on a laptop with simulated devices):

* ``state_bytes_per_device``: params + optimizer state on the busiest device,
  from each leaf's ``sharding.shard_shape`` (exact).
* the compiled train step's ``memory_analysis()`` per device: arguments
  (state + batch), outputs, temporaries (gradients, activations, collectives'
  buffers), minus what donation aliases. ``total = argument + output + temp -
  alias`` is XLA's own estimate of the peak. On CPU set
  ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` (see ENVIRONMENT.md),
  or fused kernels may hide temporaries.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from tfx_jax.train.mesh import batch_sharding
from tfx_jax.train.state import abstract_train_state, train_state_shardings
from tfx_jax.train.step import make_train_step
from tfx_jax.train.task import Task


def _leaf_bytes(x, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def bytes_per_device(abstract_tree: Any) -> int:
    """Bytes of one device's shards of a tree of sharded ``ShapeDtypeStruct``/arrays."""
    return sum(_leaf_bytes(x, x.sharding.shard_shape(x.shape))
               for x in jax.tree.leaves(abstract_tree))


def total_bytes(tree: Any) -> int:
    return sum(_leaf_bytes(x, x.shape) for x in jax.tree.leaves(tree))


def compiled_memory(compiled) -> dict:
    """``memory_analysis()`` of a compiled program, per device, with the peak estimate."""
    analysis = compiled.memory_analysis()
    fields = ("argument", "output", "temp", "alias", "generated_code")
    out = {f"{name}_bytes": int(getattr(analysis, f"{name}_size_in_bytes")) for name in fields}
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                          - out["alias_bytes"])
    return out


def plan_train_memory(task: Task, optimizer: optax.GradientTransformation,
                      schedule: optax.Schedule, mesh: Mesh,
                      batch: Mapping[str, Any], *, seed: int = 0,
                      grad_accum_steps: int = 1) -> dict:
    """Compiles (never runs) the library's train step on ``mesh`` for abstract inputs.

    ``batch``: one global batch (arrays or ``ShapeDtypeStruct``), only its shapes
    are used. Returns the state's bytes (total and per device) and the compiled
    step's ``memory_analysis`` per device.
    """
    shardings = train_state_shardings(task.init_params, optimizer, mesh)
    state = abstract_train_state(task.init_params, optimizer, seed, shardings)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                        sharding=batch_sharding(mesh)), batch)
    step = make_train_step(task.loss_fn, optimizer, schedule, mesh,
                           grad_accum_steps=grad_accum_steps, state_shardings=shardings)
    compiled = step.lower(state, batch).compile()
    return {
        "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
        "state_bytes_total": total_bytes(state),
        "state_bytes_per_device": bytes_per_device(state),
        "params_bytes_per_device": bytes_per_device(state.params),
        **{f"compiled_{k}": v for k, v in compiled_memory(compiled).items()},
    }

