"""Fine-tuning from pre-trained parameters: what starts from the checkpoint, what trains.

Three modes, the usual ones for transfer learning:

* ``"full"``: every parameter trains (ViT's fine-tuning recipe);
* ``"frozen"``: the backbone is frozen, only the new parameters (the new
  head) train -- a linear probe;
* ``"lora"``: the backbone is frozen, low-rank adapters on its attention and
  MLP kernels train together with the new head (:mod:`tfx_jax.train.lora`).
  The train state's parameters are then ``{"model": ..., "lora": ...}`` and
  :meth:`FineTuning.model_params` merges them for ``model.apply``.

A :class:`FineTuning` gives a :class:`tfx_jax.train.Task` its
``init_params`` (from the checkpoint), the parameters to apply, and the
``trainable`` mask the loop hands to :func:`tfx_jax.train.trainable.mask_optimizer`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfx_jax.train import lora
from tfx_jax.train.trainable import Mask, mask_by_top_level

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
    lora_targets: tuple[str, ...] = lora.TARGETS

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"fine-tuning mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "lora":
            lora._check(self.lora_rank, self.lora_targets)

    def init_params(self, base_init: Callable[[jax.Array], Any],
                    pretrained: Optional[Any] = None) -> Callable[[jax.Array], Any]:
        """``init_params(rng)``: the pre-trained parameters (+ fresh adapters for LoRA).

        Without ``pretrained`` the model's own ``base_init`` gives the shapes
        (e.g. to restore a fine-tuned checkpoint for inference).
        """
        def init(rng):
            params = (base_init(rng) if pretrained is None
                      else jax.tree.map(jnp.asarray, pretrained))
            if self.mode != "lora":
                return params
            # Adapters are small and stay replicated; the base keeps its logical axes.
            adapters = lora.init_lora(jax.random.fold_in(rng, 1), nn.meta.unbox(params),
                                      rank=self.lora_rank, targets=self.lora_targets)
            return {"model": params, "lora": adapters}
        return init

    def model_params(self, params: Any) -> Any:
        """The parameters ``model.apply`` takes (LoRA adapters merged into the kernels)."""
        if self.mode != "lora":
            return params
        return lora.merge_lora(params["model"], params["lora"], alpha=self.lora_alpha)

    def trainable(self, params: Any) -> Mask:
        """True on the parameters that train."""
        if self.mode == "full":
            return jax.tree.map(lambda _: True, params)
        if self.mode == "frozen":
            return mask_by_top_level(params, self.new)
        return {"model": mask_by_top_level(params["model"], self.new),
                "lora": jax.tree.map(lambda _: True, params["lora"])}
