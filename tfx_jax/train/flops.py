"""Analytic model FLOPs of the Transformer family, and the peak FLOP/s of accelerators.

Convention (PaLM's MFU, Chowdhery et al. 2022, appendix B): every matrix
multiplication counts 2 FLOPs per multiply-add; element-wise work (softmax,
LayerNorm, activations, biases, the optimizer) and embedding look-ups count 0.
One training step is 3 x forward (the backward pass computes two matmuls for
every forward one). Forward FLOPs per sequence, with d = d_model, f = d_ff,
L layers, V vocabulary:

    self-attention over T tokens       8 T d^2  (Q, K, V, W_o) + 4 T^2 d  (Q K^T, A V)
    cross-attention, T queries, S keys 4 T d^2 + 4 S d^2  + 4 T S d
    feed-forward over T tokens         4 T d f
    output logits                      2 T d V
    ViT patch embedding                2 (H W / P^2) (P^2 C) d,  head 2 d classes

Attention counts the whole T x T score matrix even when causal, so for the
decoder-only model the count is exactly ``6 N T + 12 L T^2 d`` per sequence of
T tokens (N: the parameters that take part in matmuls; a tied embedding counts
once, as the output projection). Grouped-query attention (``num_kv_heads <
num_heads``) shrinks the K and V projections to ``num_kv_heads * head_dim``
columns. Recomputation (remat) is not counted: MFU measures useful model
FLOPs, not the hardware's.

MFU = model FLOPs per second / (peak FLOP/s per device x devices), with the
vendors' dense bf16 peaks of :data:`PEAK_BF16_TFLOPS`.
"""
from __future__ import annotations

from typing import Optional

# Peak dense (no sparsity) bf16 tensor FLOP/s per JAX device, from the vendors' data
# sheets. First match (lower-cased substring of device.device_kind) wins. On TPU v4,
# v5e, v5p and v6e one JAX device is one chip; on TPU7x one of a chip's two cores.
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),   # NVIDIA H100 PCIe
    ("h100 nvl", 835.0),    # NVIDIA H100 NVL
    ("h100", 989.0),        # NVIDIA H100 SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989.0),        # NVIDIA H200 (and GH200)
    ("a100", 312.0),        # NVIDIA A100 (SXM and PCIe)
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0), ("tpu v5e", 197.0),   # TPU v5e
    ("tpu v5p", 459.0), ("tpu v5", 459.0),         # TPU v5p reports "TPU v5"
    ("tpu v6 lite", 918.0), ("tpu v6e", 918.0),   # TPU v6e (Trillium)
    ("tpu7x", 1153.5),      # TPU7x (Ironwood): 2307 per chip, JAX shows its 2 cores
)


def peak_tflops_per_device(device_kind: str, override: Optional[float] = None
                           ) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of one device of this kind (None: unknown, MFU n/a)."""
    if override:
        return override
    kind = device_kind.lower()
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern in kind:
            return tflops
    return None


def attention_flops(d_model: int, q_length: int, kv_length: int, *,
                    kv_fraction: float = 1.0) -> float:
    """Forward FLOPs of one multi-head attention (projections, scores, weighted sum).

    ``kv_fraction`` = num_kv_heads / num_heads for grouped-query attention (K, V
    projections that narrow).
    """
    projections = 2 * d_model * d_model * (2 * q_length + 2 * kv_length * kv_fraction)
    return projections + 4 * q_length * kv_length * d_model


def feed_forward_flops(d_model: int, d_ff: int, length: int) -> float:
    return 4 * length * d_model * d_ff


def _kv_fraction(cfg) -> float:
    kv_heads = getattr(cfg, "num_kv_heads", None)
    return 1.0 if not kv_heads else kv_heads / cfg.num_heads


def transformer_forward_flops(cfg, source_length: int, target_length: int) -> float:
    """Encoder-decoder (``TransformerConfig``), one sentence pair; logits reuse the embedding."""
    d, f, kv = cfg.d_model, cfg.d_ff, _kv_fraction(cfg)
    encoder = cfg.num_encoder_layers * (
        attention_flops(d, source_length, source_length, kv_fraction=kv)
        + feed_forward_flops(d, f, source_length))
    decoder = cfg.num_decoder_layers * (
        attention_flops(d, target_length, target_length, kv_fraction=kv)
        + attention_flops(d, target_length, source_length, kv_fraction=kv)
        + feed_forward_flops(d, f, target_length))
    return encoder + decoder + 2 * target_length * d * cfg.vocab_size


def vit_forward_flops(cfg) -> float:
    """One image (``ViTConfig``): patch embedding, the encoder over patches (+ [CLS]), the head."""
    d, tokens = cfg.d_model, cfg.num_patches + (cfg.pool == "cls")
    patch_embedding = 2 * cfg.num_patches * cfg.patch_size ** 2 * cfg.num_channels * d
    encoder = cfg.num_layers * (attention_flops(d, tokens, tokens, kv_fraction=_kv_fraction(cfg))
                                + feed_forward_flops(d, cfg.d_ff, tokens))
    return patch_embedding + encoder + 2 * d * cfg.num_classes


def causal_lm_forward_flops(cfg, length: int) -> float:
    """One sequence of ``length`` tokens (``CausalLMConfig``; full T x T scores)."""
    d = cfg.d_model
    layers = cfg.num_layers * (attention_flops(d, length, length, kv_fraction=_kv_fraction(cfg))
                               + feed_forward_flops(d, cfg.d_ff, length))
    return layers + 2 * length * d * cfg.vocab_size


def training_flops(forward_flops: float) -> float:
    """Forward + backward: the backward pass does two matmuls per forward matmul."""
    return 3.0 * forward_flops
