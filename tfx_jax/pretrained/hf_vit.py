"""Hugging Face ``ViTModel`` / ``ViTForImageClassification`` <-> :class:`tfx_jax.ViT`.

The HF ViT is the same pre-LN encoder with a [CLS] token; its weights are
torch layouts:

* ``nn.Linear`` weights are [out, in]: transposed, then reshaped to our
  per-head kernels (query/key/value [D, heads, head_dim], output
  [heads, head_dim, D]);
* the patch convolution is [D, C, P, P] (OIHW): transposed to [P, P, C, D];
* position embeddings [1, 1 + N, D] -> [1 + N, D]; ``cls_token`` [1, 1, D].

Its GELU is the exact (erf) one, ``hidden_act="gelu"`` (our "gelu_exact"),
and its LayerNorm epsilon 1e-12. ``ViTModel``'s pooler (Dense + tanh on the
[CLS] vector) is exactly the paper's "pre_logits" representation layer; a
``ViTModel`` has no classifier, so its head is new (zero, ``num_labels`` wide)
unless ``num_classes`` is given.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from tfx_jax.errors import DataError
from tfx_jax.pretrained.tensors import TensorReader
from tfx_jax.vit import ViTConfig

ARCHITECTURES = ("ViTForImageClassification", "ViTModel")
_FROM_HF_ACT = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "relu": "relu"}
_TO_HF_ACT = {"gelu_exact": "gelu", "gelu": "gelu_pytorch_tanh", "relu": "relu"}


def _side(value, name, source) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise DataError(f"{source}: {name}={value!r}; only square images and patches are "
                             f"supported")
        value = value[0]
    return int(value)


def config_from_hf(config: dict[str, Any], architecture: str, tensors: dict,
                   source: str) -> ViTConfig:
    """The ViTConfig of an HF ViT config.json (unsupported options raise)."""
    act = config.get("hidden_act", "gelu")
    if act not in _FROM_HF_ACT:
        raise DataError(f"{source}: hidden_act={act!r} is not supported; expected one of "
                         f"{sorted(_FROM_HF_ACT)}")
    if not config.get("qkv_bias", True):
        raise DataError(f"{source}: qkv_bias=False is not supported (our attention has biases "
                         f"on all projections)")
    d_model = config.get("hidden_size", 768)
    has_pooler = any(k.startswith(("pooler.", "vit.pooler.")) for k in tensors)
    representation = None
    if architecture == "ViTModel" and has_pooler:
        if config.get("pooler_act", "tanh") != "tanh":
            raise DataError(f"{source}: pooler_act={config['pooler_act']!r}; only 'tanh' "
                             f"(the paper's pre_logits) is supported")
        representation = config.get("pooler_output_size") or d_model
    labels = config.get("id2label")
    num_classes = len(labels) if labels else int(config.get("num_labels", 2))
    return ViTConfig(
        image_size=_side(config.get("image_size", 224), "image_size", source),
        patch_size=_side(config.get("patch_size", 16), "patch_size", source),
        num_channels=config.get("num_channels", 3), num_classes=num_classes,
        num_layers=config.get("num_hidden_layers", 12), pool="cls",
        representation_size=representation, d_model=d_model,
        num_heads=config.get("num_attention_heads", 12),
        d_ff=config.get("intermediate_size", 3072), activation=_FROM_HF_ACT[act],
        layer_norm_epsilon=float(config.get("layer_norm_eps", 1e-12)),
        dropout_rate=float(config.get("hidden_dropout_prob", 0.0)),
        attention_dropout_rate=float(config.get("attention_probs_dropout_prob", 0.0)),
        pre_norm=True, use_bias=True)


def config_to_hf(cfg: ViTConfig) -> dict[str, Any]:
    """A ViTForImageClassification config.json for ``cfg``."""
    problems = [f"{name}={getattr(cfg, name)!r} (HF ViT has {want!r})"
                for name, want in (("pool", "cls"), ("pre_norm", True), ("use_bias", True),
                                   ("representation_size", None))
                if getattr(cfg, name) != want]
    if getattr(cfg, "num_kv_heads", None) not in (None, cfg.num_heads):
        problems.append(f"num_kv_heads={cfg.num_kv_heads}")
    if problems:
        raise ValueError(f"save_hf: this ViTConfig has no ViTForImageClassification "
                         f"equivalent: {'; '.join(problems)}")
    return {"architectures": ["ViTForImageClassification"], "model_type": "vit",
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.d_ff,
            "hidden_act": _TO_HF_ACT[cfg.activation], "layer_norm_eps": cfg.layer_norm_epsilon,
            "hidden_dropout_prob": cfg.dropout_rate,
            "attention_probs_dropout_prob": cfg.attention_dropout_rate,
            "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.num_channels, "qkv_bias": True,
            "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)},
            "label2id": {f"LABEL_{i}": i for i in range(cfg.num_classes)}, "dtype": "float32"}


def _linear_names(cfg: ViTConfig) -> dict[str, tuple[str, tuple, tuple]]:
    """Per layer: HF Linear name -> (our name, our kernel shape, our bias shape)."""
    d, f, n = cfg.d_model, cfg.d_ff, cfg.num_heads
    hd = d // n
    names = {f"attention.attention.{p}": (f"self_attention/{p}", (d, n, hd), (n, hd))
             for p in ("query", "key", "value")}
    names["attention.output.dense"] = ("self_attention/out", (n, hd, d), (d,))
    names["intermediate.dense"] = ("ffn/wi", (d, f), (f,))
    names["output.dense"] = ("ffn/wo", (f, d), (d,))
    return names


def _in_size(our: str, kernel: tuple) -> int:
    """Input width of a kernel: the output projection reads two axes (heads, head_dim)."""
    return int(np.prod(kernel[:2 if our.endswith("/out") else 1]))


_NORMS = {"layernorm_before": "self_attention_norm", "layernorm_after": "ffn_norm"}


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ViTConfig, architecture: str,
                   source: str, num_classes: Optional[int]) -> dict[str, np.ndarray]:
    """Our flat parameters from HF ViT tensors (checked names and shapes)."""
    reader = TensorReader({k[4:] if k.startswith("vit.") else k: v for k, v in tensors.items()},
                          source)
    d, p, c = cfg.d_model, cfg.patch_size, cfg.num_channels
    flat = {
        "cls": reader.get("embeddings.cls_token", (1, 1, d)),
        "position/embedding": reader.get("embeddings.position_embeddings",
                                         (1, cfg.num_patches + 1, d))[0],
        "patch_embedding/kernel": reader.get("embeddings.patch_embeddings.projection.weight",
                                             (d, c, p, p)).transpose(2, 3, 1, 0),
        "patch_embedding/bias": reader.get("embeddings.patch_embeddings.projection.bias", (d,)),
        "encoder/final_norm/scale": reader.get("layernorm.weight", (d,)),
        "encoder/final_norm/bias": reader.get("layernorm.bias", (d,)),
    }
    for i in range(cfg.num_layers):
        hf, ours = f"encoder.layer.{i}.", f"encoder/layer_{i}/"
        for name, (our, kernel, bias) in _linear_names(cfg).items():
            in_size = _in_size(our, kernel)
            out_size = int(np.prod(kernel)) // in_size
            flat[f"{ours}{our}/kernel"] = reader.get(f"{hf}{name}.weight",
                                                     (out_size, in_size)).T.reshape(kernel)
            flat[f"{ours}{our}/bias"] = reader.get(f"{hf}{name}.bias", (out_size,)).reshape(bias)
        for name, our in _NORMS.items():
            flat[f"{ours}{our}/scale"] = reader.get(f"{hf}{name}.weight", (d,))
            flat[f"{ours}{our}/bias"] = reader.get(f"{hf}{name}.bias", (d,))
    if cfg.representation_size is not None:
        r = cfg.representation_size
        flat["pre_logits/kernel"] = reader.get("pooler.dense.weight", (r, d)).T
        flat["pre_logits/bias"] = reader.get("pooler.dense.bias", (r,))
    if architecture == "ViTForImageClassification" and num_classes is None:
        flat["head/kernel"] = reader.get("classifier.weight", (cfg.num_classes, d)).T
        flat["head/bias"] = reader.get("classifier.bias", (cfg.num_classes,))
    else:  # a new head: ViTModel has none, or num_classes replaces it
        for name in ("classifier.weight", "classifier.bias"):
            reader.skip(name)
        width = cfg.representation_size or d
        flat["head/kernel"] = np.zeros((width, cfg.num_classes), np.float32)
        flat["head/bias"] = np.zeros((cfg.num_classes,), np.float32)
    reader.check_all_used(f"{architecture} with {cfg.num_layers} layers")
    return flat


def params_to_hf(flat: dict[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """ViTForImageClassification tensors (``vit.`` names) from our flat params."""
    t = {"vit.embeddings.cls_token": flat["cls"],
         "vit.embeddings.position_embeddings": flat["position/embedding"][None],
         "vit.embeddings.patch_embeddings.projection.weight":
             flat["patch_embedding/kernel"].transpose(3, 2, 0, 1),
         "vit.embeddings.patch_embeddings.projection.bias": flat["patch_embedding/bias"],
         "vit.layernorm.weight": flat["encoder/final_norm/scale"],
         "vit.layernorm.bias": flat["encoder/final_norm/bias"],
         "classifier.weight": flat["head/kernel"].T,
         "classifier.bias": flat["head/bias"]}
    for i in range(cfg.num_layers):
        hf, ours = f"vit.encoder.layer.{i}.", f"encoder/layer_{i}/"
        for name, (our, kernel, _) in _linear_names(cfg).items():
            k = flat[f"{ours}{our}/kernel"]
            t[f"{hf}{name}.weight"] = k.reshape(_in_size(our, k.shape), -1).T
            t[f"{hf}{name}.bias"] = flat[f"{ours}{our}/bias"].reshape(-1)
        for name, our in _NORMS.items():
            t[f"{hf}{name}.weight"] = flat[f"{ours}{our}/scale"]
            t[f"{hf}{name}.bias"] = flat[f"{ours}{our}/bias"]
    return t
