r"""Training throughput and model FLOP utilisation (MFU) of the three model families.

What is measured: whole TRAINING steps -- forward, backward and the Adam update
-- built by the training library itself (``tfx_jax.train.create_optimizer``,
``create_train_state``, ``make_train_step`` over ``make_data_mesh()``), on a
synthetic batch that already sits on the devices (the input pipeline is not
timed). Models at their paper sizes:

* ``transformer``: Transformer-base (Vaswani et al. 2017): d_model 512, 8 heads,
  6 + 6 layers, d_ff 2048, dropout 0.1, 37,000-token shared vocabulary, source and
  target length 256, label smoothing 0.1. Unit: tokens = source + target tokens.
* ``vit``: ViT-B/16 at 224 x 224, 1000 classes. Unit: images.
* ``gpt``: a GPT-style ``tfx.CausalLM`` of ~356M parameters: d_model 1024, 24
  layers, 16 heads, d_ff 4096, context 2048, vocabulary 50,304 (GPT-2's 50,257
  rounded up to a multiple of 128), tied embeddings, no dropout. Unit: tokens.

``--small`` swaps in tiny variants of all three (seconds on a CPU; for CI).

Timing: each model is compiled once (``train_step.lower(...).compile()``, timed
as ``compile_s``), run ``--warmup`` times, then ``--repeats`` times; one repeat
is one optimizer update (``--grad_accum_steps`` micro-batches of
``--batch_size``), closed by ``jax.block_until_ready``. ``step_time_s`` is the
median repeat divided by ``grad_accum_steps``, i.e. the time of one batch.

FLOP convention (``model_flops_per_step``, counted by ``tfx_jax.train.perf``,
which the training loop uses for its ``mfu`` too): every matrix multiplication
counts 2 FLOPs per multiply-add; element-wise work (softmax, LayerNorm, activations,
biases, the optimizer) and embedding look-ups count 0. One training step is
3 x forward (the backward pass computes two matmuls for every forward one).
Forward FLOPs per sequence, with d = d_model, f = d_ff, L layers, V vocabulary:

    self-attention over T tokens      8 T d^2  (Q, K, V, W_o) + 4 T^2 d  (Q K^T, A V)
    cross-attention, T queries, S keys 4 T d^2 + 4 S d^2  + 4 T S d
    feed-forward over T tokens        4 T d f
    output logits                     2 T d V
    ViT patch embedding               2 (H W / P^2) (P^2 C) d,  head 2 d classes

Attention counts the whole T x T score matrix even when causal (the convention
of PaLM's MFU, Chowdhery et al. 2022, appendix B), so for the decoder-only model
the count is exactly ``6 N T + 12 L T^2 d`` per sequence of T tokens, where N are
the parameters that take part in matmuls (the tied embedding counts once, as
the output projection). Recomputation (``--remat_policy``) is *not* counted:
MFU measures useful model FLOPs, not the hardware's.

Cross-check: XLA's own count, ``compiled.cost_analysis()["flops"]``, is per
device, so it is multiplied by the device count (``xla_flops_per_step``) and
printed with ``xla_over_model``. Expect a ratio a little above 1 (XLA also
counts element-wise work and the optimizer; rematerialisation raises it). With
``--scan_layers`` XLA counts the body of the layer loop once, not once per
layer, so the ratio drops far below 1: compare without scan.

MFU = model_flops_per_step / step_time_s / (peak_flops_per_device x devices),
with the peak dense bf16 FLOP/s per device of ``PEAK_BF16_TFLOPS`` (vendor data
sheets), whatever ``--dtype`` is (a float32 run reports its MFU against the bf16
peak). An unknown device (or a CPU) reports MFU as n/a unless ``--peak_tflops``
gives its peak.

Memory: on GPU/TPU ``device.memory_stats()["peak_bytes_in_use"]`` (the largest
over local devices); elsewhere the compiled program's estimate,
argument + output + temp - aliased bytes per device (``memory_analysis()``).
Each model runs in its own subprocess (``--isolate``, default), because a
device's peak never resets within a process.

Meshes: ``--mesh=fsdp=4,tensor=2`` times the step on a ``data x fsdp x tensor``
mesh (default: data parallel), with the state created directly sharded.
``--memory_meshes="data=8;fsdp=8;fsdp=4,tensor=2"`` switches to a compile-only
memory plan (``tfx_jax.train.perf``): for every model and mesh, the per-device
bytes of params + optimizer state and the compiled step's ``memory_analysis``
(argument / output / temp / alias, per device), without running anything, so
it works on CPU with simulated devices (``xla_force_host_platform_device_count``).
``--models=gpt1.3b`` is a GPT-3 XL-shaped causal LM (Brown et al. 2020: 24
layers, d_model 2048, 16 heads, d_ff 8192, context 2048; 1.3B parameters),
bf16 compute, f32 parameters and Adam, scanned + fully rematerialised layers
and chunked attention; it is meant for the memory plan.

Usage:
  python experiments/throughput.py --small                       # CPU / CI, seconds
  python experiments/throughput.py --models=vit --batch_size=256   # bf16 on GPU/TPU
  python experiments/throughput.py --models=gpt --batch_size=8 --remat_policy=dots \
      --attention_implementation=cudnn
Writes <out_dir>/<name>.json and .csv (all flags, device kind and count, versions,
date) and prints the table.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform as platform_lib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from absl import app, flags, logging

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, _REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tfx_jax as tfx  # noqa: E402
from tfx_jax import train as tr  # noqa: E402
from tfx_jax.model_config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES  # noqa: E402
from tfx_jax.train.perf import (PEAK_BF16_TFLOPS, attention_flops,  # noqa: E402,F401
                                 causal_lm_forward_flops, feed_forward_flops,
                                 peak_tflops_per_device, training_flops,
                                 transformer_forward_flops, vit_forward_flops)
from tfx_jax.train.perf import bytes_per_device, plan_train_memory  # noqa: E402
from tfx_jax.train.metrics import write_results  # noqa: E402

MODELS = ("transformer", "vit", "gpt")
MEMORY_MODELS = MODELS + ("gpt1.3b",)  # gpt1.3b: for --memory_meshes (compile only)

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Which models to measure, from {MODELS}.")
flags.DEFINE_bool("small", False, "Tiny variants of every model (CPU, CI); not a target.")
flags.DEFINE_integer("batch_size", None, "Global batch (all devices) for every model; default "
                     "per model: transformer 128, vit 256, gpt 8 (small: 8).")
flags.DEFINE_integer("seq_len", None, "Sequence length of transformer (source = target) and "
                     "gpt; default 256 and 2048 (small: 32 and 64). ViT uses --image_size.")
flags.DEFINE_integer("image_size", None, "ViT image side; default 224 (small: 32).")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Computation dtype; auto = bfloat16 on GPU/TPU, float32 on CPU.")
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                  "Parameter (master weight) dtype.")
flags.DEFINE_bool("scan_layers", False, "Run the layers with nn.scan (faster compiles).")
flags.DEFINE_enum("remat_policy", "none", list(REMAT_POLICIES),
                  "Recompute each layer's activations in the backward pass.")
flags.DEFINE_enum("attention_implementation", "auto", list(ATTENTION_IMPLEMENTATIONS),
                  "tfx.dot_product_attention implementation.")
flags.DEFINE_bool("fused_qkv", False, "One matmul for Q, K and V in self-attention.")
flags.DEFINE_integer("grad_accum_steps", 1, "Batches per optimizer update (optax.MultiSteps).")
flags.DEFINE_bool("donate", True, "Donate the train state to the step (update in place).")
flags.DEFINE_integer("warmup", 2, "Untimed optimizer updates after compilation.")
flags.DEFINE_integer("repeats", 10, "Timed optimizer updates; the median is reported.")
flags.DEFINE_float("peak_tflops", None, "Peak FLOP/s per device in TFLOP/s for MFU "
                   "(default: PEAK_BF16_TFLOPS by device kind; n/a if unknown).")
flags.DEFINE_integer("seed", 0, "Seed for parameters and synthetic data.")
flags.DEFINE_bool("isolate", True, "Measure each model in its own subprocess (peak memory).")
flags.DEFINE_string("out_dir", os.path.join(_REPO_ROOT, "benchmarks", "results"),
                    "Where the JSON and CSV go.")
flags.DEFINE_string("out_name", None, "File name stem (default: throughput_<platform>_"
                    "<device>_x<count>[_small]_<date>).")
flags.DEFINE_string("worker_result", None, "Internal: measure one model, write its record here.")
flags.DEFINE_string("mesh", "data=-1", "Mesh for timing, e.g. 'fsdp=4,tensor=2' (-1: the rest).")
flags.DEFINE_string("memory_meshes", None, "Compile-only memory plan over these meshes, e.g. "
                    "'data=8;fsdp=8;fsdp=4,tensor=2'; nothing is run.")
flags.DEFINE_float("memory_budget_gib", 16.0, "Device memory the plan checks against (v5e: 16).")

KNOB_FLAGS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_implementation",
              "fused_qkv", "grad_accum_steps", "donate")


# ----------------------------------------------------------------------------- models
@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One model to train on synthetic data."""
    name: str
    description: str
    unit: str                      # what items_per_s counts: "tokens" or "images"
    task: tr.Task
    make_batch: Callable[[np.random.Generator, int], dict]  # (rng, batch_size) -> batch
    batch_size: int
    sequence: str                  # e.g. "256+256" or "197 patches"
    items_per_example: int
    model_flops_per_example: float  # training (forward + backward)


