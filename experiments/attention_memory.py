r"""How attention's memory and time scale with sequence length, per implementation.

The seed's warning, measured: "dense" attention stores a T x T score matrix,
"chunked" and "cudnn" should not. For every implementation, sequence length
and pass (forward; forward+backward) this script records

* memory: the compiled program's temporary buffers
  (``jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``) and, on
  GPU/TPU, the device's ``peak_bytes_in_use``; next to them the physical floor,
  the bytes of Q, K, V and the output;
* time: median wall time of ``--repeats`` runs after ``--warmup`` runs, and the
  achieved TFLOP/s;
* out-of-memory, compile failures and configurations skipped because their
  compiled size exceeds the memory limit, as a status instead of a crash.

Variants (``--variants``): ``mha`` (N query = N key/value heads), ``gqa<K>``
(grouped-query: K key/value heads shared by the N query heads) and
``window<W>`` (sliding window: each query sees itself and the W keys before
it, ``local_window=(W, 0)``). Besides tfx_jax's implementations the script can
measure, side by side, ``jax_nn_xla`` (``jax.nn.dot_product_attention`` with
``implementation="xla"``) and ``mea`` (the ``memory-efficient-attention``
package, Rabe & Staats' reference JAX code, if installed; non-causal MHA only).
``splash`` off a TPU runs in Pallas TPU interpret mode: correctness only (the
max |splash - dense| is recorded), neither timed nor memory-measured.
``--time_max_length``: longer configurations are compiled (memory) but not run.

Context parallelism (``--context=1,2,4,8``): for each size P > 1 the sequence is
split over P devices (``tfx_jax.context_parallel_attention``, strategies from
``--context_strategies``) and every number is *per device*: the compiled
per-device program's temporaries, the per-device inputs, and the wall time of
the whole sharded step. Size 1 rows are the ``--implementations`` on one
device (chunked: the side-by-side baseline). On CPU the P devices are
simulated (``--xla_force_host_platform_device_count``) and share the host's
cores, so their time is the total work, not a parallel speed-up; memory is
exact. ``--device_budget_mib``: the table ends with the longest T whose
per-device temp + inputs + outputs fit that budget, per device count.

FLOP convention: forward = 4 * B * N * H * (number of attended (query, key)
pairs), i.e. two matmuls of 2 FLOPs per multiply-add; the pairs are T * S, or
the lower triangle for ``--causal``. Backward = 2.5 x forward (five matmuls
instead of two), so forward+backward = 3.5 x forward. Recomputation inside
"chunked"/"cudnn" is not counted: TFLOP/s are useful work per second.

Each configuration runs in its own subprocess (``--isolate``, the default): a
device's peak memory never resets inside a process, and an OOM kill then takes
down one configuration, not the benchmark. On CPU each configuration gets two
subprocesses: one compiles with XLA's YNN fusion disabled
(``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=``), whose temp-size report
is honest (with YNN, a forward pass that materialises the scores can report 0
bytes), and one times the program with default flags.

Usage:
  python experiments/attention_memory.py --lengths=256,512,1024 \
      --implementations=dense,chunked --causal=false --repeats=5
  # add to an earlier result file (same machine) instead of starting a new one:
  python experiments/attention_memory.py --lengths=65536 --implementations=chunked \
      --out_name=attention_memory_cpu_... --append
  # the sequence split over 1 (chunked), 2, 4 and 8 devices:
  python experiments/attention_memory.py --context=1,2,4,8 --implementations=chunked \
      --causal --passes=forward_backward --lengths=2048,4096,8192,16384 \
      --device_budget_mib=128
Writes <out_dir>/<name>.json, .csv and .png (log-log plots) and prints the table.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform as platform_lib
import re
import statistics
import subprocess
import sys
import time

from absl import app, flags

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, _REPO_ROOT)

DEFAULT_LENGTHS = [256 * 2 ** i for i in range(9)]  # 256 ... 65,536
PASSES = ("forward", "forward_backward")
CPU_HONEST_MEMORY_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
RESULT_PREFIX = "ATTENTION_MEMORY_RESULT "
MIB = 2 ** 20

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", [str(n) for n in DEFAULT_LENGTHS],
                  "Sequence lengths T (= S, self-attention).")
flags.DEFINE_list("implementations", ["dense", "chunked", "cudnn"],
                  "Implementations of tfx_jax.dot_product_attention to measure, and/or "
                  "jax_nn_xla, mea (see module doc).")
flags.DEFINE_list("variants", ["mha"], "mha, gqa<K> (K kv heads), window<W> (local_window=(W, 0)).")
flags.DEFINE_integer("time_max_length", 0,
                     "Compile (memory) but do not run configurations longer than this (0: run all).")
flags.DEFINE_integer("splash_interpret_max_length", 512,
                     "Off a TPU, check splash (interpret mode) only up to this length.")
flags.DEFINE_list("passes", list(PASSES), "forward and/or forward_backward.")
flags.DEFINE_integer("batch", 1, "Batch size B.")
flags.DEFINE_integer("heads", 4, "Number of heads N.")
flags.DEFINE_integer("head_dim", 64, "Head size H.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
flags.DEFINE_bool("causal", False, "Causal (decoder) masking.")
flags.DEFINE_integer("block_q", None, "Chunked query tile (default: the library's).")
flags.DEFINE_integer("block_kv", None, "Chunked key tile (default: the library's).")
flags.DEFINE_integer("warmup", 1, "Untimed runs before timing (compilation is separate).")
flags.DEFINE_integer("repeats", 5, "Timed runs (fewer if --time_budget_s runs out).")
flags.DEFINE_float("time_budget_s", 60.0,
                   "Per configuration: stop repeating once the timed runs took this long.")
flags.DEFINE_float("memory_limit_gib", 0.0,
                   "Skip a configuration whose compiled temp + inputs/outputs exceed this. "
                   "0: 60% of available host memory on CPU, the device's bytes_limit on GPU/TPU.")
flags.DEFINE_integer("config_timeout_s", 1800, "Kill a configuration's subprocess after this.")
flags.DEFINE_bool("isolate", True, "One subprocess per configuration (see module doc).")
flags.DEFINE_string("out_dir", os.path.join(_REPO_ROOT, "benchmarks", "results"),
                    "Where the JSON/CSV/PNG go.")
flags.DEFINE_string("out_name", None,
                    "File name stem (default: attention_memory_<platform>_<device>_<cpus>cpu_"
                    "<dtype>[_causal]_<date>).")
flags.DEFINE_bool("append", False, "Merge into an existing <out_name>.json (same settings).")
flags.DEFINE_bool("replot", False,
                  "Measure nothing: rewrite table, CSV and PNG from <out_dir>/<out_name>.json.")
flags.DEFINE_list("context", ["1"],
                  "Devices the sequence is split over (1: --implementations on one device; "
                  "P > 1: context_parallel_attention with --context_strategies).")
flags.DEFINE_list("context_strategies", ["ring"], "ring and/or all_gather (for --context > 1).")
flags.DEFINE_float("device_budget_mib", 0.0,
                   "Report the longest T whose per-device temp + inputs + outputs fit this "
                   "(0: not reported).")
flags.DEFINE_string("worker_config", None, "Internal: measure one configuration (JSON).")
flags.DEFINE_bool("worker_info", False, "Internal: print the machine description (JSON).")


# ----------------------------------------------------------------------------- measuring
def count_flops(batch, heads, head_dim, q_length, kv_length, causal, pass_name,
                window=None) -> float:
    """Useful FLOPs, convention in the module docstring."""
    if window is not None:  # query i attends keys max(0, i - W) .. i (self-attention)
        w = window[0]
        pairs = sum(min(i, w) + 1 for i in range(min(q_length, kv_length)))
    elif causal:  # query i attends keys 0..min(i, S-1)
        full_rows = max(0, q_length - kv_length)
        tri = min(q_length, kv_length)
        pairs = tri * (tri + 1) // 2 + full_rows * kv_length
    else:
        pairs = q_length * kv_length
    forward = 4.0 * batch * heads * head_dim * pairs
    return forward if pass_name == "forward" else 3.5 * forward


def machine_info() -> dict:
    import jax
    import jaxlib
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "compute_capability": getattr(device, "compute_capability", None),
        "cpu_count": os.cpu_count(),
        "processor": platform_lib.processor() or platform_lib.machine(),
        "python": platform_lib.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


EXTERNAL_IMPLEMENTATIONS = ("jax_nn_xla", "mea")


def parse_variant(variant: str, heads: int) -> dict:
    """'mha' / 'gqa<K>' / 'window<W>' -> {'kv_heads': K, 'local_window': (W, 0) or None}."""
    match = re.fullmatch(r"(mha)|gqa(\d+)|window(\d+)", variant)
    if not match:
        raise ValueError(f"variant {variant!r} is not mha, gqa<K> or window<W>")
    kv_heads = int(match.group(2)) if match.group(2) else heads
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"variant {variant!r}: {heads} heads are not a multiple of {kv_heads}")
    window = (int(match.group(3)), 0) if match.group(3) else None
    return {"kv_heads": kv_heads, "local_window": window}


def _load_mea():
    """memory_efficient_attention's JAX function, without its package __init__ (torch)."""
    import importlib.util
    spec = importlib.util.find_spec("memory_efficient_attention")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "attention_jax.py")
    module_spec = importlib.util.spec_from_file_location("_mea_attention_jax", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.efficient_dot_product_attention


def unavailable_reason(implementation: str, dtype: str, head_dim: int, machine: dict,
                       variant: str = "mha", causal: bool = False, heads: int = 1):
    """Why an implementation cannot run on `machine` (None if it can); starts no backend."""
    import jax.numpy as jnp
    from tfx_jax.attention_cudnn import cudnn_unsupported_reason
    shape = parse_variant(variant, heads)
    if implementation == "cudnn":
        return cudnn_unsupported_reason(
            jnp.dtype(dtype), head_dim,
            has_mask=False, dropout_rate=0.0, platform=machine["platform"],
            compute_capability=machine["compute_capability"], causal=causal,
            local_window=shape["local_window"])
    if implementation == "mea":
        if shape["kv_heads"] != heads or shape["local_window"] is not None or causal:
            return "mea is measured for non-causal multi-head attention only"
        if _load_mea() is None:
            return "package memory-efficient-attention is not installed"
    return None


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                   "MemoryError", "OOM"))


