"""Adapting a loaded ViT to a new task: a new head, another resolution.

Fine-tuning, as the paper does it (Dosovitskiy et al. 2021, sec. 3.2): "we
remove the pre-trained prediction head and attach a zero-initialized D x K
feedforward layer, where K is the number of downstream classes" (the
pre-training head had a hidden "pre_logits" layer: it goes too), and at a
higher resolution the position embeddings are interpolated in 2-D
(:func:`resize_position_embedding`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from tfx_jax.errors import ConfigError
from tfx_jax.pretrained.posemb import resize_position_embedding
from tfx_jax.vit import ViTConfig


def check_options(num_classes: Optional[int], image_size: Optional[int]) -> None:
    for name, value in (("num_classes", num_classes), ("image_size", image_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def adapt_vit(cfg: ViTConfig, flat: dict[str, np.ndarray], *, num_classes: Optional[int],
              image_size: Optional[int]) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """New zero head (``num_classes``) and/or resized position table (``image_size``)."""
    flat = dict(flat)
    if num_classes is not None:
        flat.pop("pre_logits/kernel", None)
        flat.pop("pre_logits/bias", None)
        flat["head/kernel"] = np.zeros((cfg.d_model, num_classes), np.float32)
        flat["head/bias"] = np.zeros((num_classes,), np.float32)
        cfg = cfg.replace(num_classes=num_classes, representation_size=None)
    if image_size is not None and image_size != cfg.image_size:
        if image_size % cfg.patch_size:
            raise ConfigError(f"image_size={image_size} is not a multiple of the checkpoint's "
                             f"patch_size={cfg.patch_size}")
        flat["position/embedding"] = resize_position_embedding(
            flat["position/embedding"], image_size // cfg.patch_size,
            num_prefix_tokens=1 if cfg.pool == "cls" else 0)
        cfg = cfg.replace(image_size=image_size)
    return cfg, flat