def stack_knobs(platform: str) -> dict:
    """The StackConfig performance options the flags select (dtype "auto" resolved)."""
    dtype = FLAGS.dtype
    if dtype == "auto":
        dtype = "float32" if platform == "cpu" else "bfloat16"
    return dict(dtype=dtype, param_dtype=FLAGS.param_dtype, scan_layers=FLAGS.scan_layers,
                remat_policy=FLAGS.remat_policy,
                attention_implementation=FLAGS.attention_implementation,
                fused_qkv=FLAGS.fused_qkv)


def _random_tokens(rng, shape, vocab_size):
    return rng.integers(4, vocab_size, size=shape, dtype=np.int32)  # no padding (id 0)


def transformer_benchmark(knobs: dict, small: bool, batch_size: Optional[int] = None,
                          seq_len: Optional[int] = None, **_) -> Benchmark:
    length = seq_len or (32 if small else 256)
    sizes = (dict(vocab_size=512, d_model=64, num_heads=4, d_ff=128, num_encoder_layers=2,
                  num_decoder_layers=2) if small else dict(vocab_size=37_000))
    cfg = tfx.TransformerConfig(max_len=length, **sizes, **knobs)
    model = tfx.Transformer(cfg)

    def init_params(rng):
        dummy = jnp.ones((1, length), jnp.int32)
        return model.init({"params": rng}, dummy, dummy)["params"]

    def loss_fn(params, batch, rng, train):
        logits = model.apply({"params": params}, batch["source"], batch["target_in"],
                             deterministic=not train, rngs={"dropout": rng})
        loss, num_tokens = tr.token_cross_entropy(logits, batch["target_out"],
                                                  label_smoothing=0.1)
        return loss, {"weight": num_tokens}

    def make_batch(rng, batch_size):
        target = _random_tokens(rng, (batch_size, length + 1), cfg.vocab_size)
        return {"source": _random_tokens(rng, (batch_size, length), cfg.vocab_size),
                "target_in": target[:, :-1], "target_out": target[:, 1:]}

    return Benchmark(
        name="transformer", description="small encoder-decoder" if small else "Transformer-base",
        unit="tokens", task=tr.Task(init_params, loss_fn), make_batch=make_batch,
        batch_size=batch_size or (8 if small else 128), sequence=f"{length}+{length}",
        items_per_example=2 * length,
        model_flops_per_example=training_flops(transformer_forward_flops(cfg, length, length)))


