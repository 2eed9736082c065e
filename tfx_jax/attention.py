"""Scaled dot-product attention: the cornerstone of the encoder and the decoder.

For every query the seed's recipe is: take the dot product of the query with
every key (the *score*: how much this word should look at that word), scale it
by 1/sqrt(d_k) so the values do not grow with the head size, turn the scores
into weights with a softmax, and return the weighted sum of the values
(Vaswani et al. 2017, eq. 1):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

Layout follows ``jax.nn.dot_product_attention``: ``query`` is
``[batch, q_length, num_heads, head_dim]`` and ``key``/``value`` are
``[batch, kv_length, num_heads, head_dim]``. Masks are boolean, broadcastable
to ``[batch, num_heads, q_length, kv_length]``, and ``True`` means "may attend".

The price the seed names is visible here: the "dense" implementation builds the
full ``q_length x kv_length`` score matrix per head. "chunked"
(``attention_chunked.py``) computes the same numbers tile by tile with memory
linear in the lengths; "cudnn" (``attention_cudnn.py``) is NVIDIA's fused kernel.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.attention_chunked import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, chunked_attention
from tfx_jax.attention_dropout import dense_keep_multiplier, dropout_seeds
# The accelerator kernels (attention_splash.py for TPU, attention_cudnn.py for NVIDIA GPUs)
# are imported where they are chosen, so a run loads only its own platform's kernel.

IMPLEMENTATIONS = ("auto", "dense", "chunked", "cudnn", "splash")
# "auto" switches from dense to chunked at this length. CPU measurements
# (docs/attention_memory.md): from T = 512 on chunked was faster in both passes and
# its gradient needed half the memory; below, a tile or two cover the whole sequence.
CHUNKED_MIN_LENGTH = 512


class Placement(NamedTuple):
    """The accelerator a computation is placed on: what "auto" and the kernels decide by."""
    platform: str                       # "cpu", "gpu" (CUDA and ROCm: "gpu"), "tpu"
    device_kind: str                    # e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3"
    compute_capability: Optional[str]   # CUDA devices only, e.g. "9.0"
    mesh: Optional[jax.sharding.AbstractMesh]  # the mesh in context (None: none set)


def placement() -> Placement:
    """Where the computation being traced runs: the devices of the mesh in context.

    That mesh is the one ``jax.set_mesh(mesh)`` sets, or the one the training
    library's steps trace under (``jax.sharding.use_abstract_mesh``); its abstract
    mesh names the devices' platform and kind, also for compile-only devices (a
    TPU topology described on a CPU host), so compiling for a TPU chooses the TPU
    kernels. Without a mesh: the first local device (``jax.devices()[0]``).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and mesh.abstract_device is not None:
        kind = mesh.abstract_device.device_kind
        platform = mesh.abstract_device.platform
        capability = None
        if platform in ("cuda", "gpu"):
            from tfx_jax.attention_cudnn import compute_capability_of  # pylint: disable=import-outside-toplevel
            local = jax.devices()[0]  # the mesh's own kind of device: ask it
            capability = (getattr(local, "compute_capability", None)
                          if local.device_kind == kind else None) or compute_capability_of(kind)
        return Placement("gpu" if platform in ("cuda", "rocm") else platform, kind,
                         capability, mesh)
    device = jax.devices()[0]
    return Placement(device.platform, device.device_kind,
                     getattr(device, "compute_capability", None), None)


_KERNEL_FLOPS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar(
    "tfx_jax_kernel_flops", default=None)


@contextlib.contextmanager
def counting_kernel_flops() -> Iterator[list]:
    """Collects the forward FLOPs (all devices) of the fused kernels traced inside.

    XLA's cost analysis counts nothing inside a Pallas (splash) or cuDNN call, so
    these kernels report their own matmul FLOPs, 2 per multiply-add of Q K^T and
    of P V over the tiles they compute (causal and windowed tiles skipped).
    """
    counter: list = []
    token = _KERNEL_FLOPS.set(counter)
    try:
        yield counter
    finally:
        _KERNEL_FLOPS.reset(token)


def record_kernel_flops(flops: float) -> None:
    """Called by the kernels while tracing; a no-op outside `counting_kernel_flops`."""
    counter = _KERNEL_FLOPS.get()
    if counter is not None:
        counter.append(float(flops))


