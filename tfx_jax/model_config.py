"""Model configurations: frozen dataclasses that check themselves.

Every model is built from a stack of the same Transformer block; the options
of that stack live in :class:`StackConfig`, and each model's config adds what
is its own (vocabulary, image size, ...). A bad value raises ValueError naming
the field when the config is created, not deep inside a traced function.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

ACTIVATIONS = ("relu", "gelu")
ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "chunked", "cudnn", "splash")
POSITION_KINDS = ("sinusoidal", "learned", "rope")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, "
                             f"got {value!r}")


def _one_of(config, name, choices):
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{name} must be one of {choices}, got {value!r}")


def _rate(config, *names):
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{type(config).__name__}.{name} must be in [0, 1), got {value!r}")


def _dtype(config, name):
    value = getattr(config, name)
    if isinstance(value, str):
        if value not in DTYPES:
            raise ValueError(f"{type(config).__name__}.{name} must be one of "
                             f"{tuple(DTYPES)}, got {value!r}")
        object.__setattr__(config, name, DTYPES[value])
    elif jnp.dtype(value) not in {jnp.dtype(d) for d in DTYPES.values()}:
        raise ValueError(f"{type(config).__name__}.{name} must be a floating dtype, got {value!r}")


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
      activation: "relu" (paper) or "gelu" (ViT, GPT).
      layer_norm_epsilon: LayerNorm epsilon.
      use_bias: biases in the attention and feed-forward projections.
      fused_qkv: one matmul for Q, K and V in self-attention.
      attention_implementation: "auto", "dense", "chunked" or "cudnn".
      scan_layers: run the layers with ``nn.scan`` (one compiled layer, faster compile).
      remat_policy: rematerialisation of each layer in the backward pass:
        "none", "full" (recompute everything), "dots" / "dots_no_batch" (save matmuls).
      dtype: computation dtype (e.g. "bfloat16" on TPU); param_dtype: parameters'.
      decode: autoregressive mode with key/value caches.
      rope_base: base of the rotary frequencies theta_i = rope_base^(-2i/d_k) when a
        model's ``position`` is "rope" (RoFormer: 10000).
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

    def __post_init__(self):
        _positive(self, "d_model", "num_heads", "d_ff")
        if self.d_model % self.num_heads:
            raise ValueError(f"{type(self).__name__}.d_model={self.d_model} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.num_kv_heads is not None:
            _positive(self, "num_kv_heads")
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"{type(self).__name__}.num_heads={self.num_heads} is not "
                                 f"divisible by num_kv_heads={self.num_kv_heads}")
            if self.fused_qkv and self.num_kv_heads != self.num_heads:
                raise ValueError(f"{type(self).__name__}.fused_qkv=True needs num_kv_heads == "
                                 f"num_heads, got num_kv_heads={self.num_kv_heads}")
        if not self.rope_base > 1.0:
            raise ValueError(f"{type(self).__name__}.rope_base must be > 1, got {self.rope_base!r}")
        _rate(self, "dropout_rate", "attention_dropout_rate")
        _one_of(self, "activation", ACTIVATIONS)
        _one_of(self, "attention_implementation", ATTENTION_IMPLEMENTATIONS)
        _one_of(self, "remat_policy", REMAT_POLICIES)
        _dtype(self, "dtype")
        _dtype(self, "param_dtype")

    @property
    def rotary(self) -> bool:
        """Whether the model's ``position`` is "rope" (rotary embeddings inside attention)."""
        return getattr(self, "position", None) == "rope"

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