def vit_benchmark(knobs: dict, small: bool, batch_size: Optional[int] = None,
                  image_size: Optional[int] = None, **_) -> Benchmark:
    image_size = image_size or (32 if small else 224)
    sizes = (dict(patch_size=8, num_classes=10, d_model=64, num_heads=4, d_ff=128, num_layers=2)
             if small else {})
    cfg = tfx.ViTConfig(image_size=image_size, **sizes, **knobs)
    model = tfx.ViT(cfg)
    shape = (image_size, image_size, cfg.num_channels)

    def init_params(rng):
        return model.init({"params": rng}, jnp.zeros((1, *shape), jnp.float32))["params"]

    def loss_fn(params, batch, rng, train):
        logits = model.apply({"params": params}, batch["images"], deterministic=not train,
                             rngs={"dropout": rng})
        return tr.classification_cross_entropy(logits, batch["labels"]), {}

    def make_batch(rng, batch_size):
        return {"images": rng.standard_normal((batch_size, *shape), dtype=np.float32),
                "labels": rng.integers(0, cfg.num_classes, size=batch_size, dtype=np.int32)}

    return Benchmark(
        name="vit", description="small ViT" if small else "ViT-B/16", unit="images",
        task=tr.Task(init_params, loss_fn), make_batch=make_batch,
        batch_size=batch_size or (8 if small else 256),
        sequence=f"{cfg.num_patches + 1} patches", items_per_example=1,
        model_flops_per_example=training_flops(vit_forward_flops(cfg)))


