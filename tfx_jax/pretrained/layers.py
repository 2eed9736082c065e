"""The two layouts of a block stack's parameters: one subtree per layer, or stacked.

``BlockStack`` with ``scan_layers=False`` names its layers ``layer_0 ..
layer_{N-1}``; with ``scan_layers=True`` (``nn.scan``) the same parameters
live under ``layers`` with a leading axis of size N. Loaders build the
per-layer layout; :func:`to_scan` / :func:`from_scan` convert a model's whole
parameter tree (``stack`` names the BlockStack: "encoder" in ViT, "layers" in
CausalLM), so a loaded checkpoint fits either model.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def from_scan(params: Any, stack: str, num_layers: int) -> Any:
    """Stacked ``<stack>/layers`` -> ``<stack>/layer_<i>`` (leaves sliced on axis 0)."""
    block = dict(params[stack])
    if "layers" not in block:
        raise ValueError(f"params[{stack!r}] has no scanned 'layers' subtree; its keys are "
                         f"{sorted(block)}")
    stacked = block.pop("layers")
    for i in range(num_layers):
        block[f"layer_{i}"] = _map(lambda x, i=i: x[i], stacked)
    return {**params, stack: block}


def to_scan(params: Any, stack: str, num_layers: int) -> Any:
    """``<stack>/layer_<i>`` -> stacked ``<stack>/layers`` (leaves stacked on axis 0)."""
    block = dict(params[stack])
    missing = [f"layer_{i}" for i in range(num_layers) if f"layer_{i}" not in block]
    if missing:
        raise ValueError(f"params[{stack!r}] lacks {missing}; its keys are {sorted(block)}")
    layers = [block.pop(f"layer_{i}") for i in range(num_layers)]
    block["layers"] = _map(_stack, *layers)
    return {**params, stack: block}


def _stack(*xs):
    """NumPy arrays stack in NumPy; jax arrays (placed in shards, or traced) in jax."""
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    import jax.numpy as jnp
    return jnp.stack(xs)


def _map(fn, *trees):
    """tree map over nested dicts (NumPy values stay NumPy)."""
    first = trees[0]
    if isinstance(first, dict) or hasattr(first, "items"):
        return {k: _map(fn, *(t[k] for t in trees)) for k in first}
    return fn(*trees)
