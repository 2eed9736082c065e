"""The Vision Transformer (Dosovitskiy et al. 2021): image patches used as words.

An image [H, W, C] is cut into non-overlapping P x P patches; each patch is
flattened and linearly projected to d_model (one strided convolution does
both), giving a sequence of (H/P)*(W/P) "words". A learned [CLS] token is
prepended, learned position embeddings are added, and a pre-LN Transformer
encoder (GELU MLPs) mixes the patches. The classification head reads the
final [CLS] vector (or the mean of the patch vectors: global average pooling).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfx_jax.blocks import BlockStack
from tfx_jax.errors import ConfigError
from tfx_jax.logical_axes import with_axes
from tfx_jax.model_config import StackConfig, check_one_of, check_positive
from tfx_jax.position import AddPositionEncoding

POOLINGS = ("cls", "gap")
# Named sizes: (d_model, num_layers, d_ff, num_heads). B, L, H: Dosovitskiy et al. 2021,
# Table 1 (86M, 307M, 632M parameters); Ti, S: Touvron et al. 2021 (DeiT), Table 1 (5M, 22M).
SIZES = {"Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "B": (768, 12, 3072, 12),
         "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig(StackConfig):
    """ViT hyper-parameters; defaults are ViT-B/16 at 224x224 for ImageNet-1k.

    Attributes (beyond :class:`StackConfig`):
      image_size: square input side in pixels; must divide by patch_size.
      patch_size: P, the side of a patch ("16x16 words").
      num_channels: C of the input images.
      num_classes: size of the classification head.
      num_layers: encoder depth.
      pool: "cls" (read the [CLS] token, the paper) or "gap" (average the patches).
      representation_size: if set, a "pre_logits" layer Dense(representation_size) + tanh
        between the pooled vector and the head (the paper's pre-training head, kept by
        the ImageNet-21k checkpoints of google-research/vision_transformer); None: none.
    """
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_classes: int = 1000
    num_layers: int = 12
    pool: str = "cls"
    representation_size: Optional[int] = None
    d_model: int = 768
    num_heads: int = 12
    d_ff: int = 3072
    dropout_rate: float = 0.0
    pre_norm: bool = True
    activation: str = "gelu"

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "image_size", "patch_size", "num_channels", "num_classes",
                       "num_layers")
        if self.image_size % self.patch_size:
            raise ConfigError(f"ViTConfig.patch_size={self.patch_size} does not divide "
                             f"image_size={self.image_size}")
        check_one_of(self, "pool", POOLINGS)
        if self.representation_size is not None:
            check_positive(self, "representation_size")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ViTConfig":
        """A named variant "<size>/<patch>", e.g. "B/16" (ViT-Base, 16x16 patches), "Ti/16",
        "S/16", "L/16", "H/14", "B/32": the size is one of ``SIZES``, the patch any
        side dividing ``image_size``. ``overrides`` set other fields (``num_classes``,
        ``image_size``, ``dropout_rate``, ...); the defaults are 224x224 RGB, 1000 classes.

        Parameter counts at the defaults: Ti/16 5.7M, S/16 22.1M, B/16 86.6M, L/16 304.3M,
        H/14 632.0M (the papers print 5M, 22M, 86M, 632M; Table 1's 307M for ViT-L is
        the count with 32x32 patches, L/32: 306.5M).
        """
        size, _, patch = name.partition("/")
        if size not in SIZES or not patch.isdigit():
            raise ConfigError(f"ViT preset must be '<size>/<patch>' with size one of "
                             f"{tuple(SIZES)} and an integer patch, e.g. 'B/16'; got {name!r}")
        d_model, num_layers, d_ff, num_heads = SIZES[size]
        return cls(**{**dict(d_model=d_model, num_layers=num_layers, d_ff=d_ff,
                             num_heads=num_heads, patch_size=int(patch)), **overrides})

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ViT(nn.Module):
    """``apply({"params": p}, images [B, H, W, C]) -> logits [B, num_classes]`` (float32).

    With ``return_intermediates=True`` it returns ``(logits, out)``, ``out`` a dict:
      "patches": [B, num_patches, D] the patch embeddings (the stem's output);
      "layers": [num_layers, B, T, D] each encoder block's output (T = patches + [CLS]);
      "encoded": [B, T, D] the encoder's output (after the final LayerNorm);
      "pre_logits": [B, D] (or [B, representation_size]) the vector the head reads.
    Attention probabilities: applied with ``mutable=["intermediates"]``, see
    :class:`tfx_jax.MultiHeadAttention`.
    """
    config: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array, *, deterministic: bool = True,
                 return_intermediates: bool = False):
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape [batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}], got {tuple(images.shape)}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(f"images must be floating point (normalised pixels), "
                            f"got dtype {images.dtype}")
        p = cfg.patch_size
        x = nn.Conv(cfg.d_model, (p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, name="patch_embedding",
                    kernel_init=with_axes(nn.linear.default_kernel_init,
                                          (None, None, None, "embed")),
                    bias_init=with_axes(nn.initializers.zeros_init(), ("embed",)))(images)
        batch = x.shape[0]
        x = x.reshape(batch, -1, cfg.d_model)  # [B, num_patches, D]: patches as words
        out = {"patches": x}
        if cfg.pool == "cls":
            cls = self.param("cls", with_axes(nn.initializers.zeros, (None, None, "embed")),
                             (1, 1, cfg.d_model), cfg.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.d_model)).astype(x.dtype),
                                 x], axis=1)
        x = AddPositionEncoding(x.shape[1], "learned", param_dtype=cfg.param_dtype,
                                name="position")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = BlockStack(cfg, cfg.num_layers, deterministic=deterministic, name="encoder")(
            x, return_intermediates=return_intermediates)
        x, out["layers"] = x if return_intermediates else (x, None)
        out["encoded"] = x
        x = x[:, 0] if cfg.pool == "cls" else x.mean(axis=1)
        if cfg.representation_size is not None:
            x = jnp.tanh(nn.Dense(
                cfg.representation_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                kernel_init=with_axes(nn.initializers.lecun_normal(), ("embed", None)),
                bias_init=with_axes(nn.initializers.zeros_init(), (None,)),
                name="pre_logits")(x))
        out["pre_logits"] = x
        logits = nn.Dense(cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                          kernel_init=with_axes(nn.initializers.zeros, (
                              "embed" if cfg.representation_size is None else None,
                              "classes")),
                          bias_init=with_axes(nn.initializers.zeros_init(), ("classes",)),
                          name="head")(x).astype(jnp.float32)
        return (logits, out) if return_intermediates else logits