def gpt_benchmark(knobs: dict, small: bool, batch_size: Optional[int] = None,
                  seq_len: Optional[int] = None, **_) -> Benchmark:
    length = seq_len or (64 if small else 2048)
    sizes = (dict(vocab_size=512, d_model=64, num_heads=4, d_ff=256, num_layers=2) if small
             else dict(vocab_size=50_304, d_model=1024, num_heads=16, d_ff=4096, num_layers=24))
    cfg = tfx.CausalLMConfig(max_len=length, dropout_rate=0.0, **sizes, **knobs)
    model = tfx.CausalLM(cfg)

    def init_params(rng):
        return model.init({"params": rng}, jnp.ones((1, length), jnp.int32))["params"]

    def loss_fn(params, batch, rng, train):
        logits = model.apply({"params": params}, batch["tokens"][:, :-1],
                             deterministic=not train, rngs={"dropout": rng})
        loss, num_tokens = tr.token_cross_entropy(logits, batch["tokens"][:, 1:])
        return loss, {"weight": num_tokens}

    def make_batch(rng, batch_size):
        return {"tokens": _random_tokens(rng, (batch_size, length + 1), cfg.vocab_size)}

    return Benchmark(
        name="gpt", description="small causal LM" if small else "GPT-style 350M",
        unit="tokens", task=tr.Task(init_params, loss_fn), make_batch=make_batch,
        batch_size=batch_size or 8, sequence=str(length),
        items_per_example=length,
        model_flops_per_example=training_flops(causal_lm_forward_flops(cfg, length)))


def gpt13b_benchmark(knobs: dict, small: bool, batch_size: Optional[int] = None,
                     seq_len: Optional[int] = None, **_) -> Benchmark:
    """GPT-3 XL shape (1.3B): 24 x 2048, 16 heads of 128, d_ff 8192 (memory plans)."""
    knobs = {**knobs, "dtype": "bfloat16", "param_dtype": "float32",
             "scan_layers": True, "remat_policy": "full", "attention_implementation": "chunked"}
    if small:
        return gpt_benchmark(knobs, small, batch_size=batch_size, seq_len=seq_len)
    length = seq_len or 2048
    cfg = tfx.CausalLMConfig(max_len=length, dropout_rate=0.0, vocab_size=50_304, d_model=2048,
                             num_heads=16, d_ff=8192, num_layers=24, **knobs)
    return Benchmark(
        name="gpt1.3b", description="GPT-style 1.3B", unit="tokens",
        task=_lm_task(tfx.CausalLM(cfg)),
        make_batch=lambda rng, b: {"tokens": _random_tokens(rng, (b, length + 1),
                                                            cfg.vocab_size)},
        batch_size=batch_size or 8, sequence=str(length), items_per_example=length,
        model_flops_per_example=training_flops(causal_lm_forward_flops(cfg, length)))


def _lm_task(model) -> tr.Task:
    def init_params(rng):
        return model.init({"params": rng}, jnp.ones((1, model.config.max_len), jnp.int32))[
            "params"]

    def loss_fn(params, batch, rng, train):
        logits = model.apply({"params": params}, batch["tokens"][:, :-1],
                             deterministic=not train, rngs={"dropout": rng})
        loss, num_tokens = tr.token_cross_entropy(logits, batch["tokens"][:, 1:])
        return loss, {"weight": num_tokens}

    return tr.Task(init_params, loss_fn)


# name -> builder(knobs, small, batch_size=None, seq_len=None, image_size=None); None = default
BENCHMARKS = {"transformer": transformer_benchmark, "vit": vit_benchmark, "gpt": gpt_benchmark}
MEMORY_BENCHMARKS = {**BENCHMARKS, "gpt1.3b": gpt13b_benchmark}


