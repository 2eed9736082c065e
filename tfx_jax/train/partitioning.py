"""The one rules table from logical axis names to mesh axes, and the shardings it gives.

Models name their parameter dimensions (``tfx_jax.logical_axes``); this table
says which mesh axis splits each name. Rules are tried in order and a mesh axis
is used at most once per array (Flax's ``nn.logical_to_mesh_axes``), so an
activation ``("batch", "length", "embed")`` puts the batch on ``data`` x
``fsdp`` and leaves ``embed`` whole, while a weight ``("embed", "mlp")`` is
split over ``fsdp`` (its large axis: FSDP / ZeRO-3, Rajbhandari et al. 2020)
and ``tensor`` (Megatron-LM, Shoeybi et al. 2019: column-parallel W1/Q/K/V,
row-parallel W2/W_o, vocab-parallel embedding and logits).

Replicated on purpose: LayerNorm scales/biases (``norm``), the per-head width
(``kv``), learned position rows and ViT class outputs: they are tiny, and
splitting them would only add collectives. Mesh axes a mesh lacks are dropped
(a 1-D ``("data",)`` mesh gives pure data parallelism).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)

Rules = Sequence[tuple[str, Any]]

RULES: Rules = (
    ("batch", BATCH_AXES),  # activations: the batch over every data-parallel device
    ("length", None),
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
                raise ValueError(
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


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the ``data`` and ``fsdp`` sizes."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    return int(np.prod([sizes[a] for a in BATCH_AXES if a in sizes]))