def measure(cfg: dict, *, time_it: bool, memory_limit_bytes: float) -> dict:
    """Compiles (and, if time_it, runs) one configuration in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import tfx_jax

    b, n, h, t = cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["length"]
    dtype = jnp.dtype(cfg["dtype"])
    rec = {"status": "ok"}
    blocks = {k: cfg[k] for k in ("block_q", "block_kv") if cfg.get(k)}
    shape = parse_variant(cfg.get("variant", "mha"), n)
    kv_heads, window = shape["kv_heads"], shape["local_window"]
    impl = cfg["implementation"]

    context = cfg.get("context", 1)
    sharding = None
    if context > 1:  # the length split over `context` devices; numbers per device
        from jax.sharding import NamedSharding, PartitionSpec
        mesh = jax.make_mesh((context,), ("context",), devices=jax.devices()[:context],
                             axis_types=(jax.sharding.AxisType.Auto,))
        sharding = NamedSharding(mesh, PartitionSpec(None, "context"))

    def tfx_attention(q, k, v, implementation=impl):
        return tfx_jax.dot_product_attention(q, k, v, causal=cfg["causal"],
                                             local_window=window,
                                             implementation=implementation, **blocks)

    def attention(q, k, v):
        if context > 1:
            return tfx_jax.context_parallel_attention(
                q, k, v, mesh=mesh, strategy=impl, causal=cfg["causal"], local_window=window,
                **blocks)
        if impl == "jax_nn_xla":
            return jax.nn.dot_product_attention(q, k, v, is_causal=cfg["causal"],
                                                local_window_size=window, implementation="xla")
        if impl == "mea":
            return _load_mea()(q, k, v)
        return tfx_attention(q, k, v)

    def forward_backward(q, k, v, cotangent):
        _, vjp = jax.vjp(attention, q, k, v)
        return vjp(cotangent)

    q_shape, kv_shape = (b, t, n, h), (b, t, kv_heads, h)
    shapes = (q_shape, kv_shape, kv_shape, q_shape)[:3 if cfg["pass"] == "forward" else 4]
    if time_it or impl == "splash":
        keys = jax.random.split(jax.random.key(0), 4)
        args = [jax.device_put(jax.random.normal(key, s, dtype), sharding)
                for key, s in zip(keys, shapes)]
    else:  # compile only: no arrays (a long sequence need not fit the host)
        args = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
    fn = attention if cfg["pass"] == "forward" else forward_backward
    # Q, output, K, V (per device)
    rec["floor_bytes"] = 2 * int(np.prod(q_shape) + np.prod(kv_shape)) * dtype.itemsize // context
    if impl == "auto":
        rec["auto_picked"] = tfx_jax.attention.select_implementation(
            args[0], args[1], causal=cfg["causal"], local_window=window)
    if impl == "splash" and jax.devices()[0].platform != "tpu":
        return _check_splash_in_interpret_mode(cfg, args[:3], tfx_attention, rec)
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        rec["status"] = "oom (compile)" if _is_oom(e) else f"compile error: {_short(e)}"
        return rec
    analysis = compiled.memory_analysis()
    rec["temp_bytes"] = int(analysis.temp_size_in_bytes)
    rec["argument_bytes"] = int(analysis.argument_size_in_bytes)
    rec["output_bytes"] = int(analysis.output_size_in_bytes)
    if not time_it:
        return rec
    if cfg.get("time_max_length") and t > cfg["time_max_length"]:
        rec["status"] = "compiled only (not timed)"
        return rec
    needed = max(rec["temp_bytes"], cfg.get("known_temp_bytes") or 0)
    needed += rec["argument_bytes"] + rec["output_bytes"]
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not memory_limit_bytes and stats and stats.get("bytes_limit"):
        memory_limit_bytes = stats["bytes_limit"]
    if memory_limit_bytes and needed > memory_limit_bytes:
        rec["status"] = (f"skipped: needs {needed / 2**30:.1f} GiB > limit "
                         f"{memory_limit_bytes / 2**30:.1f} GiB")
        return rec
    try:
        for _ in range(cfg["warmup"]):
            jax.block_until_ready(compiled(*args))
        times = []
        spent = 0.0
        while len(times) < max(1, cfg["repeats"]) and (not times or spent < cfg["time_budget_s"]):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
            spent += times[-1]
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        rec["status"] = "oom" if _is_oom(e) else f"run error: {_short(e)}"
        return rec
    rec["times_s"] = times
    rec["median_s"] = statistics.median(times)
    rec["tflops"] = count_flops(b, n, h, t, t, cfg["causal"], cfg["pass"],
                                window=window) / rec["median_s"] / 1e12
    if stats is not None and device.platform != "cpu" and cfg.get("isolated", True):
        # In-process (--isolate=false) the peak never resets: not this config's.
        rec["peak_bytes"] = int(device.memory_stats()["peak_bytes_in_use"])
    return rec


def _check_splash_in_interpret_mode(cfg, args, tfx_attention, rec) -> dict:
    """Splash off a TPU: forward in Pallas interpret mode vs dense; not timed."""
    import jax
    import numpy as np
    from jax.experimental.pallas import tpu as pltpu
    if cfg["length"] > cfg.get("splash_interpret_max_length", 512):
        rec["status"] = "skipped: splash off a TPU is checked (interpret mode) at short lengths"
        return rec
    try:
        with pltpu.force_tpu_interpret_mode():
            got = jax.jit(tfx_attention)(*args)
        expected = jax.jit(lambda q, k, v: tfx_attention(q, k, v, "dense"))(*args)
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        rec["status"] = f"run error: {_short(e)}"
        return rec
    rec["max_abs_err"] = float(np.max(np.abs(np.asarray(got, np.float32) -
                                             np.asarray(expected, np.float32))))
    rec["status"] = "checked in interpret mode (correctness only, not timed)"
    return rec


def _short(error: BaseException) -> str:
    return re.sub(r"\s+", " ", f"{type(error).__name__}: {error}")[:200]


# ----------------------------------------------------------------------------- subprocesses
def _spawn(argv: list[str], extra_env: dict, timeout: float) -> tuple[int, str, str]:
    env = dict(os.environ, **extra_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__)] + argv
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "", "timeout"
    return done.returncode, done.stdout, done.stderr


def _parse_result(stdout: str):
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def _env_for(platform: str, honest_cpu_memory: bool) -> dict:
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    flags_now = os.environ.get("XLA_FLAGS", "")
    devices = max(int(c) for c in FLAGS.context)
    if platform in ("cpu", "") and devices > 1 and "device_count" not in flags_now:
        flags_now = f"{flags_now} --xla_force_host_platform_device_count={devices}"
    if platform == "cpu" and honest_cpu_memory:
        flags_now = f"{flags_now} {CPU_HONEST_MEMORY_FLAG}"
    if flags_now.strip():
        env["XLA_FLAGS"] = flags_now.strip()
    return env


def measure_isolated(cfg: dict, platform: str, memory_limit_bytes: float) -> dict:
    """Runs `measure` in subprocesses; a crash or kill becomes a status."""
    def run(mode_cfg, honest, time_it):
        payload = dict(mode_cfg, time_it=time_it, memory_limit_bytes=memory_limit_bytes)
        rc, out, err = _spawn([f"--worker_config={json.dumps(payload)}"],
                              _env_for(platform, honest), FLAGS.config_timeout_s)
        rec = _parse_result(out)
        if rec is not None:
            return rec
        if rc == -1:
            return {"status": f"timeout after {FLAGS.config_timeout_s} s"}
        if rc in (-9, 137) or _is_oom(Exception(err)):
            return {"status": f"oom (process killed, rc={rc})"}
        return {"status": f"crashed rc={rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"}

    if platform != "cpu":
        return run(cfg, honest=False, time_it=True)
    memory = run(cfg, honest=True, time_it=False)
    if memory["status"] != "ok":
        return memory
    if cfg.get("time_max_length") and cfg["length"] > cfg["time_max_length"]:
        return dict(memory, status="compiled only (not timed)")
    timed = run(dict(cfg, known_temp_bytes=memory["temp_bytes"]), honest=False, time_it=True)
    timed["temp_bytes"] = memory["temp_bytes"]  # the honest (YNN-off) figure
    timed["floor_bytes"] = memory["floor_bytes"]
    return timed


# ----------------------------------------------------------------------------- output
COLUMNS = ["implementation", "context", "variant", "pass", "length", "status", "temp_mib",
           "peak_mib", "floor_mib", "device_mib", "median_ms", "tflops", "max_abs_err"]


def _row(rec: dict) -> dict:
    def mib(key):
        return round(rec[key] / MIB, 2) if rec.get(key) is not None else None
    return {
        "implementation": rec["implementation"], "context": rec.get("context", 1),
        "variant": rec.get("variant", "mha"), "pass": rec["pass"], "length": rec["length"],
        "status": rec["status"], "temp_mib": mib("temp_bytes"), "peak_mib": mib("peak_bytes"),
        "floor_mib": mib("floor_bytes"),
        "device_mib": (round(device_bytes(rec) / MIB, 2) if device_bytes(rec) is not None
                       else None),
        "median_ms": round(rec["median_s"] * 1e3, 3) if rec.get("median_s") else None,
        "tflops": round(rec["tflops"], 5) if rec.get("tflops") else None,
        "max_abs_err": (f"{rec['max_abs_err']:.2e}" if rec.get("max_abs_err") is not None
                        else None),
    }


def device_bytes(rec: dict):
    """Per-device memory the configuration needs: temporaries + inputs + outputs."""
    if rec.get("temp_bytes") is None or rec.get("argument_bytes") is None:
        return None
    return rec["temp_bytes"] + rec["argument_bytes"] + rec.get("output_bytes", 0)


def longest_fitting(records: list[dict], budget_bytes: float) -> list[dict]:
    """Per (implementation, context, variant, pass): the longest measured T whose
    per-device memory fits the budget, and the next T measured (which did not)."""
    groups = {}
    for r in records:
        key = (r["implementation"], r.get("context", 1), r.get("variant", "mha"), r["pass"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (impl, context, variant, pass_name), recs in sorted(groups.items(),
                                                          key=lambda kv: (kv[0][3], kv[0][1])):
        sized = sorted((r["length"], device_bytes(r)) for r in recs
                       if device_bytes(r) is not None)
        fits = [t for t, needed in sized if needed <= budget_bytes]
        over = [t for t, needed in sized if needed > budget_bytes]
        rows.append({"implementation": impl, "context": context, "variant": variant,
                     "pass": pass_name, "budget_mib": round(budget_bytes / MIB, 1),
                     "longest_fitting_length": max(fits) if fits else None,
                     "first_over_budget": min(over) if over else None})
    return rows


def _progress_line(rec: dict) -> str:
    row = _row(rec)
    return "  ".join(f"{c}={row[c]}" for c in COLUMNS if row[c] is not None)


def format_table(records: list[dict], status_width: int = 60) -> str:
    """Fixed-width text table (long statuses cut to status_width; JSON has them whole)."""
    rows = [_row(r) for r in records]
    for r in rows:
        r["status"] = r["status"][:status_width]
    cells = [COLUMNS] + [["" if r[c] is None else str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_longest(rows: list[dict]) -> str:
    """Table of the longest T within the per-device budget, per device count."""
    cols = ["implementation", "context", "variant", "pass", "budget_mib",
            "longest_fitting_length", "first_over_budget"]
    cells = [cols] + [["" if r[c] is None else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path: str, records: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(_row(r) for r in records)


def plot(path: str, records: list[dict], meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(13, 5.2))
    memory_key = "peak_bytes" if meta["machine"]["platform"] != "cpu" else "temp_bytes"
    def label_of(r):
        variant, context = r.get("variant", "mha"), r.get("context", 1)
        return (r["implementation"] + ("" if context == 1 else f" x{context} devices") +
                ("" if variant == "mha" else f" {variant}"))
    series = sorted({(label_of(r), r["pass"]) for r in records})
    implementations = sorted({impl for impl, _ in series})
    colors = {impl: f"C{i}" for i, impl in enumerate(implementations)}
    markers = {"forward": "o", "forward_backward": "s"}
    for impl, pass_name in series:
        recs = sorted((r for r in records if (label_of(r), r["pass"]) == (impl, pass_name)),
                      key=lambda r: r["length"])
        label = f"{impl} {pass_name.replace('_', '+')}"
        failed = [r for r in recs if r["status"] != "ok" and not r["status"].startswith(
            ("compiled only", "checked"))]
        if failed:
            label += f" ({failed[0]['status'].split(':')[0].split(' (')[0]} from T={failed[0]['length']})"
        style = dict(marker=markers.get(pass_name, "^"), color=colors[impl],
                     linestyle="-" if pass_name == "forward_backward" else "--")
        ran = [r for r in recs if r["status"] == "ok" or r["status"].startswith("compiled only")]
        mem = [(r["length"], r[memory_key] / MIB) for r in ran if r.get(memory_key)]
        tim = [(r["length"], r["median_s"]) for r in ran if r.get("median_s")]
        if mem:
            ax_mem.plot(*zip(*mem), label=label, **style)
        if tim:
            ax_time.plot(*zip(*tim), label=label, **style)
        # Not run (too big), but the compiler said how much it would need: hollow markers.
        would_need = [(r["length"], r["temp_bytes"] / MIB) for r in failed if r.get("temp_bytes")]
        if would_need:
            ax_mem.plot(*zip(*would_need), linestyle="none", marker=style["marker"],
                        markerfacecolor="none", color=colors[impl])
    if any(r["status"] != "ok" and r.get("temp_bytes") for r in records):
        ax_mem.plot([], [], linestyle="none", marker="s", markerfacecolor="none", color="k",
                    label="hollow: not run, compiled size")
    lengths = sorted({r["length"] for r in records})
    floors = sorted({(r["length"], r["floor_bytes"] / MIB) for r in records
                     if r.get("floor_bytes") and r.get("context", 1) == 1})  # one device's
    if floors:
        ax_mem.plot(*zip(*floors), color="grey", linewidth=3, alpha=0.4,
                    label="floor: Q, K, V, output")
    for ax in (ax_mem, ax_time):
        _reference_slopes(ax, lengths)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (= S)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    per_device = " per device" if any(r.get("context", 1) > 1 for r in records) else ""
    ax_mem.set_ylabel(("compiled temp memory (MiB)" if memory_key == "temp_bytes"
                       else "peak device memory (MiB)") + per_device)
    ax_time.set_ylabel("median time (s)")
    m, s = meta["machine"], meta["settings"]
    fig.suptitle(f"attention memory/time vs length — {m['platform']} {m['device_kind']}, "
                 f"{m['cpu_count']} CPUs, jax {m['jax']}, {m['date'][:10]}; B={s['batch']}, "
                 f"N={s['heads']}, H={s['head_dim']}, {s['dtype']}"
                 f"{', causal' if s['causal'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reference_slopes(ax, lengths):
    """Dotted T and T^2 guide lines starting just below the data at the shortest length."""
    x0, x1 = lengths[0], lengths[-1]
    ys = [y for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())
          if x == x0 and y > 0]
    if x1 == x0 or not ys:
        return
    y0 = min(ys) / 2
    ax.plot([x0, x1], [y0, y0 * (x1 / x0)], "k:", linewidth=1, label="slope 1 (linear)")
    ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** 2], "k-.", linewidth=1,
            label="slope 2 (quadratic)")


def default_name(machine: dict, settings: dict) -> str:
    device = re.sub(r"[^A-Za-z0-9]+", "-", machine["device_kind"]).strip("-").lower()
    causal = "_causal" if settings["causal"] else ""
    contexts = [int(c) for c in settings.get("context", [1])]
    context = "" if contexts == [1] else "_context" + "-".join(map(str, contexts))
    return (f"attention_memory_{machine['platform']}_{device}_{machine['cpu_count']}cpu_"
            f"{settings['dtype']}{causal}{context}_jax{machine['jax']}_{machine['date'][:10]}")


def _save_partial(out_dir, name, records, machine, settings, commands) -> None:
    """JSON after every configuration, so a run killed by a time limit keeps its rows."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"machine": machine, "settings": settings, "partial": True,
            "commands": commands + [" ".join(sys.argv)]}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)


