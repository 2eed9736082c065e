"""Fine-tuning from pre-trained parameters: what starts from the checkpoint, what trains.

Three modes, the usual ones for transfer learning:

* ``"full"``: every parameter trains (ViT's fine-tuning recipe);
* ``"frozen"``: the backbone is frozen, only the new parameters (the new
  head) train -- a linear probe;
* ``"lora"``: the backbone is frozen, low-rank adapters on its attention and
  MLP kernels train together with the new head (:mod:`tfx_jax.train.finetune`).
  The train state's parameters are then ``{"model": ..., "lora": ...}`` and
  :meth:`FineTuning.model_params` merges them for ``model.apply``.

A :class:`FineTuning` gives a :class:`tfx_jax.train.Task` its
``init_params`` (from the checkpoint), the parameters to apply, and the
``trainable`` mask the loop hands to :func:`tfx_jax.train.finetune.mask_optimizer`.

Also in this module: LoRA: low-rank adapters on a frozen model's attention and MLP kernels.

Also in this module: Training only part of the parameters: masks, the masked optimizer, parameter counts.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tfx_jax.errors import ConfigError


# --- trainable --------------------------------------------------------------------------
# Training only part of the parameters: masks, the masked optimizer, parameter counts.
#
# Fine-tuning often freezes most of a pre-trained model (a linear probe trains
# the new head only; LoRA trains its adapters and the head). The frozen
# parameters get exactly zero updates: the optimizer is
# ``optax.multi_transform`` with ``optax.set_to_zero()`` for them, so neither
# the gradient step nor weight decay touches them, and they need no optimizer
# state (Adam's two moments exist for the trained parameters only).

Mask = Any  # a pytree of bools with the parameters' structure (True = trained)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jax.jit(init_params)
class FromPretrained:
    """``init_params`` of a run that starts from released weights.

    ``build(rng, weights)`` gives the parameters (the weights, plus fresh adapters for
    LoRA). :func:`tfx_jax.train.create_sharded_train_state` calls it inside its jit with
    ``weights`` as an argument: closed over, they would be constants of the compiled
    program (an 8B model: 32 GB of HLO literals); as arguments, weights already placed
    in their shards (``pretrained.load_hf(mesh=...)``) stay there. Called as
    ``init_params(rng)`` it uses ``weights`` directly (shapes, small models, tests).
    """
    build: Callable[[jax.Array, Any], Any]
    weights: Any

    def __call__(self, rng: jax.Array) -> Any:
        return self.build(rng, self.weights)


def mask_optimizer(optimizer: optax.GradientTransformation,
                   trainable: Callable[[Any], Mask]) -> optax.GradientTransformation:
    """``optimizer`` on the parameters ``trainable(params)`` marks True; zero updates elsewhere."""
    def labels(params):
        return jax.tree.map(lambda t: "train" if t else "freeze", trainable(params))

    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def count_parameters(params: Any, mask: Mask = None) -> int:
    """Number of scalars in ``params`` (only where ``mask`` is True, if given)."""
    sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), params)
    if mask is not None:
        sizes = jax.tree.map(lambda s, t: s if t else 0, sizes, mask)
    return int(sum(jax.tree.leaves(sizes)))


def mask_by_top_level(params: Any, trained: tuple[str, ...]) -> Mask:
    """True for every leaf under a top-level key in ``trained``, False elsewhere."""
    return {name: jax.tree.map(lambda _, t=name in trained: t, value)
            for name, value in params.items()}


def parameter_counts(task: Any, rng: Any = None) -> tuple[int, int]:
    """(trained, total) scalar counts of a Task's parameters (shapes only, nothing computed)."""
    shapes = jax.eval_shape(task.init_params, jax.random.key(0) if rng is None else rng)
    trained = count_parameters(shapes, None if task.trainable is None else task.trainable(shapes))
    return trained, count_parameters(shapes)


