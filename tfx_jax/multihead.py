"""Multi-head attention: several attentions side by side, joined by W_o.

One attention gives one view of how the words relate. Multi-head attention
(Vaswani et al. 2017, sec. 3.2.2) projects the inputs into ``num_heads``
different query/key/value spaces, attends in each of them in parallel, then
concatenates the heads and projects them back with the output matrix W_o:

    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W_o,
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

The same module does self-attention (keys and values from the inputs),
cross-attention (the decoder's queries against the encoder's keys and values)
and, with ``decode=True``, autoregressive decoding with a key/value cache.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import checkify

from tfx_jax.attention import (attention_weights, causal_mask, combine_masks,
                               dot_product_attention)
from tfx_jax.logical_axes import with_axes


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with the output projection W_o.

    Attributes:
      num_heads: number of parallel attention heads h.
      qkv_features: total size of the query/key/value projections (h * d_k);
        defaults to the input feature size, as in the paper (d_k = d_model / h).
      out_features: size of the output; defaults to the query input's size.
      dropout_rate: dropout on the attention weights (training only).
      use_bias: biases on the projections.
      fused_qkv: in self-attention, compute Q, K and V with one matmul.
      decode: keep a key/value cache and attend from the next positions only.
      implementation: attention core ("auto", "dense", "chunked", "cudnn").
      dtype: computation dtype (e.g. bfloat16); param_dtype: parameter dtype.

    Applied with ``mutable=["intermediates"]`` it also records its attention
    probabilities [B, N, T, S] as ``intermediates/.../attention_weights``.
    """
    num_heads: int
    qkv_features: Optional[int] = None
    out_features: Optional[int] = None
    dropout_rate: float = 0.0
    use_bias: bool = True
    fused_qkv: bool = False
    decode: bool = False
    implementation: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()

    def _dense(self, features, name, axis=-1, names=()):
        bias_names = names[len(axis) if isinstance(axis, tuple) else 1:]  # logical axes
        return nn.DenseGeneral(features, axis=axis, use_bias=self.use_bias, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               kernel_init=with_axes(self.kernel_init, names),
                               bias_init=with_axes(nn.initializers.zeros_init(), bias_names),
                               name=name)

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array] = None,
                 mask: Optional[jax.Array] = None, *, causal: bool = False,
                 deterministic: bool = True) -> jax.Array:
        """Attends from ``inputs_q`` [B,T,D] to ``inputs_kv`` [B,S,D] (itself if None).

        ``mask`` is boolean, broadcastable to [B, num_heads, T, S], True = may attend.
        ``causal`` forbids attending to later positions (decoder self-attention).
        Returns [B, T, out_features].
        """
        if inputs_q.ndim != 3:
            raise ValueError(f"inputs_q must have shape [batch, length, features], "
                             f"got {tuple(inputs_q.shape)}")
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        if inputs_kv.ndim != 3 or inputs_kv.shape[0] != inputs_q.shape[0]:
            raise ValueError(f"inputs_kv must have shape [batch={inputs_q.shape[0]}, length, "
                             f"features], got {tuple(inputs_kv.shape)}")
        features = self.qkv_features or inputs_q.shape[-1]
        if features % self.num_heads:
            raise ValueError(f"qkv_features={features} is not divisible by "
                             f"num_heads={self.num_heads}")
        head_dim = features // self.num_heads
        heads = (self.num_heads, head_dim)

        if self.fused_qkv and self_attention:
            qkv = self._dense((3,) + heads, "qkv",
                              names=("embed", None, "heads", "kv"))(inputs_q)
            query, key, value = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            query = self._dense(heads, "query", names=("embed", "heads", "kv"))(inputs_q)
            key = self._dense(heads, "key", names=("embed", "kv_heads", "kv"))(inputs_kv)
            value = self._dense(heads, "value", names=("embed", "kv_heads", "kv"))(inputs_kv)

        if self.decode:
            if not self_attention:
                raise ValueError("decode=True caches self-attention only; cross-attention "
                                 "keys/values are recomputed from the fixed encoder output")
            key, value, mask = self._extend_cache(key, value, mask, causal)
            causal = False  # folded into the cache mask

        if self.is_mutable_collection("intermediates"):
            # Inspection only (apply(..., mutable=["intermediates"])): the [B, N, T, S]
            # probabilities, computed densely on request and never otherwise.
            self.sow("intermediates", "attention_weights",
                     attention_weights(query, key, mask, causal=causal))
        dropout_rng = None
        dropout_rate = 0.0 if deterministic else self.dropout_rate
        if dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        out = dot_product_attention(query, key, value, mask, causal=causal,
                                    dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                                    implementation=self.implementation)
        out_features = self.out_features or inputs_q.shape[-1]
        return self._dense(out_features, "out", axis=(-2, -1),  # W_o over all heads
                           names=("heads", "kv", "embed"))(out)

    def _extend_cache(self, key, value, mask, causal):
        """Writes the new keys/values into the cache and returns the whole cache.

        At initialisation the cache is shaped from the inputs: initialise with a
        [batch, max_length] sequence. Afterwards each call appends its T tokens
        (a prompt of any length, or one token) at the current index; the
        returned mask lets every new query see the cached keys up to itself.
        """
        is_initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        # One index per sequence (all equal): every cache leaf then has the batch on
        # axis 0, so beam search can reorder caches with a single gather.
        cache_index = self.variable("cache", "cache_index", jnp.zeros, key.shape[:1], jnp.int32)
        if not is_initialized:
            return key, value, combine_masks(
                mask, causal_mask(key.shape[1], key.shape[1]) if causal else None)
        batch, max_length = cached_key.value.shape[:2]
        length = key.shape[1]
        if key.shape[0] != batch or length > max_length:
            raise ValueError(f"decode step of shape {tuple(key.shape[:2])} does not fit the "
                             f"cache of shape [batch={batch}, max_length={max_length}]")
        index = cache_index.value[0]
        overflow = (f"decode cache overflow: the cache holds max_length={max_length} "
                    f"positions, {{}} are filled and this call adds {length}; initialise the "
                    f"cache with a [batch, max_length] sequence as long as the prompt plus "
                    f"the generated tokens")
        if not isinstance(index, jax.core.Tracer) and int(index) + length > max_length:
            raise ValueError(overflow.format(int(index)))
        # Under jit the index is traced: wrap the step in checkify.checkify to catch it.
        checkify.debug_check(index + length <= max_length, overflow, index)
        cached_key.value = jax.lax.dynamic_update_slice_in_dim(cached_key.value, key, index, 1)
        cached_value.value = jax.lax.dynamic_update_slice_in_dim(cached_value.value, value,
                                                                 index, 1)
        cache_index.value = cache_index.value + length
        # Query t (at absolute position index + t) sees cached keys 0 .. index + t.
        visible = causal_mask(length, max_length, q_offset=index)
        return cached_key.value, cached_value.value, combine_masks(mask, visible)
