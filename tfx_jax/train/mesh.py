"""The device mesh: every device of every host on three named axes.

``data`` x ``fsdp`` x ``tensor`` (:func:`make_mesh`, shaped by
``config.mesh``). The train step is one ``jax.jit`` program over it (GSPMD):
batches are split over ``data`` x ``fsdp``; parameters and optimizer state
are split over ``fsdp`` (their ``embed`` axis) and ``tensor`` (heads, MLP
hidden, vocab) by the rules in :mod:`tfx_jax.train.mesh`, and are
replicated over ``data``. XLA inserts every collective itself (gradient
all-reduce / reduce-scatter, FSDP all-gathers, Megatron all-reduces). The
default ``{"data": -1, "fsdp": 1, "tensor": 1}`` is pure data parallelism.
``config.mesh.context`` > 1 adds a fourth axis, ``context``, that splits the
sequence: activations' ``length`` is sharded over it, and attention runs
context-parallel (:mod:`tfx_jax.context_parallel`: ring or all-gather).
This replaces ``jax.pmap``, which is in maintenance mode since JAX 0.8 (it is
now built on jit + shard_map).

Each host feeds only its own slice of the global batch (its *process-local*
batch, leading dim ``global_batch // jax.process_count()``);
``jax.make_array_from_process_local_data`` stitches the slices into one global
array without copying data between hosts.

Also in this module: The one rules table from logical axis names to mesh axes, and the shardings it gives.

Also in this module: Every batch size checked against the mesh before the first step, not at the first eval.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfx_jax.errors import ConfigError


# --- mesh -------------------------------------------------------------------------------


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


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """``(data, fsdp, context, tensor)`` sizes from a config like ``{"data": -1, "fsdp": 2}``.

    Missing axes have size 1; one axis may be -1 (the devices left over).
    Raises ValueError for unknown axis names, sizes that are not positive
    integers (or -1), and a product that is not the device count.
    """
    config = dict(mesh_config)
    unknown = sorted(set(config) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"config.mesh has unknown axis name(s) {unknown}; the mesh axes are "
                         f"{list(MESH_AXES)}")
    for axis, size in config.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
                size < 1 and size != -1):
            raise ConfigError(f"config.mesh.{axis} must be a positive integer or -1 (the "
                             f"remaining devices), got {size!r}")
    sizes = [int(config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh = {config}: at most one axis may be -1")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"config.mesh = {config}: the fixed axes ({fixed} devices) do not "
                             f"divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        named = [(a, n) for a, n in zip(MESH_AXES, sizes) if a != CONTEXT or n != 1]
        raise ConfigError(f"config.mesh = {config} gives {' x '.join(a for a, _ in named)} = "
                         f"{' x '.join(str(n) for _, n in named)} = {int(np.prod(sizes))} "
                         f"devices, but "
                         f"there are {num_devices}; make the product {num_devices} or use -1")
    return tuple(sizes)


# The target of a ``--compile_topology`` run (a tfx_jax.train.topology.Target), which
# ``topology.compiling_for`` sets; None in a real run, which never imports the compiler's module.
COMPILE_TARGET: contextvars.ContextVar[Optional[Any]] = contextvars.ContextVar(
    "tfx_jax_compile_target", default=None)


def compile_target():
    """The target of a ``--compile_topology`` run (None: a real run)."""
    return COMPILE_TARGET.get()


def make_mesh(mesh_config: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: every host's, or
    a ``--compile_topology`` target's, :mod:`tfx_jax.train.topology`), with ``"context"``
    before ``"tensor"`` when ``mesh_config`` asks for more than one.

    ``mesh_config`` maps axis names to sizes (default ``{"data": -1}``: pure data
    parallelism). The device order follows the topology: ``jax.make_mesh``
    (``mesh_utils``) puts ``tensor``, the innermost axis with the most
    traffic, on neighbouring chips, and on multi-slice TPU
    (``create_hybrid_device_mesh``) only ``data`` crosses the slow
    data-centre network (DCN) between slices.
    """
    if devices is None:
        target = compile_target()
        if target is None:
            devices = jax.devices()
        else:  # a --compile_topology run: the target's devices
            from tfx_jax.train.topology import target_devices  # pylint: disable=import-outside-toplevel
            devices = target_devices(target)
    devices = list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    sizes = mesh_shape({"data": -1} if mesh_config is None else mesh_config, len(devices))
    axes = tuple(a for a, n in zip(MESH_AXES, sizes) if a != CONTEXT or n > 1)
    shape = tuple(n for a, n in zip(MESH_AXES, sizes) if a in axes)
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        if shape[0] % num_slices:
            raise ConfigError(f"config.mesh.data = {shape[0]} must be a multiple of the "
                             f"{num_slices} TPU slices (only data parallelism crosses slices)")
        grid = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // num_slices,) + shape[1:], (num_slices,) + (1,) * (len(shape) - 1),
            devices)
        return Mesh(grid, axes, axis_types=auto)
    try:
        return jax.make_mesh(shape, axes, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # A device subset mesh_utils cannot lay out: plain order (process-major).
        return Mesh(np.asarray(devices).reshape(shape), axes, axis_types=auto)


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
        raise ConfigError(
            f"{what} = {batch_size} must be divisible by the number of devices in the mesh "
            f"({ways}) that split the batch (data x fsdp of "
            f"{dict(zip(mesh.axis_names, mesh.devices.shape))}); "
            f"e.g. use {max(ways, batch_size // ways * ways)}")
    if batch_size % jax.process_count():
        raise ConfigError(
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


# --- partitioning -----------------------------------------------------------------------
# The one rules table from logical axis names to mesh axes, and the shardings it gives.
#
# Models name their parameter dimensions (``tfx_jax.logical_axes``); this table
# says which mesh axis splits each name. Rules are tried in order and a mesh axis
# is used at most once per array (Flax's ``nn.logical_to_mesh_axes``), so an
# activation ``("batch", "length", "embed")`` puts the batch on ``data`` x
# ``fsdp`` and leaves ``embed`` whole, while a weight ``("embed", "mlp")`` is
# split over ``fsdp`` (its large axis: FSDP / ZeRO-3, Rajbhandari et al. 2020)
# and ``tensor`` (Megatron-LM, Shoeybi et al. 2019: column-parallel W1/Q/K/V,
# row-parallel W2/W_o, vocab-parallel embedding and logits).
#
# Replicated on purpose: LayerNorm scales/biases (``norm``), the per-head width
# (``kv``), learned position rows and ViT class outputs: they are tiny, and
# splitting them would only add collectives. Mesh axes a mesh lacks are dropped
# (a 1-D ``("data",)`` mesh gives pure data parallelism).

DATA, FSDP, CONTEXT, TENSOR = "data", "fsdp", "context", "tensor"
# ``context`` splits the sequence (tfx_jax/context_parallel.py); a mesh has it only when
# config.mesh.context > 1, so every other mesh keeps its three axes.
MESH_AXES = (DATA, FSDP, CONTEXT, TENSOR)
BATCH_AXES = (DATA, FSDP)

Rules = Sequence[tuple[str, Any]]

RULES: Rules = (
    ("batch", BATCH_AXES),  # activations: the batch over every data-parallel device
    ("length", CONTEXT),    # activations: the sequence over the context axis (if any)
    ("embed", FSDP),        # weights: FSDP splits d_model (activations: fsdp is taken by batch)
    ("mlp", TENSOR),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("vocab", TENSOR),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("position", None),
    ("classes", None),
)


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def rules_for_mesh(mesh: Mesh, rules: Optional[Rules] = None) -> tuple:
    """``rules`` (default :data:`RULES`) without the mesh axes ``mesh`` does not have."""
    out = []
    for name, entry in (RULES if rules is None else rules):
        kept = tuple(a for a in _mesh_axes(entry) if a in mesh.axis_names)
        out.append((name, None if not kept else kept[0] if len(kept) == 1 else kept))
    return tuple(out)


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Optional[Rules] = None,
                    *, what: str = "params") -> Any:
    """NamedShardings for a params tree from ``jax.eval_shape`` under recorded axes.

    Boxed leaves (``nn.LogicallyPartitioned``) are placed by the rules; plain
    leaves (a model without names) are replicated. Raises ValueError, before
    anything is computed, for a logical name the rules do not know and for a
    mesh axis that does not divide the dimension it splits (naming the
    parameter, its shape, the logical name and the mesh axis).
    """
    rules = rules_for_mesh(mesh, rules)
    known = {name for name, _ in rules}
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))

    def place(path, leaf):
        if not _is_box(leaf):
            return NamedSharding(mesh, PartitionSpec())
        shape, names = tuple(leaf.value.shape), tuple(leaf.names)
        name = f"{what}/{_path(path)}"
        unknown = [n for n in names if isinstance(n, str) and n not in known]
        if unknown:
            raise ValueError(
                f"parameter {name} (shape {shape}) has logical axis name(s) {unknown} that the "
                f"partitioning rules do not know; known names: {sorted(known)}")
        if len(names) != len(shape):
            raise ValueError(f"parameter {name} has shape {shape} but {len(names)} logical "
                             f"axis names {names}")
        spec = nn.logical_to_mesh_axes(names, rules)
        for dim, (size, logical, entry) in enumerate(zip(shape, names, spec)):
            axes = _mesh_axes(entry)
            split = int(np.prod([sizes[a] for a in axes])) if axes else 1
            if size % split:
                raise ConfigError(
                    f"parameter {name} of shape {shape}: dimension {dim} ({logical!r}, size "
                    f"{size}) is split over mesh axis {'x'.join(axes)} of size {split}, "
                    f"which does not divide it; change config.mesh or the model size")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(place, abstract_params, is_leaf=_is_box)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Optional[Rules] = None) -> Iterator[None]:
    """Inside a traced function: makes the models' ``constrain(...)`` calls real constraints."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
            nn.logical_axis_rules(rules_for_mesh(mesh, rules)):
        yield


def batch_partition(mesh: Mesh) -> PartitionSpec:
    """The batch dimension over the mesh's data-parallel axes (``data`` x ``fsdp``)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return PartitionSpec(axes if axes else None)


