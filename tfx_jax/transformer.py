"""The encoder-decoder Transformer (Vaswani et al. 2017) for sequence transduction.

The encoder reads the whole source sentence at once: embeddings (scaled by
sqrt(d_model)) plus positional encodings, then N blocks of self-attention and
feed-forward. The decoder writes the target one token at a time; each of its
blocks attends causally to the target prefix, then to the encoder's keys and
values (cross-attention: "which source words matter for the word I am about
to write"), then applies its feed-forward network. The decoder's output is
turned into next-token logits by the embedding matrix itself (sec. 3.4: the
two embeddings and the pre-softmax projection share one weight matrix).

In training the decoder is fed the correct target shifted right (teacher
forcing), so all positions are predicted in parallel; at inference it is run
autoregressively with a key/value cache (``decode=True``).

Packed batches (several sentence pairs per row, as in Flax's wmt example) pass
``src_segment_ids`` / ``tgt_segment_ids``: the encoder attends within source
segments, the decoder within target segments and, across, only to the source
tokens of its own segment id; positions restart at every segment. Without
segment ids, token ``pad_id`` is (right) padding and reaches the attention core
as per-row key lengths, which fused kernels (cuDNN) accept.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfx_jax.blocks import BlockStack, padding_lengths, self_attention_args
from tfx_jax.errors import ConfigError
from tfx_jax.logical_axes import with_axes
from tfx_jax.model_config import POSITION_KINDS, StackConfig, check_one_of, check_positive
from tfx_jax.position import SequenceLayout, add_positions, check_tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig(StackConfig):
    """The encoder-decoder's hyper-parameters; defaults are the paper's base model.

    Attributes (beyond :class:`StackConfig`):
      vocab_size: size of the (shared) token vocabulary; id ``pad_id`` is padding.
      num_encoder_layers, num_decoder_layers: N (paper: 6 each).
      max_len: longest source or target sequence.
      share_embeddings: one matrix for source embedding, target embedding and the
        pre-softmax projection (paper, with a shared source/target BPE vocabulary).
      position: "sinusoidal" (paper), "learned" or "rope" (rotary embeddings in every
        self-attention, RoFormer; nothing is added to the embeddings, and
        cross-attention has no positions).
      pad_id: the padding token id (masked out as attention key). Sequences are
        right-padded: padding reaches attention as the number of non-pad tokens.
    """
    vocab_size: int
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    max_len: int = 256
    share_embeddings: bool = True
    position: str = "sinusoidal"
    pad_id: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "vocab_size", "num_encoder_layers", "num_decoder_layers", "max_len")
        check_one_of(self, "position", POSITION_KINDS)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TransformerConfig":
        """The paper's "base" or "big" model (Vaswani et al. 2017, Table 3).

        base: d_model 512, d_ff 2048, h 8, N 6, P_drop 0.1; big: d_model 1024, d_ff 4096,
        h 16, N 6, P_drop 0.3 (EN-DE). Post-LN, ReLU, sinusoidal positions, one shared
        embedding matrix. ``vocab_size`` defaults to 37000, the paper's shared
        source/target BPE vocabulary for WMT 2014 English-German (sec. 5.1); ``overrides``
        set it and any other field. Parameter counts at 37000 tokens: base 63.1M, big
        214.2M (Table 3 prints 65M and 213M; no single vocabulary gives both with
        shared embeddings).
        """
        sizes = {"base": dict(d_model=512, d_ff=2048, num_heads=8, dropout_rate=0.1),
                 "big": dict(d_model=1024, d_ff=4096, num_heads=16, dropout_rate=0.3)}
        if name not in sizes:
            raise ConfigError(f"Transformer preset must be one of {tuple(sizes)}, got {name!r}")
        return cls(**{**sizes[name], "vocab_size": 37000, "num_encoder_layers": 6,
                      "num_decoder_layers": 6, "pre_norm": False, "activation": "relu",
                      "position": "sinusoidal", "share_embeddings": True, **overrides})


def embed_tokens(embedding: nn.Embed, tokens: jax.Array, config: StackConfig) -> jax.Array:
    """Token embeddings multiplied by sqrt(d_model), as in sec. 3.4."""
    return embedding(tokens) * jnp.asarray(math.sqrt(config.d_model), config.dtype)


class Encoder(nn.Module):
    """Source tokens [B, S] -> contextual vectors [B, S, d_model]."""
    config: TransformerConfig
    embedding: nn.Module

    @nn.compact
    def __call__(self, source: jax.Array, *, segment_ids=None, positions=None,
                 deterministic: bool = True, return_intermediates: bool = False):
        cfg = self.config
        positions, segment_ids = SequenceLayout(name="positions")(
            *source.shape, positions, segment_ids)
        x = embed_tokens(self.embedding, source, cfg)
        x = add_positions(x, positions, cfg)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        stack = BlockStack(cfg.replace(decode=False), cfg.num_encoder_layers,
                           deterministic=deterministic, name="layers")
        return stack(x, attention_args=self_attention_args(
            segment_ids, positions, cfg, padding_lengths(source, cfg.pad_id)),
            return_intermediates=return_intermediates)


class Decoder(nn.Module):
    """Target prefix [B, T] + encoder output [B, S, D] -> next-token logits [B, T, vocab]."""
    config: TransformerConfig
    embedding: nn.Module

    @nn.compact
    def __call__(self, encoded: jax.Array, source: jax.Array, target_in: jax.Array, *,
                 src_segment_ids=None, tgt_segment_ids=None, tgt_positions=None,
                 deterministic: bool = True, return_intermediates: bool = False):
        cfg = self.config
        if not cfg.decode and (src_segment_ids is None) != (tgt_segment_ids is None):
            raise ValueError("packed translation needs both src_segment_ids and "
                             "tgt_segment_ids (or neither: pad_id marks padding)")
        # In decode mode the layout keeps per-sequence positions and segment ids.
        positions, segment_ids = SequenceLayout(cfg.decode, name="positions")(
            *target_in.shape, tgt_positions, tgt_segment_ids)
        y = embed_tokens(self.embedding, target_in, cfg)
        y = add_positions(y, positions, cfg)
        y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
        # Right-padded targets: causality already hides padding keys from real queries.
        self_args = self_attention_args(segment_ids, positions, cfg)
        if src_segment_ids is None:
            cross_args = {"kv_lengths": padding_lengths(source, cfg.pad_id)}
        else:  # a target token attends the source tokens of its own segment
            cross_args = {"q_segment_ids": segment_ids, "kv_segment_ids": src_segment_ids}
        stack = BlockStack(cfg, cfg.num_decoder_layers, causal=True, cross_attention=True,
                           deterministic=deterministic, name="layers")
        y = stack(y, None, encoded, None, attention_args=self_args,
                  cross_attention_args=cross_args, return_intermediates=return_intermediates)
        y, layers = y if return_intermediates else (y, None)
        if cfg.share_embeddings:
            logits = self.embedding.attend(y)
        else:
            logits = nn.Dense(cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              kernel_init=with_axes(nn.linear.default_kernel_init,
                                                    ("embed", "vocab")),
                              bias_init=with_axes(nn.initializers.zeros_init(), ("vocab",)),
                              name="logits")(y)
        logits = logits.astype(jnp.float32)
        if return_intermediates:
            return logits, {"decoder_layers": layers, "pre_logits": y}
        return logits


class Transformer(nn.Module):
    """Encoder-decoder Transformer: ``apply({"params": p}, source, target_in) -> logits``.

    ``source`` [B, S] and ``target_in`` [B, T] are integer token ids, right-padded
    with ``pad_id``; ``target_in`` is the target shifted right (teacher forcing).
    Logits [B, T, vocab_size] are float32. ``encode`` and ``decode`` are exposed
    for autoregressive inference (``config.decode=True`` keeps a key/value cache).

    With ``return_intermediates=True`` it returns ``(logits, out)``, ``out`` a dict:
      "encoder_layers": [num_encoder_layers, B, S, D] each encoder block's output;
      "encoded": [B, S, D] the encoder output (the memory cross-attention reads);
      "decoder_layers": [num_decoder_layers, B, T, D] each decoder block's output;
      "pre_logits": [B, T, D] the decoder output the vocabulary projection reads.
    ``encode`` returns ``(encoded, {"encoder_layers": ...})`` and ``decode``
    ``(logits, {"decoder_layers": ..., "pre_logits": ...})`` when asked the same way.
    Attention probabilities: applied with ``mutable=["intermediates"]``, see
    :class:`tfx_jax.MultiHeadAttention`.
    """
    config: TransformerConfig

    def setup(self):
        cfg = self.config

        def embedding(name):
            return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype,
                            embedding_init=with_axes(
                                nn.initializers.normal(stddev=cfg.d_model ** -0.5),
                                ("vocab", "embed")),
                            name=name)

        if cfg.share_embeddings:
            source_embedding = target_embedding = embedding("embedding")
        else:
            source_embedding = embedding("source_embedding")
            target_embedding = embedding("target_embedding")
        self.encoder = Encoder(cfg, source_embedding)
        self.decoder = Decoder(cfg, target_embedding)

    def encode(self, source: jax.Array, *, src_segment_ids=None, src_positions=None,
               deterministic: bool = True, return_intermediates: bool = False):
        """Source [B, S] -> encoder output [B, S, d_model]."""
        check_tokens("source", source, self.config.max_len)
        encoded = self.encoder(source, segment_ids=src_segment_ids, positions=src_positions,
                               deterministic=deterministic,
                               return_intermediates=return_intermediates)
        if return_intermediates:
            encoded, layers = encoded
            return encoded, {"encoder_layers": layers}
        return encoded

    def decode(self, encoded: jax.Array, source: jax.Array, target_in: jax.Array, *,
               src_segment_ids=None, tgt_segment_ids=None, tgt_positions=None,
               deterministic: bool = True, return_intermediates: bool = False):
        """Encoder output + source (its padding / segments) + target prefix -> logits."""
        check_tokens("target_in", target_in, self.config.max_len)
        if encoded.shape[:2] != source.shape:
            raise ValueError(f"encoded {tuple(encoded.shape)} does not match source "
                             f"{tuple(source.shape)} in [batch, length]")
        return self.decoder(encoded, source, target_in, src_segment_ids=src_segment_ids,
                            tgt_segment_ids=tgt_segment_ids, tgt_positions=tgt_positions,
                            deterministic=deterministic,
                            return_intermediates=return_intermediates)

    def __call__(self, source: jax.Array, target_in: jax.Array, *, src_segment_ids=None,
                 tgt_segment_ids=None, src_positions=None, tgt_positions=None,
                 deterministic: bool = True, return_intermediates: bool = False):
        """Teacher-forced logits [B, T, vocab]. Segment ids (int [B, S] / [B, T], 0 =
        padding) pack several pairs per row; positions (int) default to 0, 1, ...
        restarting at every segment."""
        if source.ndim == 2 and target_in.ndim == 2 and source.shape[0] != target_in.shape[0]:
            raise ValueError(f"source batch {source.shape[0]} != target_in batch "
                             f"{target_in.shape[0]}")
        encoded = self.encode(source, src_segment_ids=src_segment_ids,
                              src_positions=src_positions, deterministic=deterministic,
                              return_intermediates=return_intermediates)
        encoded, out = encoded if return_intermediates else (encoded, {})
        logits = self.decode(encoded, source, target_in, src_segment_ids=src_segment_ids,
                             tgt_segment_ids=tgt_segment_ids, tgt_positions=tgt_positions,
                             deterministic=deterministic,
                             return_intermediates=return_intermediates)
        if not return_intermediates:
            return logits
        logits, decoder_out = logits
        return logits, {**out, "encoded": encoded, **decoder_out}
