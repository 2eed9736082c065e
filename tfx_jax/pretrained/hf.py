"""``load_hf`` / ``save_hf``: Hugging Face model directories <-> our configs and parameters.

The architecture is read from config.json's ``architectures`` (or
``model_type``): ``GPT2LMHeadModel`` and the decoders ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
``GemmaForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` ->
:class:`tfx_jax.CausalLM`; ``ViTForImageClassification`` / ``ViTModel`` ->
:class:`tfx_jax.ViT`. The per-architecture tensor maps are in ``hf_gpt2.py``,
``hf_decoders.py`` and ``hf_vit.py``. Decoders are read lazily: the config is
checked, then every tensor's name and shape from the file headers, before any
tensor is read; with a ``mesh`` each device's block is read straight from disk.
``save_hf`` writes what ``transformers`` ``from_pretrained`` reads, and
``load_hf(save_hf(...))`` gives back the same arrays bit for bit.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np

from tfx_jax.errors import ConfigError
from tfx_jax.lm import CausalLM, CausalLMConfig
from tfx_jax.pretrained import hf_decoders, hf_gpt2, hf_vit
from tfx_jax.pretrained.hf_files import (CONFIG, LazyCheckpoint, read_config, read_directory,
                                         write_directory)
from tfx_jax.pretrained.tree import canonical, unflatten
from tfx_jax.pretrained.vit_adapt import adapt_vit, check_options
from tfx_jax.vit import ViTConfig

SUPPORTED = (hf_gpt2.ARCHITECTURE, *hf_decoders.ARCHITECTURES, *hf_vit.ARCHITECTURES)
_MODEL_TYPES = {"gpt2": hf_gpt2.ARCHITECTURE, "vit": "ViTModel", **hf_decoders.MODEL_TYPES}


def _architecture(config: dict[str, Any], source: str) -> str:
    names = config.get("architectures") or []
    known = [name for name in names if name in SUPPORTED]
    if known:
        return known[0]
    if not names and config.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[config["model_type"]]
    raise ConfigError(f"{source}: architectures={names!r} (model_type="
                     f"{config.get('model_type')!r}) is not supported; load_hf reads "
                     f"{list(SUPPORTED)}")


def load_hf_config(directory: str) -> CausalLMConfig:
    """The :class:`CausalLMConfig` of a decoder or GPT-2 directory, from its config.json
    alone (no tensor is read): what a run checks before loading the weights."""
    config = read_config(directory)
    source = os.path.join(str(directory), CONFIG)
    architecture = _architecture(config, source)
    if architecture in hf_decoders.ARCHITECTURES:
        return hf_decoders.config_from_hf(config, architecture, source)
    if architecture == hf_gpt2.ARCHITECTURE:
        return hf_gpt2.config_from_hf(config, source)
    raise ConfigError(f"{source}: {architecture} is not a causal LM; a decoder or GPT-2 "
                      f"directory is needed")


def load_hf(directory: str, *, num_classes: Optional[int] = None,
            image_size: Optional[int] = None, mesh=None, rules=None
            ) -> tuple[Union[CausalLMConfig, ViTConfig], dict]:
    """``(config, params)`` from a Hugging Face directory (config.json + safetensors).

    ``params`` (float32 NumPy arrays, per-layer layout) go straight into
    ``CausalLM(cfg)`` / ``ViT(cfg)``'s ``apply({"params": params}, ...)``.
    Sharded checkpoints (``model.safetensors.index.json``) and float32 / bfloat16 /
    float16 tensors are read (as float32). With a ``mesh`` (decoders), every
    parameter is a ``jax.Array`` placed by the partitioning ``rules`` (default
    ``tfx_jax.train.RULES``), each device's block read from disk on its own (GPT-2:
    read whole, then placed).
    For ViTs, ``num_classes`` attaches a new zero-initialised head and
    ``image_size`` resizes the position embeddings, as in :func:`load_vit_npz`.
    """
    check_options(num_classes, image_size)
    config = read_config(directory)
    source = os.path.join(str(directory), CONFIG)
    architecture = _architecture(config, source)
    if architecture in hf_decoders.ARCHITECTURES:
        if num_classes is not None or image_size is not None:
            raise ConfigError("num_classes and image_size apply to ViT checkpoints, not "
                              f"{architecture}")
        cfg = hf_decoders.config_from_hf(config, architecture, source)
        return cfg, _load_decoder(cfg, directory, mesh, rules)
    if mesh is not None and architecture != hf_gpt2.ARCHITECTURE:
        raise ConfigError(f"load_hf(mesh=...) places decoder checkpoints; {architecture} is "
                          f"read whole (shard it with jax.device_put)")
    config, tensors = read_directory(directory)
    weights = os.path.join(str(directory), "model.safetensors")
    if architecture == hf_gpt2.ARCHITECTURE:
        if num_classes is not None or image_size is not None:
            raise ConfigError("num_classes and image_size apply to ViT checkpoints, not "
                             f"{architecture}")
        cfg = hf_gpt2.config_from_hf(config, source)
        params = unflatten(hf_gpt2.params_from_hf(tensors, cfg, weights))
        if mesh is not None:  # GPT-2 sizes are read whole, then placed in their shards
            import jax
            params = jax.device_put(params, _decoder_shardings(cfg, mesh, rules))
        return cfg, params
    cfg = hf_vit.config_from_hf(config, architecture, tensors, source)
    flat = hf_vit.params_from_hf(tensors, cfg, architecture, weights, num_classes)
    cfg, flat = adapt_vit(cfg, flat, num_classes=num_classes, image_size=image_size)
    return cfg, unflatten(flat)


def _load_decoder(cfg: CausalLMConfig, directory: str, mesh, rules) -> dict:
    """The parameters of a decoder checkpoint: checked whole, then read tensor by tensor."""
    checkpoint = LazyCheckpoint(directory)
    specs = hf_decoders.tensor_specs(cfg)
    hf_decoders.check_tensors(specs, checkpoint, cfg.tie_embeddings, str(directory))
    if mesh is None:
        return unflatten({s.ours: hf_decoders.read_block(
            s, lambda index, s=s: checkpoint.block(s.hf, index)) for s in specs})
    import jax
    from flax import traverse_util
    shardings = traverse_util.flatten_dict(_decoder_shardings(cfg, mesh, rules), sep="/")
    dtype = np.dtype(cfg.param_dtype)
    flat = {}
    for spec in specs:
        def block(index, spec=spec):
            return hf_decoders.read_block(
                spec, lambda hf_index: checkpoint.block(spec.hf, hf_index), index).astype(dtype)
        flat[spec.ours] = jax.make_array_from_callback(spec.shape, shardings[spec.ours], block)
    return unflatten(flat)


def _decoder_shardings(cfg: CausalLMConfig, mesh, rules) -> dict:
    """Where the partitioning ``rules`` place each of ``CausalLM(cfg)``'s parameters."""
    import jax
    import jax.numpy as jnp

    import tfx_jax.train as tr
    from tfx_jax.logical_axes import recording_logical_axes
    with recording_logical_axes():
        abstract = jax.eval_shape(lambda: CausalLM(cfg).init(
            jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    return tr.param_shardings(abstract, mesh, rules)


def save_hf(cfg: Union[CausalLMConfig, ViTConfig], params: Any, directory: str, *,
            max_shard_bytes: int = 5 << 30) -> None:
    """Writes ``directory/config.json`` + safetensors in transformers' layout.

    A :class:`CausalLMConfig` becomes the decoder family its options describe
    (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3; ``hf_decoders.family_of``)
    or ``GPT2LMHeadModel``; a :class:`ViTConfig` ``ViTForImageClassification``.
    Parameters may be in either layer layout (``scan_layers``) and either attention
    layout (``fused_qkv``), NumPy or (sharded) jax arrays. Tensors are float32, in
    shards of at most ``max_shard_bytes`` with an index when they do not fit one.
    Models the target architecture cannot express raise ConfigError.
    """
    if hasattr(params, "keys") and set(params.keys()) == {"params"}:
        params = params["params"]
    if isinstance(cfg, CausalLMConfig) and hf_decoders.family_of(cfg) is not None:
        config = hf_decoders.config_to_hf(cfg)
        flat = canonical(params, "layers", cfg.num_layers, cfg.scan_layers)
        specs = hf_decoders.tensor_specs(cfg)
        missing = sorted({s.ours for s in specs} - set(flat))
        if missing:
            raise ConfigError(f"save_hf: params lack {missing[:3]} that this "
                              f"{config['architectures'][0]} config has")
        tensors = {s.hf: hf_decoders.to_hf(s, flat[s.ours]).astype("float32") for s in specs}
        write_directory(directory, config, tensors, max_shard_bytes=max_shard_bytes)
        return
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
    write_directory(directory, config, {k: v.astype("float32") for k, v in tensors.items()},
                    max_shard_bytes=max_shard_bytes)