# ----------------------------------------------------------------------------- measuring
def _xla_flops_per_device(compiled) -> Optional[float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _memory(compiled) -> tuple[Optional[int], str]:
    """Peak bytes per device and where the number comes from."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return max(s["peak_bytes_in_use"] for s in stats), "device peak_bytes_in_use"
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None, "unavailable"
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return int(total), "compiled memory_analysis estimate"


def measure(bench: Benchmark, *, grad_accum_steps: int = 1, donate: bool = True,
            warmup: int = 2, repeats: int = 10, seed: int = 0,
            peak_tflops: Optional[float] = None) -> dict:
    """Compiles and times the library's train step for ``bench``; returns one record."""
    mesh = tr.make_mesh(parse_mesh(FLAGS.mesh) if FLAGS.is_parsed() else None)
    tr.check_batch_size(bench.batch_size, mesh, what="--batch_size")
    config = tr.default_config()
    config.update(batch_size=bench.batch_size, schedule="constant", learning_rate=1e-4,
                  warmup_steps=0, grad_accum_steps=grad_accum_steps,
                  num_train_steps=grad_accum_steps * (warmup + repeats + 1), seed=seed)
    tr.validate_config(config)
    optimizer, schedule = tr.create_optimizer(config)
    shardings = tr.train_state_shardings(bench.task.init_params, optimizer, mesh)
    state = tr.create_sharded_train_state(bench.task.init_params, optimizer, seed, shardings)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    batch = tr.shard_batch(bench.make_batch(np.random.default_rng(seed), bench.batch_size), mesh)
    train_step = tr.make_train_step(bench.task.loss_fn, optimizer, schedule, mesh,
                                    grad_accum_steps=grad_accum_steps, donate=donate,
                                    state_shardings=shardings)
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start

    def one_update(state):
        for _ in range(grad_accum_steps):
            state, metrics = compiled(state, batch)
        return jax.block_until_ready((state, metrics))

    for _ in range(warmup):
        state, metrics = one_update(state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = one_update(state)
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times) / grad_accum_steps

    model_flops = bench.model_flops_per_example * bench.batch_size
    xla_per_device = _xla_flops_per_device(compiled)
    xla_flops = None if xla_per_device is None else xla_per_device * mesh.devices.size
    device = jax.devices()[0]
    peak = peak_tflops_per_device(device.device_kind, peak_tflops)
    achieved = model_flops / step_time
    memory_bytes, memory_source = _memory(compiled)
    return {
        "model": bench.name, "description": bench.description, "status": "ok",
        "params": int(num_params), "batch_size": bench.batch_size, "sequence": bench.sequence,
        "unit": bench.unit, "items_per_step": bench.items_per_example * bench.batch_size,
        "compile_s": compile_s, "step_time_s": step_time,
        "step_time_min_s": min(times) / grad_accum_steps,
        "step_time_mean_s": statistics.fmean(times) / grad_accum_steps,
        "repeats": repeats, "warmup": warmup,
        "items_per_s": bench.items_per_example * bench.batch_size / step_time,
        "model_flops_per_step": model_flops, "xla_flops_per_step": xla_flops,
        "xla_over_model": None if xla_flops is None else xla_flops / model_flops,
        "achieved_tflops": achieved / 1e12,
        "achieved_tflops_per_device": achieved / 1e12 / mesh.devices.size,
        "peak_tflops_per_device": peak,
        "mfu": None if peak is None else achieved / (peak * 1e12 * mesh.devices.size),
        "peak_memory_bytes": memory_bytes, "memory_source": memory_source,
        "mesh": "x".join(str(n) for n in mesh.devices.shape),
        "state_bytes_per_device": bytes_per_device(state),
        "final_loss": float(metrics["loss"]), "finite": bool(metrics["finite"]),
    }


def _status_of(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom: " + text.splitlines()[0][:300]
    return "error: " + text.splitlines()[0][:300]


def measure_model(name: str) -> dict:
    """One model with the flags' knobs; failures become a status, not a crash."""
    try:
        bench = BENCHMARKS[name](stack_knobs(jax.devices()[0].platform), FLAGS.small,
                                 batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                                 image_size=FLAGS.image_size)
        record = measure(bench, grad_accum_steps=FLAGS.grad_accum_steps, donate=FLAGS.donate,
                         warmup=FLAGS.warmup, repeats=FLAGS.repeats, seed=FLAGS.seed,
                         peak_tflops=FLAGS.peak_tflops)
        if FLAGS.scan_layers:
            record["xla_note"] = "scan_layers: XLA counts the layer loop's body once"
        return record
    except Exception as error:  # noqa: BLE001 -- reported per model (OOM, unsupported knob)
        return {"model": name, "status": _status_of(error)}


def measure_in_subprocess(name: str) -> dict:
    """Runs this script for one model in a fresh process (fresh device peak memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "record.json")
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                   f"--models={name}", "--noisolate", f"--worker_result={path}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0 and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
    return {"model": name, "status": f"error: worker exited with {done.returncode}: "
            f"{tail[0][:300]}"}


# ----------------------------------------------------------------------------- reporting
def machine_info() -> dict:
    device = jax.devices()[0]

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "platform": device.platform, "device_kind": device.device_kind,
        "device_count": jax.device_count(), "process_count": jax.process_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform_lib.processor() or platform_lib.machine(),
        "python": platform_lib.python_version(),
        **{name: version(name) for name in ("jax", "jaxlib", "flax", "optax")},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _fmt(value, spec, scale=1.0):
    return "n/a" if value is None else format(value * scale, spec)


def format_table(records: list[dict]) -> str:
    header = ("model", "params", "batch", "sequence", "step ms", "items/s", "model TFLOP",
              "XLA/model", "TFLOP/s/dev", "MFU", "peak MiB", "status")
    rows = [header]
    for r in records:
        rows.append((
            r.get("description", r["model"]),
            _fmt(r.get("params"), ".1f", 1e-6) + ("M" if r.get("params") else ""),
            str(r.get("batch_size", "")), r.get("sequence", ""),
            _fmt(r.get("step_time_s"), ".1f", 1e3),
            _fmt(r.get("items_per_s"), ",.0f" if r.get("items_per_s", 0) >= 100 else ".3g")
            + (f" {r['unit']}" if "items_per_s" in r else ""),
            _fmt(r.get("model_flops_per_step"), ".4g", 1e-12),
            _fmt(r.get("xla_over_model"), ".3f"),
            _fmt(r.get("achieved_tflops_per_device"), ".3g"),
            _fmt(r.get("mfu"), ".1%"),
            _fmt(r.get("peak_memory_bytes"), ",.0f", 2 ** -20),
            r["status"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def write_throughput_results(records: list[dict], meta: dict, out_dir: str,
                             name: str) -> list[str]:
    settings = {f"flag_{k}": v for k, v in meta["flags"].items() if k in KNOB_FLAGS}
    return write_results(out_dir, name, meta, records, {
        "device_kind": meta["machine"]["device_kind"],
        "device_count": meta["machine"]["device_count"], **settings,
        "date": meta["machine"]["date"]})


# ----------------------------------------------------------------------------- memory plans
def parse_mesh(text: str) -> dict:
    """'fsdp=4,tensor=2' -> {"fsdp": 4, "tensor": 2} (axes left out have size 1)."""
    mesh = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, _, size = part.partition("=")
        try:
            mesh[axis.strip()] = int(size)
        except ValueError:
            raise app.UsageError(f"mesh entry {part!r} must be axis=size, e.g. fsdp=4") from None
    if mesh and "data" not in mesh and -1 not in mesh.values():
        mesh["data"] = -1
    return mesh


def plan_memory(name: str, mesh_config: dict, budget_gib: float) -> dict:
    """Compile-only memory of one model on one mesh (see tfx_jax.train.perf)."""
    try:
        mesh = tr.make_mesh(mesh_config)  # the platform is the mesh's (a compile target's)
        bench = MEMORY_BENCHMARKS[name](stack_knobs(mesh.devices.flat[0].platform), FLAGS.small,
                                        batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                                        image_size=FLAGS.image_size)
        tr.check_batch_size(bench.batch_size, mesh, what="--batch_size")
        config = tr.default_config()
        config.update(schedule="constant", learning_rate=1e-4, warmup_steps=0,
                      grad_accum_steps=FLAGS.grad_accum_steps)
        optimizer, schedule = tr.create_optimizer(config)
        start = time.perf_counter()
        plan = plan_train_memory(bench.task, optimizer, schedule, mesh,
                                 bench.make_batch(np.random.default_rng(0), bench.batch_size),
                                 grad_accum_steps=FLAGS.grad_accum_steps)
        plan["mesh"] = "x".join(str(v) for v in plan["mesh"].values())
        return {"model": name, "description": bench.description, "status": "ok",
                "batch_size": bench.batch_size, "sequence": bench.sequence, **plan,
                "compile_s": time.perf_counter() - start, "budget_gib": budget_gib,
                "fits": plan["compiled_total_bytes"] <= budget_gib * 2 ** 30}
    except Exception as error:  # noqa: BLE001 -- reported per row
        return {"model": name, "mesh": str(mesh_config), "status": _status_of(error)}


def format_memory_table(records: list[dict]) -> str:
    header = ("model", "params", "mesh (d x f x t)", "batch", "state MiB/dev", "args MiB",
              "temp MiB", "peak MiB/dev", f"fits {FLAGS.memory_budget_gib:g} GiB", "status")
    gib = lambda r, k: _fmt(r.get(k), ",.1f", 2 ** -20)  # noqa: E731
    rows = [header] + [(
        r.get("description", r["model"]), _fmt(r.get("params"), ",.2f", 1e-6) + "M",
        r.get("mesh", ""), str(r.get("batch_size", "")), gib(r, "state_bytes_per_device"),
        gib(r, "compiled_argument_bytes"), gib(r, "compiled_temp_bytes"),
        gib(r, "compiled_total_bytes"),
        "" if "fits" not in r else ("yes" if r["fits"] else "NO"), r["status"])
        for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def memory_main() -> None:
    unknown = [m for m in FLAGS.models if m not in MEMORY_MODELS]
    if unknown or not FLAGS.models:
        raise app.UsageError(f"--models must name some of {MEMORY_MODELS}, got {FLAGS.models}")
    meshes = [parse_mesh(m) for m in FLAGS.memory_meshes.split(";") if m.strip()]
    records = [plan_memory(name, mesh, FLAGS.memory_budget_gib)
               for name in FLAGS.models for mesh in meshes]
    machine = machine_info()
    meta = {"benchmark": "compile-only memory plan of one training step per mesh",
            "machine": machine, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "flags": {flag.name: flag.value for flag in FLAGS.get_flags_for_module(__name__)},
            "note": "per device; total = argument + output + temp - alias (memory_analysis)"}
    name = FLAGS.out_name or "_".join(["memory", machine["platform"],
                                       f"x{machine['device_count']}",
                                       *(["small"] if FLAGS.small else []), machine["date"][:10]])
    print(format_memory_table(records))
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    json_path, csv_path = (os.path.join(FLAGS.out_dir, f"{name}.{ext}") for ext in ("json", "csv"))
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=2)
        f.write("\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in records for k in r)))
        writer.writeheader()
        writer.writerows(records)
    print("wrote", json_path)
    print("wrote", csv_path)
    if any(r["status"] != "ok" for r in records):
        sys.exit(1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # keep JAX's backend-probing INFO lines out of the table
        logging.set_verbosity(logging.WARNING)
    if FLAGS.memory_meshes:
        memory_main()
        return
    unknown = [m for m in FLAGS.models if m not in MODELS]
    if unknown or not FLAGS.models:
        raise app.UsageError(f"--models must name some of {MODELS}, got {FLAGS.models}")
    if FLAGS.grad_accum_steps < 1 or FLAGS.repeats < 1 or FLAGS.warmup < 0:
        raise app.UsageError("--grad_accum_steps and --repeats must be >= 1, --warmup >= 0")
    if FLAGS.worker_result:  # one model, in a subprocess of the run below
        record = measure_model(FLAGS.models[0])
        with open(FLAGS.worker_result, "w") as f:
            json.dump(record, f)
        return
    isolate = FLAGS.isolate and len(FLAGS.models) > 1
    records = [measure_in_subprocess(m) if isolate else measure_model(m) for m in FLAGS.models]
    machine = machine_info()
    flag_values = {flag.name: flag.value for flag in FLAGS.get_flags_for_module(__name__)
                   if flag.name != "worker_result"}
    meta = {"benchmark": "training throughput (forward + backward + Adam update)",
            "machine": machine, "flags": flag_values,
            "knobs": stack_knobs(machine["platform"]),
            "note": ("CPU measurement: shows the script works, not a performance target"
                     if machine["platform"] == "cpu" else "")}
    name = FLAGS.out_name or "_".join(
        ["throughput", machine["platform"], _slug(machine["device_kind"]),
         f"x{machine['device_count']}", *(["small"] if FLAGS.small else []),
         machine["date"][:10]])
    print(format_table(records))
    for path in write_throughput_results(records, meta, FLAGS.out_dir, name):
        print("wrote", path)
    if any(r["status"] != "ok" for r in records):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
