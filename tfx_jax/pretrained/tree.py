"""Our parameter trees as flat ``"a/b/c" -> array`` dicts, and back.

Checkpoint formats are flat name -> tensor mappings, so both directions of
every converter work on flat dicts of our own names
(``"encoder/layer_0/self_attention/query/kernel"``). :func:`canonical` brings
any model's tree to the layout loaders produce: per-layer subtrees (not
``nn.scan``-stacked) and separate query/key/value (not ``fused_qkv``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tfx_jax.pretrained.layers import from_scan


def flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts -> ``{"a/b": leaf}`` (boxed leaves are unboxed)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = np.asarray(getattr(value, "value", value))
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    """``{"a/b": leaf}`` -> nested dicts."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def canonical(params: Any, stack: str, num_layers: int, scanned: bool) -> dict[str, np.ndarray]:
    """Flat per-layer, unfused parameters of a model (``stack``: its BlockStack's name)."""
    params = {k: v for k, v in params.items()}
    if scanned:
        params = from_scan(params, stack, num_layers)
    flat = {}
    for name, value in flatten(params).items():
        head, _, leaf = name.rpartition("/qkv/")
        if not _:
            flat[name] = value
            continue
        axis = 1 if leaf == "kernel" else 0  # kernel [D, 3, N, H], bias [3, N, H]
        for index, part in enumerate(("query", "key", "value")):
            flat[f"{head}/{part}/{leaf}"] = np.take(value, index, axis=axis)
    return flat
