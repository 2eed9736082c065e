"""GPT-2 (Hugging Face ``GPT2LMHeadModel``) <-> :class:`tfx_jax.CausalLM`.

GPT-2 is our pre-LN causal stack with learned positions and tied embeddings.
What differs is only how the tensors are stored:

* its projections are ``Conv1D`` modules whose weights are [in, out] (not
  torch's usual [out, in]), so no transpose is needed;
* ``attn.c_attn`` is one fused [D, 3D] projection whose columns are
  query | key | value, each split into heads of D / n_head consecutive
  columns: it reshapes to [D, 3, heads, head_dim];
* the output projection ``attn.c_proj`` [D, D] reshapes to [heads, head_dim, D];
* ``gelu_new`` is the tanh-approximated GELU (our "gelu"), LayerNorm
  epsilon 1e-5, and ``lm_head`` is tied to ``wte`` (not stored).

Names may carry the ``transformer.`` prefix (``GPT2LMHeadModel.save_pretrained``)
or not (the original ``gpt2`` checkpoints); the causal-mask buffers
``attn.bias`` / ``attn.masked_bias`` of old files are ignored.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from tfx_jax.errors import DataError
from tfx_jax.lm import CausalLMConfig
from tfx_jax.pretrained.tensors import TensorReader

ARCHITECTURE = "GPT2LMHeadModel"
_FROM_HF_ACT = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
                "gelu": "gelu_exact", "relu": "relu"}
_TO_HF_ACT = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}


def config_from_hf(config: dict[str, Any], source: str) -> CausalLMConfig:
    """The CausalLMConfig of a GPT-2 config.json (unsupported options raise)."""
    for key, value, why in (("scale_attn_by_inverse_layer_idx", False, "layer-scaled attention"),
                            ("scale_attn_weights", True, "unscaled attention"),
                            ("add_cross_attention", False, "cross-attention"),
                            ("tie_word_embeddings", True, "an untied lm_head")):
        if config.get(key, value) != value:
            raise DataError(f"{source}: {key}={config[key]!r} ({why}) is not supported; "
                             f"expected {value!r}")
    act = config.get("activation_function", "gelu_new")
    if act not in _FROM_HF_ACT:
        raise DataError(f"{source}: activation_function={act!r} is not supported; expected one "
                         f"of {sorted(_FROM_HF_ACT)}")
    d_model = config.get("n_embd", 768)
    return CausalLMConfig(
        vocab_size=config.get("vocab_size", 50257), max_len=config.get("n_positions", 1024),
        d_model=d_model, num_heads=config.get("n_head", 12), num_layers=config.get("n_layer", 12),
        d_ff=config.get("n_inner") or 4 * d_model, activation=_FROM_HF_ACT[act],
        layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
        dropout_rate=float(config.get("resid_pdrop", 0.1)),
        attention_dropout_rate=float(config.get("attn_pdrop", 0.1)),
        pre_norm=True, position="learned", tie_embeddings=True, use_bias=True)


def config_to_hf(cfg: CausalLMConfig) -> dict[str, Any]:
    """A GPT-2 config.json for ``cfg`` (models GPT-2 cannot express raise)."""
    problems = [f"{name}={getattr(cfg, name, want)!r} (GPT-2 has {want!r})"
                for name, want in (("pre_norm", True), ("position", "learned"),
                                   ("tie_embeddings", True), ("use_bias", True))
                if getattr(cfg, name, want) != want]
    if getattr(cfg, "num_kv_heads", None) not in (None, cfg.num_heads):
        problems.append(f"num_kv_heads={cfg.num_kv_heads} (GPT-2 has one key/value head per "
                        f"query head)")
    if problems:
        raise ValueError(f"save_hf: this CausalLMConfig has no GPT-2 equivalent: "
                         f"{'; '.join(problems)}")
    return {"architectures": [ARCHITECTURE], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
            "activation_function": _TO_HF_ACT[cfg.activation],
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "resid_pdrop": cfg.dropout_rate,
            "embd_pdrop": cfg.dropout_rate, "attn_pdrop": cfg.attention_dropout_rate,
            "scale_attn_weights": True, "tie_word_embeddings": True, "dtype": "float32",
            "bos_token_id": None, "eos_token_id": None}


def params_from_hf(tensors: dict[str, np.ndarray], cfg: CausalLMConfig,
                   source: str) -> dict[str, np.ndarray]:
    """Our flat parameters from GPT-2 tensors (checked names and shapes)."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    reader = TensorReader({k[len(prefix):] if k.startswith(prefix) else k: v
                           for k, v in tensors.items()}, source)
    for name in list(reader.tensors):
        if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", name):
            reader.skip(name)  # causal-mask buffers of old checkpoints
    d, f, n = cfg.d_model, cfg.d_ff, cfg.num_heads
    hd = d // n
    flat = {"embedding/embedding": reader.get("wte.weight", (cfg.vocab_size, d)),
            "position/embedding": reader.get("wpe.weight", (cfg.max_len, d)),
            "layers/final_norm/scale": reader.get("ln_f.weight", (d,)),
            "layers/final_norm/bias": reader.get("ln_f.bias", (d,))}
    if "lm_head.weight" in reader:
        head = reader.get("lm_head.weight", (cfg.vocab_size, d))
        if not np.array_equal(head, flat["embedding/embedding"]):
            raise DataError(f"{source}: 'lm_head.weight' differs from 'wte.weight'; only tied "
                             f"GPT-2 heads are supported")
    for i in range(cfg.num_layers):
        h, ours = f"h.{i}.", f"layers/layer_{i}/"
        qkv = reader.get(h + "attn.c_attn.weight", (d, 3 * d)).reshape(d, 3, n, hd)
        qkv_bias = reader.get(h + "attn.c_attn.bias", (3 * d,)).reshape(3, n, hd)
        for j, part in enumerate(("query", "key", "value")):
            flat[f"{ours}self_attention/{part}/kernel"] = qkv[:, j]
            flat[f"{ours}self_attention/{part}/bias"] = qkv_bias[j]
        flat.update({
            f"{ours}self_attention/out/kernel":
                reader.get(h + "attn.c_proj.weight", (d, d)).reshape(n, hd, d),
            f"{ours}self_attention/out/bias": reader.get(h + "attn.c_proj.bias", (d,)),
            f"{ours}self_attention_norm/scale": reader.get(h + "ln_1.weight", (d,)),
            f"{ours}self_attention_norm/bias": reader.get(h + "ln_1.bias", (d,)),
            f"{ours}ffn_norm/scale": reader.get(h + "ln_2.weight", (d,)),
            f"{ours}ffn_norm/bias": reader.get(h + "ln_2.bias", (d,)),
            f"{ours}ffn/wi/kernel": reader.get(h + "mlp.c_fc.weight", (d, f)),
            f"{ours}ffn/wi/bias": reader.get(h + "mlp.c_fc.bias", (f,)),
            f"{ours}ffn/wo/kernel": reader.get(h + "mlp.c_proj.weight", (f, d)),
            f"{ours}ffn/wo/bias": reader.get(h + "mlp.c_proj.bias", (d,)),
        })
    reader.check_all_used(f"GPT-2 with {cfg.num_layers} layers")
    return flat


