"""The decoder-only causal language model (GPT-style), the engine of DALL-E.

Drop the encoder and the cross-attention from the Transformer and keep the
decoder: every position attends to itself and the positions before it, and is
trained to predict the next token. DALL-E (Ramesh et al. 2021) models one
stream of [text tokens ; image tokens] exactly this way and generates an image
by sampling its tokens one after another.

``segment_ids`` (int [B, T], 0 = padding) restrict attention to each segment:
packed training rows (several documents per row, positions restarting per
document) and left-padded batches of prompts of different lengths (padding as
segment 0, real tokens numbered from position 0) both give every token the
logits it has when its sequence is run alone, in the full pass and in cached
decoding (the cache keeps each key's segment id).

The same model, with the block options of :class:`StackConfig`, is Llama,
Mistral, Qwen 2/3 and Gemma 1/2/3 (``CausalLMConfig.preset(name)`` gives the
released sizes; ``tfx_jax.pretrained.load_hf`` reads their checkpoints).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfx_jax.attention import soft_cap
from tfx_jax.blocks import BlockStack, self_attention_args
from tfx_jax.errors import ConfigError
from tfx_jax.logical_axes import with_axes
from tfx_jax.model_config import POSITION_KINDS, StackConfig, check_one_of, check_positive
from tfx_jax.position import SequenceLayout, add_positions, check_tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class CausalLMConfig(StackConfig):
    """Decoder-only LM hyper-parameters (pre-LN, GELU, learned positions by default).

    Attributes (beyond :class:`StackConfig`):
      vocab_size: token vocabulary size.
      num_layers: number of causal blocks.
      max_len: longest sequence (context window).
      tie_embeddings: reuse the token embedding as the output projection; else a
        separate ``logits`` projection (with a bias if ``use_bias``).
      position: "learned" (GPT), "sinusoidal" or "rope" (rotary embeddings applied to
        queries and keys in every layer, RoFormer/Llama; no additive embedding).
      scale_embeddings: multiply the token embeddings by sqrt(d_model) (Gemma).
      final_logit_soft_cap: c > 0: logits become c * tanh(logits / c) (Gemma 2: 30).

    ``CausalLMConfig.preset(name, **changes)`` gives the released models' shapes
    (``PRESETS``).
    """
    vocab_size: int
    num_layers: int = 12
    max_len: int = 1024
    tie_embeddings: bool = True
    position: str = "learned"
    pre_norm: bool = True
    activation: str = "gelu"
    scale_embeddings: bool = False
    final_logit_soft_cap: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "vocab_size", "num_layers", "max_len")
        check_one_of(self, "position", POSITION_KINDS)
        cap = self.final_logit_soft_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                                or cap <= 0):
            raise ConfigError(f"CausalLMConfig.final_logit_soft_cap must be a positive number "
                              f"or None, got {cap!r}")
        for i in range(self.num_layers):  # layer_types must match num_layers
            self.layer_type(i, self.num_layers)
        if self.rope_scaling is not None and self.position != "rope":
            raise ConfigError(f"CausalLMConfig.rope_scaling needs position='rope', got "
                              f"position={self.position!r}")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "CausalLMConfig":
        """The config of a released model (``PRESETS``), with ``changes`` applied.

        E.g. ``CausalLMConfig.preset("llama3.2-1b", max_len=4096, dtype="bfloat16")``.
        Dropout is 0 (as the released models are fine-tuned).
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown CausalLMConfig preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})


def _llama(**fields):
    return {**dict(position="rope", norm="rms_norm", mlp="gated", activation="silu",
                   use_bias=False, dropout_rate=0.0, pre_norm=True), **fields}


def _gemma(**fields):
    return _llama(**{**dict(activation="gelu", norm_scale_offset=1.0, scale_embeddings=True,
                            layer_norm_epsilon=1e-6, tie_embeddings=True), **fields})


def _pattern(num_layers, every):
    """Gemma's layer pattern: every ``every``-th layer full, the others sliding."""
    return tuple("full" if (i + 1) % every == 0 else "sliding" for i in range(num_layers))


_LLAMA3_SCALING = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
# Shapes from each model's config.json on the Hugging Face Hub.
PRESETS = {
    "gpt2": dict(vocab_size=50257, num_layers=12, max_len=1024, d_model=768, num_heads=12,
                 d_ff=3072, layer_norm_epsilon=1e-5, activation="gelu", dropout_rate=0.0),
    "llama3.1-8b": _llama(vocab_size=128256, num_layers=32, max_len=131072, d_model=4096,
                          num_heads=32, num_kv_heads=8, d_ff=14336, layer_norm_epsilon=1e-5,
                          rope_base=500000.0, tie_embeddings=False,
                          rope_scaling=dict(_LLAMA3_SCALING, factor=8.0)),
    "llama3.2-1b": _llama(vocab_size=128256, num_layers=16, max_len=131072, d_model=2048,
                          num_heads=32, num_kv_heads=8, head_dim=64, d_ff=8192,
                          layer_norm_epsilon=1e-5, rope_base=500000.0, tie_embeddings=True,
                          rope_scaling=dict(_LLAMA3_SCALING, factor=32.0)),
    "mistral-7b": _llama(vocab_size=32000, num_layers=32, max_len=32768, d_model=4096,
                         num_heads=32, num_kv_heads=8, d_ff=14336, layer_norm_epsilon=1e-5,
                         rope_base=10000.0, tie_embeddings=False, sliding_window=4096),
    "qwen2.5-0.5b": _llama(vocab_size=151936, num_layers=24, max_len=32768, d_model=896,
                           num_heads=14, num_kv_heads=2, d_ff=4864, layer_norm_epsilon=1e-6,
                           rope_base=1000000.0, tie_embeddings=True, qkv_bias=True),
    "qwen3-0.6b": _llama(vocab_size=151936, num_layers=28, max_len=40960, d_model=1024,
                         num_heads=16, num_kv_heads=8, head_dim=128, d_ff=3072,
                         layer_norm_epsilon=1e-6, rope_base=1000000.0, tie_embeddings=True,
                         qk_norm=True),
    "gemma2-2b": _gemma(vocab_size=256000, num_layers=26, max_len=8192, d_model=2304,
                        num_heads=8, num_kv_heads=4, head_dim=256, d_ff=9216,
                        sandwich_norm=True, query_pre_attn_scalar=256.0,
                        attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
                        sliding_window=4096, layer_types=_pattern(26, 2)),
    "gemma3-1b": _gemma(vocab_size=262144, num_layers=26, max_len=32768, d_model=1152,
                        num_heads=4, num_kv_heads=1, head_dim=256, d_ff=6912,
                        sandwich_norm=True, qk_norm=True, query_pre_attn_scalar=256.0,
                        rope_base=1000000.0, local_rope_base=10000.0, sliding_window=512,
                        layer_types=_pattern(26, 6)),
}


