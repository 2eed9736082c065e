"""Compile a run for a TPU slice or GPU cluster before renting it (``--compile_topology``).

JAX compiles ahead of time for devices it does not have: libtpu describes any
TPU topology on a CPU host (``jax.experimental.topologies.get_topology_desc``),
and a ``jax.jit(...).lower(<ShapeDtypeStructs placed on a mesh of those
devices>).compile()`` runs the real TPU compiler, Mosaic kernels included. This
module turns the names users type into those devices, builds the run's mesh on
them, compiles exactly the train and eval steps the run would compile there and
reports, per chip: the state, temporary and peak bytes against the chip's HBM,
the FLOPs per step, a roofline step time and MFU ceiling, which attention
kernels the program calls (Mosaic / cuDNN custom calls) and the compile time.

Target names (:func:`parse_target`):

* JAX's TPU topologies ``v4:2x2x1``, ``v5e:2x4``, ``v5p:2x2x2``, ``v6e:4x4``,
  ``tpu7x:2x2x1`` (chips per dimension);
* Cloud TPU accelerator types ``v5litepod-16`` / ``v5e-16``, ``v6e-8`` (chips),
  ``v4-8``, ``v5p-32`` (TensorCores: 2 per chip);
* NVIDIA targets ``h100:8``, ``h200:8`` (GPUs per host), ``h100:8x4`` (x hosts):
  parsed with their chip facts; compiling for them needs the CUDA wheels
  (``pip install "jax[cuda12]"``, about 5.5 GB) and a GPU target description.

What a compile-only check cannot tell: XLA's cost analysis counts no FLOPs
inside Pallas or cuDNN calls (the attention kernels' FLOPs are counted while
tracing, ``tfx_jax.attention.counting_kernel_flops``) and counts a loop's body
once (a scanned layer stack: one layer's FLOPs and bytes; the roofline's compute
term therefore takes at least the model's FLOPs, and its memory term is then low);
the roofline time is a lower bound, not a measurement; per-chip bytes are the
compiler's buffer assignment, which is what the chip would allocate, less the
runtime's own reserve.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import re
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import numpy as np

from tfx_jax.attention import counting_kernel_flops
from tfx_jax.errors import ConfigError
from tfx_jax.model_config import REMAT_POLICIES
from tfx_jax.train.mesh import (COMPILE_TARGET, batch_parallelism, batch_sharding, compile_target,
                                replicated_sharding)
from tfx_jax.train.optim import create_optimizer
from tfx_jax.train.perf import bytes_per_device, compiled_memory, peak_tflops_per_device
from tfx_jax.train.state import (abstract_train_state, make_eval_step, make_train_step,
                                 train_state_shardings)

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published facts of one JAX device of an accelerator (a chip, or one TensorCore
    where JAX shows each core as a device: tpu7x)."""
    name: str
    platform: str                 # "tpu" or "gpu"
    device_kind: str              # what jax reports as device.device_kind
    hbm_bytes: int
    hbm_bytes_per_s: float
    cores_per_device: int = 1

    @property
    def peak_flops(self) -> float:
        """Peak dense bf16 FLOP/s (tfx_jax.train.perf.PEAK_BF16_TFLOPS)."""
        return peak_tflops_per_device(self.device_kind) * 1e12


