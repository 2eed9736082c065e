"""ViT checkpoints in the .npz layout of google-research/vision_transformer and big_vision.

Those codebases are Flax too, so the arrays already have our shapes
(``DenseGeneral`` attention kernels [D, heads, head_dim], patch convolution
[P, P, C, D]); loading is renaming plus the config read off the shapes::

    embedding/kernel                    [P, P, C, D]  -> patch_embedding/kernel
    cls                                 [1, 1, D]     -> cls (absent: pool="gap")
    Transformer/posembed_input/pos_embedding [1, N, D] -> position/embedding [N, D]
    Transformer/encoderblock_<i>/LayerNorm_0          -> encoder/layer_<i>/self_attention_norm
        .../MultiHeadDotProductAttention_1/{query,key,value,out}  -> .../self_attention/...
        .../LayerNorm_2                               -> .../ffn_norm
        .../MlpBlock_3/Dense_0, Dense_1               -> .../ffn/wi, ffn/wo
    Transformer/encoder_norm                          -> encoder/final_norm
    pre_logits/{kernel,bias}  (optional)              -> pre_logits (representation_size)
    head/{kernel,bias}                                -> head

big_vision names the sub-layers ``LayerNorm_0, MultiHeadDotProductAttention_0,
LayerNorm_1, MlpBlock_0``, keeps the position table at top level
(``pos_embedding``) and, with ``scan=True``, stacks all blocks under
``Transformer/encoderblock`` with a leading depth axis; both are read. Keys
may carry an ``opt/target/`` or ``params/`` prefix (older training states).
Both codebases use Flax's tanh-approximated GELU and LayerNorm epsilon 1e-6,
which the returned config sets.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

import numpy as np

from tfx_jax.errors import DataError, DataNotFound
from tfx_jax.pretrained.tensors import TensorReader
from tfx_jax.pretrained.tree import unflatten
from tfx_jax.pretrained.vit_adapt import adapt_vit, check_options
from tfx_jax.vit import ViTConfig

_PREFIXES = ("opt/target/", "params/")
# (role, our name, candidate checkpoint names: google-research/vision_transformer, big_vision)
_SUBLAYERS = (
    ("ln1", "self_attention_norm", ("LayerNorm_0",)),
    ("attn", "self_attention", ("MultiHeadDotProductAttention_1",
                                "MultiHeadDotProductAttention_0")),
    ("ln2", "ffn_norm", ("LayerNorm_2", "LayerNorm_1")),
    ("mlp", "ffn", ("MlpBlock_3", "MlpBlock_0")),
)
_UNSUPPORTED = {
    "MAPHead_0/": "multihead attention pooling (big_vision pool_type='map')",
    "conv_root/": "a ResNet stem (R50+ViT hybrid)",
    "block1/": "a ResNet stem (R50+ViT hybrid)",
}


def read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz file (clear errors for a missing or unreadable file)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise DataNotFound(f"no .npz checkpoint at {path!r}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except Exception as error:  # zipfile.BadZipFile, ValueError, OSError
        raise DataError(f"{path}: not a readable .npz archive ({error})") from None


def load_vit_npz(path: str, *, num_classes: Optional[int] = None,
                 image_size: Optional[int] = None) -> tuple[ViTConfig, dict]:
    """``(ViTConfig, params)`` from a vision_transformer / big_vision ViT .npz checkpoint.

    Args:
      path: the .npz file.
      num_classes: if given, a new zero-initialised head of this size replaces the
        stored one, and the pre-training "pre_logits" layer is dropped (the paper
        fine-tunes "with a zero-initialized D x K feedforward layer" in place of the
        pre-training MLP head).
      image_size: if given (a multiple of the patch size), the position embeddings
        are resized to its patch grid by bilinear interpolation ([CLS] kept).

    Returns:
      the config (per-layer parameters: ``scan_layers=False``) and the parameter
      tree for ``ViT(cfg).apply({"params": params}, images)``, float32 NumPy arrays.

    Raises:
      ValueError: naming the tensor and the shape expected, for a missing tensor, a
        wrong shape, leftovers of another model, or an unsupported variant.
    """
    check_options(num_classes, image_size)
    raw = read_npz(path)
    prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in raw), "")
    reader = TensorReader({k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)},
                          str(path))
    for marker, what in _UNSUPPORTED.items():
        if any(name.startswith(marker) or f"/{marker}" in name for name in reader.tensors):
            raise DataError(f"{path}: the checkpoint has {what} (tensors {marker}...), which "
                             f"tfx_jax.ViT does not implement")
    cfg, names = _infer_config(reader, num_classes)
    flat = _read_params(reader, cfg, names)
    reader.check_all_used("ViT .npz checkpoint")

    cfg, flat = adapt_vit(cfg, flat, num_classes=num_classes, image_size=image_size)
    return cfg, unflatten(flat)


def _infer_config(reader: TensorReader, new_classes: Optional[int]) -> tuple[ViTConfig, dict]:
    """Reads the architecture off the shapes; returns the config and the names it found."""
    kh, kw, channels, d_model = reader.shape("embedding/kernel")
    if kh != kw:
        raise DataError(f"{reader.source}: 'embedding/kernel' has shape "
                         f"{reader.shape('embedding/kernel')}: non-square patches are not "
                         f"supported (expected [P, P, C, D])")
    names = {"posemb": next((n for n in ("Transformer/posembed_input/pos_embedding",
                                         "pos_embedding") if n in reader),
                            "Transformer/posembed_input/pos_embedding")}
    pool = "cls" if "cls" in reader else "gap"
    tokens = reader.shape(names["posemb"])[-2]
    patches = tokens - (pool == "cls")
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise DataError(f"{reader.source}: {names['posemb']!r} has {tokens} positions; "
                         f"expected 1 + grid**2 (cls) or grid**2 (gap) for a square image")
    block_names = sorted({m.group(1) for n in reader.tensors
                          if (m := re.match(r"Transformer/encoderblock_(\d+)/", n))}, key=int)
    if block_names:
        names["blocks"] = [f"Transformer/encoderblock_{i}/" for i in block_names]
        if block_names != [str(i) for i in range(len(block_names))]:
            raise DataError(f"{reader.source}: encoder blocks {block_names} are not numbered "
                             f"0..{len(block_names) - 1}")
        first, stacked = names["blocks"][0], None
    elif any(n.startswith("Transformer/encoderblock/") for n in reader.tensors):
        first = stacked = "Transformer/encoderblock/"
    else:
        raise DataError(f"{reader.source}: no tensors 'Transformer/encoderblock_0/...' "
                         f"(vision_transformer) or 'Transformer/encoderblock/...' (big_vision, "
                         f"scanned): not a ViT checkpoint")
    for role, _, candidates in _SUBLAYERS:
        found = [c for c in candidates if any(n.startswith(first + c + "/")
                                              for n in reader.tensors)]
        names[role] = found[0] if found else candidates[0]
    query = reader.shape(f"{first}{names['attn']}/query/kernel")
    wi = reader.shape(f"{first}{names['mlp']}/Dense_0/kernel")
    num_layers = len(names["blocks"]) if stacked is None else query[0]
    names["stacked"] = stacked
    num_heads, d_ff = query[-2], wi[-1]
    representation = reader.shape("pre_logits/kernel")[1] if "pre_logits/kernel" in reader \
        else None
    head_in = representation or d_model
    names["head"] = "head/kernel" in reader or new_classes is None
    num_classes = reader.shape("head/kernel")[1] if names["head"] else new_classes
    cfg = ViTConfig(image_size=grid * kh, patch_size=kh, num_channels=channels,
                    num_classes=num_classes, num_layers=num_layers, pool=pool,
                    representation_size=representation, d_model=d_model, num_heads=num_heads,
                    d_ff=d_ff, dropout_rate=0.0, pre_norm=True, activation="gelu",
                    layer_norm_epsilon=1e-6)
    names["head_in"] = head_in
    return cfg, names


def _read_params(reader: TensorReader, cfg: ViTConfig, names: dict) -> dict[str, np.ndarray]:
    d, p, c = cfg.d_model, cfg.patch_size, cfg.num_channels
    heads, head_dim = cfg.num_heads, cfg.d_model // cfg.num_heads
    tokens = cfg.num_patches + (cfg.pool == "cls")
    flat = {"patch_embedding/kernel": reader.get("embedding/kernel", (p, p, c, d)),
            "patch_embedding/bias": reader.get("embedding/bias", (d,)),
            "position/embedding": reader.get(names["posemb"], (1, tokens, d))[0],
            "encoder/final_norm/scale": reader.get("Transformer/encoder_norm/scale", (d,)),
            "encoder/final_norm/bias": reader.get("Transformer/encoder_norm/bias", (d,))}
    if cfg.pool == "cls":
        flat["cls"] = reader.get("cls", (1, 1, d))
    shapes = {  # our name within a layer -> (checkpoint role, name within it, shape)
        "self_attention_norm/scale": ("ln1", "scale", (d,)),
        "self_attention_norm/bias": ("ln1", "bias", (d,)),
        "ffn_norm/scale": ("ln2", "scale", (d,)),
        "ffn_norm/bias": ("ln2", "bias", (d,)),
        "ffn/wi/kernel": ("mlp", "Dense_0/kernel", (d, cfg.d_ff)),
        "ffn/wi/bias": ("mlp", "Dense_0/bias", (cfg.d_ff,)),
        "ffn/wo/kernel": ("mlp", "Dense_1/kernel", (cfg.d_ff, d)),
        "ffn/wo/bias": ("mlp", "Dense_1/bias", (d,)),
        "self_attention/out/kernel": ("attn", "out/kernel", (heads, head_dim, d)),
        "self_attention/out/bias": ("attn", "out/bias", (d,)),
    }
    for part in ("query", "key", "value"):
        shapes[f"self_attention/{part}/kernel"] = ("attn", f"{part}/kernel", (d, heads, head_dim))
        shapes[f"self_attention/{part}/bias"] = ("attn", f"{part}/bias", (heads, head_dim))
    for ours, (role, sub, shape) in shapes.items():
        if names["stacked"]:
            stacked = reader.get(f"{names['stacked']}{names[role]}/{sub}",
                                 (cfg.num_layers, *shape))
            for i in range(cfg.num_layers):
                flat[f"encoder/layer_{i}/{ours}"] = stacked[i]
        else:
            for i, block in enumerate(names["blocks"]):
                flat[f"encoder/layer_{i}/{ours}"] = reader.get(f"{block}{names[role]}/{sub}",
                                                               shape)
    if cfg.representation_size is not None:
        r = cfg.representation_size
        flat["pre_logits/kernel"] = reader.get("pre_logits/kernel", (d, r))
        flat["pre_logits/bias"] = reader.get("pre_logits/bias", (r,))
    if names["head"]:  # a checkpoint without head needs num_classes (a new head)
        flat["head/kernel"] = reader.get("head/kernel", (names["head_in"], cfg.num_classes))
        flat["head/bias"] = reader.get("head/bias", (cfg.num_classes,))
    return flat