def batch_parallelism(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """How many ways the batch is split: the product of the ``data`` and ``fsdp`` sizes."""
    sizes = dict(mesh.shape)
    return int(np.prod([sizes[a] for a in BATCH_AXES if a in sizes]))


def rows_per_device(batch_rows: int) -> int:
    """Rows each device holds of a ``batch_rows``-row batch being traced: the batch is
    split over the data-parallel axes of the mesh in context (the library's steps trace
    under theirs; ``jax.set_mesh`` sets a user's); without a mesh, all of it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return batch_rows
    return max(1, batch_rows // batch_parallelism(mesh))


# --- batch sizes ------------------------------------------------------------------------
# Every batch size checked against the mesh before the first step, not at the first eval.
#
# The training batch is checked by :func:`tfx_jax.train.mesh.check_batch_size`.
# Evaluation batches come from the experiment; :func:`check_eval_batches` reads
# the first one before training and refuses a leading dimension that does not
# split over this host's devices (which would otherwise fail only at the first
# evaluation, after the work of a whole eval interval). :func:`padded_batch_size`
# is what pipelines use to avoid that: round an eval/test/predict batch up to a
# multiple of the device count; the extra rows are padding with ``valid=False``.

def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """``batch_size`` rounded up to a multiple of the mesh's devices (and processes)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
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
            raise ConfigError(
                f"eval batches have {rows} rows per process (batch{jax.tree_util.keystr(path)} "
                f"of shape {np.shape(leaf)}), not divisible by this host's {local_devices} "
                f"device(s) in the mesh; pad the eval batch to a multiple of the device count "
                f"(tfx_jax.train.mesh.padded_batch_size)")