# --- lora -------------------------------------------------------------------------------
# LoRA: low-rank adapters on a frozen model's attention and MLP kernels.
#
# Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models":
# freeze the pre-trained weight W and learn a low-rank update,
#
#     h = x (W + (alpha / r) A B),   A [in, r] random Gaussian,  B [r, out] zero,
#
# so that at the start of training the adapted model *is* the pre-trained model
# (B = 0), and only r * (in + out) numbers per adapted matrix are trained. The
# paper adapts the attention projections; adapting the MLP too is common
# practice (QLoRA) and is on by default here.
#
# Functional, like everything in this library: :func:`init_lora` reads a
# parameter tree and returns the adapters (a tree mirroring the adapted modules:
# ``{..., "self_attention": {"query": {"lora_a": A, "lora_b": B}}}``);
# :func:`merge_lora` returns the parameters with every adapted kernel replaced
# by W + (alpha / r) A B, ready for ``model.apply``. Kernels of any of our
# layouts are handled: multi-head kernels [D, heads, head_dim] / [heads,
# head_dim, D] / fused [D, 3, heads, head_dim] are flattened to matrices, and
# ``nn.scan``-stacked layers keep their leading layer axis.

# module name -> (number of input axes of its kernel, kernel rank without stacked layers)
KERNELS = {"query": (1, 3), "key": (1, 3), "value": (1, 3), "qkv": (1, 4), "out": (2, 3),
           "wi": (1, 2), "wi_0": (1, 2), "wi_1": (1, 2), "wo": (1, 2)}  # wi_0/1: gated MLP
PARENTS = ("self_attention", "cross_attention", "ffn")
TARGETS = tuple(KERNELS)


