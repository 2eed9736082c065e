"""LoRA: low-rank adapters on a frozen model's attention and MLP kernels.

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models":
freeze the pre-trained weight W and learn a low-rank update,

    h = x (W + (alpha / r) A B),   A [in, r] random Gaussian,  B [r, out] zero,

so that at the start of training the adapted model *is* the pre-trained model
(B = 0), and only r * (in + out) numbers per adapted matrix are trained. The
paper adapts the attention projections; adapting the MLP too is common
practice (QLoRA) and is on by default here.

Functional, like everything in this library: :func:`init_lora` reads a
parameter tree and returns the adapters (a tree mirroring the adapted modules:
``{..., "self_attention": {"query": {"lora_a": A, "lora_b": B}}}``);
:func:`merge_lora` returns the parameters with every adapted kernel replaced
by W + (alpha / r) A B, ready for ``model.apply``. Kernels of any of our
layouts are handled: multi-head kernels [D, heads, head_dim] / [heads,
head_dim, D] / fused [D, 3, heads, head_dim] are flattened to matrices, and
``nn.scan``-stacked layers keep their leading layer axis.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

# module name -> (number of input axes of its kernel, kernel rank without stacked layers)
KERNELS = {"query": (1, 3), "key": (1, 3), "value": (1, 3), "qkv": (1, 4), "out": (2, 3),
           "wi": (1, 2), "wi_0": (1, 2), "wi_1": (1, 2), "wo": (1, 2)}  # wi_0/1: gated MLP
PARENTS = ("self_attention", "cross_attention", "ffn")
TARGETS = tuple(KERNELS)


def _check(rank, targets):
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    unknown = sorted(set(targets) - set(KERNELS))
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not adaptable kernels; "
                         f"choose from {TARGETS}")


def _adapted(params: Any, targets: Sequence[str], parent: str = ""):
    """Yields (path, kernel) of every kernel to adapt."""
    for name, value in params.items():
        if not hasattr(value, "items"):
            continue
        if name in targets and parent in PARENTS and "kernel" in value:
            yield (name,), value["kernel"]
        else:
            for path, kernel in _adapted(value, targets, name):
                yield (name, *path), kernel


def _shape(name: str, kernel_shape) -> tuple[tuple, int, int]:
    """(stacked layer axes, input size, output size) of a kernel."""
    in_axes, ndim = KERNELS[name]
    stack = tuple(kernel_shape[:len(kernel_shape) - ndim])
    own = kernel_shape[len(stack):]
    fan_in = 1
    for d in own[:in_axes]:
        fan_in *= d
    fan_out = 1
    for d in own[in_axes:]:
        fan_out *= d
    return stack, fan_in, fan_out


def init_lora(rng: jax.Array, params: Any, *, rank: int,
              targets: Sequence[str] = TARGETS) -> dict:
    """Adapters for every target kernel: A ~ N(0, 1/in) [.., in, rank], B = 0 [.., rank, out]."""
    _check(rank, targets)
    adapters: dict = {}
    found = list(_adapted(params, tuple(targets)))
    if not found:
        raise ValueError(f"no kernel of the modules {tuple(targets)} under "
                         f"{PARENTS} in the parameters; nothing to adapt")
    for index, (path, kernel) in enumerate(found):
        stack, fan_in, fan_out = _shape(path[-1], kernel.shape)
        a = jax.random.normal(jax.random.fold_in(rng, index), (*stack, fan_in, rank),
                              jnp.float32) / jnp.sqrt(jnp.float32(fan_in))
        node = adapters
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = {"lora_a": a.astype(kernel.dtype),
                          "lora_b": jnp.zeros((*stack, rank, fan_out), kernel.dtype)}
    return adapters


def merge_lora(params: Any, adapters: Any, *, alpha: float) -> Any:
    """``params`` with each adapted kernel W replaced by W + (alpha / r) A B."""
    merged = dict(params)
    for name, adapter in adapters.items():
        if name not in params:
            raise ValueError(f"LoRA adapter for {name!r} has no parameters to adapt; "
                             f"parameter keys are {sorted(params)}")
        if "lora_a" in adapter:
            kernel = params[name]["kernel"]
            a, b = adapter["lora_a"], adapter["lora_b"]
            delta = jnp.matmul(a, b) * (alpha / a.shape[-1])
            merged[name] = {**params[name],
                            "kernel": kernel + delta.reshape(kernel.shape).astype(kernel.dtype)}
        else:
            merged[name] = merge_lora(params[name], adapter, alpha=alpha)
    return merged