def write_outputs(out_dir: str, name: str, records: list[dict], meta: dict) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "csv", "png", "txt")}
    table = format_table(records)
    if meta.get("longest_fitting"):
        table += "\n\n" + format_longest(meta["longest_fitting"])
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    write_csv(paths["csv"], records)
    with open(paths["txt"], "w") as f:
        f.write(table + "\n")
    plot(paths["png"], records, meta)
    return paths


# ----------------------------------------------------------------------------- main
def _settings() -> dict:
    return {"batch": FLAGS.batch, "heads": FLAGS.heads, "head_dim": FLAGS.head_dim,
            "dtype": FLAGS.dtype, "causal": FLAGS.causal, "block_q": FLAGS.block_q,
            "block_kv": FLAGS.block_kv, "warmup": FLAGS.warmup, "repeats": FLAGS.repeats,
            "time_budget_s": FLAGS.time_budget_s, "time_max_length": FLAGS.time_max_length,
            "splash_interpret_max_length": FLAGS.splash_interpret_max_length,
            "context": [int(c) for c in FLAGS.context],
            "device_budget_mib": FLAGS.device_budget_mib}


def _validate_flags() -> tuple[list[int], list[str]]:
    try:
        lengths = [int(x) for x in FLAGS.lengths]
    except ValueError:
        raise app.UsageError(f"--lengths must be integers, got {FLAGS.lengths}") from None
    if not lengths or min(lengths) < 1:
        raise app.UsageError(f"--lengths must be positive, got {lengths}")
    from tfx_jax.attention import IMPLEMENTATIONS
    known = IMPLEMENTATIONS + EXTERNAL_IMPLEMENTATIONS
    for impl in FLAGS.implementations:
        if impl not in known:
            raise app.UsageError(f"--implementations: {impl!r} is not one of {known}")
    for variant in FLAGS.variants:
        try:
            parse_variant(variant, FLAGS.heads)
        except ValueError as e:
            raise app.UsageError(f"--variants: {e}") from None
    for p in FLAGS.passes:
        if p not in PASSES:
            raise app.UsageError(f"--passes: {p!r} is not one of {PASSES}")
    try:
        contexts = [int(c) for c in FLAGS.context]
    except ValueError:
        raise app.UsageError(f"--context must be integers, got {FLAGS.context}") from None
    if min(contexts) < 1:
        raise app.UsageError(f"--context sizes must be >= 1, got {contexts}")
    from tfx_jax.context_parallel import STRATEGIES
    for strategy in FLAGS.context_strategies:
        if strategy not in STRATEGIES:
            raise app.UsageError(f"--context_strategies: {strategy!r} is not one of {STRATEGIES}")
    for length in lengths:
        for c in contexts:
            if c > 1 and length % (2 * c if FLAGS.causal else c):
                raise app.UsageError(f"--lengths: {length} does not split over --context={c}")
    return lengths, list(FLAGS.passes)