def _check(rank, targets):
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"LoRA rank must be a positive int, got {rank!r}")
    unknown = sorted(set(targets) - set(KERNELS))
    if unknown:
        raise ConfigError(f"LoRA targets {unknown} are not adaptable kernels; "
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


def beside_kernels(params: Any, adapters: Any) -> Any:
    """``params`` with each adapter's ``lora_a`` / ``lora_b`` put beside the kernel it
    adapts (a dict merge: no arithmetic), for :func:`adapted_layers`."""
    out = dict(params)
    for name, adapter in adapters.items():
        if name not in params:
            raise ValueError(f"LoRA adapter for {name!r} has no parameters to adapt; "
                             f"parameter keys are {sorted(params)}")
        out[name] = ({**params[name], **adapter} if "lora_a" in adapter
                     else beside_kernels(params[name], adapter))
    return out


@contextlib.contextmanager
def adapted_layers(alpha: float) -> Iterator[None]:
    """Inside, every ``nn.Dense`` / ``nn.DenseGeneral`` whose parameters hold ``lora_a``
    and ``lora_b`` (:func:`beside_kernels`) returns ``x W + (alpha / r) (x A) B``.

    The same function as ``x (W + (alpha / r) A B)`` (:func:`merge_lora`), computed
    the paper's way: the gradients of A and B pass through [.., r] activations only,
    never through a [in, out] update of W, so a LoRA step needs no full-size copy or
    gradient of the adapted kernels (merged, an 8B model's LoRA step took more memory
    than full fine-tuning). It works inside ``nn.scan``: the adapters are stacked with
    the layers' other parameters and sliced with them.
    """
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        out = next_fun(*args, **kwargs)
        if (context.method_name != "__call__"
                or not isinstance(module, (nn.Dense, nn.DenseGeneral))
                or not module.has_variable("params", "lora_a")):
            return out
        a = module.get_variable("params", "lora_a")
        b = module.get_variable("params", "lora_b")
        x = args[0]
        contracted = 1 if isinstance(module, nn.Dense) else len(np.atleast_1d(module.axis))
        x = x.reshape(x.shape[:x.ndim - contracted] + (a.shape[-2],)).astype(out.dtype)
        delta = (x @ a.astype(out.dtype)) @ b.astype(out.dtype)
        return out + (alpha / a.shape[-1]) * delta.reshape(out.shape)

    with nn.intercept_methods(intercept):
        yield


# --- finetune ---------------------------------------------------------------------------
MODES = ("full", "frozen", "lora")


@dataclasses.dataclass(frozen=True)
class FineTuning:
    """How to fine-tune.

    Attributes:
      mode: "full", "frozen" (train only ``new``) or "lora" (adapters + ``new``).
      new: top-level parameter names that are new for the task (the head); they
        always train.
      lora_rank: r, the adapters' rank.
      lora_alpha: the update is scaled by alpha / r (the paper's alpha).
      lora_targets: module names whose kernels get adapters (attention
        query/key/value/qkv/out, MLP wi/wo).
    """
    mode: str = "full"
    new: tuple[str, ...] = ("head",)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"fine-tuning mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "lora":
            _check(self.lora_rank, self.lora_targets)

    def init_params(self, base_init: Callable[[jax.Array], Any],
                    pretrained: Optional[Any] = None,
                    layout: Optional[Callable[[Any], Any]] = None
                    ) -> Callable[[jax.Array], Any]:
        """``init_params(rng)``: the pre-trained parameters (+ fresh adapters for LoRA).

        Without ``pretrained`` the model's own ``base_init`` gives the shapes
        (e.g. to restore a fine-tuned checkpoint for inference). With it, a
        :class:`FromPretrained`: the training library passes the weights to the jit
        that builds the state as an argument, never as constants of the program;
        ``layout(weights)`` (e.g. stacking the layers for ``scan_layers``) runs there.
        """
        def add_adapters(rng, params):
            if self.mode != "lora":
                return params
            # Adapters are small and stay replicated; the base keeps its logical axes.
            adapters = init_lora(jax.random.fold_in(rng, 1), nn.meta.unbox(params),
                                 rank=self.lora_rank, targets=self.lora_targets)
            return {"model": params, "lora": adapters}

        if pretrained is None:
            return lambda rng: add_adapters(rng, base_init(rng))

        def build(rng, weights):
            weights = jax.tree.map(jnp.asarray, weights)
            return add_adapters(rng, weights if layout is None else layout(weights))
        return FromPretrained(build=build, weights=pretrained)

    def model_params(self, params: Any) -> Any:
        """The parameters ``model.apply`` takes (LoRA adapters merged into the kernels:
        to generate or export; training uses :meth:`applying`)."""
        if self.mode != "lora":
            return params
        return merge_lora(params["model"], params["lora"], alpha=self.lora_alpha)

    def applying(self, params: Any) -> tuple[Any, Any]:
        """``(parameters, context)`` for a training step's ``model.apply``: ``with
        context: model.apply({"params": parameters}, ...)``.

        The frozen weights pass through ``jax.lax.stop_gradient``, so the step
        computes no gradient for them (one the optimizer would drop: a frozen 8B
        model's is 32 GB of float32); LoRA adapters sit beside their kernels and the
        adapted layers add ``(x A) B`` (:func:`adapted_layers`) instead of a merged
        copy of every adapted kernel.
        """
        if self.mode == "full":
            return params, contextlib.nullcontext()
        base = params["model"] if self.mode == "lora" else params
        base = {name: value if name in self.new else jax.lax.stop_gradient(value)
                for name, value in base.items()}
        if self.mode != "lora":
            return base, contextlib.nullcontext()
        return beside_kernels(base, params["lora"]), adapted_layers(self.lora_alpha)

    def trainable(self, params: Any) -> Mask:
        """True on the parameters that train."""
        if self.mode == "full":
            return jax.tree.map(lambda _: True, params)
        if self.mode == "frozen":
            return mask_by_top_level(params, self.new)
        return {"model": mask_by_top_level(params["model"], self.new),
                "lora": jax.tree.map(lambda _: True, params["lora"])}
