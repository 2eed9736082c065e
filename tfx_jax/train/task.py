"""What an experiment hands the training loop: how to init, how to score, how to evaluate.

The loop knows nothing of models or data formats; a :class:`Task` is the whole
contract::

    def init_params(rng):                       # -> params pytree
        return model.init({"params": rng}, dummy_src, dummy_tgt)["params"]

    def loss_fn(params, batch, rng, train):     # -> (scalar loss, {name: scalar})
        logits = model.apply({"params": params}, batch["inputs"], batch["targets_in"],
                             deterministic=not train, rngs={"dropout": rng})
        loss, num_tokens = token_cross_entropy(logits, batch["targets"], label_smoothing=0.1)
        return loss, {"weight": num_tokens}

    task = Task(init_params=init_params, loss_fn=loss_fn, evaluate=None)

``loss_fn`` runs inside ``jax.jit`` on the *global* batch (a dict of arrays
sharded over the ``data`` mesh axis) and must be differentiable in
``params``. Its metrics are scalars; the optional key ``"weight"`` (e.g. the
number of real tokens or examples) weights that batch when metrics of
several batches are averaged, and its sum is logged.

``evaluate(params, step, mesh) -> {name: float}`` is an optional callback run
on every host at evaluation time, for metrics that need more than the loss
(BLEU, exact match, ...); use :func:`tfx_jax.train.shard_batch` with ``mesh``
to feed it data. Return names from the project's vocabulary: ``exact_match``,
``bleu``, ``accuracy``.

Every app builds its Task with a factory of one shape::

    <app>_task(model_config, *, <sizes the data fixed>, <loss options>,
               evaluate=None) -> Task

the model config first (built from ``config.model`` by
``tfx_jax.model_config.from_config_dict``), then keyword-only arguments:
``translation_task(cfg, max_source_length=..., max_target_length=...,
label_smoothing=0.1, evaluate=...)``, ``classification_task(cfg,
label_smoothing=0.0, evaluate=...)``, ``generator_task(cfg, layout=...,
evaluate=...)``. The factory builds the model from the config, so a script
never needs the model object to train.

``trainable(params) -> pytree of bools`` (optional) marks the parameters the
optimizer updates; the others stay exactly as initialised (fine-tuning with a
frozen backbone or LoRA, :mod:`tfx_jax.train.finetune`).

Two optional hooks feed the loop's speed metrics (``tokens_per_sec``,
``examples_per_sec``, ``mfu``; see :mod:`tfx_jax.train.throughput`):
``flops_per_example`` is the analytic training FLOPs (forward + backward,
:mod:`tfx_jax.train.flops`) of one row of a batch, and ``count_tokens(batch)``
the number of real (non-padding) tokens in a process-local NumPy batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
from jax.sharding import Mesh

Params = Any
Batch = Mapping[str, Any]
LossFn = Callable[[Params, Batch, jax.Array, bool], tuple[jax.Array, Mapping[str, jax.Array]]]
EvaluateFn = Callable[[Params, int, Mesh], Mapping[str, float]]

WEIGHT_KEY = "weight"


@dataclasses.dataclass(frozen=True)
class Task:
    """The experiment side of training: ``init_params``, ``loss_fn`` and optional ``evaluate``."""
    init_params: Callable[[jax.Array], Params]
    loss_fn: LossFn
    evaluate: Optional[EvaluateFn] = None
    trainable: Optional[Callable[[Params], Any]] = None
    flops_per_example: Optional[float] = None
    count_tokens: Optional[Callable[[Batch], int]] = None

    def __post_init__(self):
        if self.trainable is not None and not callable(self.trainable):
            raise TypeError(f"Task.trainable must be callable or None, got {self.trainable!r}")
        for name in ("init_params", "loss_fn"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Task.{name} must be callable, got {getattr(self, name)!r}")
        for name in ("evaluate", "count_tokens"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"Task.{name} must be callable or None, got "
                                f"{getattr(self, name)!r}")
        if self.flops_per_example is not None and not self.flops_per_example > 0:
            raise ValueError(f"Task.flops_per_example must be a positive number or None, got "
                             f"{self.flops_per_example!r}")
