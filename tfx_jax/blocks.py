"""The Transformer block and the stack of N blocks every model is made of.

A block is attention followed by a position-wise feed-forward network, each
wrapped in a residual connection and layer normalisation (Vaswani et al. 2017,
sec. 3.1). The paper normalises after the residual sum (post-LN):

    x = LayerNorm(x + Dropout(Sublayer(x)))

while most later models normalise first (pre-LN): x = x + Dropout(Sublayer(LayerNorm(x))).

The same block is the encoder layer (self-attention + FFN), the decoder layer
(causal self-attention + cross-attention to the encoder + FFN) and the
GPT/DALL-E layer (causal self-attention + FFN).

The later decoders (Llama, Mistral, Qwen, Gemma) change parts of the block,
each an option of :class:`StackConfig`: RMSNorm in place of LayerNorm, a gated
feed-forward network (SwiGLU / GeGLU), a norm on each sub-layer's output too
("sandwich", Gemma 2/3), a per-head norm of queries and keys, and per-layer
attention: a sliding window on some layers, with its own rotary base.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfx_jax.errors import ConfigError
from tfx_jax.logical_axes import constrain, with_axes
from tfx_jax.model_config import StackConfig
from tfx_jax.multihead import MultiHeadAttention

_ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "gelu_exact": lambda x: nn.gelu(x, False),
                "silu": nn.silu}
_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "full_nested": None,  # as "full", and each attention checkpointed again inside it
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * w.

    No centring and no bias. Normalised in float32; with ``scale_offset`` 0 the
    result is cast to ``dtype`` and multiplied by w (Llama), with 1 it is
    multiplied by (1 + w) in float32 and then cast (Gemma stores w around 0).
    """
    epsilon: float = 1e-6
    scale_offset: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.scale_offset else nn.initializers.ones_init()
        scale = self.param("scale", with_axes(init, ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                                + self.epsilon)
        if self.scale_offset:
            return (y * (self.scale_offset + scale.astype(jnp.float32))).astype(self.dtype)
        return y.astype(self.dtype) * scale.astype(self.dtype)


def make_norm(cfg: StackConfig, name: str) -> nn.Module:
    """The stack's norm (``cfg.norm``: LayerNorm or RMSNorm) as a module named ``name``."""
    if cfg.norm == "rms_norm":
        return RMSNorm(epsilon=cfg.layer_norm_epsilon, scale_offset=cfg.norm_scale_offset,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    if cfg.norm_scale_offset:
        raise ConfigError(f"norm_scale_offset={cfg.norm_scale_offset} applies to "
                          f"norm='rms_norm' only")
    return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, name=name,
                        scale_init=with_axes(nn.initializers.ones_init(), ("norm",)),
                        bias_init=with_axes(nn.initializers.zeros_init(), ("norm",)))


class FeedForward(nn.Module):
    """Position-wise feed-forward network FFN(x) = act(x W1 + b1) W2 + b2 (sec. 3.3).

    With ``mlp="gated"``: (act(x W_gate) * (x W_up)) W_down (Shazeer 2020, "GLU
    Variants Improve Transformer"), the gate and up projections named ``wi_0``
    and ``wi_1``, the down projection ``wo``.
    """
    config: StackConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda features, name, names: nn.Dense(  # noqa: E731
            features, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=with_axes(nn.initializers.xavier_uniform(), names),
            bias_init=with_axes(nn.initializers.zeros_init(), names[1:]), name=name)
        act = _ACTIVATIONS[cfg.activation]
        if cfg.mlp == "gated":
            h = act(dense(cfg.d_ff, "wi_0", ("embed", "mlp"))(x)) * dense(
                cfg.d_ff, "wi_1", ("embed", "mlp"))(x)
        else:
            h = act(dense(cfg.d_ff, "wi", ("embed", "mlp"))(x))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        return dense(x.shape[-1], "wo", ("mlp", "embed"))(h)


class TransformerBlock(nn.Module):
    """Self-attention [+ cross-attention] + feed-forward, with residuals and LayerNorm.

    Attributes:
      config: the stack's options.
      causal: self-attention may not look ahead (decoder, language model).
      cross_attention: add a sub-layer attending to an encoder's output.
      deterministic: disable dropout.
      emit_output: also return the block's output as the scan output (intermediates).
      layer_type: "full" or "sliding" (self-attention within ``cfg.sliding_window``,
        rotary base ``cfg.local_rope_base`` if set).

    Called as ``block(x, mask, encoded, cross_mask, attention_args,
    cross_attention_args) -> (x, None)`` (``(x, x)`` with ``emit_output``); the
    ``(carry, output)`` form lets ``nn.scan`` run the layers and stack their
    outputs. ``attention_args`` / ``cross_attention_args`` are dicts of keyword
    arguments for the two :class:`MultiHeadAttention` calls (segment ids, lengths,
    positions): padding and packing as structure.
    """
    config: StackConfig
    causal: bool = False
    cross_attention: bool = False
    deterministic: bool = True
    emit_output: bool = False
    layer_type: str = "full"

    def _residual(self, x, sublayer, name):
        cfg = self.config
        norm = make_norm(cfg, f"{name}_norm")
        dropout = nn.Dropout(cfg.dropout_rate)
        if cfg.pre_norm:
            h = sublayer(norm(x))
            if cfg.sandwich_norm:
                h = make_norm(cfg, f"{name}_post_norm")(h)
            return x + dropout(h, deterministic=self.deterministic)
        return norm(x + dropout(sublayer(x), deterministic=self.deterministic))

    def _attend(self, attention: MultiHeadAttention, arrays: dict, **options):
        """The attention sub-layer as a function of its input, ``h -> attention(h, **arrays,
        **options)``. Under remat_policy "full_nested" it is checkpointed on its own: the
        layer's recomputed forward then keeps only the attention's input and output, and its
        internals (q/k/v, the kernel's residuals) are computed a third time at the
        attention's own backward instead of living through the MLP's. ``prevent_cse``:
        without it XLA merges the two recomputations back into one."""
        if self.config.remat_policy != "full_nested" or self.config.decode:
            return functools.partial(attention, **arrays, **options)
        checkpointed = nn.remat(lambda module, arrays, h: module(h, **arrays, **options),
                                prevent_cse=True)
        return functools.partial(checkpointed, attention, arrays)

    def _attention(self, name, decode, rotary=False):
        cfg = self.config
        local = name == "self_attention" and self.layer_type == "sliding"
        own_rope = local and cfg.local_rope_base is not None
        return MultiHeadAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            qkv_features=cfg.head_dim and cfg.num_heads * cfg.head_dim,
            dropout_rate=cfg.attention_dropout_rate,
            use_bias=cfg.use_bias, qkv_bias=cfg.qkv_bias, fused_qkv=cfg.fused_qkv,
            decode=decode, rotary=rotary,
            rope_base=cfg.local_rope_base if own_rope else cfg.rope_base,
            rope_scaling=None if own_rope else cfg.rope_scaling,
            qk_norm=(lambda norm_name: make_norm(cfg, norm_name)) if cfg.qk_norm else None,
            local_window=cfg.sliding_window - 1 if local else None,
            scale=(None if cfg.query_pre_attn_scalar is None
                   else cfg.query_pre_attn_scalar ** -0.5),
            logit_soft_cap=cfg.attention_logit_soft_cap,
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
        arrays = dict(mask=mask, **(attention_args or {}))
        x = self._residual(x, self._attend(self_attention, arrays, causal=self.causal,
                                           deterministic=self.deterministic), "self_attention")
        if self.cross_attention:
            if encoded is None:
                raise ValueError("a cross-attention block needs the encoder output")
            cross = self._attention("cross_attention", decode=False)
            arrays = dict(inputs_kv=encoded, mask=cross_mask, **(cross_attention_args or {}))
            x = self._residual(x, self._attend(cross, arrays, deterministic=self.deterministic),
                               "cross_attention")
        ffn = FeedForward(cfg, deterministic=self.deterministic, name="ffn")
        x = constrain(self._residual(x, ffn, "ffn"))
        return x, (x if self.emit_output else None)


class BlockStack(nn.Module):
    """N identical blocks, as a Python loop or as one ``nn.scan``-ned layer.

    With ``scan_layers`` the parameters of all layers are stacked on a leading
    axis of size N and XLA compiles the layer once (fast compiles for deep
    models); ``remat_policy`` recomputes activations in the backward pass to
    trade compute for memory. A final norm closes a pre-LN stack. Layers of
    different types (``cfg.layer_types``) run as a Python loop: ``nn.scan`` needs
    identical layers. Attention weights recorded with ``mutable=["intermediates"]``
    are stacked on a leading layer axis under ``layers`` when scanned, kept per
    ``layer_<i>`` otherwise.
    """
    config: StackConfig
    num_layers: int
    causal: bool = False
    cross_attention: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask=None, encoded=None, cross_mask=None, *, attention_args=None,
                 cross_attention_args=None, return_intermediates: bool = False):
        """``attention_args`` / ``cross_attention_args``: keyword arguments (arrays or None)
        for every layer's self- / cross-attention, e.g. ``dict(q_segment_ids=s, positions=p)``.

        Returns the stack's output [B, T, D]; with ``return_intermediates`` the pair
        ``(output, layers)``, ``layers`` [num_layers, B, T, D] holding each block's
        output (the residual stream before the final LayerNorm)."""
        cfg = self.config
        args = (mask, encoded, cross_mask, attention_args, cross_attention_args)
        block = TransformerBlock
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy],
                             prevent_cse=not cfg.scan_layers)
        kwargs = dict(config=cfg, causal=self.causal, cross_attention=self.cross_attention,
                      deterministic=self.deterministic, emit_output=return_intermediates)
        x = constrain(x)  # the stack's input: the embeddings (a gather from a split table)
        types = [cfg.layer_type(i, self.num_layers) for i in range(self.num_layers)]
        if cfg.scan_layers:
            if len(set(types)) > 1:
                raise ConfigError(f"scan_layers=True needs identical layers; layer_types mixes "
                                  f"{sorted(set(types))}: set scan_layers=False")
            kwargs["layer_type"] = types[0]
            # Caches stack on axis 1 so that every cache leaf keeps the batch on axis 0.
            scanned = nn.scan(block, variable_axes={"params": 0, "cache": 1, "intermediates": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * 5, length=self.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, layers = scanned(**kwargs, name="layers")(x, *args)
        else:
            layers = []
            for i in range(self.num_layers):
                x, output = block(**kwargs, layer_type=types[i], name=f"layer_{i}")(x, *args)
                layers.append(output)
            layers = jnp.stack(layers) if return_intermediates else None
        if cfg.pre_norm:
            x = make_norm(cfg, "final_norm")(x)
        return (x, layers) if return_intermediates else x


def self_attention_args(segment_ids, positions, config, lengths=None) -> dict:
    """Keyword arguments of every self-attention: segment ids (or key lengths) and,
    for rotary embeddings, the positions."""
    args = {"q_segment_ids": segment_ids} if segment_ids is not None else {}
    if segment_ids is None and lengths is not None:
        args["kv_lengths"] = lengths
    if config.rotary:
        args["positions"] = positions
    return args


def padding_lengths(tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """int32 [B]: the number of non-pad tokens per row.

    For right-padded rows these are the key lengths the attention core takes
    instead of a [B, 1, 1, S] mask (cuDNN's fused kernel accepts lengths, not masks).
    """
    return jnp.sum(tokens != pad_id, axis=-1, dtype=jnp.int32)
