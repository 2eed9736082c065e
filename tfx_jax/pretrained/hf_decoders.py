"""Llama, Mistral, Qwen 2/3 and Gemma 1/2/3 (Hugging Face) <-> :class:`tfx_jax.CausalLM`.

These ``*ForCausalLM`` models share one layout (``model.embed_tokens``,
``model.layers.<i>.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``model.norm``, ``lm_head``) and differ in options that are fields of
:class:`CausalLMConfig` (see docs/pretrained.md for the table):

* projections are ``torch.nn.Linear`` weights [out, in]: transposed, and the
  query/key/value outputs split into [heads, head_dim];
* Hugging Face rotates feature i of a head with feature i + head_dim/2
  ("rotate half"); our rotary embedding rotates adjacent pairs (2i, 2i+1). The
  two are the same map up to a fixed permutation of each head's features, which
  is applied to the query/key projections (and their biases and norms) on the
  way in and undone on the way out; scores q . k do not change;
* Llama's ``post_attention_layernorm`` is the norm *before* the MLP, Gemma 2/3's
  the norm of the attention *output* (``pre_feedforward_layernorm`` /
  ``post_feedforward_layernorm`` around the MLP);
* rope settings are read from ``rope_parameters`` (transformers 5) or
  ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` (the Hub's files).

``tensor_specs(cfg)`` lists every parameter as (our name, Hugging Face name,
layout); ``read_block`` / ``to_hf`` apply a layout, to a whole tensor or to the
block of it one device holds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from tfx_jax.errors import ConfigError, DataError
from tfx_jax.lm import CausalLMConfig
from tfx_jax.rotary import ROPE_SCALING_TYPES

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
                 "Gemma3ForCausalLM": "gemma3"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM"}
_HF_MODEL_TYPE = {ARCHITECTURES[a]: model_type for model_type, a in MODEL_TYPES.items()}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu",
                "gelu_new": "gelu", "gelu_fast": "gelu", "gelu": "gelu_exact"}
_TO_HF_ACT = {"silu": "silu", "gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu"}
_TIED_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False,
                 "gemma": True, "gemma2": True, "gemma3": True}
# Fields a checkpoint does not fix (training and runtime choices): kept from the defaults.
_RUNTIME = ("dropout_rate", "attention_dropout_rate", "fused_qkv", "attention_implementation",
            "scan_layers", "remat_policy", "dtype", "param_dtype", "decode")


def _rope(config: dict, key: Optional[str], source: str) -> tuple[float, Any]:
    """(theta, rope_scaling or None) of the rope parameters ``config[...][key]``."""
    params = config.get("rope_parameters")
    if params is not None and key is not None:
        params = params.get(key)
    if params is None:  # the Hub's format: rope_theta + rope_scaling
        params = dict(config.get("rope_scaling") or {}, rope_theta=config.get("rope_theta"))
        if key == "sliding_attention":
            params = {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq")}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", *ROPE_SCALING_TYPES):
        raise ConfigError(f"{source}: rope type {kind!r} is not supported; load_hf reads "
                          f"'default', {', '.join(map(repr, ROPE_SCALING_TYPES))}")
    theta = params.get("rope_theta")
    scaling = None if kind == "default" else {k: v for k, v in params.items()
                                               if k not in ("rope_theta", "type")}
    if scaling is not None:
        scaling["rope_type"] = kind
    return theta, scaling


def _refuse(config: dict, source: str, checks) -> None:
    for key, allowed, why in checks:
        if config.get(key, allowed[0]) not in allowed:
            raise ConfigError(f"{source}: {key}={config[key]!r} ({why}) is not supported; "
                              f"expected {allowed[0]!r}")


def config_from_hf(config: dict[str, Any], architecture: str, source: str) -> CausalLMConfig:
    """The CausalLMConfig of a decoder's config.json; unsupported options raise ConfigError."""
    family = ARCHITECTURES[architecture]
    if family == "gemma3" and "text_config" in config:
        raise ConfigError(f"{source}: a Gemma3 multimodal config (text_config); load_hf reads "
                          f"the text-only Gemma3ForCausalLM")
    _refuse(config, source, (
        ("attention_bias", (False,), "biases on every attention projection"),
        ("mlp_bias", (False,), "MLP biases"),
        ("use_bidirectional_attention", (False, None), "bidirectional attention"),
        ("use_sliding_window", (False,), "Qwen's layer-range sliding window")))
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    act = (config.get("hidden_activation") or config.get("hidden_act")
           or "gelu_pytorch_tanh") if family.startswith("gemma") else config.get("hidden_act",
                                                                                 "silu")
    if family == "gemma" and act == "gelu":  # transformers runs Gemma 1 with tanh GELU
        act = "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act={act!r} is not supported; expected one of "
                          f"{sorted(_ACTIVATIONS)}")
    num_layers = config["num_hidden_layers"]
    window, layer_types = config.get("sliding_window"), config.get("layer_types")
    if family in ("gemma2", "gemma3"):
        every = 2 if family == "gemma2" else config.get("sliding_window_pattern", 6)
        layer_types = layer_types or ["full_attention" if (i + 1) % every == 0
                                      else "sliding_attention" for i in range(num_layers)]
    elif family in ("qwen2", "qwen3", "llama", "gemma"):
        window, layer_types = None, None
    if layer_types is not None:
        kinds = {"full_attention": "full", "sliding_attention": "sliding"}
        unknown = sorted(set(layer_types) - set(kinds))
        if unknown:
            raise ConfigError(f"{source}: layer_types {unknown} are not supported; expected "
                              f"{sorted(kinds)}")
        layer_types = tuple(kinds[t] for t in layer_types)
        if "sliding" not in layer_types:
            window, layer_types = None, None
    gemma3 = family == "gemma3"
    theta, scaling = _rope(config, "full_attention" if gemma3 else None, source)
    local_theta = _rope(config, "sliding_attention", source)[0] if gemma3 else None
    gemma = family.startswith("gemma")
    return CausalLMConfig(
        vocab_size=config["vocab_size"], num_layers=num_layers,
        max_len=config.get("max_position_embeddings", 2048), d_model=hidden, num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads, d_ff=config["intermediate_size"],
        position="rope", rope_base=float(theta or 10000.0), rope_scaling=scaling,
        norm="rms_norm", norm_scale_offset=1.0 if gemma else 0.0,
        layer_norm_epsilon=float(config.get("rms_norm_eps", 1e-6)), pre_norm=True,
        mlp="gated", activation=_ACTIVATIONS[act], use_bias=False,
        qkv_bias=True if family == "qwen2" else None,
        qk_norm=family in ("qwen3", "gemma3"), sandwich_norm=family in ("gemma2", "gemma3"),
        query_pre_attn_scalar=(float(config.get("query_pre_attn_scalar", 256))
                               if family in ("gemma2", "gemma3") else None),
        attention_logit_soft_cap=config.get("attn_logit_softcapping") if gemma else None,
        final_logit_soft_cap=config.get("final_logit_softcapping") if gemma else None,
        sliding_window=window, layer_types=layer_types,
        local_rope_base=None if local_theta is None else float(local_theta),
        scale_embeddings=gemma,
        tie_embeddings=bool(config.get("tie_word_embeddings", _TIED_DEFAULT[family])),
        dropout_rate=0.0, attention_dropout_rate=float(config.get("attention_dropout", 0.0)))