def run_benchmark() -> dict:
    lengths, passes = _validate_flags()
    settings = _settings()
    if FLAGS.isolate:
        rc, out, err = _spawn(["--worker_info"], _env_for("", False), 600)
        machine = _parse_result(out)
        if machine is None:
            raise RuntimeError(f"could not start JAX in a subprocess (rc={rc}): {err[-2000:]}")
    else:
        machine = machine_info()
    name = FLAGS.out_name or default_name(machine, settings)
    records: list[dict] = []
    commands: list[str] = []
    json_path = os.path.join(FLAGS.out_dir, f"{name}.json")
    if FLAGS.append and os.path.exists(json_path):
        with open(json_path) as f:
            previous = json.load(f)
        if previous["meta"]["settings"]["dtype"] != settings["dtype"] or (
                previous["meta"]["settings"]["causal"] != settings["causal"]):
            raise app.UsageError(f"--append: {json_path} was measured with other settings "
                                 f"{previous['meta']['settings']}")
        records = previous["records"]
        commands = previous["meta"].get("commands", [])
    limit = FLAGS.memory_limit_gib * 2 ** 30
    if not limit and machine["platform"] == "cpu":
        limit = 0.6 * _host_available_bytes()
    contexts = [int(c) for c in FLAGS.context]
    series = [(i, v, 1) for v in FLAGS.variants for i in FLAGS.implementations if 1 in contexts]
    series += [(s, v, c) for v in FLAGS.variants for c in contexts if c > 1
               for s in FLAGS.context_strategies]
    for impl, variant, context in series:
        reason = None if context > 1 else unavailable_reason(
            impl, FLAGS.dtype, FLAGS.head_dim, machine, variant, FLAGS.causal, FLAGS.heads)
        if context > machine["device_count"]:
            reason = f"needs {context} devices, the machine has {machine['device_count']}"
        for length in lengths:
            for pass_name in passes:
                if impl == "splash" and machine["platform"] != "tpu" and (
                        pass_name != "forward"):
                    continue  # interpret mode: a forward correctness check only
                cfg = dict(settings, implementation=impl, variant=variant, length=length,
                           context=context, **{"pass": pass_name})
                if reason is not None:
                    rec = {"status": f"unavailable: {reason}"}
                elif FLAGS.isolate:
                    rec = measure_isolated(cfg, machine["platform"], limit)
                else:
                    rec = measure(dict(cfg, isolated=False), time_it=True,
                                  memory_limit_bytes=limit)
                rec = dict(cfg, **rec)
                records = [r for r in records if (r["implementation"], r.get("context", 1),
                                                  r.get("variant", "mha"), r["pass"],
                                                  r["length"])
                           != (impl, context, variant, pass_name, length)] + [rec]
                print(_progress_line(rec), flush=True)
                _save_partial(FLAGS.out_dir, name, records, machine, settings, commands)
    records.sort(key=lambda r: (r.get("variant", "mha"), r.get("context", 1),
                                r["implementation"], r["pass"], r["length"]))
    meta = {"machine": machine, "settings": settings,
            "flops_convention": "forward 4*B*N*H*attended_pairs; backward 2.5x forward",
            "memory": ("temp_bytes: compiled temp size (CPU: YNN fusion disabled); "
                       "peak_bytes: device peak_bytes_in_use (GPU/TPU); "
                       "floor_bytes: Q, K, V and output"),
            "commands": commands + [" ".join(sys.argv)]}
    if FLAGS.device_budget_mib:
        meta["longest_fitting"] = longest_fitting(records, FLAGS.device_budget_mib * MIB)
    paths = write_outputs(FLAGS.out_dir, name, records, meta)
    print(format_table(records))
    if meta.get("longest_fitting"):
        print(format_longest(meta["longest_fitting"]))
    print("wrote", ", ".join(paths.values()))
    return paths


def main(argv):
    del argv
    if FLAGS.worker_info:
        print(RESULT_PREFIX + json.dumps(machine_info()), flush=True)
        return
    if FLAGS.worker_config:
        cfg = json.loads(FLAGS.worker_config)
        rec = measure(cfg, time_it=cfg.pop("time_it"),
                      memory_limit_bytes=cfg.pop("memory_limit_bytes"))
        print(RESULT_PREFIX + json.dumps(rec), flush=True)
        return
    if FLAGS.replot:
        if not FLAGS.out_name:
            raise app.UsageError("--replot needs --out_name (the JSON file's stem)")
        with open(os.path.join(FLAGS.out_dir, f"{FLAGS.out_name}.json")) as f:
            result = json.load(f)
        if FLAGS.device_budget_mib:
            result["meta"]["longest_fitting"] = longest_fitting(result["records"],
                                                                FLAGS.device_budget_mib * MIB)
        write_outputs(FLAGS.out_dir, FLAGS.out_name, result["records"], result["meta"])
        print(format_table(result["records"]))
        return
    run_benchmark()


if __name__ == "__main__":
    app.run(main)