def _as_array(x, name):
    """Arrays (and tracers) pass; Python lists/tuples/scalars become arrays."""
    if x is None or hasattr(x, "dtype"):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}: {e}") from None


def _check_inputs(query, key, value, mask, bias=None):
    """Raises ValueError/TypeError naming the offending argument and its shape."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "ndim"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have shape [batch, length, num_heads, head_dim], "
                f"got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    b, _, n, h = query.shape
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key and value must agree in [batch, kv_length, num_kv_heads], "
            f"got key {tuple(key.shape)} and value {tuple(value.shape)}")
    if key.shape[0] != b:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree in batch")
    num_kv_heads = key.shape[2]
    if num_kv_heads == 0 or n % num_kv_heads:
        raise ValueError(
            f"query num_heads ({n}) must be a multiple of key/value num_kv_heads "
            f"({num_kv_heads}); got query {tuple(query.shape)} and key {tuple(key.shape)}")
    if key.shape[3] != h:
        raise ValueError(
            f"query and key must have the same head_dim, got {h} and {key.shape[3]}")
    if h == 0 or value.shape[3] == 0:
        raise ValueError(f"head_dim must be >= 1, got query/key head_dim {h} and value "
                         f"head_dim {value.shape[3]}")
    target = (b, n, query.shape[1], key.shape[1])
    for name, x in (("mask", mask), ("bias", bias)):
        if x is None:
            continue
        if name == "mask" and x.dtype != jnp.bool_:
            raise TypeError(f"mask must be boolean (True = may attend), got dtype {x.dtype}")
        if name == "bias" and not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"bias must be a floating-point array, got dtype {x.dtype}")
        if x.ndim > 4:
            raise ValueError(f"{name} must be broadcastable to [B,N,T,S], got {tuple(x.shape)}")
        try:
            jnp.broadcast_shapes(x.shape, target)
        except ValueError:
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} is not broadcastable to "
                f"[batch, num_heads, q_length, kv_length] = {target}") from None


def _check_segment_ids(query, key, q_segment_ids, kv_segment_ids):
    """Validates segment ids; kv_segment_ids defaults to q_segment_ids when T == S."""
    if q_segment_ids is None and kv_segment_ids is None:
        return None, None
    if q_segment_ids is None:
        raise ValueError("kv_segment_ids was given without q_segment_ids; pass both")
    if kv_segment_ids is None:
        if query.shape[1] != key.shape[1]:
            raise ValueError(
                f"kv_segment_ids is needed when q_length ({query.shape[1]}) != kv_length "
                f"({key.shape[1]}); q_segment_ids alone is used for both only in self-attention")
        kv_segment_ids = q_segment_ids
    for name, ids, length in (("q_segment_ids", q_segment_ids, query.shape[1]),
                              ("kv_segment_ids", kv_segment_ids, key.shape[1])):
        if ids.shape != (query.shape[0], length):
            raise ValueError(f"{name} must have shape [batch, length] = "
                             f"{(query.shape[0], length)}, got {tuple(ids.shape)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name} must be integers (0 = padding), got dtype {ids.dtype}")
    return q_segment_ids, kv_segment_ids


def _check_window(local_window):
    """None, an int w (= (w, w)) or (left, right) of ints >= 0 or None (unbounded)."""
    if local_window is None:
        return None
    if isinstance(local_window, numbers.Integral) and not isinstance(local_window, bool):
        local_window = (int(local_window), int(local_window))
    ok = isinstance(local_window, (tuple, list)) and len(local_window) == 2 and all(
        w is None or (isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 0)
        for w in local_window)
    if not ok:
        raise ValueError(f"local_window must be (left, right) with ints >= 0 or None, or one "
                         f"int >= 0, got {local_window!r}")
    left, right = local_window
    if left is None and right is None:
        return None
    return (None if left is None else int(left), None if right is None else int(right))


def _check_scalars(dropout_rate, scale, logit_soft_cap=None):
    if not isinstance(dropout_rate, numbers.Real) or not 0.0 <= float(dropout_rate) < 1.0:
        raise ValueError(f"dropout_rate must be a float in [0, 1), got {dropout_rate!r}")
    if scale is not None and (not isinstance(scale, numbers.Real) or
                              not math.isfinite(float(scale))):
        raise ValueError(f"scale must be a finite float (None = 1/sqrt(head_dim)), "
                         f"got {scale!r}")
    if logit_soft_cap is not None and (not isinstance(logit_soft_cap, numbers.Real) or
                                       not 0.0 < float(logit_soft_cap) < math.inf):
        raise ValueError(f"logit_soft_cap must be a finite float > 0 (None = no cap), "
                         f"got {logit_soft_cap!r}")


def soft_cap(scores: jax.Array, cap: Optional[float]) -> jax.Array:
    """cap * tanh(scores / cap): scores squashed into (-cap, cap) (Gemma 2; None = as is)."""
    return scores if cap is None else cap * jnp.tanh(scores / cap)


def causal_mask(q_length: int, kv_length: int, q_offset: int | jax.Array = 0) -> jax.Array:
    """Boolean [q_length, kv_length] mask: query i may attend key j iff j <= i + q_offset.

    ``q_offset`` places the queries at positions ``q_offset ... q_offset+q_length-1``
    of the key sequence (used when a decoder continues from a key/value cache).
    """
    q_pos = jnp.arange(q_length)[:, None] + q_offset
    k_pos = jnp.arange(kv_length)[None, :]
    return k_pos <= q_pos


def window_mask(q_length: int, kv_length: int, local_window) -> jax.Array:
    """Boolean [q_length, kv_length]: query i may attend key j iff i-left <= j <= i+right.

    ``local_window = (left, right)``; None on a side means unbounded
    (sliding-window attention, Beltagy et al. 2020; Mistral uses (w, 0) with causal).
    """
    left, right = local_window
    offset = jnp.arange(kv_length)[None, :] - jnp.arange(q_length)[:, None]  # j - i
    allowed = jnp.ones((q_length, kv_length), bool)
    if left is not None:
        allowed &= offset >= -left
    if right is not None:
        allowed &= offset <= right
    return allowed


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Boolean [B, 1, T, S]: same segment id and not padding (id 0)."""
    q_ids = jnp.asarray(q_segment_ids)[:, None, :, None]
    kv_ids = jnp.asarray(kv_segment_ids)[:, None, None, :]
    return (q_ids == kv_ids) & (q_ids != 0)


