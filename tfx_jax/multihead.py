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

Two later refinements are options here. Grouped-query attention (Ainslie et al.
2023; multi-query attention, Shazeer 2019, is the case of one group) projects
keys and values to ``num_kv_heads`` < ``num_heads`` heads, each shared by
``num_heads / num_kv_heads`` query heads: fewer parameters and a decoding cache
that many times smaller. Rotary position embeddings (``rotary.py``) rotate
queries and keys by their absolute positions before the scores are taken.

Padding and packing reach the attention core as structure (key lengths,
segment ids, ``causal``), not as [B, 1, T, S] mask arrays, so that fused kernels
such as cuDNN's can run them.

Under a mesh with a ``context`` axis larger than one (the training library
activates its mesh while tracing the step), attention runs context-parallel
(``context_parallel.py``): the sequence stays split over that axis.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import checkify

from tfx_jax.attention import causal_mask, combine_masks, dot_product_attention
from tfx_jax.attention import segment_mask as core_segment_mask
from tfx_jax.context_parallel import context_parallel_attention, context_size
from tfx_jax.errors import ConfigError
from tfx_jax.rotary import apply_rotary
from tfx_jax.logical_axes import with_axes


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with the output projection W_o.

    Attributes:
      num_heads: number of parallel attention heads h (query heads).
      num_kv_heads: key/value heads (grouped-query attention); None = num_heads.
        num_heads must divide by it. The decoding cache holds num_kv_heads heads.
      qkv_features: total size of the query projection (h * d_k); defaults to the
        input feature size, as in the paper (d_k = d_model / h). Keys and values
        have num_kv_heads * d_k features.
      out_features: size of the output; defaults to the query input's size.
      dropout_rate: dropout on the attention weights (training only).
      use_bias: biases on the projections.
      fused_qkv: in self-attention, compute Q, K and V with one matmul (needs
        num_kv_heads == num_heads).
      decode: keep a key/value cache and attend from the next positions only.
      rotary: apply rotary position embeddings to queries and keys (self-attention).
      rope_base: base of the rotary frequencies (RoFormer: 10000).
      rope_scaling: frequency scaling of the rotary embeddings (``rotary.py``).
      qkv_bias: biases on the query/key/value projections; None = use_bias (the output
        projection's bias always follows use_bias; Qwen 2: qkv_bias=True, use_bias=False).
      qk_norm: ``qk_norm(name)`` builds the per-head norm applied to queries and keys
        (over head_dim) before the rotation (Qwen 3, Gemma 3); None = none.
      local_window: w >= 0: a query at position i sees keys i - w ... i only
        (sliding-window self-attention); None = all.
      scale: multiplies Q K^T; None = 1/sqrt(head_dim).
      logit_soft_cap: scores become c * tanh(scores / c) (Gemma 2); None = as is.
      implementation: attention core ("auto", "dense", "chunked", "cudnn", ...).
      dtype: computation dtype (e.g. bfloat16); param_dtype: parameter dtype.

    Applied with ``mutable=["intermediates"]`` it runs the dense attention path
    (whatever ``implementation`` says: only it materialises the [B, N, T, S]
    probabilities) and records the float32 probabilities its output is computed
    from (before attention dropout) as ``intermediates/.../attention_weights``.
    Without that collection nothing is recorded and ``implementation`` applies.
    """
    num_heads: int
    num_kv_heads: Optional[int] = None
    qkv_features: Optional[int] = None
    out_features: Optional[int] = None
    dropout_rate: float = 0.0
    use_bias: bool = True
    fused_qkv: bool = False
    decode: bool = False
    rotary: bool = False
    rope_base: float = 10000.0
    rope_scaling: Any = None
    qkv_bias: Optional[bool] = None
    qk_norm: Optional[Any] = None
    local_window: Optional[int] = None
    scale: Optional[float] = None
    logit_soft_cap: Optional[float] = None
    implementation: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()

    def _dense(self, features, name, axis=-1, names=(), use_bias=None):
        bias_names = names[len(axis) if isinstance(axis, tuple) else 1:]  # logical axes
        use_bias = self.use_bias if use_bias is None else use_bias
        return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               kernel_init=with_axes(self.kernel_init, names),
                               bias_init=with_axes(nn.initializers.zeros_init(), bias_names),
                               name=name)

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array] = None,
                 mask: Optional[jax.Array] = None, *, causal: bool = False,
                 q_segment_ids: Optional[jax.Array] = None,
                 kv_segment_ids: Optional[jax.Array] = None,
                 q_lengths: Optional[jax.Array] = None,
                 kv_lengths: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None,
                 deterministic: bool = True) -> jax.Array:
        """Attends from ``inputs_q`` [B,T,D] to ``inputs_kv`` [B,S,D] (itself if None).

        Args:
          mask: optional boolean, broadcastable to [B, num_heads, T, S], True = may attend.
          causal: forbid attending to later positions (decoder self-attention).
          q_segment_ids, kv_segment_ids: int [B, T] / [B, S]; a query attends a key only
            when their ids are equal (packed sequences; padding is segment 0). In
            self-attention kv_segment_ids defaults to q_segment_ids.
          q_lengths, kv_lengths: int [B]: padding given as lengths (right padding).
          positions: int [B, T] absolute positions of the queries (and, in
            self-attention, the keys) for rotary embeddings; default 0..T-1, or in
            decode mode the cache index onwards.
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
        for name, x in (("inputs_q", inputs_q), ("inputs_kv", inputs_kv)):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"{name} must be a real floating-point array, got dtype "
                                f"{x.dtype} (complex and integer inputs are not cast)")
        features = self.qkv_features or inputs_q.shape[-1]
        if features % self.num_heads:
            raise ValueError(f"qkv_features={features} is not divisible by "
                             f"num_heads={self.num_heads}")
        num_kv_heads = self.num_kv_heads or self.num_heads
        if num_kv_heads <= 0 or self.num_heads % num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by "
                             f"num_kv_heads={num_kv_heads}")
        head_dim = features // self.num_heads
        if self_attention and kv_segment_ids is None:
            kv_segment_ids = q_segment_ids

        if self.fused_qkv and self_attention:
            if num_kv_heads != self.num_heads:
                raise ValueError(f"fused_qkv=True needs num_kv_heads == num_heads, got "
                                 f"num_kv_heads={num_kv_heads}, num_heads={self.num_heads}")
            qkv = self._dense((3, self.num_heads, head_dim), "qkv", use_bias=self.qkv_bias,
                              names=("embed", None, "heads", "kv"))(inputs_q)
            query, key, value = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            query = self._dense((self.num_heads, head_dim), "query", use_bias=self.qkv_bias,
                                names=("embed", "heads", "kv"))(inputs_q)
            key = self._dense((num_kv_heads, head_dim), "key", use_bias=self.qkv_bias,
                              names=("embed", "kv_heads", "kv"))(inputs_kv)
            value = self._dense((num_kv_heads, head_dim), "value", use_bias=self.qkv_bias,
                                names=("embed", "kv_heads", "kv"))(inputs_kv)
        if self.qk_norm is not None:
            query = self.qk_norm("query_norm")(query)
            key = self.qk_norm("key_norm")(key)
        window = None if self.local_window is None else (self.local_window, None)

        if self.decode:
            if not self_attention:
                raise ValueError("decode=True caches self-attention only; cross-attention "
                                 "keys/values are recomputed from the fixed encoder output")
            if q_lengths is not None or kv_lengths is not None:
                raise ValueError("decode=True takes padding as segment ids (0 = padding), "
                                 "not q_lengths/kv_lengths")
            query, key, value, mask = self._extend_cache(query, key, value, mask, causal,
                                                         q_segment_ids, positions)
            # causal, segments and window are folded into the mask
            causal, q_segment_ids, kv_segment_ids, window = False, None, None, None
        elif self.rotary:
            if not self_attention:
                raise ValueError("rotary=True applies to self-attention only (queries and "
                                 "keys share positions)")
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(query.shape[1]), query.shape[:2])
            query = apply_rotary(query, positions, self.rope_base, self.rope_scaling)
            key = apply_rotary(key, positions, self.rope_base, self.rope_scaling)

        structure = {k: v for k, v in dict(q_segment_ids=q_segment_ids,
                                           kv_segment_ids=kv_segment_ids, q_lengths=q_lengths,
                                           kv_lengths=kv_lengths).items() if v is not None}
        dropout_rng = None
        dropout_rate = 0.0 if deterministic else self.dropout_rate
        if dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        # Inspection (apply(..., mutable=["intermediates"])) runs the dense path and
        # records the very weights the output is computed from; otherwise none exist.
        record = self.is_mutable_collection("intermediates")
        mesh = jax.sharding.get_abstract_mesh()
        if context_size(mesh) > 1 and not (self.decode or record):
            out = self._context_parallel(query, key, value, mesh, mask, causal, dropout_rate,
                                         window, structure)
        else:
            out = dot_product_attention(
                query, key, value, mask, causal=causal, dropout_rate=dropout_rate,
                dropout_rng=dropout_rng, local_window=window, scale=self.scale,
                logit_soft_cap=self.logit_soft_cap,
                implementation="dense" if record else self.implementation,
                return_weights=record, **structure)
        if record:
            out, weights = out
            self.sow("intermediates", "attention_weights", weights)
        out_features = self.out_features or inputs_q.shape[-1]
        return self._dense(out_features, "out", axis=(-2, -1),  # W_o over all heads
                           names=("heads", "kv", "embed"))(out)

    def _context_parallel(self, query, key, value, mesh, mask, causal, dropout_rate, window,
                          structure):
        """Attention with the length split over the active mesh's ``context`` axis."""
        size = context_size(mesh)
        where = f"with the sequence split over the mesh's context axis ({size} devices)"
        if self.implementation not in ("auto", "chunked"):
            raise ConfigError(f"implementation={self.implementation!r} cannot run {where}; "
                              f"use 'auto' or 'chunked' (context-parallel attention runs "
                              f"the chunked kernel on each device)")
        if mask is not None:
            raise ConfigError(f"a boolean mask array cannot be used {where}; pass padding "
                              f"and packing as lengths or segment ids, and causal=True")
        if dropout_rate > 0.0:
            raise ConfigError(f"attention dropout (dropout_rate={dropout_rate}) is not "
                              f"supported {where}; set the attention dropout to 0")
        if self.logit_soft_cap is not None:
            raise ConfigError(f"attention logit soft-capping (logit_soft_cap="
                              f"{self.logit_soft_cap}) is not supported {where}")
        return context_parallel_attention(query, key, value, mesh=mesh, causal=causal,
                                          local_window=window, scale=self.scale, **structure)

    def _extend_cache(self, query, key, value, mask, causal, q_segment_ids, positions):
        """Writes the new keys/values into the cache and returns the whole cache.

        At initialisation the cache is shaped from the inputs: initialise with a
        [batch, max_length] sequence. Afterwards each call appends its T tokens
        (a prompt of any length, or one token) at the current index. Keys are
        cached after the rotary rotation, with num_kv_heads heads, together with
        their segment ids (0 = padding, e.g. the left padding of a prompt), so
        that every later query keeps seeing only the valid keys of its segment.
        Returns (query, keys, values, mask [B, 1, T, S]), query and keys rotated.
        """
        batch, length = key.shape[:2]
        if q_segment_ids is None:
            q_segment_ids = jnp.ones((batch, length), jnp.int32)
        q_segment_ids = jnp.asarray(q_segment_ids, jnp.int32)
        is_initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cached_segments = self.variable("cache", "cached_segment_ids", jnp.zeros,
                                        (batch, length), jnp.int32)
        # One index per sequence (all equal): every cache leaf then has the batch on
        # axis 0, so beam search can reorder caches with a single gather.
        cache_index = self.variable("cache", "cache_index", jnp.zeros, key.shape[:1], jnp.int32)
        index = cache_index.value[0] if is_initialized else 0
        if self.rotary:
            if positions is None:
                positions = index + jnp.broadcast_to(jnp.arange(length), (batch, length))
            query = apply_rotary(query, positions, self.rope_base, self.rope_scaling)
            key = apply_rotary(key, positions, self.rope_base, self.rope_scaling)
        if not is_initialized:
            visible = combine_masks(mask, segment_mask(q_segment_ids, q_segment_ids),
                                    causal_mask(length, length) if causal else None,
                                    self._window(length, length, 0))
            return query, key, value, visible
        max_length = cached_key.value.shape[1]
        if batch != cached_key.value.shape[0] or length > max_length:
            raise ValueError(f"decode step of shape {(batch, length)} does not fit the "
                             f"cache of shape [batch={cached_key.value.shape[0]}, "
                             f"max_length={max_length}]")
        overflow = (f"decode cache overflow: the cache holds max_length={max_length} "
                    f"positions, {{}} are filled and this call adds {length}; initialise the "
                    f"cache with a [batch, max_length] sequence as long as the prompt plus "
                    f"the generated tokens")
        if not isinstance(index, jax.core.Tracer) and int(index) + length > max_length:
            raise ValueError(overflow.format(int(index)))
        # Under jit the index is traced: the decoding utilities check lengths before
        # decoding; wrap a hand-written step in checkify.checkify to catch it here.
        # Unchecked, an overflowing step returns NaN rather than silently wrong values.
        checkify.debug_check(index + length <= max_length, overflow, index)
        query = jnp.where(index + length <= max_length, query, jnp.nan).astype(query.dtype)
        cached_key.value = jax.lax.dynamic_update_slice_in_dim(cached_key.value, key, index, 1)
        cached_value.value = jax.lax.dynamic_update_slice_in_dim(cached_value.value, value,
                                                                 index, 1)
        cached_segments.value = jax.lax.dynamic_update_slice_in_dim(
            cached_segments.value, q_segment_ids, index, 1)
        cache_index.value = cache_index.value + length
        # Query t (at cache slot index + t) sees cached keys 0 .. index + t of its segment.
        visible = combine_masks(mask, causal_mask(length, max_length, q_offset=index),
                                segment_mask(q_segment_ids, cached_segments.value),
                                self._window(length, max_length, index))
        return query, cached_key.value, cached_value.value, visible

    def _window(self, q_length, kv_length, q_offset):
        """[T, S] local-window mask of queries at cache slots q_offset.. (None: no window)."""
        if self.local_window is None:
            return None
        q_pos = jnp.arange(q_length)[:, None] + q_offset
        return jnp.arange(kv_length)[None, :] >= q_pos - self.local_window


def segment_mask(q_segment_ids: Optional[jax.Array],
                 kv_segment_ids: Optional[jax.Array]) -> Optional[jax.Array]:
    """[B, 1, T, S] mask: query and key in the same non-zero segment (0 = padding).

    None if there are no segment ids; else the attention core's
    :func:`tfx_jax.attention.segment_mask`, for the decode cache and the
    recorded attention weights.
    """
    if q_segment_ids is None and kv_segment_ids is None:
        return None
    if q_segment_ids is None or kv_segment_ids is None:
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    return core_segment_mask(q_segment_ids, kv_segment_ids)