def params_to_hf(flat: dict[str, np.ndarray], cfg: CausalLMConfig) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel tensors (``transformer.`` names; lm_head tied) from our flat params."""
    d, f = cfg.d_model, cfg.d_ff
    t = {"transformer.wte.weight": flat["embedding/embedding"],
         "transformer.wpe.weight": flat["position/embedding"],
         "transformer.ln_f.weight": flat["layers/final_norm/scale"],
         "transformer.ln_f.bias": flat["layers/final_norm/bias"]}
    for i in range(cfg.num_layers):
        h, ours = f"transformer.h.{i}.", f"layers/layer_{i}/"
        attn = ours + "self_attention/"
        t[h + "attn.c_attn.weight"] = np.stack(
            [flat[f"{attn}{p}/kernel"] for p in ("query", "key", "value")], axis=1).reshape(d, -1)
        t[h + "attn.c_attn.bias"] = np.stack(
            [flat[f"{attn}{p}/bias"] for p in ("query", "key", "value")]).reshape(-1)
        t[h + "attn.c_proj.weight"] = flat[attn + "out/kernel"].reshape(d, d)
        t[h + "attn.c_proj.bias"] = flat[attn + "out/bias"]
        t[h + "ln_1.weight"] = flat[ours + "self_attention_norm/scale"]
        t[h + "ln_1.bias"] = flat[ours + "self_attention_norm/bias"]
        t[h + "ln_2.weight"] = flat[ours + "ffn_norm/scale"]
        t[h + "ln_2.bias"] = flat[ours + "ffn_norm/bias"]
        t[h + "mlp.c_fc.weight"] = flat[ours + "ffn/wi/kernel"].reshape(d, f)
        t[h + "mlp.c_fc.bias"] = flat[ours + "ffn/wi/bias"]
        t[h + "mlp.c_proj.weight"] = flat[ours + "ffn/wo/kernel"].reshape(f, d)
        t[h + "mlp.c_proj.bias"] = flat[ours + "ffn/wo/bias"]
    return t