def combine_masks(*masks: Optional[jax.Array]) -> Optional[jax.Array]:
    """Logical AND of the masks that are not None (None if all are None)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def lengths_mask(q_length: int, kv_length: int, q_lengths: Optional[jax.Array] = None,
                 kv_lengths: Optional[jax.Array] = None) -> Optional[jax.Array]:
    """Padding as a boolean [B, 1, T, S]-broadcastable mask (None if no lengths).

    Query i of sequence b is real iff i < q_lengths[b]; key j iff j < kv_lengths[b].
    """
    mask = None
    if kv_lengths is not None:
        mask = (jnp.arange(kv_length)[None, :] < jnp.asarray(kv_lengths)[:, None])[:, None, None, :]
    if q_lengths is not None:
        q_mask = (jnp.arange(q_length)[None, :] < jnp.asarray(q_lengths)[:, None])[:, None, :, None]
        mask = combine_masks(mask, q_mask)
    return mask


def _full_mask(query, key, mask, causal, q_segment_ids=None, kv_segment_ids=None,
               local_window=None, q_lengths=None, kv_lengths=None):
    """The boolean mask actually applied, shaped to broadcast against [B,N,T,S]."""
    t, s = query.shape[1], key.shape[1]
    return combine_masks(
        mask,
        causal_mask(t, s) if causal else None,
        window_mask(t, s, local_window) if local_window is not None else None,
        segment_mask(q_segment_ids, kv_segment_ids) if q_segment_ids is not None else None,
        lengths_mask(t, s, q_lengths, kv_lengths))


def _dense_weights(query, key, mask, bias, scale, logit_soft_cap=None):
    """softmax(soft_cap(scale * Q K^T) + bias) in float32 over the allowed keys, [B, N, T, S].

    Grouped-query: query [B,T,K*G,H] against key [B,S,K,H] is one einsum over the
    shared key head (no repeated K). A query whose keys are all masked gets an
    all-zero row (it attends to nothing) instead of NaN.
    """
    b, t, n, h = query.shape
    s, num_kv_heads = key.shape[1], key.shape[2]
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    grouped = query.reshape(b, t, num_kv_heads, n // num_kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", grouped, key,
                        preferred_element_type=jnp.float32).reshape(b, n, t, s) * scale
    scores = soft_cap(scores, logit_soft_cap)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    big_negative = jnp.finfo(jnp.float32).min
    scores = jnp.where(mask, scores, big_negative)
    weights = jax.nn.softmax(scores, axis=-1)
    # Fully masked rows: softmax of a constant row is uniform; make them zero instead.
    return jnp.where(mask, weights, 0.0)


def attention_weights(query: jax.Array, key: jax.Array, mask: Optional[jax.Array] = None,
                      *, causal: bool = False, q_segment_ids: Optional[jax.Array] = None,
                      kv_segment_ids: Optional[jax.Array] = None, local_window=None,
                      bias: Optional[jax.Array] = None, scale: Optional[float] = None,
                      q_lengths: Optional[jax.Array] = None,
                      kv_lengths: Optional[jax.Array] = None,
                      logit_soft_cap: Optional[float] = None) -> jax.Array:
    """The attention probabilities softmax(scale * Q K^T + bias), shape [B, N, T, S].

    Same masking arguments as `dot_product_attention` (key may have fewer heads
    than query). Computed in float32 whatever the input dtype. A query whose keys
    are all masked gets an all-zero row (it attends to nothing) instead of NaN.
    """
    mask, bias = _as_array(mask, "mask"), _as_array(bias, "bias")
    q_segment_ids = _as_array(q_segment_ids, "q_segment_ids")
    kv_segment_ids = _as_array(kv_segment_ids, "kv_segment_ids")
    _check_inputs(query, key, key, mask, bias)
    _check_scalars(0.0, scale, logit_soft_cap)
    q_segment_ids, kv_segment_ids = _check_segment_ids(query, key, q_segment_ids, kv_segment_ids)
    _check_lengths(query, q_lengths, kv_lengths)
    local_window = _check_window(local_window)
    mask = _full_mask(query, key, mask, causal, q_segment_ids, kv_segment_ids, local_window,
                      *_clamped_lengths(query, key, q_lengths, kv_lengths))
    return _dense_weights(query, key, mask, bias, scale, logit_soft_cap)


def _dense_attention(query, key, value, mask, bias, scale, dropout_rate, dropout_rng,
                     logit_soft_cap=None):
    """Materialises the [B, N, T, S] weights, then takes the weighted sum of values.

    Returns (output, weights before dropout)."""
    probabilities = weights = _dense_weights(query, key, mask, bias, scale, logit_soft_cap)
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError(f"attention dropout_rate={dropout_rate} > 0 needs a dropout_rng")
        # The same bits as "chunked" for the same rng (attention_dropout.py).
        weights = weights * dense_keep_multiplier(dropout_seeds(dropout_rng), dropout_rate,
                                                  weights.shape)
    b, n, t, s = weights.shape
    num_kv_heads = value.shape[2]
    grouped = weights.reshape(b, num_kv_heads, n // num_kv_heads, t, s)
    out = jnp.einsum("bkgts,bskh->btkgh", grouped.astype(value.dtype), value,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, value.shape[-1]).astype(value.dtype), probabilities


def _check_lengths(query, q_lengths, kv_lengths):
    for name, lengths in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
        if lengths is None:
            continue
        lengths = jnp.asarray(lengths)
        if lengths.shape != (query.shape[0],):
            raise ValueError(f"{name} must have shape [batch] = ({query.shape[0]},), "
                             f"got {tuple(lengths.shape)}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(f"{name} must be integers, got dtype {lengths.dtype}")


def _clamped_lengths(query, key, q_lengths, kv_lengths):
    """Lengths clipped to [0, q_length] / [0, kv_length] (a length past the end means
    'all of it'), as int32."""
    if q_lengths is not None:
        q_lengths = jnp.clip(jnp.asarray(q_lengths, jnp.int32), 0, query.shape[1])
    if kv_lengths is not None:
        kv_lengths = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, key.shape[1])
    return q_lengths, kv_lengths


def _padding_shared(q_segment_ids, kv_segment_ids, q_lengths, kv_lengths) -> bool:
    """Whether keys get exactly the queries' segment ids and lengths (self-attention
    padding): the same array object, or equal concrete values."""
    def same(a, b):
        if a is b:
            return True
        if a is None or b is None or isinstance(a, jax.core.Tracer) or isinstance(
                b, jax.core.Tracer):
            return False
        return np.array_equal(np.asarray(a), np.asarray(b))
    return same(q_segment_ids, kv_segment_ids) and same(q_lengths, kv_lengths)


def _unsupported_reason(implementation, query, key, *, mask, bias, causal, dropout_rate,
                        q_segment_ids, local_window, value_head_dim, platform=None,
                        compute_capability=None, kv_segment_ids=None, q_lengths=None,
                        kv_lengths=None, logit_soft_cap=None) -> Optional[str]:
    """None if `implementation` runs these inputs, else a sentence naming why not."""
    if implementation == "dense":
        return None
    if logit_soft_cap is not None and implementation == "cudnn":
        return ("implementation='cudnn' takes no logit_soft_cap (its fused kernel here "
                "applies none); use implementation='splash' (TPU), 'chunked' or 'dense'")
    if bias is not None:
        return (f"implementation={implementation!r} takes no additive bias (only 'dense' "
                f"materialises the scores it is added to); use implementation='dense'")
    if implementation == "chunked":
        return None
    if implementation == "splash":
        from tfx_jax.attention_splash import splash_unsupported_reason  # pylint: disable=import-outside-toplevel
        has_padding = any(x is not None for x in (q_segment_ids, q_lengths, kv_lengths))
        return splash_unsupported_reason(
            query.shape, key.shape, has_mask=mask is not None, has_bias=False,
            dropout_rate=dropout_rate, has_padding=has_padding,
            padding_shared=_padding_shared(q_segment_ids, kv_segment_ids, q_lengths,
                                           kv_lengths),
            local_window=local_window, platform=platform, value_head_dim=value_head_dim,
            causal=causal, has_segment_ids=q_segment_ids is not None)
    from tfx_jax.attention_cudnn import cudnn_unsupported_reason  # pylint: disable=import-outside-toplevel
    return cudnn_unsupported_reason(
        query.dtype, query.shape[-1], has_mask=mask is not None, dropout_rate=dropout_rate,
        causal=causal, q_length=query.shape[1], kv_length=key.shape[1],
        value_head_dim=value_head_dim, platform=platform,
        compute_capability=compute_capability,
        has_segment_ids=q_segment_ids is not None, local_window=local_window)


# "auto" sends lengths that are not multiples of splash's 128-wide tile to splash padded
# to the tile when that adds at most a third (ViT-B/16's 197 tokens -> 256); lengths
# under one tile stay with "dense" (one XLA tile covers them anyway).
SPLASH_MAX_TILE_PADDING = 4 / 3


def _splash_tile_padding_ok(length: int) -> bool:
    from tfx_jax.attention_splash import LANES, padded_length  # pylint: disable=import-outside-toplevel
    return length % LANES == 0 or (
        length >= LANES and padded_length(length) <= SPLASH_MAX_TILE_PADDING * length)


def select_implementation(query, key, mask=None, causal=False, dropout_rate=0.0, *,
                          platform: Optional[str] = None,
                          compute_capability: Optional[str] = None,
                          value_head_dim: Optional[int] = None,
                          q_segment_ids=None, kv_segment_ids=None, local_window=None,
                          bias=None, scale=None, q_lengths=None, kv_lengths=None,
                          logit_soft_cap=None) -> str:
    """What "auto" resolves to for these inputs (the same arguments as
    `dot_product_attention`; only their shapes, dtypes and presence matter).

    1. an additive ``bias`` -> "dense" (the only implementation that takes one);
       a ``logit_soft_cap`` rules out "cudnn" (splash applies it in its kernel);
    2. a TPU, no mask array and no dropout, lengths that are multiples of 128 or
       padded to them at a cost of at most a third (``SPLASH_MAX_TILE_PADDING``),
       and padding a window or causal segment ids leave no real query without a
       key (shared by queries and keys) -> "splash" (the Pallas TPU kernel);
    3. an NVIDIA GPU (sm80+), float16/bfloat16, a cuDNN head_dim, no mask array, no
       segment ids and no dropout (causal, lengths, GQA and a left window are
       fine) -> "cudnn";
    4. max(q_length, kv_length) >= CHUNKED_MIN_LENGTH -> "chunked" (with or without
       attention dropout);
    5. otherwise "dense" (short sequences: one tile would cover them anyway).

    ``platform`` ("cpu"/"gpu"/"tpu") and ``compute_capability`` (e.g. "9.0")
    default to the devices the computation is placed on (:func:`placement`: the
    mesh in context, else the first local device); pass them to ask about
    another machine.
    ``value_head_dim``: the value's head size when it differs from the query's.
    """
    del scale  # every implementation takes it
    local_window = _check_window(local_window)
    if bias is not None:
        return "dense"
    if platform is None:
        placed = placement()
        platform, compute_capability = placed.platform, placed.compute_capability
    if kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    common = dict(mask=mask, bias=bias, causal=causal, dropout_rate=dropout_rate,
                  q_segment_ids=q_segment_ids, local_window=local_window,
                  value_head_dim=value_head_dim, platform=platform,
                  compute_capability=compute_capability, kv_segment_ids=kv_segment_ids,
                  q_lengths=q_lengths, kv_lengths=kv_lengths, logit_soft_cap=logit_soft_cap)
    if (platform == "tpu" and _unsupported_reason("splash", query, key, **common) is None
            and all(_splash_tile_padding_ok(n) for n in (query.shape[1], key.shape[1]))):
        return "splash"
    if platform == "gpu" and _unsupported_reason("cudnn", query, key, **common) is None:
        return "cudnn"
    if max(query.shape[1], key.shape[1]) >= CHUNKED_MIN_LENGTH:
        return "chunked"
    return "dense"


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: Optional[jax.Array] = None, *, causal: bool = False,
                          q_segment_ids: Optional[jax.Array] = None,
                          kv_segment_ids: Optional[jax.Array] = None,
                          local_window=None,
                          bias: Optional[jax.Array] = None,
                          scale: Optional[float] = None,
                          dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                          implementation: str = "auto",
                          q_lengths: Optional[jax.Array] = None,
                          kv_lengths: Optional[jax.Array] = None,
                          logit_soft_cap: Optional[float] = None,
                          block_q: int = DEFAULT_BLOCK_Q,
                          block_kv: int = DEFAULT_BLOCK_KV,
                          return_weights: bool = False):
    """softmax(scale * Q K^T + bias) V for every head; returns [B, T, N, H] in value's dtype.

    Args:
      query: [batch, q_length, num_heads, head_dim].
      key, value: [batch, kv_length, num_kv_heads, head_dim]; kv_length may differ
        from q_length (cross-attention); num_heads must be a multiple of
        num_kv_heads: grouped-query attention (query head n uses key/value head
        n // (num_heads / num_kv_heads); 1 kv head = multi-query attention). K/V
        are not repeated in memory.
      mask: optional boolean array broadcastable to [batch, num_heads, q_length,
        kv_length]; True = may attend. Queries with no key to attend return zeros.
      causal: also forbid query i to attend key j > i (decoder self-attention).
      q_segment_ids, kv_segment_ids: optional [batch, q_length] / [batch,
        kv_length] ints: query i attends key j only if their ids are equal and
        non-zero. Packed sequences get ids 1, 2, ...; padding is 0 (a padding
        query returns zeros). kv_segment_ids defaults to q_segment_ids in
        self-attention.
      local_window: optional (left, right): query i attends keys i-left ... i+right
        (sliding-window attention; None on a side = unbounded; an int w = (w, w)).
      bias: optional float array broadcastable to [batch, num_heads, q_length,
        kv_length], added to the scaled scores ("dense" only).
      scale: multiplies Q K^T; default 1/sqrt(head_dim).
      dropout_rate, dropout_rng: dropout on the attention weights (training only;
        "dense" and "chunked"); the rate must be in [0, 1).
      implementation: "dense" materialises the scores; "chunked" (any backend),
        "cudnn" (NVIDIA GPU) and "splash" (TPU Pallas kernel) avoid it; "auto" picks
        with `select_implementation`.
      q_lengths, kv_lengths: optional [batch] ints: padding given as lengths, the
        memory-lean alternative to a padding mask. Query i of sequence b is real
        iff i < q_lengths[b] (other queries return zeros); key j iff j < kv_lengths[b].
        Values are clamped to [0, length].
      logit_soft_cap: optional c > 0: the scaled scores become c * tanh(scores / c)
        before masking and softmax (Gemma 2's attention logit soft-capping; "dense"
        and "chunked" only).
      block_q, block_kv: tile sizes of "chunked" (ignored by the others).
      return_weights: return ``(output, weights)``, ``weights`` being the float32
        [B, N, T, S] probabilities the output was computed from (before attention
        dropout). Only the dense path materialises them: ``implementation`` must be
        "dense" or "auto" (which then runs "dense", whatever the inputs).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if return_weights:
        if implementation not in ("auto", "dense"):
            raise ValueError(f"return_weights=True needs the dense path (it materialises the "
                             f"weights); got implementation={implementation!r}")
        implementation = "dense"
    mask, bias = _as_array(mask, "mask"), _as_array(bias, "bias")
    q_segment_ids = _as_array(q_segment_ids, "q_segment_ids")
    kv_segment_ids = _as_array(kv_segment_ids, "kv_segment_ids")
    _check_inputs(query, key, value, mask, bias)
    _check_lengths(query, q_lengths, kv_lengths)
    _check_scalars(dropout_rate, scale, logit_soft_cap)
    q_segment_ids, kv_segment_ids = _check_segment_ids(query, key, q_segment_ids, kv_segment_ids)
    local_window = _check_window(local_window)
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"attention dropout_rate={dropout_rate} > 0 needs a dropout_rng")
    if implementation == "auto":
        implementation = select_implementation(
            query, key, mask, causal, dropout_rate, value_head_dim=value.shape[-1],
            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
            local_window=local_window, bias=bias, q_lengths=q_lengths, kv_lengths=kv_lengths,
            logit_soft_cap=logit_soft_cap)
    reason = _unsupported_reason(
        implementation, query, key, mask=mask, bias=bias, causal=causal,
        dropout_rate=dropout_rate, q_segment_ids=q_segment_ids, local_window=local_window,
        value_head_dim=value.shape[-1], kv_segment_ids=kv_segment_ids, q_lengths=q_lengths,
        kv_lengths=kv_lengths, logit_soft_cap=logit_soft_cap)
    if reason is not None:
        raise ValueError(f"implementation={implementation!r} cannot run here: {reason}")
    q_lengths, kv_lengths = _clamped_lengths(query, key, q_lengths, kv_lengths)
    if query.shape[0] == 0 and not return_weights:  # an empty batch: an empty result
        return jnp.zeros(query.shape[:3] + value.shape[3:], value.dtype)
    if implementation == "dense":
        mask = _full_mask(query, key, mask, causal, q_segment_ids, kv_segment_ids,
                          local_window, q_lengths, kv_lengths)
        out, weights = _dense_attention(query, key, value, mask, bias, scale, dropout_rate,
                                        dropout_rng, logit_soft_cap)
        return (out, weights) if return_weights else out
    if implementation == "chunked":
        return chunked_attention(query, key, value, mask, causal=causal, q_lengths=q_lengths,
                                 kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                                 kv_segment_ids=kv_segment_ids, local_window=local_window,
                                 scale=scale, dropout_rate=dropout_rate,
                                 dropout_rng=dropout_rng, logit_soft_cap=logit_soft_cap,
                                 block_q=block_q, block_kv=block_kv)
    if implementation == "splash":
        from tfx_jax.attention_splash import splash_attention  # pylint: disable=import-outside-toplevel
        return splash_attention(query, key, value, causal=causal, local_window=local_window,
                                scale=scale, q_segment_ids=q_segment_ids,
                                kv_segment_ids=kv_segment_ids, q_lengths=q_lengths,
                                kv_lengths=kv_lengths, logit_soft_cap=logit_soft_cap)
    from tfx_jax.attention_cudnn import cudnn_attention  # pylint: disable=import-outside-toplevel
    return cudnn_attention(query, key, value, causal=causal, q_lengths=q_lengths,
                           kv_lengths=kv_lengths, local_window=local_window, scale=scale)