class CausalLM(nn.Module):
    """``apply({"params": p}, tokens [B, T]) -> next-token logits [B, T, vocab]`` (float32).

    Optional ``positions`` / ``segment_ids`` (int [B, T]): absolute positions
    (default 0..T-1, restarting at every segment) and segments (attention stays
    within equal non-zero ids; 0 = padding). Without segment ids attention is
    causal only (right padding is hidden by causality).

    With ``config.decode=True`` initialise on a [B, max_length] sequence to shape
    the key/value caches, then feed a prompt (any length; left-padded prompts with
    their positions and segment ids, see ``decoding.left_pad``) and one token at a
    time with ``mutable=["cache"]``; later tokens continue each row's positions
    and segment.

    With ``return_intermediates=True`` it returns ``(logits, out)``, ``out`` a dict:
    "layers" [num_layers, B, T, D] each block's output and "pre_logits" [B, T, D]
    the stack's output the vocabulary projection reads. With ``return_hidden=True``
    it returns only that [B, T, D] array and skips the projection (:func:`output_logits`
    applies it, e.g. to a few positions at a time).
    """
    config: CausalLMConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, positions=None, segment_ids=None,
                 deterministic: bool = True, return_intermediates: bool = False,
                 return_hidden: bool = False):
        cfg = self.config
        check_tokens("tokens", tokens, cfg.max_len)
        positions, segment_ids = SequenceLayout(cfg.decode, name="positions")(
            *tokens.shape, positions, segment_ids)
        embedding = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype,
                             embedding_init=with_axes(nn.initializers.normal(stddev=0.02),
                                                      ("vocab", "embed")),
                             name="embedding")
        x = embedding(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
        x = add_positions(x, positions, cfg)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = BlockStack(cfg, cfg.num_layers, causal=True, deterministic=deterministic,
                       name="layers")(x, attention_args=self_attention_args(
                           segment_ids, positions, cfg),
                           return_intermediates=return_intermediates)
        x, layers = x if return_intermediates else (x, None)
        if return_hidden:
            return x
        logits = OutputLayer(cfg, name="logits")(
            x, embedding.embedding if cfg.tie_embeddings else None)
        return (logits, {"layers": layers, "pre_logits": x}) if return_intermediates else logits


class OutputLayer(nn.Module):
    """The vocabulary projection: final hidden states [..., D] -> float32 logits [..., V].

    Tied (``tie_embeddings``, GPT-2 and the papers it follows): ``x @ E^T`` with the
    token embedding ``E`` passed in; else its own ``kernel`` [D, V] (and ``bias`` with
    ``use_bias``), ``params["logits"]``; then ``final_logit_soft_cap``. A module of its
    own so a loss can project a few positions at a time (:func:`output_logits`):
    a row of logits is ``T x V`` floats, the largest activation of most LMs.
    """
    config: CausalLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, embedding: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        if cfg.tie_embeddings:
            x, kernel = nn.dtypes.promote_dtype(x, embedding, dtype=cfg.dtype)
            logits = jnp.dot(x, kernel.T)
        else:
            kernel = self.param("kernel", with_axes(nn.linear.default_kernel_init,
                                                    ("embed", "vocab")),
                                (x.shape[-1], cfg.vocab_size), cfg.param_dtype)
            bias = self.param("bias", with_axes(nn.initializers.zeros_init(), ("vocab",)),
                              (cfg.vocab_size,), cfg.param_dtype) if cfg.use_bias else None
            x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=cfg.dtype)
            logits = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
            if bias is not None:
                logits = logits + bias
        return soft_cap(logits.astype(jnp.float32), cfg.final_logit_soft_cap)


def output_logits(config: CausalLMConfig, params: Any, hidden: jax.Array) -> jax.Array:
    """The logits ``CausalLM(config)`` computes from its final hidden states ``hidden``
    (``CausalLM.apply(..., return_hidden=True)``) with its ``params``; for a loss that
    projects a chunk of positions at a time (``tfx_jax.train.chunked_token_losses``)."""
    embedding = params["embedding"]["embedding"] if config.tie_embeddings else None
    return OutputLayer(config).apply({"params": params.get("logits", {})}, hidden, embedding)