def family_of(cfg: CausalLMConfig) -> Optional[str]:
    """The decoder family that writes ``cfg`` (None: not one of these; GPT-2 may be)."""
    if cfg.norm != "rms_norm" or cfg.position != "rope" or cfg.mlp != "gated":
        return None
    if cfg.norm_scale_offset == 1.0:
        return "gemma3" if cfg.qk_norm else "gemma2" if cfg.sandwich_norm else "gemma"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def config_to_hf(cfg: CausalLMConfig) -> dict[str, Any]:
    """config.json of ``cfg``'s family; a config the family cannot express raises ConfigError.

    Rope settings are written in the Hub's keys (``rope_theta``, ``rope_scaling``,
    ``rope_local_base_freq``), which transformers 4 and 5 both read.
    """
    family = family_of(cfg)
    architecture = {v: k for k, v in ARCHITECTURES.items()}[family]
    config = {"architectures": [architecture], "model_type": _HF_MODEL_TYPE[family],
              "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
              "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
              "head_dim": cfg.attention_head_dim, "max_position_embeddings": cfg.max_len,
              "rms_norm_eps": cfg.layer_norm_epsilon, "rope_theta": cfg.rope_base,
              "rope_scaling": None if cfg.rope_scaling is None else dict(cfg.rope_scaling),
              "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
              "attention_dropout": cfg.attention_dropout_rate, "dtype": "float32"}
    act = _TO_HF_ACT.get(cfg.activation)
    config["hidden_activation" if family.startswith("gemma") else "hidden_act"] = act
    if family.startswith("gemma"):
        config["hidden_act"] = act
    if family in ("llama", "qwen3"):
        config["mlp_bias"] = False
    if family in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    if family == "mistral":
        config["sliding_window"] = cfg.sliding_window
    if family in ("gemma2", "gemma3"):
        scalar = cfg.query_pre_attn_scalar  # an int in transformers' config classes
        config.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                      attn_logit_softcapping=cfg.attention_logit_soft_cap,
                      final_logit_softcapping=cfg.final_logit_soft_cap,
                      sliding_window=cfg.sliding_window,
                      layer_types=[f"{cfg.layer_type(i, cfg.num_layers)}_attention"
                                   for i in range(cfg.num_layers)])
    if family == "gemma3":
        config["rope_local_base_freq"] = cfg.local_rope_base or cfg.rope_base
    ours, back = _meaning(cfg), _meaning(config_from_hf(config, architecture, "save_hf"))
    differ = [f"{name}={value!r} ({architecture} has {back[name]!r})"
              for name, value in ours.items() if value != back[name]]
    if differ:
        raise ConfigError(f"save_hf: this CausalLMConfig has no {architecture} equivalent: "
                          f"{'; '.join(differ)}")
    return config


