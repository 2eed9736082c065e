"""Data parallelism: one device mesh over every device of every host.

The train step is one ``jax.jit`` program over a ``jax.sharding.Mesh`` with a
single ``data`` axis. Batches are split along that axis (``NamedSharding(mesh,
P("data"))``); parameters and optimizer state are replicated (``P()``). XLA
inserts the gradient all-reduce itself. This replaces ``jax.pmap``, which is in
maintenance mode since JAX 0.8 (it is now built on jit + shard_map).

Each host feeds only its own slice of the global batch (its *process-local*
batch, leading dim ``global_batch // jax.process_count()``);
``jax.make_array_from_process_local_data`` stitches the slices into one global
array without copying data between hosts.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           auto_detect: bool = False) -> None:
    """Starts JAX's multi-host runtime; training scripts call this first.

    * With any argument given, or the ``JAX_COORDINATOR_ADDRESS`` environment
      variable set, calls ``jax.distributed.initialize`` with them (GPU
      clusters: one process per host, same coordinator address everywhere,
      ``process_id`` 0..num_processes-1).
    * With ``auto_detect=True`` calls ``jax.distributed.initialize()`` and lets
      JAX find the cluster (Cloud TPU VMs, SLURM, Open MPI, Kubernetes).
    * Otherwise does nothing: a single process sees its local devices.

    Calling it again after the runtime is up is a no-op.
    """
    if jax.distributed.is_initialized():
        return
    explicit = (coordinator_address is not None or num_processes is not None
                or process_id is not None or "JAX_COORDINATOR_ADDRESS" in os.environ)
    if explicit or auto_detect:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)


def make_data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_data_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,),
                axis_types=(jax.sharding.AxisType.Auto,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension is split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, *, what: str = "config.batch_size") -> None:
    """Raises ValueError unless the global batch splits evenly over devices and hosts."""
    num_devices = mesh.devices.size
    if batch_size % num_devices:
        raise ValueError(
            f"{what} = {batch_size} must be divisible by the number of devices in the mesh "
            f"({num_devices}); e.g. use {max(num_devices, batch_size // num_devices * num_devices)}")
    if batch_size % jax.process_count():
        raise ValueError(
            f"{what} = {batch_size} must be divisible by the number of processes "
            f"({jax.process_count()})")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Turns a pytree of process-local NumPy arrays into global arrays sharded on ``data``.

    Every leaf needs a leading batch dimension; on each host it holds that
    host's slice, and its size must divide by the host's devices in the mesh.
    """
    sharding = batch_sharding(mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def to_global(path, leaf):
        leaf = np.asarray(leaf)
        if leaf.ndim == 0 or leaf.shape[0] % local_devices:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} has shape {leaf.shape}: its leading "
                f"(batch) dimension must be divisible by this host's {local_devices} "
                f"device(s) in the mesh")
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jax.tree_util.tree_map_with_path(to_global, batch)
