"""Model configurations: frozen dataclasses that check themselves.

Every model is built from a stack of the same Transformer block; the options
of that stack live in :class:`StackConfig`, and each model's config adds what
is its own (vocabulary, image size, ...). A bad value raises
:class:`tfx_jax.errors.ConfigError` (a ValueError) naming the field when the
config is created, not deep inside a traced function.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, TypeVar

import jax.numpy as jnp

from tfx_jax.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from tfx_jax.errors import ConfigError, require
from tfx_jax.rotary import rope_scaling_items

ACTIVATIONS = ("relu", "gelu", "gelu_exact", "silu")  # gelu: tanh approx.; gelu_exact: erf
POSITION_KINDS = ("sinusoidal", "learned", "rope")
NORMS = ("layer_norm", "rms_norm")
MLPS = ("dense", "gated")
LAYER_TYPES = ("full", "sliding")
REMAT_POLICIES = ("none", "full", "full_nested", "dots", "dots_no_batch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Set by the code that decodes (inference), never by a training config's ``model`` section.
RUNTIME_FIELDS = ("decode",)

ConfigT = TypeVar("ConfigT", bound="StackConfig")


def check_positive(config, *names: str) -> None:
    """ConfigError unless each field ``names`` of ``config`` is a positive integer."""
    for name in names:
        value = getattr(config, name)
        require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def check_one_of(config, name: str, choices: tuple) -> None:
    """ConfigError unless the field ``name`` of ``config`` is one of ``choices``."""
    value = getattr(config, name)
    require(value in choices,
            f"{type(config).__name__}.{name} must be one of {choices}, got {value!r}")


def _check_rate(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        require(0.0 <= value < 1.0,
                f"{type(config).__name__}.{name} must be in [0, 1), got {value!r}")


def _resolve_dtype(config, name: str) -> None:
    """Checks a dtype field and replaces a name ("bfloat16") by the dtype."""
    value = getattr(config, name)
    if isinstance(value, str):
        require(value in DTYPES, f"{type(config).__name__}.{name} must be one of "
                f"{tuple(DTYPES)}, got {value!r}")
        object.__setattr__(config, name, DTYPES[value])
    else:
        require(jnp.dtype(value) in {jnp.dtype(d) for d in DTYPES.values()},
                f"{type(config).__name__}.{name} must be a floating dtype, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackConfig:
    """Options shared by every stack of Transformer blocks.

    Attributes:
      d_model: width of the residual stream (paper: 512 base, 1024 big).
      num_heads: attention heads h; d_model must divide by it (d_k = d_model / h).
      num_kv_heads: key/value heads (grouped-query attention, Ainslie et al. 2023):
        None = num_heads (the paper's multi-head attention), 1 = multi-query attention
        (Shazeer 2019); num_heads must divide by it. Each group of
        num_heads / num_kv_heads query heads shares one key/value head, which shrinks
        the key/value projections and the decoding cache by that factor.
      d_ff: inner width of the position-wise feed-forward network (paper: 2048).
      dropout_rate: dropout on sub-layer outputs and embeddings (paper: 0.1).
      attention_dropout_rate: dropout on attention weights (the paper has none).
      pre_norm: LayerNorm before each sub-layer (pre-LN, stabler for deep stacks)
        instead of after the residual sum (post-LN, the paper).
      activation: "relu" (paper), "gelu" (tanh approximation: GPT-2, JAX ViT) or
        "gelu_exact" (erf GELU: Hugging Face / PyTorch ViT).
      layer_norm_epsilon: LayerNorm epsilon.
      use_bias: biases in the attention and feed-forward projections.
      fused_qkv: one matmul for Q, K and V in self-attention.
      attention_implementation: "auto", "dense", "chunked" or "cudnn".
      scan_layers: run the layers with ``nn.scan`` (one compiled layer, faster compile).
      remat_policy: rematerialisation of each layer in the backward pass:
        "none", "full" (recompute everything), "full_nested" ("full", and each attention
        sub-layer checkpointed again inside the layer: its internals are recomputed at
        its own backward instead of living through the MLP's, a lower peak for one more
        attention forward per layer), "dots" / "dots_no_batch" (save matmuls).
      dtype: computation dtype (e.g. "bfloat16" on TPU); param_dtype: parameters'.
      decode: autoregressive mode with key/value caches.
      rope_base: base of the rotary frequencies theta_i = rope_base^(-2i/d_k) when a
        model's ``position`` is "rope" (RoFormer: 10000; Llama 3: 500000).
      rope_scaling: None, or a mapping stretching the rotary frequencies for long
        contexts: ``{"rope_type": "linear", "factor": f}`` or ``{"rope_type": "llama3",
        "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings"}`` (see ``rotary.py``); kept as sorted
        (key, value) pairs. Other types raise ConfigError by name.

    The options below express the decoders of Llama, Mistral, Qwen and Gemma (their
    defaults are the original Transformer / GPT-2 block):

      head_dim: size of each attention head; None = d_model / num_heads. Gemma and
        Qwen 3 use num_heads * head_dim != d_model.
      norm: "layer_norm" (mean and variance, scale and bias) or "rms_norm" (Zhang &
        Sennrich 2019: x / sqrt(mean(x^2) + eps) * scale, no bias; Llama).
      norm_scale_offset: the norms multiply by (norm_scale_offset + scale): 0 for the
        usual scale, 1 for Gemma's RMSNorm whose stored weight w scales by (1 + w).
      mlp: "dense" (act(x W1) W2) or "gated" (GLU variants, Shazeer 2020:
        (act(x W_gate) * x W_up) W_down; SwiGLU with activation="silu", GeGLU with "gelu").
      qkv_bias: biases on the query/key/value projections; None = use_bias (Qwen 2:
        True with use_bias=False, i.e. no bias on the output or MLP projections).
      qk_norm: a per-head norm (kind ``norm``, over head_dim) on queries and keys
        before the rotation (Qwen 3, Gemma 3).
      sandwich_norm: also normalise each sub-layer's output before the residual sum
        (Gemma 2 and 3: x + norm(f(norm(x)))).
      query_pre_attn_scalar: scores are scaled by query_pre_attn_scalar^-0.5 instead of
        head_dim^-0.5 (Gemma 2 and 3).
      attention_logit_soft_cap: scores become c * tanh(scores / c) before the softmax
        (Gemma 2: 50); needs the "dense" or "chunked" attention implementation.
      sliding_window: w > 0: a query at position i sees keys j with i - w < j <= i in
        the layers of type "sliding" (Mistral, Gemma 2 and 3; Hugging Face's meaning).
      layer_types: one "full" or "sliding" per layer; None = all "sliding" when
        sliding_window is set (Mistral), else all "full".
      local_rope_base: rope base of the "sliding" layers, which then use no
        rope_scaling (Gemma 3: 10000 local, rope_base 1e6 global); None = as the others.
    """
    d_model: int = 512
    num_heads: int = 8
    num_kv_heads: Optional[int] = None
    d_ff: int = 2048
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    pre_norm: bool = False
    activation: str = "relu"
    layer_norm_epsilon: float = 1e-6
    use_bias: bool = True
    fused_qkv: bool = False
    attention_implementation: str = "auto"
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    decode: bool = False
    rope_base: float = 10000.0
    rope_scaling: Any = None
    head_dim: Optional[int] = None
    norm: str = "layer_norm"
    norm_scale_offset: float = 0.0
    mlp: str = "dense"
    qkv_bias: Optional[bool] = None
    qk_norm: bool = False
    sandwich_norm: bool = False
    query_pre_attn_scalar: Optional[float] = None
    attention_logit_soft_cap: Optional[float] = None
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple] = None
    local_rope_base: Optional[float] = None

    def __post_init__(self):
        check_positive(self, "d_model", "num_heads", "d_ff")
        if self.head_dim is not None:
            check_positive(self, "head_dim")
        elif self.d_model % self.num_heads:
            raise ConfigError(f"{type(self).__name__}.d_model={self.d_model} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.num_kv_heads is not None:
            check_positive(self, "num_kv_heads")
            if self.num_heads % self.num_kv_heads:
                raise ConfigError(f"{type(self).__name__}.num_heads={self.num_heads} is not "
                                 f"divisible by num_kv_heads={self.num_kv_heads}")
            if self.fused_qkv and self.num_kv_heads != self.num_heads:
                raise ConfigError(f"{type(self).__name__}.fused_qkv=True needs num_kv_heads == "
                                 f"num_heads, got num_kv_heads={self.num_kv_heads}")
        if not self.rope_base > 1.0:
            raise ConfigError(f"{type(self).__name__}.rope_base must be > 1, got {self.rope_base!r}")
        _check_rate(self, "dropout_rate", "attention_dropout_rate")
        check_one_of(self, "activation", ACTIVATIONS)
        check_one_of(self, "attention_implementation", ATTENTION_IMPLEMENTATIONS)
        check_one_of(self, "remat_policy", REMAT_POLICIES)
        _resolve_dtype(self, "dtype")
        _resolve_dtype(self, "param_dtype")
        check_one_of(self, "norm", NORMS)
        check_one_of(self, "mlp", MLPS)
        object.__setattr__(self, "rope_scaling", rope_scaling_items(self.rope_scaling))
        for name in ("query_pre_attn_scalar", "attention_logit_soft_cap", "local_rope_base"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or value <= 0):
                raise ConfigError(f"{type(self).__name__}.{name} must be a positive number or "
                                  f"None, got {value!r}")
        if self.sliding_window is not None:
            check_positive(self, "sliding_window")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ConfigError(f"{type(self).__name__}.layer_types has {bad}; each layer is "
                                  f"one of {LAYER_TYPES}")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ConfigError(f"{type(self).__name__}.layer_types has 'sliding' layers "
                                  f"but sliding_window is None")

    def layer_type(self, index: int, num_layers: int) -> str:
        """"full" or "sliding": the attention of layer ``index`` of a stack of ``num_layers``."""
        if self.layer_types is None:
            return "full" if self.sliding_window is None else "sliding"
        if len(self.layer_types) != num_layers:
            raise ConfigError(f"{type(self).__name__}.layer_types has {len(self.layer_types)} "
                              f"entries for a stack of {num_layers} layers")
        return self.layer_types[index]

    @property
    def attention_head_dim(self) -> int:
        """Each attention head's size: head_dim, or d_model / num_heads."""
        return self.head_dim or self.d_model // self.num_heads

    @property
    def rotary(self) -> bool:
        """Whether the model's ``position`` is "rope" (rotary embeddings inside attention)."""
        return getattr(self, "position", None) == "rope"

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def model_section(cls: type, /, values: Mapping[str, Any], *, derived: tuple[str, ...]):
    """An experiment config's ``model`` section: an ``ml_collections.ConfigDict`` of every
    field of ``cls`` but the ``derived`` and runtime ones, so that each one can be set
    from the command line (``--config.model.fused_qkv=True``).

    ``values`` replace the dataclass defaults; dtypes are kept as names ("float32");
    a field that is None is a typed placeholder (``--config.model.num_kv_heads=4``
    works); :func:`from_config_dict` drops the Nones again (the dataclass default).
    """
    import typing

    import ml_collections
    from ml_collections import config_dict

    hints = typing.get_type_hints(cls)
    section = {}
    for field in dataclasses.fields(cls):
        if field.name in derived or field.name in RUNTIME_FIELDS:
            continue
        value = values.get(field.name, field.default)
        if value is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{field.name} has no default: pass it in values")
        if value is None:
            kinds = [t for t in typing.get_args(hints[field.name]) if t is not type(None)]
            kind = typing.get_origin(kinds[0]) or kinds[0] if len(kinds) == 1 else object
            value = config_dict.placeholder(kind if kind is not Any else object)
        elif field.name.endswith("dtype") and not isinstance(value, str):
            value = jnp.dtype(value).name
        section[field.name] = value
    return ml_collections.ConfigDict(section)


def from_config_dict(cls: type[ConfigT], config_dict: Optional[Mapping[str, Any]],
                     /, **derived: Any) -> ConfigT:
    """``cls(**config_dict, **derived)``: the one way an app builds its model from ``config.model``.

    ``config_dict`` is an experiment config's ``model`` section (an
    ``ml_collections.ConfigDict`` or a plain mapping; ``None`` means all
    defaults); ``derived`` holds the fields the run fixes from its data
    (``vocab_size`` from the tokenizer, ``image_size`` from the dataset, ...).
    Every problem is one ConfigError naming the key: a derived field also set in
    ``config.model``, a runtime field (``decode``), a key that ``cls`` does not
    have (the known ones are listed), or a bad value (the config's own check).
    """
    if config_dict is None:
        config_dict = {}
    if hasattr(config_dict, "to_dict"):
        config_dict = config_dict.to_dict()
    if not isinstance(config_dict, Mapping):
        raise TypeError(f"config.model must be a mapping of {cls.__name__} fields, "
                        f"got {type(config_dict).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    derived_keys = sorted(set(config_dict) & set(derived))
    if derived_keys:
        name = derived_keys[0]
        raise ConfigError(f"config.model.{name} is derived by the run ({name}={derived[name]!r} "
                         f"from the data or tokenizer); remove it from config.model")
    runtime_keys = sorted(set(config_dict) & set(RUNTIME_FIELDS))
    if runtime_keys:
        raise ConfigError(f"config.model.{runtime_keys[0]} is set by the code that uses the "
                         f"model (inference), not by a config; remove it from config.model")
    unknown = sorted(set(config_dict) - fields)
    if unknown:
        raise ConfigError(f"config.model has keys {unknown} that {cls.__name__} does not know; "
                         f"known: {sorted(fields - set(derived) - set(RUNTIME_FIELDS))}")
    try:
        return cls(**config_dict, **derived)
    except TypeError as e:  # e.g. a string where a number belongs, caught by a comparison
        raise ConfigError(f"config.model: bad value for {cls.__name__} ({e})") from e
