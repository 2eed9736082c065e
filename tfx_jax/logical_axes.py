"""Logical axis names: what each parameter dimension *means*, so a mesh can split it.

Every parameter of every model names its dimensions with Flax's logical
partitioning (``nn.with_logical_partitioning``). The names, one vocabulary for
all models:

=========  ==========================================================
name       dimension
=========  ==========================================================
embed      the model width d_model (FSDP shards this one)
mlp        the feed-forward hidden width d_ff
heads      query heads (and the heads of the output projection W_o)
kv_heads   key/value heads (= heads without grouped-query attention)
kv         the per-head width d_k (head_dim)
vocab      the token vocabulary (embedding rows, output logits)
layers     the stacked-layers axis of an ``nn.scan``-ned stack
norm       LayerNorm scale/bias (small; kept whole)
position   rows of a learned position table (max_len)
classes    ViT classification outputs
=========  ==========================================================

plus ``None`` for dimensions never split (a patch kernel's height, width and
channels, the 3 of a fused QKV kernel). Activations are constrained at block
boundaries to ``("batch", "length", "embed")``. The names mean nothing on
their own: a rules table (``tfx_jax.train.mesh.RULES``) maps them to
mesh axes. Without rules and a mesh every constraint is a no-op.

Plain pytrees by default: ``model.init`` returns plain arrays, as it did
before the names existed, so code that reads ``params["dense"]["kernel"]``
keeps working. The names are only *recorded* (as ``nn.LogicallyPartitioned``
boxes) inside :func:`recording_logical_axes`, which is what the training
library does when it traces ``init`` with ``jax.eval_shape`` to plan the
shardings. Boxed or plain, ``model.apply`` accepts both.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax

BLOCK_ACTIVATION = ("batch", "length", "embed")

_RECORDING = contextvars.ContextVar("tfx_jax_recording_logical_axes", default=False)


@contextlib.contextmanager
def recording_logical_axes() -> Iterator[None]:
    """Inside, model initialisers return ``nn.LogicallyPartitioned`` boxes with their names."""
    token = _RECORDING.set(True)
    try:
        yield
    finally:
        _RECORDING.reset(token)


def with_axes(init_fn: Callable[..., Any], names: Sequence[Optional[str]]) -> Callable[..., Any]:
    """``init_fn`` whose result carries the logical ``names`` while recording (else plain)."""
    names = tuple(names)
    boxed = nn.with_logical_partitioning(init_fn, names)

    def init(*args, **kwargs):
        return boxed(*args, **kwargs) if _RECORDING.get() else init_fn(*args, **kwargs)

    return init


def constrain(x: jax.Array, names: Sequence[Optional[str]] = BLOCK_ACTIVATION) -> jax.Array:
    """``nn.with_logical_constraint``: a sharding hint under rules + mesh, else a no-op."""
    return nn.with_logical_constraint(x, tuple(names))
