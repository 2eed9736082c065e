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
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfx_jax.blocks import BlockStack
from tfx_jax.logical_axes import with_axes
from tfx_jax.model_config import POSITION_KINDS, StackConfig, check_one_of, check_positive
from tfx_jax.position import SequenceLayout
from tfx_jax.transformer import add_positions, check_tokens, self_attention_args


@dataclasses.dataclass(frozen=True, kw_only=True)
class CausalLMConfig(StackConfig):
    """Decoder-only LM hyper-parameters (pre-LN, GELU, learned positions by default).

    Attributes (beyond :class:`StackConfig`):
      vocab_size: token vocabulary size.
      num_layers: number of causal blocks.
      max_len: longest sequence (context window).
      tie_embeddings: reuse the token embedding as the output projection.
      position: "learned" (GPT), "sinusoidal" or "rope" (rotary embeddings applied to
        queries and keys in every layer, RoFormer/Llama; no additive embedding).
    """
    vocab_size: int
    num_layers: int = 12
    max_len: int = 1024
    tie_embeddings: bool = True
    position: str = "learned"
    pre_norm: bool = True
    activation: str = "gelu"

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "vocab_size", "num_layers", "max_len")
        check_one_of(self, "position", POSITION_KINDS)


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
    """
    config: CausalLMConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, positions=None, segment_ids=None,
                 deterministic: bool = True) -> jax.Array:
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
        x = add_positions(x, positions, cfg)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = BlockStack(cfg, cfg.num_layers, causal=True, deterministic=deterministic,
                       name="layers")(x, attention_args=self_attention_args(
                           segment_ids, positions, cfg))
        if cfg.tie_embeddings:
            logits = embedding.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              kernel_init=with_axes(nn.linear.default_kernel_init,
                                                    ("embed", "vocab")),
                              bias_init=with_axes(nn.initializers.zeros_init(), ("vocab",)),
                              name="logits")(x)
        return logits.astype(jnp.float32)