# Google Cloud TPU system-architecture pages and NVIDIA data sheets, per JAX device.
CHIPS = {
    "v4": Chip("v4", "tpu", "TPU v4", 32 * GiB, 1.2e12, cores_per_device=2),
    "v5e": Chip("v5e", "tpu", "TPU v5 lite", 16 * GiB, 8.19e11),
    "v5p": Chip("v5p", "tpu", "TPU v5", 95 * GiB, 2.765e12, cores_per_device=2),
    "v6e": Chip("v6e", "tpu", "TPU v6 lite", 32 * GiB, 1.64e12),
    "tpu7x": Chip("tpu7x", "tpu", "TPU7x", 96 * GiB, 3.69e12),  # one of a chip's 2 cores
    "h100": Chip("h100", "gpu", "NVIDIA H100 80GB HBM3", 84_942_979_072, 3.35e12),
    "h200": Chip("h200", "gpu", "NVIDIA H200", 143_771 * 2 ** 20, 4.8e12),
}
# What XLA's GPU compiler needs to know of a device it cannot see (its GpuTargetConfig):
# the published SXM figures (132 SMs at 1.98 GHz boost, 50 MiB L2, 228 KiB shared memory
# per SM), memory size and bandwidth from CHIPS, cuDNN 9.28 (the CUDA 12 wheels' release).
_GPU_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 28 }}
device_description_str: "{kind}"
"""
# Cloud TPU accelerator types: name prefix -> (chip, TensorCores counted per chip).
CLOUD_TYPES = {"v5litepod": ("v5e", 1), "v5e": ("v5e", 1), "v6e": ("v6e", 1),
               "v4": ("v4", 2), "v5p": ("v5p", 2)}
_TWO_D = ("v5e", "v6e")  # 2-D tori; the others are 3-D


class DoesNotFit(ConfigError):
    """The compiled steps need more memory per chip than the target has (exit code 2)."""


class Compiled(Exception):
    """Raised after a compile-only run wrote its report: the script stops, exit code 0."""

    def __init__(self, report: Mapping[str, Any], path: str):
        super().__init__(path)
        self.report, self.path = report, path


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: ``chip`` x ``shape`` (per slice / host) x ``num_slices``."""
    name: str                     # as the user typed it
    chip: Chip
    shape: tuple[int, ...]        # TPU: chips per torus dimension; GPU: (GPUs per host, hosts)
    num_slices: int = 1

    @property
    def num_devices(self) -> int:
        per_chip = 2 if self.chip.name == "tpu7x" else 1
        return int(np.prod(self.shape)) * self.num_slices * per_chip

    @property
    def topology_name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The Cloud TPU accelerator type of one slice (v5litepod-8, v5p-16, ...)."""
        chips = int(np.prod(self.shape))
        if self.chip.name in _TWO_D:
            return f"{'v5litepod' if self.chip.name == 'v5e' else 'v6e'}-{chips}"
        return f"{self.chip.name}-{2 * chips}"

    @property
    def file_stem(self) -> str:
        stem = self.name if self.num_slices == 1 else f"{self.name}x{self.num_slices}slices"
        return re.sub(r"[^A-Za-z0-9._-]", "_", stem)


def _torus(chip: str, chips: int) -> tuple[int, ...]:
    """The usual slice shape for ``chips`` chips: 2-D for v5e/v6e, 3-D from 2x2x1 up."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"a Cloud TPU slice has a power-of-two number of chips, got {chips}")
    if chip in _TWO_D:
        k = chips.bit_length() - 1
        return (2 ** (k // 2), 2 ** (k - k // 2))
    if chips < 4:
        return (chips, 1, 1)
    dims = [2, 2, 1]
    while int(np.prod(dims)) < chips:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    return tuple(dims)


def parse_target(name: str, num_slices: int = 1) -> Target:
    """A :class:`Target` from a name (module docstring); ConfigError names the forms."""
    text = str(name).strip().lower()
    if not isinstance(num_slices, int) or num_slices < 1:
        raise ConfigError(f"--compile_num_slices must be an integer >= 1, got {num_slices!r}")
    match = re.fullmatch(r"(v4|v5e|v5p|v6e|tpu7x):(\d+(?:x\d+){1,2})", text)
    if match:
        chip, shape = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
        if chip in _TWO_D and len(shape) != 2 or chip not in _TWO_D and len(shape) != 3:
            raise ConfigError(f"--compile_topology={name}: {chip} slices have "
                             f"{2 if chip in _TWO_D else 3} dimensions, e.g. "
                             f"{'v5e:2x4' if chip in _TWO_D else chip + ':2x2x1'}")
        return Target(name, CHIPS[chip], shape, num_slices)
    match = re.fullmatch(r"(v5litepod|v5e|v6e|v4|v5p)-(\d+)", text)
    if match:
        chip, per_chip = CLOUD_TYPES[match.group(1)]
        count = int(match.group(2))
        if count % per_chip:
            raise ConfigError(f"--compile_topology={name}: {match.group(1)}-N counts "
                             f"TensorCores, {per_chip} per chip; N must be even")
        return Target(name, CHIPS[chip], _torus(chip, count // per_chip), num_slices)
    match = re.fullmatch(r"(h100|h200):(\d+)(?:x(\d+))?", text)
    if match:
        if num_slices != 1:
            raise ConfigError("--compile_num_slices is for TPU targets; a GPU target names its "
                             "hosts: h100:8x4 is 4 hosts of 8 GPUs")
        return Target(name, CHIPS[match.group(1)],
                      (int(match.group(2)), int(match.group(3) or 1)))
    raise ConfigError(
        f"--compile_topology={name!r} is not a target name; use a TPU topology (v5e:2x4, "
        f"v5p:2x2x2, v6e:4x4, v4:2x2x1, tpu7x:2x2x1), a Cloud TPU type (v5litepod-16, "
        f"v6e-8, v5p-32: TensorCores) or a GPU target (h100:8, h200:8, h100:8x4)")


def target_devices(target: Target) -> list:
    """The target's compile-only devices (no chip needed; JAX_PLATFORMS may be cpu)."""
    from jax.experimental import topologies
    if target.chip.platform == "gpu":
        chip = target.chip
        config = _GPU_TARGET.format(bandwidth=int(chip.hbm_bytes_per_s), memory=chip.hbm_bytes,
                                    kind=chip.device_kind)
        per_host, hosts = target.shape
        try:
            topology = topologies.get_topology_desc(
                platform="cuda", topology=f"1x{hosts}x{per_host}", target_config=config)
        except (RuntimeError, ValueError, NotImplementedError, ImportError) as error:
            raise ConfigError(
                f"compiling for {target.name} needs JAX's CUDA plugin (pip install "
                f"\"jax[cuda12]\", about 5.5 GB; README 'Check a run fits before renting') "
                f"and JAX_PLATFORMS=cpu: {str(error).splitlines()[0] if str(error) else ''}"
            ) from None
        return list(topology.devices)
    # libtpu, found without chips: no metadata server, one local "worker", and other
    # processes (test workers) may load it at the same time.
    for variable, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                            ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                            ("TPU_ACCELERATOR_TYPE", target.accelerator_type)):
        os.environ.setdefault(variable, value)
    kwargs = {"chip_config_name": "megacore"} if target.chip.cores_per_device == 2 else {}
    try:
        topology = topologies.get_topology_desc(
            topology_name=target.topology_name, platform="tpu", num_slices=target.num_slices,
            **kwargs)
    except (RuntimeError, ValueError) as error:  # libtpu refuses the shape
        raise ConfigError(f"libtpu cannot describe {target.name} ({target.topology_name}, "
                         f"{target.num_slices} slice(s)): {str(error).splitlines()[0]}") from None
    return list(topology.devices)


# ------------------------------------------------------------------ the active target
_SEARCH: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "tfx_jax_compile_search", default=None)
# "batch_size": the largest global batch that fits, with the run's remat policy;
# "batch_size,remat_policy": that for every remat policy, the report at the largest
REMAT_SEARCH = "batch_size,remat_policy"
SEARCHES = ("batch_size", REMAT_SEARCH)


@contextlib.contextmanager
def compiling_for(target: Target, search: Optional[str] = None) -> Iterator[None]:
    """Inside, ``make_mesh`` builds meshes on the target's devices and ``train()``
    compiles its steps for them instead of training (:func:`compile_run`);
    ``search="batch_size"`` makes it look for the largest global batch that fits
    (``"batch_size,remat_policy"``: for each remat policy)."""
    if search and search not in SEARCHES:
        raise ConfigError(f"--compile_search must be one of {SEARCHES}, got {search!r}")
    tokens = COMPILE_TARGET.set(target), _SEARCH.set(search or None)
    try:
        yield
    finally:
        COMPILE_TARGET.reset(tokens[0])
        _SEARCH.reset(tokens[1])


# A flash-attention backward recomputes the scores and takes four more matmuls
# (dV, dP, dQ, dK): 2.5 x the forward's two (Dao et al. 2022, FlashAttention-2 sec. 3).
KERNEL_BACKWARD_FACTOR = 2.5


# ------------------------------------------------------------------ compiling and reporting
def _custom_calls(text: str) -> dict:
    return {"mosaic": text.count('custom_call_target="tpu_custom_call"'),
            "cudnn": len(re.findall(r'custom_call_target="__cudnn\$fmha', text))}


_HBM_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory on HBM.*?\(([\d.]+)([KMGT])\) "
                            r"exceeds available HBM \(([\d.]+)([KMGT])\)", re.S)


def _size(number: str, unit: str) -> int:
    return int(float(number) * 2 ** (10 * "KMGT".index(unit) + 10))


# XLA's GPU compiler tiles its Triton GEMMs by autotuning on the device; compiling without
# one it can find no tiles for some shapes (ViT-B/16's [12608, 768] projection on h100:8:
# "Couldn't find output tile sizes"). Such a step is compiled again with cuBLAS for its
# GEMMs (the report says so); on the GPU itself the executable is recompiled and autotuned.
_NO_GPU_TILES = "Couldn't find output tile sizes"
CUBLAS_GEMMS = {"xla_gpu_enable_triton_gemm": False}


def compile_step(jitted, args, *, num_devices: int, differentiated: bool) -> dict:
    """Lowers and compiles one jitted step for abstract ``args``; its per-device figures.

    When the TPU compiler itself refuses the program for HBM (its temporaries
    alone exceed the chip), the figures are the compiler's: ``needed_bytes`` and
    ``available_bytes``, with ``compile_error`` its message. ``compiler_options``
    records the options a second compile needed (:data:`CUBLAS_GEMMS`), {} if none.
    """
    start = time.perf_counter()
    with counting_kernel_flops() as kernel:
        lowered = jitted.lower(*args)
    kernel_flops = sum(kernel) * ((1 + KERNEL_BACKWARD_FACTOR) if differentiated else 1)
    options = {}
    try:
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as error:
            if _NO_GPU_TILES not in str(error):
                raise
            options = CUBLAS_GEMMS
            compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as error:
        found = _HBM_EXHAUSTED.search(str(error))
        if found is None:
            raise
        needed, available = _size(*found.groups()[:2]), _size(*found.groups()[2:])
        return {"compile_s": round(time.perf_counter() - start, 2),
                "compile_error": str(error).splitlines()[0], "needed_bytes": needed,
                "available_bytes": available, "total_bytes": needed, "temp_bytes": needed,
                "kernel_flops_per_device": kernel_flops / num_devices}
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    xla_flops = float(cost.get("flops", 0.0))
    return {"compile_s": round(seconds, 2), **compiled_memory(compiled),
            "xla_flops_per_device": xla_flops,
            "kernel_flops_per_device": kernel_flops / num_devices,
            "flops_per_device": xla_flops + kernel_flops / num_devices,
            "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
            "cost_analysis": bool(cost),  # XLA's GPU compiler gives none without a GPU
            "custom_calls": _custom_calls(compiled.as_text()), "compiler_options": options}


def _roofline(step: dict, chip: Chip, model_flops_per_device: float) -> tuple[float, str]:
    """(seconds, bound): the larger of compute at peak and HBM traffic at full bandwidth.

    The compute term counts at least the model's FLOPs: XLA's cost analysis counts a
    loop's body once, so a scanned stack of N layers (``scan_layers``) reports about
    one layer's FLOPs and bytes; a train step cannot do less work than its model.
    """
    compute = max(step["flops_per_device"], model_flops_per_device) / chip.peak_flops
    memory = step["bytes_accessed_per_device"] / chip.hbm_bytes_per_s
    return max(compute, memory), ("compute" if compute >= memory else "memory")


def compile_report(target: Target, mesh, *, train_step, train_args, eval_step=None,
                   eval_args=None, model_flops_per_step: Optional[float] = None,
                   knobs: str = "config.mesh.fsdp, config.model.remat_policy, "
                                 "config.batch_size") -> dict:
    """Compiles the run's steps on ``mesh`` (the target's devices) and reports.

    ``train_args`` / ``eval_args``: abstract arguments (``ShapeDtypeStruct`` with
    shardings); the first train argument is the TrainState. The peak of the eval
    step counts the optimizer state too: it stays resident while evaluating.
    """
    chip = target.chip
    state = train_args[0]
    state_bytes = bytes_per_device(state)
    params_bytes = bytes_per_device(state.params)
    steps = {"train": compile_step(train_step, train_args, num_devices=mesh.devices.size,
                                   differentiated=True)}
    steps["train"]["peak_bytes"] = steps["train"]["total_bytes"]
    if eval_step is not None:
        steps["eval"] = compile_step(eval_step, eval_args, num_devices=mesh.devices.size,
                                      differentiated=False)
        steps["eval"]["peak_bytes"] = steps["eval"]["total_bytes"] + state_bytes - params_bytes
    peak = max(step["peak_bytes"] for step in steps.values())
    hbm = min([chip.hbm_bytes] + [step["available_bytes"] for step in steps.values()
                                  if "available_bytes" in step])
    train = steps["train"]
    refused = any("compile_error" in step for step in steps.values())
    num_devices = mesh.devices.size
    useful = model_flops_per_step or train.get("flops_per_device", 0.0) * num_devices
    roofline, bound = (None, None) if refused or not train.get("cost_analysis") else (
        _roofline(train, chip, useful / num_devices))
    # XLA's cost analysis counts a loop body once: well below the model's own FLOPs (under
    # 80%: causal kernels that skip empty tiles come to ~85%), the step is a scanned layer
    # stack whose HBM bytes are one layer's too; the roofline then is the model's FLOPs
    # at peak, and an MFU ceiling would be 100% by construction
    one_layer = (roofline is not None
                 and train["flops_per_device"] * num_devices < 0.8 * useful)
    return {
        "target": target.name, "topology": target.topology_name,
        "num_slices": target.num_slices, "device_kind": mesh.devices.flat[0].device_kind,
        "chips": num_devices,
        "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
        "hbm_bytes_per_chip": hbm, "peak_flops_per_chip": chip.peak_flops,
        "hbm_bytes_per_s_per_chip": chip.hbm_bytes_per_s,
        "state_bytes_per_chip": state_bytes, "params_bytes_per_chip": params_bytes,
        "peak_bytes_per_chip": peak, "fits": not refused and peak <= hbm,
        "steps": steps,
        "model_flops_per_step": model_flops_per_step,
        "roofline_step_s": roofline,
        "roofline_bound": bound,
        "cost_counts_one_layer": one_layer,
        "mfu_ceiling": (useful / (roofline * chip.peak_flops * num_devices)
                        if roofline and not one_layer else None),
        "compile_s": round(sum(step["compile_s"] for step in steps.values()), 2),
        "knobs": knobs, "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _versions() -> dict:
    out = {}
    for package in ("jax", "jaxlib", "libtpu", "flax"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a few lines for the terminal."""
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    lines = [f"{report['target']}: {report['chips']} x {report['device_kind']} "
             f"({report['topology']}, {report['num_slices']} slice(s)); mesh {mesh}",
             f"  per chip: state {gib(report['state_bytes_per_chip'])}, peak "
             f"{gib(report['peak_bytes_per_chip'])} of {gib(report['hbm_bytes_per_chip'])} HBM: "
             f"{'fits' if report['fits'] else 'DOES NOT FIT'}"]
    for name, step in report["steps"].items():
        if "compile_error" in step:
            lines.append(f"  {name} step: the TPU compiler refused it: {step['compile_error']}")
            continue
        calls = step["custom_calls"]
        lines.append(
            f"  {name} step: temp {gib(step['temp_bytes'])}, peak {gib(step['peak_bytes'])}; "
            f"{step['flops_per_device'] / 1e12:.3f} TFLOPs/chip (XLA "
            f"{step['xla_flops_per_device'] / 1e12:.3f} + kernels "
            f"{step['kernel_flops_per_device'] / 1e12:.3f}); Mosaic calls {calls['mosaic']}, "
            f"cuDNN calls {calls['cudnn']}; compiled in {step['compile_s']:.1f} s")
        if step.get("compiler_options"):
            lines.append(f"    (compiled with {step['compiler_options']}: XLA found no Triton "
                         f"GEMM tiles without a GPU to tune on; its GEMMs are cuBLAS's here)")
    if "search" in report:
        found = report["search"]
        tried = ", ".join(f"{t['batch_size']} {'fits' if t['fits'] else 'no'}"
                          for t in found["tried"])
        lines.append(f"  largest global batch that fits: {found['batch_size']} (tried {tried}); "
                     f"the figures above are at that batch")
    for policy, found in report.get("search_by_remat", {}).items():
        lines.append(f"  remat_policy={policy}: largest batch {found['batch_size']} "
                     f"({found['compiles']} compiles)"
                     + (" <- the figures above" if policy == report["remat_policy"] else ""))
    mfu = report["mfu_ceiling"]
    if report["roofline_step_s"] is None:
        if not refused_any(report):
            lines.append("  roofline n/a: the compiler gave no cost analysis (GPU without a GPU)")
        return "\n".join(lines)
    model = report["model_flops_per_step"]
    model = "" if not model else f"; model {model / report['chips'] / 1e12:.3f} TFLOPs/chip"
    lines.append(f"  roofline train step {report['roofline_step_s'] * 1e3:.2f} ms "
                 f"({report['roofline_bound']}-bound{model}), MFU ceiling "
                 f"{'n/a' if mfu is None else f'{mfu:.1%}'}")
    if report.get("cost_counts_one_layer"):
        lines.append("  (XLA's cost analysis counted the scanned layers once: the roofline is "
                     "the model's FLOPs at peak, a looser bound, and gives no MFU ceiling)")
    return "\n".join(lines)


def refused_any(report: Mapping[str, Any]) -> bool:
    return any("compile_error" in step for step in report["steps"].values())


def write_report(report: Mapping[str, Any], workdir: str, target: Target) -> str:
    """Writes ``<workdir>/compile/<target>.json`` (the only file a compile-only run writes)."""
    from etils import epath
    directory = epath.Path(workdir) / "compile"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{target.file_stem}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return str(path)


def does_not_fit_line(report: Mapping[str, Any]) -> str:
    """The one line a run that does not fit exits with."""
    worst = max(report["steps"].items(), key=lambda item: item[1]["peak_bytes"])
    return (f"does not fit {report['target']}: the {worst[0]} step needs "
            f"{report['peak_bytes_per_chip'] / GiB:.2f} GiB per chip, a {report['device_kind']} "
            f"chip has {report['hbm_bytes_per_chip'] / GiB:.2f} GiB; try {report['knobs']}")


def compile_task(task, optimizer, schedule, mesh, batch, *, eval_batch=None, seed: int = 0,
                 grad_accum_steps: int = 1, target: Optional[Target] = None) -> dict:
    """Compiles the library's train step (and eval step, given ``eval_batch``) of
    ``task`` on ``mesh`` for abstract inputs, as ``train()`` would build them; the
    :func:`compile_report`. ``batch`` / ``eval_batch``: one global batch (arrays
    or ``ShapeDtypeStruct``; only shapes and dtypes are used)."""
    target = target or compile_target()
    placed = batch_sharding(mesh)

    def abstract(batch):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                           sharding=placed), batch)

    shardings = train_state_shardings(task.init_params, optimizer, mesh)
    state = abstract_train_state(task.init_params, optimizer, seed, shardings)
    train_step = make_train_step(task.loss_fn, optimizer, schedule, mesh,
                                 grad_accum_steps=grad_accum_steps, state_shardings=shardings)
    eval_step = eval_args = None
    if eval_batch is not None:
        eval_step = make_eval_step(task.loss_fn, mesh, shardings.params)
        rng = jax.ShapeDtypeStruct(state.rng.shape, state.rng.dtype,
                                   sharding=replicated_sharding(mesh))
        eval_args = (state.params, abstract(eval_batch), rng)
    batch = abstract(batch)
    rows = jax.tree.leaves(batch)[0].shape[0]
    return compile_report(target, mesh, train_step=train_step, train_args=(state, batch),
                          eval_step=eval_step, eval_args=eval_args,
                          model_flops_per_step=(task.flops_per_example * rows
                                                if task.flops_per_example else None))


def _with_rows(batch, rows: int):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype), batch)


def search_batch_size(compile_at, batch, mesh, *, max_compiles: int = 8) -> dict:
    """The report at the largest global batch that fits, found by compiling: doubling
    from the run's batch (or halving, when it does not fit), then bisecting, in
    steps of the mesh's batch parallelism, at most ``max_compiles`` compiles. The
    report's ``search`` lists every batch tried with its peak bytes and fit."""
    step = batch_parallelism(mesh)
    tried: dict[int, dict] = {}

    def fits(rows: int) -> bool:
        if rows not in tried:
            tried[rows] = compile_at(_with_rows(batch, rows))
        return tried[rows]["fits"]

    rows = jax.tree.leaves(batch)[0].shape[0]
    lo, hi = (rows, None) if fits(rows) else (None, rows)
    while len(tried) < max_compiles and (lo is None or hi is None):
        if lo is None:
            if hi <= step:
                break
            candidate = max(step, hi // 2 // step * step)
            lo, hi = (candidate, hi) if fits(candidate) else (None, candidate)
        else:
            candidate = lo * 2
            lo, hi = (candidate, None) if fits(candidate) else (lo, candidate)
    while lo is not None and hi is not None and hi - lo > step and len(tried) < max_compiles:
        middle = (lo + hi) // 2 // step * step
        lo, hi = (middle, hi) if fits(middle) else (lo, middle)
    best = tried[lo] if lo is not None else tried[min(tried)]
    return {**best, "search": {
        "batch_size": lo, "step": step,
        "tried": [{"batch_size": b, "peak_bytes_per_chip": r["peak_bytes_per_chip"],
                   "fits": r["fits"]} for b, r in sorted(tried.items())]}}


def _global(batch):
    """A process-local NumPy batch as the global batch's shapes (every host feeds one)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (np.shape(x)[0] * jax.process_count(),) + np.shape(x)[1:], np.asarray(x).dtype), batch)


def abstract_batch(rows: int, features: Mapping[str, tuple], *, packed: bool = False) -> dict:
    """The global batch a run's pipeline would feed, as ``ShapeDtypeStruct``s, from
    ``features``: ``{key: (shape of one row, dtype)}``; plus ``"valid"`` [rows] (every
    pipeline's batches carry it) and, when ``packed``, ``<key>_segmentation`` and
    ``<key>_position`` (int32, the key's shape) of each feature, as
    :mod:`tfx_jax.data.packing` adds them."""
    batch = {key: jax.ShapeDtypeStruct((rows,) + tuple(shape), np.dtype(dtype))
             for key, (shape, dtype) in features.items()}
    if packed:
        for key in features:
            for suffix in ("_segmentation", "_position"):
                batch[key + suffix] = jax.ShapeDtypeStruct(batch[key].shape, np.int32)
    batch["valid"] = jax.ShapeDtypeStruct((rows,), np.bool_)
    return batch


def compile_plan(config, workdir: str, task, mesh, batch, eval_batch=None, *,
                 with_remat: Optional[Callable[[str], Any]] = None) -> None:
    """A ``--compile_topology`` run: compiles the train step (and the eval step, given
    ``eval_batch``) the run would compile on ``mesh`` for global batches of these
    shapes, with the run's optimizer (``config``'s, frozen parameters masked), writes
    ``<workdir>/compile/<target>.json`` (nothing else) and raises :class:`Compiled`
    (it fits) or :class:`DoesNotFit` (one line). The apps call it from the config
    alone, before reading any data; :func:`tfx_jax.train.train` from the first batches.

    ``with_remat(policy)``: the task with another ``remat_policy``, for the search
    ``"batch_size,remat_policy"`` (the report is that of the policy with the largest
    batch; its ``search_by_remat`` lists each policy's).
    """
    target = compile_target()

    def compile_at(task):
        optimizer, schedule = create_optimizer(config, task.trainable)
        return functools.partial(compile_task, task, optimizer, schedule, mesh,
                                 eval_batch=eval_batch, seed=config.seed,
                                 grad_accum_steps=config.grad_accum_steps, target=target)

    search = _SEARCH.get()
    if search == REMAT_SEARCH:
        if with_remat is None:
            raise ConfigError(f"--compile_search={REMAT_SEARCH} needs a script whose model "
                              f"has a remat_policy")
        found = {policy: search_batch_size(compile_at(with_remat(policy)), batch, mesh)
                 for policy in REMAT_POLICIES}
        best = max(found, key=lambda p: (found[p]["search"]["batch_size"] or 0,
                                         -found[p]["peak_bytes_per_chip"]))
        report = {**found[best], "search_by_remat": {
            policy: {"batch_size": r["search"]["batch_size"],
                     "peak_bytes_per_chip": r["peak_bytes_per_chip"],
                     "compiles": len(r["search"]["tried"])} for policy, r in found.items()},
            "remat_policy": best}
    elif search == "batch_size":
        report = search_batch_size(compile_at(task), batch, mesh)
    else:
        report = compile_at(task)(batch)
    path = write_report(report, workdir, target)
    print(format_report(report))
    print(f"wrote {path}")
    if not report["fits"]:
        raise DoesNotFit(does_not_fit_line(report))
    raise Compiled(report, path)


def compile_run(config, workdir: str, task, train_iter, eval_batches, mesh) -> None:
    """What ``tfx_jax.train.train`` does under :func:`compiling_for`: :func:`compile_plan`
    with the shapes of the first batch of ``train_iter`` and of ``eval_batches``."""
    eval_batch = None
    if eval_batches is not None:
        first = next(iter(eval_batches() if callable(eval_batches) else eval_batches), None)
        eval_batch = None if first is None else _global(first)
    compile_plan(config, workdir, task, mesh, _global(next(train_iter)), eval_batch)
