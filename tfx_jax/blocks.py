"""The Transformer block and the stack of N blocks every model is made of.

A block is attention followed by a position-wise feed-forward network, each
wrapped in a residual connection and layer normalisation (Vaswani et al. 2017,
sec. 3.1). The paper normalises after the residual sum (post-LN):

    x = LayerNorm(x + Dropout(Sublayer(x)))

while most later models normalise first (pre-LN): x = x + Dropout(Sublayer(LayerNorm(x))).

The same block is the encoder layer (self-attention + FFN), the decoder layer
(causal self-attention + cross-attention to the encoder + FFN) and the
GPT/DALL-E layer (causal self-attention + FFN).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfx_jax.logical_axes import constrain, with_axes
from tfx_jax.model_config import StackConfig
from tfx_jax.multihead import MultiHeadAttention

_ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "gelu_exact": lambda x: nn.gelu(x, False)}
_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class FeedForward(nn.Module):
    """Position-wise feed-forward network FFN(x) = act(x W1 + b1) W2 + b2 (sec. 3.3)."""
    config: StackConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda features, name, names: nn.Dense(  # noqa: E731
            features, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=with_axes(nn.initializers.xavier_uniform(), names),
            bias_init=with_axes(nn.initializers.zeros_init(), names[1:]), name=name)
        h = _ACTIVATIONS[cfg.activation](dense(cfg.d_ff, "wi", ("embed", "mlp"))(x))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        return dense(x.shape[-1], "wo", ("mlp", "embed"))(h)


class TransformerBlock(nn.Module):
    """Self-attention [+ cross-attention] + feed-forward, with residuals and LayerNorm.

    Attributes:
      config: the stack's options.
      causal: self-attention may not look ahead (decoder, language model).
      cross_attention: add a sub-layer attending to an encoder's output.
      deterministic: disable dropout.

    Called as ``block(x, mask, encoded, cross_mask, attention_args,
    cross_attention_args) -> (x, None)``; the ``(carry, output)`` form lets
    ``nn.scan`` run the layers. ``attention_args`` / ``cross_attention_args`` are
    dicts of keyword arguments for the two :class:`MultiHeadAttention` calls
    (segment ids, lengths, positions): padding and packing as structure.
    """
    config: StackConfig
    causal: bool = False
    cross_attention: bool = False
    deterministic: bool = True

    def _residual(self, x, sublayer, name):
        cfg = self.config
        norm = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, name=f"{name}_norm",
                            scale_init=with_axes(nn.initializers.ones_init(), ("norm",)),
                            bias_init=with_axes(nn.initializers.zeros_init(), ("norm",)))
        dropout = nn.Dropout(cfg.dropout_rate)
        if cfg.pre_norm:
            return x + dropout(sublayer(norm(x)), deterministic=self.deterministic)
        return norm(x + dropout(sublayer(x), deterministic=self.deterministic))

    def _attention(self, name, decode, rotary=False):
        cfg = self.config
        return MultiHeadAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            dropout_rate=cfg.attention_dropout_rate,
            use_bias=cfg.use_bias, fused_qkv=cfg.fused_qkv, decode=decode,
            rotary=rotary, rope_base=cfg.rope_base,
            implementation=cfg.attention_implementation, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
                 encoded: Optional[jax.Array] = None, cross_mask: Optional[jax.Array] = None,
                 attention_args: Optional[dict] = None,
                 cross_attention_args: Optional[dict] = None):
        cfg = self.config
        x = constrain(x)  # ("batch", "length", "embed") at block boundaries
        self_attention = self._attention("self_attention", decode=cfg.decode,
                                         rotary=cfg.rotary)
        x = self._residual(
            x, lambda h: self_attention(h, mask=mask, causal=self.causal,
                                        deterministic=self.deterministic,
                                        **(attention_args or {})), "self_attention")
        if self.cross_attention:
            if encoded is None:
                raise ValueError("a cross-attention block needs the encoder output")
            cross = self._attention("cross_attention", decode=False)
            x = self._residual(
                x, lambda h: cross(h, encoded, mask=cross_mask, deterministic=self.deterministic,
                                   **(cross_attention_args or {})), "cross_attention")
        ffn = FeedForward(cfg, deterministic=self.deterministic, name="ffn")
        x = self._residual(x, ffn, "ffn")
        return constrain(x), None


class BlockStack(nn.Module):
    """N identical blocks, as a Python loop or as one ``nn.scan``-ned layer.

    With ``scan_layers`` the parameters of all layers are stacked on a leading
    axis of size N and XLA compiles the layer once (fast compiles for deep
    models); ``remat_policy`` recomputes activations in the backward pass to
    trade compute for memory. A final LayerNorm closes a pre-LN stack.
    """
    config: StackConfig
    num_layers: int
    causal: bool = False
    cross_attention: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask=None, encoded=None, cross_mask=None, *, attention_args=None,
                 cross_attention_args=None):
        """``attention_args`` / ``cross_attention_args``: keyword arguments (arrays or None)
        for every layer's self- / cross-attention, e.g. ``dict(q_segment_ids=s, positions=p)``."""
        cfg = self.config
        args = (mask, encoded, cross_mask, attention_args, cross_attention_args)
        block = TransformerBlock
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy],
                             prevent_cse=not cfg.scan_layers)
        kwargs = dict(config=cfg, causal=self.causal, cross_attention=self.cross_attention,
                      deterministic=self.deterministic)
        x = constrain(x)  # the stack's input: the embeddings (a gather from a split table)
        if cfg.scan_layers:
            # Caches stack on axis 1 so that every cache leaf keeps the batch on axis 0.
            scanned = nn.scan(block, variable_axes={"params": 0, "cache": 1},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * 5, length=self.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(**kwargs, name="layers")(x, *args)
        else:
            for i in range(self.num_layers):
                x, _ = block(**kwargs, name=f"layer_{i}")(x, *args)
        if cfg.pre_norm:
            x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype, name="final_norm",
                             scale_init=with_axes(nn.initializers.ones_init(), ("norm",)),
                             bias_init=with_axes(nn.initializers.zeros_init(), ("norm",)))(x)
        return x


def padding_lengths(tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """int32 [B]: the number of non-pad tokens per row.

    For right-padded rows these are the key lengths the attention core takes
    instead of a [B, 1, 1, S] mask (cuDNN's fused kernel accepts lengths, not masks).
    """
    return jnp.sum(tokens != pad_id, axis=-1, dtype=jnp.int32)
