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

Also in this module: Speed metrics of the training loop (tokens/s, examples/s, MFU) and profiler traces.

Also in this module: Per-device memory of a training run, planned without allocating it.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from tfx_jax.errors import ConfigError
from tfx_jax.train.mesh import batch_sharding
from tfx_jax.train.state import Task, abstract_train_state, make_train_step, train_state_shardings

# --- flops ------------------------------------------------------------------------------
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


# --- throughput -------------------------------------------------------------------------
# Speed metrics of the training loop (tokens/s, examples/s, MFU) and profiler traces.
#
# Every train metrics line gets, over the steps since the previous line:
#
# * ``examples_per_sec``: examples trained on per second; a packed row counts
#   each example it holds (its largest segment id), an unpacked batch its
#   ``"valid"`` rows;
# * ``tokens_per_sec``: real (non-padding) tokens per second, as the Task's
#   ``count_tokens(batch)`` counts them (absent if the Task has no counter);
# * ``mfu``: model FLOP utilisation, ``flops_per_example x rows x steps /
#   seconds / (peak FLOP/s per device x devices)``, when the Task gives
#   ``flops_per_example`` and the device's peak is known
#   (:data:`tfx_jax.train.perf.PEAK_BF16_TFLOPS`, or ``config.peak_tflops``).
#   The FLOPs are those of whole rows (a padded row costs the same matmuls as a
#   full one), so padding shows up as lower ``tokens_per_sec``, not lower MFU.
#
# Counting is host-side NumPy on each process-local batch (microseconds); with
# several processes the counts are summed over hosts once per metrics line.
#
# ``config.profile_steps`` writes a ``jax.profiler`` trace of some steps into
# ``<workdir>/profile`` (open it with TensorBoard's profile plugin or Perfetto):
# ``"10,15"`` traces steps 10 to 15, an integer ``n`` the ``n`` steps after the
# run's first (compiling) step, ``""`` or 0 nothing.

PROFILE_DIR = "profile"


def count_examples(batch) -> int:
    """Examples in a process-local batch: segments of packed rows, else valid rows."""
    for key, value in batch.items():
        if key.endswith("_segmentation"):
            return int(np.asarray(value).max(axis=-1).sum())
    if "valid" in batch:
        return int(np.asarray(batch["valid"]).sum())
    return int(np.shape(next(iter(batch.values())))[0])


class ThroughputMeter:
    """Accumulates examples and tokens of the steps since the last metrics line."""

    def __init__(self, task, config, mesh):
        self.task = task
        self.batch_size = config.batch_size
        self.num_devices = mesh.devices.size
        peak = peak_tflops_per_device(mesh.devices.flat[0].device_kind,  # the run's chips
                                      config.get("peak_tflops") or None)
        self.peak_flops = None if peak is None else peak * 1e12 * self.num_devices
        self.reset()

    def reset(self) -> None:
        self.examples = 0
        self.tokens = 0

    def add(self, batch) -> None:
        self.examples += count_examples(batch)
        if self.task.count_tokens is not None:
            self.tokens += int(self.task.count_tokens(batch))

    def rates(self, num_steps: int, seconds: float) -> dict[str, float]:
        """The speed metrics of ``num_steps`` steps in ``seconds``; resets the counts."""
        counts = np.asarray([self.examples, self.tokens], np.int64)
        if jax.process_count() > 1:
            counts = multihost_utils.process_allgather(counts).sum(axis=0)
        seconds = max(seconds, 1e-9)
        out = {"examples_per_sec": float(counts[0]) / seconds}
        if self.task.count_tokens is not None:
            out["tokens_per_sec"] = float(counts[1]) / seconds
        if self.task.flops_per_example and self.peak_flops:
            flops = self.task.flops_per_example * self.batch_size * num_steps
            out["mfu"] = flops / seconds / self.peak_flops
        self.reset()
        return out


