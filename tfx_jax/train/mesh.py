"""The device mesh: every device of every host on three named axes.

``data`` x ``fsdp`` x ``tensor`` (:func:`make_mesh`, shaped by
``config.mesh``). The train step is one ``jax.jit`` program over it (GSPMD):
batches are split over ``data`` x ``fsdp``; parameters and optimizer state
are split over ``fsdp`` (their ``embed`` axis) and ``tensor`` (heads, MLP
hidden, vocab) by the rules in :mod:`tfx_jax.train.partitioning`, and are
replicated over ``data``. XLA inserts every collective itself (gradient
all-reduce / reduce-scatter, FSDP all-gathers, Megatron all-reduces). The
default ``{"data": -1, "fsdp": 1, "tensor": 1}`` is pure data parallelism.
This replaces ``jax.pmap``, which is in maintenance mode since JAX 0.8 (it is
now built on jit + shard_map).

Each host feeds only its own slice of the global batch (its *process-local*
batch, leading dim ``global_batch // jax.process_count()``);
``jax.make_array_from_process_local_data`` stitches the slices into one global
array without copying data between hosts.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfx_jax.train.partitioning import MESH_AXES, batch_parallelism, batch_partition

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


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` sizes from a config like ``{"data": -1, "fsdp": 2}``.

    Missing axes have size 1; one axis may be -1 (the devices left over).
    Raises ValueError for unknown axis names, sizes that are not positive
    integers (or -1), and a product that is not the device count.
    """
    config = dict(mesh_config)
    unknown = sorted(set(config) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.mesh has unknown axis name(s) {unknown}; the mesh axes are "
                         f"{list(MESH_AXES)}")
    for axis, size in config.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
                size < 1 and size != -1):
            raise ValueError(f"config.mesh.{axis} must be a positive integer or -1 (the "
                             f"remaining devices), got {size!r}")
    sizes = [int(config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh = {config}: at most one axis may be -1")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"config.mesh = {config}: the fixed axes ({fixed} devices) do not "
                             f"divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"config.mesh = {config} gives data x fsdp x tensor = "
                         f"{' x '.join(map(str, sizes))} = {int(np.prod(sizes))} devices, but "
                         f"there are {num_devices}; make the product {num_devices} or use -1")
    return tuple(sizes)


def make_mesh(mesh_config: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: every host's, or
    a ``--compile_topology`` target's, :mod:`tfx_jax.train.topology`).

    ``mesh_config`` maps axis names to sizes (default ``{"data": -1}``: pure data
    parallelism). The device order follows the topology: ``jax.make_mesh``
    (``mesh_utils``) puts ``tensor``, the innermost axis with the most
    traffic, on neighbouring chips, and on multi-slice TPU
    (``create_hybrid_device_mesh``) only ``data`` crosses the slow
    data-centre network (DCN) between slices.
    """
    if devices is None:  # a --compile_topology run: the target's devices
        from tfx_jax.train.topology import compile_target, target_devices
        target = compile_target()
        devices = jax.devices() if target is None else target_devices(target)
    devices = list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    shape = mesh_shape({"data": -1} if mesh_config is None else mesh_config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        if shape[0] % num_slices:
            raise ValueError(f"config.mesh.data = {shape[0]} must be a multiple of the "
                             f"{num_slices} TPU slices (only data parallelism crosses slices)")
        grid = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // num_slices, shape[1], shape[2]), (num_slices, 1, 1), devices)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # A device subset mesh_utils cannot lay out: plain order (process-major).
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def make_data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """Pure data parallelism: :func:`make_mesh` with ``data`` over all ``devices``."""
    return make_mesh({"data": -1}, devices)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension is split over the ``data`` x ``fsdp`` axes."""
    return NamedSharding(mesh, batch_partition(mesh))


def check_batch_size(batch_size: int, mesh: Mesh, *, what: str = "config.batch_size") -> None:
    """Raises ValueError unless the global batch splits evenly over devices and hosts."""
    ways = batch_parallelism(mesh)
    if batch_size % ways:
        raise ValueError(
            f"{what} = {batch_size} must be divisible by the number of devices in the mesh "
            f"({ways}) that split the batch (data x fsdp of "
            f"{dict(zip(mesh.axis_names, mesh.devices.shape))}); "
            f"e.g. use {max(ways, batch_size // ways * ways)}")
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
    local_devices = _local_batch_shards(mesh)

    def to_global(path, leaf):
        leaf = np.asarray(leaf)
        if leaf.ndim == 0 or leaf.shape[0] % local_devices:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} has shape {leaf.shape}: its leading "
                f"(batch) dimension must be divisible by this host's {local_devices} "
                f"batch shard(s) in the mesh")
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jax.tree_util.tree_map_with_path(to_global, batch)


def _local_batch_shards(mesh: Mesh) -> int:
    """How many distinct batch slices this host's devices hold (tensor replicas count once)."""
    batch_dims = [i for i, a in enumerate(mesh.axis_names) if a in ("data", "fsdp")]
    here = np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices)
    return len({tuple(index[i] for i in batch_dims) for index in zip(*np.nonzero(here))})
