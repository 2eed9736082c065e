"""Every batch size checked against the mesh before the first step, not at the first eval.

The training batch is checked by :func:`tfx_jax.train.mesh.check_batch_size`.
Evaluation batches come from the experiment; :func:`check_eval_batches` reads
the first one before training and refuses a leading dimension that does not
split over this host's devices (which would otherwise fail only at the first
evaluation, after the work of a whole eval interval). :func:`padded_batch_size`
is what pipelines use to avoid that: round an eval/test/predict batch up to a
multiple of the device count; the extra rows are padding with ``valid=False``.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """``batch_size`` rounded up to a multiple of the mesh's devices (and processes)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    multiple = int(np.lcm(mesh.devices.size, jax.process_count()))
    return -(-batch_size // multiple) * multiple


def check_eval_batches(eval_batches, mesh: Mesh) -> None:
    """ValueError if the first eval batch's rows do not split over this host's devices.

    Re-iterable eval batches only: a callable that builds them is not called
    before its first evaluation (building the pipeline may be its whole cost).
    """
    if eval_batches is None or callable(eval_batches):
        return
    batches = iter(eval_batches)
    first = next(batches, None)
    if first is None:
        return
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    for path, leaf in jax.tree_util.tree_flatten_with_path(first)[0]:
        rows = np.shape(leaf)[0] if np.ndim(leaf) else 0
        if rows == 0 or rows % local_devices:
            raise ValueError(
                f"eval batches have {rows} rows per process (batch{jax.tree_util.keystr(path)} "
                f"of shape {np.shape(leaf)}), not divisible by this host's {local_devices} "
                f"device(s) in the mesh; pad the eval batch to a multiple of the device count "
                f"(tfx_jax.train.batch_sizes.padded_batch_size)")
