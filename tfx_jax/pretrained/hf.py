"""``load_hf`` / ``save_hf``: Hugging Face model directories <-> our configs and parameters.

The architecture is read from config.json's ``architectures`` (or
``model_type``): ``GPT2LMHeadModel`` -> :class:`tfx_jax.CausalLM`,
``ViTForImageClassification`` / ``ViTModel`` -> :class:`tfx_jax.ViT`. The
per-architecture tensor maps are in ``hf_gpt2.py`` and ``hf_vit.py``.
``save_hf`` writes what ``transformers`` ``from_pretrained`` reads, and
``load_hf(save_hf(...))`` gives back the same arrays bit for bit.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

from tfx_jax.errors import ConfigError, DataError
from tfx_jax.lm import CausalLMConfig
from tfx_jax.pretrained import hf_gpt2, hf_vit
from tfx_jax.pretrained.hf_files import CONFIG, read_directory, write_directory
from tfx_jax.pretrained.tree import canonical, unflatten
from tfx_jax.pretrained.vit_adapt import adapt_vit, check_options
from tfx_jax.vit import ViTConfig

SUPPORTED = (hf_gpt2.ARCHITECTURE, *hf_vit.ARCHITECTURES)
_MODEL_TYPES = {"gpt2": hf_gpt2.ARCHITECTURE, "vit": "ViTModel"}


def _architecture(config: dict[str, Any], source: str) -> str:
    names = config.get("architectures") or []
    known = [name for name in names if name in SUPPORTED]
    if known:
        return known[0]
    if not names and config.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[config["model_type"]]
    raise DataError(f"{source}: architectures={names!r} (model_type="
                     f"{config.get('model_type')!r}) is not supported; load_hf reads "
                     f"{list(SUPPORTED)}")


def load_hf(directory: str, *, num_classes: Optional[int] = None,
            image_size: Optional[int] = None
            ) -> tuple[Union[CausalLMConfig, ViTConfig], dict]:
    """``(config, params)`` from a Hugging Face directory (config.json + model.safetensors).

    ``params`` (float32 NumPy arrays, per-layer layout) go straight into
    ``CausalLM(cfg)`` / ``ViT(cfg)``'s ``apply({"params": params}, ...)``.
    For ViTs, ``num_classes`` attaches a new zero-initialised head and
    ``image_size`` resizes the position embeddings, as in :func:`load_vit_npz`.
    """
    check_options(num_classes, image_size)
    config, tensors = read_directory(directory)
    source = os.path.join(str(directory), CONFIG)
    architecture = _architecture(config, source)
    weights = os.path.join(str(directory), "model.safetensors")
    if architecture == hf_gpt2.ARCHITECTURE:
        if num_classes is not None or image_size is not None:
            raise ConfigError("num_classes and image_size apply to ViT checkpoints, not "
                             f"{architecture}")
        cfg = hf_gpt2.config_from_hf(config, source)
        return cfg, unflatten(hf_gpt2.params_from_hf(tensors, cfg, weights))
    cfg = hf_vit.config_from_hf(config, architecture, tensors, source)
    flat = hf_vit.params_from_hf(tensors, cfg, architecture, weights, num_classes)
    cfg, flat = adapt_vit(cfg, flat, num_classes=num_classes, image_size=image_size)
    return cfg, unflatten(flat)


def save_hf(cfg: Union[CausalLMConfig, ViTConfig], params: Any, directory: str) -> None:
    """Writes ``directory/config.json`` + ``model.safetensors`` in transformers' layout.

    A :class:`CausalLMConfig` becomes ``GPT2LMHeadModel``, a :class:`ViTConfig`
    ``ViTForImageClassification``; parameters may be in either layer layout
    (``scan_layers``) and either attention layout (``fused_qkv``). Tensors are
    float32. Models the target architecture cannot express raise ValueError.
    """
    if hasattr(params, "keys") and set(params.keys()) == {"params"}:
        params = params["params"]
    if isinstance(cfg, CausalLMConfig):
        config = hf_gpt2.config_to_hf(cfg)
        flat = canonical(params, "layers", cfg.num_layers, cfg.scan_layers)
        tensors = hf_gpt2.params_to_hf(flat, cfg)
    elif isinstance(cfg, ViTConfig):
        config = hf_vit.config_to_hf(cfg)
        flat = canonical(params, "encoder", cfg.num_layers, cfg.scan_layers)
        tensors = hf_vit.params_to_hf(flat, cfg)
    else:
        raise TypeError(f"save_hf writes a CausalLMConfig (as GPT-2) or a ViTConfig, got "
                        f"{type(cfg).__name__}")
    write_directory(directory, config, {k: v.astype("float32") for k, v in tensors.items()})