def parse_profile_steps(value: Any, start_step: int) -> Optional[tuple[int, int]]:
    """``(first, last)`` step to trace from ``config.profile_steps``, or None (off)."""
    if value in (None, "", 0, "0"):
        return None
    text = str(value).strip()
    try:
        parts = [int(part) for part in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] > 0:
        return start_step + 2, start_step + 1 + parts[0]
    if len(parts) == 2 and 0 < parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise ConfigError(f"config.profile_steps must be 'FIRST,LAST' (1 <= FIRST <= LAST), a "
                     f"positive step count, or '' (off); got {value!r}")


class StepProfiler:
    """Starts a ``jax.profiler`` trace before step ``first`` and stops it after ``last``."""

    def __init__(self, profile_steps: Any, workdir: str, start_step: int):
        self.window = parse_profile_steps(profile_steps, start_step)
        self.directory = os.path.join(workdir, PROFILE_DIR)
        self.active = False

    def before(self, step: int) -> None:
        if self.window and step == self.window[0]:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and step >= self.window[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


# --- memory -----------------------------------------------------------------------------
# Per-device memory of a training run, planned without allocating it.
#
# Two numbers per mesh shape, both from shapes alone (no array is created, so a
# 1.3B-parameter model can be planned on a laptop with simulated devices):
#
# * ``state_bytes_per_device``: params + optimizer state on the busiest device,
#   from each leaf's ``sharding.shard_shape`` (exact).
# * the compiled train step's ``memory_analysis()`` per device: arguments
#   (state + batch), outputs, temporaries (gradients, activations, collectives'
#   buffers), minus what donation aliases. ``total = argument + output + temp -
#   alias`` is XLA's own estimate of the peak. On CPU set
#   ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` (see ENVIRONMENT.md),
#   or fused kernels may hide temporaries.

def _leaf_bytes(x, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def bytes_per_device(abstract_tree: Any) -> int:
    """Bytes of one device's shards of a tree of sharded ``ShapeDtypeStruct``/arrays."""
    return sum(_leaf_bytes(x, x.sharding.shard_shape(x.shape))
               for x in jax.tree.leaves(abstract_tree))


def total_bytes(tree: Any) -> int:
    return sum(_leaf_bytes(x, x.shape) for x in jax.tree.leaves(tree))


def compiled_memory(compiled) -> dict:
    """``memory_analysis()`` of a compiled program, per device, with the peak estimate."""
    analysis = compiled.memory_analysis()
    fields = ("argument", "output", "temp", "alias", "generated_code")
    out = {f"{name}_bytes": int(getattr(analysis, f"{name}_size_in_bytes")) for name in fields}
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                          - out["alias_bytes"])
    return out


def plan_train_memory(task: Task, optimizer: optax.GradientTransformation,
                      schedule: optax.Schedule, mesh: Mesh,
                      batch: Mapping[str, Any], *, seed: int = 0,
                      grad_accum_steps: int = 1) -> dict:
    """Compiles (never runs) the library's train step on ``mesh`` for abstract inputs.

    ``batch``: one global batch (arrays or ``ShapeDtypeStruct``), only its shapes
    are used. Returns the state's bytes (total and per device) and the compiled
    step's ``memory_analysis`` per device.
    """
    shardings = train_state_shardings(task.init_params, optimizer, mesh)
    state = abstract_train_state(task.init_params, optimizer, seed, shardings)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                        sharding=batch_sharding(mesh)), batch)
    step = make_train_step(task.loss_fn, optimizer, schedule, mesh,
                           grad_accum_steps=grad_accum_steps, state_shardings=shardings)
    compiled = step.lower(state, batch).compile()
    return {
        "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
        "state_bytes_total": total_bytes(state),
        "state_bytes_per_device": bytes_per_device(state),
        "params_bytes_per_device": bytes_per_device(state.params),
        **{f"compiled_{k}": v for k, v in compiled_memory(compiled).items()},
    }
