"""cuDNN flash attention on NVIDIA GPUs, through ``jax.nn.dot_product_attention``.

cuDNN's fused kernel (the FlashAttention algorithm, Dao et al. 2022) never
writes the ``T x S`` scores to GPU memory. It only stays memory-lean when the
mask reaches it as structure, not as an array: causal masking as
``is_causal`` and padding as per-sequence lengths. A general boolean mask
would be turned into a dense ``T x S`` bias, so this path refuses one, and
refuses segment ids (jax's wrapper has no way to pass them) and an additive
bias. Grouped-query attention (fewer key/value heads) and a sliding window
that looks only left (``local_window=(left, 0)``, or any window with
``causal=True``) go to the kernel as they are.

What cuDNN supports (jax 0.10 checks the same): CUDA GPUs of compute
capability 8.0 (Ampere) or newer, float16/bfloat16 inputs, head_dim a multiple
of 8 and at most 128 (256 from Hopper, sm90), no dropout here.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from tfx_jax.attention import placement, record_kernel_flops

CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)
MIN_COMPUTE_CAPABILITY = (8, 0)


def _parse_capability(capability) -> Optional[tuple[int, int]]:
    if capability is None:
        return None
    major, minor = str(capability).split(".")[:2]
    return int(major), int(minor)


# CUDA compute capability by device kind (NVIDIA's tables), for devices that do not
# report one: compile-only devices of a GPU target description have only a kind.
COMPUTE_CAPABILITIES = (("h100", "9.0"), ("h200", "9.0"), ("gh200", "9.0"), ("h800", "9.0"),
                        ("b200", "10.0"), ("gb200", "10.0"), ("a100", "8.0"), ("a800", "8.0"),
                        ("a10", "8.6"), ("a40", "8.6"), ("l40", "8.9"), ("l4", "8.9"))


def compute_capability_of(device_kind: str) -> Optional[str]:
    """"9.0" for "NVIDIA H100 80GB HBM3"; None for a kind not in the table."""
    kind = device_kind.lower()
    for pattern, capability in COMPUTE_CAPABILITIES:
        if pattern in kind:
            return capability
    return None


def cudnn_unsupported_reason(dtype, head_dim: int, *, has_mask: bool, dropout_rate: float,
                             causal: bool = False, q_length: int = 0, kv_length: int = 0,
                             value_head_dim: Optional[int] = None,
                             platform: Optional[str] = None,
                             compute_capability: Optional[str] = None,
                             has_segment_ids: bool = False,
                             local_window: Optional[tuple] = None) -> Optional[str]:
    """None if cuDNN attention can run these inputs, else a sentence saying why not.

    ``platform`` / ``compute_capability`` default to the devices the computation
    is placed on (``tfx_jax.attention.placement``), so the rule can be tested for
    any machine by passing them explicitly.
    """
    if has_mask:
        return ("cuDNN attention takes masks only as causal=True and q_lengths/kv_lengths; "
                "a boolean mask array would become a dense T x S bias. Pass lengths, or use "
                "implementation='chunked' or 'dense'")
    if has_segment_ids:
        return ("cudnn attention through jax.nn.dot_product_attention takes no segment ids; "
                "pass padding as q_lengths/kv_lengths, or use implementation='chunked'")
    if dropout_rate > 0.0:
        return ("cudnn attention here has no attention dropout; use implementation='chunked' "
                "or 'dense'")
    if local_window is not None:
        left, right = local_window
        if not causal and right != 0:
            return (f"cudnn supports only a window that looks left (local_window=(left, 0) or "
                    f"causal=True), got local_window={tuple(local_window)}")
        if q_length != kv_length:
            return (f"a local window with q_length {q_length} != kv_length {kv_length} is not "
                    f"routed to cudnn: its diagonal alignment for T != S is untested here")
    if causal and q_length != kv_length:
        return (f"causal cross-attention (q_length {q_length} != kv_length {kv_length}) is not "
                f"routed to cuDNN: its diagonal alignment for T != S is untested here")
    if q_length % 2 or kv_length % 2:  # found compiling ViT-B/16 (197 tokens) for an H100
        return (f"cuDNN's training kernel (jax 0.10) needs even sequence lengths, got q_length "
                f"{q_length} and kv_length {kv_length}; use implementation='chunked' or 'dense'")
    if platform is None:
        placed = placement()
        platform, compute_capability = placed.platform, placed.compute_capability
    capability = _parse_capability(compute_capability)
    if platform != "gpu" or capability is None:
        return (f"cuDNN attention needs an NVIDIA GPU, but the platform is {platform!r}"
                f"{'' if platform != 'gpu' else ' without a CUDA compute capability'}")
    if capability < MIN_COMPUTE_CAPABILITY:
        return (f"cuDNN flash attention needs compute capability >= 8.0 (Ampere), "
                f"this GPU has {compute_capability}")
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        return f"cuDNN attention needs float16 or bfloat16 inputs, got {jnp.dtype(dtype).name}"
    max_head_dim = 256 if capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_head_dim:
        return (f"cuDNN attention needs head_dim a multiple of 8 and <= {max_head_dim} on "
                f"compute capability {compute_capability}, got {head_dim}")
    if value_head_dim is not None and value_head_dim != head_dim:
        return (f"value head_dim {value_head_dim} != query head_dim {head_dim} is not routed "
                f"to cuDNN (it needs cuDNN >= 9.10 on Hopper)")
    return None


def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, causal: bool,
                    q_lengths: Optional[jax.Array], kv_lengths: Optional[jax.Array],
                    local_window: Optional[tuple] = None,
                    scale: Optional[float] = None) -> jax.Array:
    """jax.nn.dot_product_attention(implementation="cudnn"), with our zero-row contract.

    ``local_window=(left, 0)`` (or with ``causal``) becomes a causal sliding
    window of ``left + 1`` keys; ``(None, 0)`` is plain causal.

    Queries that have nothing to attend (past ``q_lengths``, or a sequence with
    ``kv_lengths == 0``) are set to zero, as the other implementations return.
    """
    batch, t, n, h = query.shape
    s = key.shape[1]
    record_kernel_flops(4 * batch * n * h * t * s * (0.5 if causal or local_window else 1.0))
    if q_lengths is not None:
        q_lengths = jnp.asarray(q_lengths, jnp.int32)
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    window = None
    if local_window is not None:
        causal = True  # the checks admit only windows with right == 0 or causal
        if local_window[0] is not None:
            window = (local_window[0], 0)
    out = jax.nn.dot_product_attention(
        query, key, value, scale=scale, is_causal=causal, query_seq_lengths=q_lengths,
        key_value_seq_lengths=kv_lengths, local_window_size=window, implementation="cudnn")
    if q_lengths is None and kv_lengths is None:
        return out
    batch, q_length = query.shape[:2]
    attends = jnp.ones((batch, q_length), bool)
    if q_lengths is not None:
        attends &= jnp.arange(q_length)[None, :] < q_lengths[:, None]
    if kv_lengths is not None:
        attends &= (kv_lengths > 0)[:, None]
    return jnp.where(attends[:, :, None, None], out, jnp.zeros_like(out))