def _meaning(cfg: CausalLMConfig) -> dict[str, Any]:
    """The fields that define the model, defaults made explicit (None heads = num_heads, ...)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name not in _RUNTIME}
    types = tuple(cfg.layer_type(i, cfg.num_layers) for i in range(cfg.num_layers))
    fields.update(num_kv_heads=cfg.num_kv_heads or cfg.num_heads,
                  head_dim=cfg.attention_head_dim,
                  qkv_bias=cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias,
                  layer_types=types if "sliding" in types else None,
                  sliding_window=cfg.sliding_window if "sliding" in types else None,
                  local_rope_base=(cfg.local_rope_base, None) if cfg.local_rope_base
                  else (cfg.rope_base, cfg.rope_scaling))
    return fields


@dataclasses.dataclass(frozen=True)
class Spec:
    """One parameter: our flat name, the Hugging Face tensor, how one becomes the other.

    layouts: "copy"; "t" (our [in, out] = weight.T); "heads_in" (our [D, N, H] from a
    [N*H, D] projection); "heads_out" (our [N, H, D] from [D, N*H]); "head_bias" (our
    [N, H] from [N*H]); "head_vec" (our [H], a per-head norm). ``rope``: the head
    features are permuted from rotate-half to adjacent pairs.
    """
    ours: str
    hf: str
    layout: str
    shape: tuple
    rope: bool = False

    @property
    def hf_shape(self) -> tuple:
        s = self.shape
        if self.layout == "t":
            return s[::-1]
        if self.layout == "heads_in":
            return (s[1] * s[2], s[0])
        if self.layout == "heads_out":
            return (s[2], s[0] * s[1])
        if self.layout == "head_bias":
            return (s[0] * s[1],)
        return s


def _pairs(head_dim: int) -> np.ndarray:
    """Our feature j = Hugging Face feature perm[j]: (0, H/2, 1, H/2 + 1, ...)."""
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=-1).reshape(-1)


def tensor_specs(cfg: CausalLMConfig) -> list[Spec]:
    """Every parameter of ``CausalLM(cfg)`` (per-layer layout) with its Hugging Face tensor."""
    family = family_of(cfg)
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    n, k, h = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads, cfg.attention_head_dim
    specs = [Spec("embedding/embedding", "model.embed_tokens.weight", "copy", (v, d)),
             Spec("layers/final_norm/scale", "model.norm.weight", "copy", (d,))]
    if not cfg.tie_embeddings:
        specs.append(Spec("logits/kernel", "lm_head.weight", "t", (d, v)))
    sandwich = family in ("gemma2", "gemma3")
    norms = {"self_attention_norm": "input_layernorm",
             "ffn_norm": "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"}
    if sandwich:
        norms.update(self_attention_post_norm="post_attention_layernorm",
                     ffn_post_norm="post_feedforward_layernorm")
    for i in range(cfg.num_layers):
        ours, hf = f"layers/layer_{i}/", f"model.layers.{i}."
        specs += [Spec(f"{ours}{a}/scale", f"{hf}{b}.weight", "copy", (d,))
                  for a, b in norms.items()]
        for part, proj, heads in (("query", "q", n), ("key", "k", k), ("value", "v", k)):
            rope = part != "value"
            specs.append(Spec(f"{ours}self_attention/{part}/kernel",
                              f"{hf}self_attn.{proj}_proj.weight", "heads_in", (d, heads, h),
                              rope))
            if cfg.qkv_bias:
                specs.append(Spec(f"{ours}self_attention/{part}/bias",
                                  f"{hf}self_attn.{proj}_proj.bias", "head_bias", (heads, h),
                                  rope))
            if cfg.qk_norm and rope:
                specs.append(Spec(f"{ours}self_attention/{part}_norm/scale",
                                  f"{hf}self_attn.{proj}_norm.weight", "head_vec", (h,), True))
        specs.append(Spec(f"{ours}self_attention/out/kernel", f"{hf}self_attn.o_proj.weight",
                          "heads_out", (n, h, d)))
        specs += [Spec(f"{ours}ffn/{a}/kernel", f"{hf}mlp.{b}_proj.weight", "t", shape)
                  for a, b, shape in (("wi_0", "gate", (d, f)), ("wi_1", "up", (d, f)),
                                      ("wo", "down", (f, d)))]
    return specs


def _span(index: slice, size: int) -> tuple[int, int]:
    start, stop, step = index.indices(size)
    if step != 1:
        raise ValueError(f"only contiguous blocks are read, got step {step}")
    return start, stop


def read_block(spec: Spec, read, index: Optional[tuple] = None) -> np.ndarray:
    """Block ``index`` (slices over our shape; None = all) of our parameter.

    ``read(hf_index)`` returns that block of the Hugging Face tensor; only the
    rows and columns the block needs are asked for (whole heads for head layouts).
    """
    shape = spec.shape
    index = tuple(slice(None) for _ in shape) if index is None else tuple(index)
    spans = [_span(s, size) for s, size in zip(index, shape)]
    full = slice(None)
    if spec.layout == "copy":
        return read(tuple(slice(a, b) for a, b in spans))
    if spec.layout == "t":
        return read((slice(*spans[1]), slice(*spans[0]))).T
    if spec.layout == "heads_in":
        (d0, d1), (n0, n1), _ = spans
        h = shape[2]
        block = read((slice(n0 * h, n1 * h), slice(d0, d1))).T.reshape(d1 - d0, n1 - n0, h)
    elif spec.layout == "heads_out":
        _, _, (d0, d1) = spans
        (n0, n1), h = spans[0], shape[1]
        block = read((slice(d0, d1), slice(n0 * h, n1 * h))).T.reshape(n1 - n0, h, d1 - d0)
        return block[:, slice(*spans[1]), :]
    elif spec.layout == "head_bias":
        (n0, n1), h = spans[0], shape[1]
        block = read((slice(n0 * h, n1 * h),)).reshape(n1 - n0, h)
    else:  # head_vec
        block = read((full,))
    if spec.rope:
        block = block[..., _pairs(shape[-1])]
    return block[..., slice(*spans[-1])]


def to_hf(spec: Spec, value: np.ndarray) -> np.ndarray:
    """Our full parameter -> the Hugging Face tensor (the inverse of :func:`read_block`)."""
    value = np.asarray(value)
    if spec.rope:
        value = value[..., np.argsort(_pairs(spec.shape[-1]))]
    if spec.layout in ("copy", "head_vec"):
        return value
    if spec.layout == "t":
        return value.T
    if spec.layout == "heads_in":
        return value.reshape(spec.shape[0], -1).T
    if spec.layout == "heads_out":
        return value.reshape(-1, spec.shape[2]).T
    return value.reshape(-1)  # head_bias


def check_tensors(specs: list[Spec], checkpoint, tied: bool, source: str) -> None:
    """Every tensor present with its shape, and nothing left over, before any is read."""
    for spec in specs:
        if spec.hf not in checkpoint:
            raise DataError(f"{source}: tensor {spec.hf!r} is missing; expected shape "
                            f"{spec.hf_shape} (config.json describes a model that has it)")
        if checkpoint.shape(spec.hf) != spec.hf_shape:
            raise DataError(f"{checkpoint.source(spec.hf)}: tensor {spec.hf!r} has shape "
                            f"{checkpoint.shape(spec.hf)}, config.json implies "
                            f"{spec.hf_shape}")
    used = {spec.hf for spec in specs} | ({"lm_head.weight"} if tied else set())
    extra = [name for name in checkpoint.names() if name not in used
             and not name.endswith("rotary_emb.inv_freq")]
    if extra:
        raise DataError(f"{source}: tensors {extra[:5]} have no place in this model; is "
                        f"config.json the checkpoint's own?")
