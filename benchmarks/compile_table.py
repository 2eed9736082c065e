"""The table to read before renting: each model compiled for each accelerator, on a CPU.

For every model (rows) and target (columns) this runs the training script's own
``--compile_topology`` (tfx_jax/train/topology.py: the real TPU compiler from
libtpu, or XLA's GPU compiler without a GPU) on the step that script would run
there, and tries meshes and rematerialisation in order until one fits:

  1. data parallel (the scripts' default mesh), no remat;
  2. FSDP over every chip (``mesh.fsdp`` = chips), no remat;
  3. FSDP over every chip, full remat (``remat_policy=full``);
  4. FSDP over every chip, ``remat_policy=full_nested`` (each attention recomputed
     again at its own backward: less memory, one more attention forward per layer).

The first that fits is the recommendation; its per-chip peak, FLOPs per step,
roofline step time and MFU ceiling are the row. Every model is compiled with
``scan_layers=True`` (one layer compiled once: fast compiles). Batches are
given per chip, so every target runs the same per-chip work.

A second table compiles attention alone (one chip, causal, forward and
backward, 16 heads of 128, bfloat16) at 2k ... 64k tokens with each
implementation the chip offers (splash / cuDNN / chunked): compiles or not, and
the per-chip bytes.

    python benchmarks/compile_table.py                      # TPU targets, this python
    python benchmarks/compile_table.py --gpu_python=/path/to/cuda-venv/bin/python
    python benchmarks/compile_table.py --models=gpt2 --targets=v5e-8 --no_attention

GPU targets need JAX's CUDA plugin (``pip install "jax[cuda12]"``, about 5.5 GB)
in the python given as ``--gpu_python``; without it they are left out. Results
go to ``benchmarks/results/compile_table_<date>.{json,csv,md}``; a run writes
the JSON after every compile, so an interrupted run keeps what it measured.
What a compile-only check cannot tell is in README "Check a run fits before
renting": deviceless GPU compiles do no autotuning, XLA's cost analysis gives
no GPU FLOPs, and a roofline is a bound, not a measurement.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30
LM_CONFIG = "experiments/configs/lm.py"


@dataclasses.dataclass(frozen=True)
class Model:
    """A table row: a training script with flags; ``per_chip`` rows of data per chip."""
    name: str
    script: str
    flags: tuple
    per_chip: int
    batch_unit: str
    hf_config: str = ""  # a CausalLMConfig preset whose config.json the run starts from


LM_SCAN = ("--config.model.scan_layers=True",)
MODELS = {
    "transformer-base": Model(
        "Transformer base (translate :base)", "translate",
        ("--config=experiments/configs/translate.py:base", "--config.model.scan_layers=True"),
        per_chip=32, batch_unit="pairs of 128 + 128 tokens"),
    "vit-b16": Model(
        "ViT-B/16 at 224", "vit",
        ("--config.model.patch_size=16", "--config.model.d_model=768",
         "--config.model.num_heads=12", "--config.model.num_layers=12",
         "--config.model.d_ff=3072", "--config.model.scan_layers=True",
         "--config.model.dtype=bfloat16", "--config.image_size=224",
         "--config.num_classes=1000", "--config.num_epochs=0",
         "--config.num_train_steps=10000"),
        per_chip=64, batch_unit="images"),
    "gpt2": Model(
        "GPT-2 small (lm :gpt2)", "lm", (f"--config={LM_CONFIG}:gpt2", *LM_SCAN),
        per_chip=8, batch_unit="rows of 1024 tokens"),
    "gpt-474m": Model(  # the model of issue 20's side-by-side with MaxText's train_compile
        "GPT-3-style 474M (d 2048 x 8 layers)", "lm",
        (f"--config={LM_CONFIG}:gpt2", *LM_SCAN, "--config.model.num_layers=8",
         "--config.model.d_model=2048", "--config.model.num_heads=16",
         "--config.model.num_kv_heads=16", "--config.model.d_ff=8192",
         "--config.model.position=learned", "--config.model.fused_qkv=True",
         "--config.vocab_size=32768", "--config.max_len=2048",
         "--config.optimizer=adamw"),
        per_chip=8, batch_unit="rows of 2048 tokens"),
    "gpt-1.3b": Model(
        "GPT 1.3B (GPT-3 XL shape)", "lm",
        (f"--config={LM_CONFIG}:gpt2", *LM_SCAN, "--config.model.num_layers=24",
         "--config.model.d_model=2048", "--config.model.num_heads=16",
         "--config.model.num_kv_heads=16", "--config.model.d_ff=8192",
         "--config.model.position=learned", "--config.vocab_size=50304",
         "--config.max_len=2048"),
        per_chip=4, batch_unit="rows of 2048 tokens"),
}


def fine_tuning(title: str, preset: str, mode: str, scan: bool = True) -> Model:
    """A row that fine-tunes ``preset`` (its config.json only) on rows of 2048 tokens."""
    return Model(f"{title}, {'LoRA r8' if mode == 'lora' else 'full'}"
                 + ("" if scan else " (layers unscanned)"), "lm",
                 (*(LM_SCAN if scan else ()), f"--config.finetune={mode}",
                  "--config.max_len=2048"),
                 per_chip=1, batch_unit="rows of 2048 tokens", hf_config=preset)


for mode in ("lora", "full"):
    MODELS[f"llama3.1-8b-{mode}"] = fine_tuning("Llama 3.1 8B", "llama3.1-8b", mode)
    # Gemma 2 alternates sliding and full layers: nn.scan needs identical layers
    MODELS[f"gemma2-2b-{mode}"] = fine_tuning("Gemma 2 2B", "gemma2-2b", mode, scan=False)
RENTING = ("transformer-base", "vit-b16", "gpt2", "gpt-474m", "gpt-1.3b")
FINETUNING = ("llama3.1-8b-lora", "llama3.1-8b-full", "gemma2-2b-lora", "gemma2-2b-full")
TARGETS = ("v5e-8", "v5p-8", "v6e-8", "v5e-256", "h100:8")
FINETUNING_TARGETS = ("v5e-8", "v5p-8", "h100:8")
ATTEMPTS = (("data parallel", ()),
            ("fsdp", ("--config.mesh.data=1", "--config.mesh.fsdp=-1")),
            ("fsdp + full remat", ("--config.mesh.data=1", "--config.mesh.fsdp=-1",
                                   "--config.model.remat_policy=full")),
            ("fsdp + full_nested remat", ("--config.mesh.data=1", "--config.mesh.fsdp=-1",
                                          "--config.model.remat_policy=full_nested")))
ATTENTION_LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536)


def chips(target: str) -> int:
    sys.path.insert(0, ROOT)
    from tfx_jax.train.topology import parse_target
    return parse_target(target).num_devices


def is_gpu(target: str) -> bool:
    return target.lower().startswith(("h100", "h200"))


def hf_checkpoint(preset: str, directory: str) -> str:
    """A directory with only the preset's config.json (what a user downloads first)."""
    sys.path.insert(0, ROOT)
    from tfx_jax.lm import CausalLMConfig
    from tfx_jax.pretrained.hf_decoders import config_to_hf
    path = os.path.join(directory, preset)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(CausalLMConfig.preset(preset)), f)
    return path


def compile_model(python: str, model: Model, target: str, workdir: str,
                  checkpoints: str) -> dict:
    """Runs the model's script with --compile_topology, attempt after attempt."""
    batch = model.per_chip * chips(target)
    flags = [*model.flags, f"--config.batch_size={batch}", "--config.progress_bar=False"]
    if model.script != "vit":
        flags.append(f"--config.eval_batch_size={batch}")
    if model.hf_config:
        flags.append(f"--config.init_from={hf_checkpoint(model.hf_config, checkpoints)}")
    tried = []
    for attempt, extra in ATTEMPTS:
        run_dir = os.path.join(workdir, attempt.replace(" ", "_").replace("+", ""))
        start = time.perf_counter()
        done = subprocess.run(
            [python, os.path.join(ROOT, "experiments", f"{model.script}.py"),
             f"--workdir={run_dir}", f"--compile_topology={target}", *flags, *extra],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT,
                                                 "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
        seconds = time.perf_counter() - start
        reports = [os.path.join(run_dir, "compile", n)
                   for n in (os.listdir(os.path.join(run_dir, "compile"))
                             if os.path.isdir(os.path.join(run_dir, "compile")) else [])]
        if done.returncode not in (0, 2) or not reports:
            error = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["?"]
            tried.append({"attempt": attempt, "fits": None, "error": error[0][:300],
                          "wall_s": round(seconds, 1)})
            if done.returncode == 2:  # refused by a check before compiling: no later try helps
                break
            continue
        with open(reports[0]) as f:
            report = json.load(f)
        tried.append({"attempt": attempt, "fits": report["fits"], "wall_s": round(seconds, 1),
                      "report": report})
        if report["fits"]:
            break
    return {"model": model.name, "target": target, "global_batch": batch,
            "batch_unit": model.batch_unit, "attempts": tried}


def attention_rows(target: str) -> list[dict]:
    """Attention alone on one chip of ``target``: per implementation and length, whether
    it compiles and its bytes (forward + backward, causal, 16 x 128 heads, bfloat16)."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import tfx_jax as tfx
    from tfx_jax.train import topology
    from tfx_jax.train.perf import compiled_memory
    parsed = topology.parse_target(target)
    device = topology.target_devices(parsed)[0]
    mesh = jax.sharding.Mesh(np.array([device]), ("data",))
    placed = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    implementations = ("cudnn", "chunked") if is_gpu(target) else ("splash", "chunked")
    rows = []
    for implementation in implementations:
        for length in ATTENTION_LENGTHS:
            spec = jax.ShapeDtypeStruct((1, length, 16, 128), jnp.bfloat16, sharding=placed)

            def loss(q, k, v):
                return tfx.dot_product_attention(
                    q, k, v, causal=True, implementation=implementation).astype(
                        jnp.float32).sum()

            start = time.perf_counter()
            row = {"target": target, "implementation": implementation, "length": length}
            try:
                with jax.set_mesh(mesh):
                    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
                        spec, spec, spec).compile()
                memory = compiled_memory(compiled)
                row.update(compiles=True, total_bytes=memory["total_bytes"],
                           temp_bytes=memory["temp_bytes"])
            except Exception as error:  # noqa: BLE001 (the compiler's refusal is the result)
                row.update(compiles=False, error=str(error).splitlines()[0][:200])
            row["compile_s"] = round(time.perf_counter() - start, 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def best(row: dict) -> dict | None:
    fitting = [a for a in row["attempts"] if a.get("fits")]
    return fitting[0] if fitting else None


def _gib(value) -> str:
    return "" if value is None else f"{value / GiB:.2f}"


def model_table(rows: list[dict]) -> list[list[str]]:
    out = [["model", "target", "global batch", "recommended", "peak GiB/chip", "HBM GiB/chip",
            "TFLOPs/chip/step", "roofline ms", "MFU ceiling", "compile s"]]
    for row in rows:
        chosen = best(row)
        last = row["attempts"][-1] if row["attempts"] else {}
        report = (chosen or last).get("report")
        if report is None:
            out.append([row["model"], row["target"], str(row["global_batch"]),
                        f"error: {last.get('error', '')}", "", "", "", "", "", ""])
            continue
        train = report["steps"]["train"]
        flops = max(train.get("flops_per_device", 0.0),
                    (report.get("model_flops_per_step") or 0.0) / report["chips"])
        roofline, mfu = report.get("roofline_step_s"), report.get("mfu_ceiling")
        out.append([row["model"], row["target"], str(row["global_batch"]),
                    chosen["attempt"] if chosen else "does not fit",
                    _gib(report["peak_bytes_per_chip"]), _gib(report["hbm_bytes_per_chip"]),
                    f"{flops / 1e12:.2f}",
                    "" if roofline is None else f"{roofline * 1e3:.1f}"
                    + ("*" if report.get("cost_counts_one_layer") else ""),
                    "n/a*" if report.get("cost_counts_one_layer") else
                    "" if mfu is None else f"{mfu:.0%}",
                    f"{report['compile_s']:.0f}"])
    return out


def attention_table(rows: list[dict]) -> list[list[str]]:
    out = [["target", "implementation"] + [f"T={n // 1024}k" for n in ATTENTION_LENGTHS]]
    keys = sorted({(r["target"], r["implementation"]) for r in rows})
    for target, implementation in keys:
        cells = []
        for length in ATTENTION_LENGTHS:
            found = [r for r in rows if (r["target"], r["implementation"], r["length"])
                     == (target, implementation, length)]
            cells.append("" if not found else (f"{found[0]['total_bytes'] / 2 ** 20:.0f} MiB"
                                               if found[0]["compiles"] else "no"))
        out.append([target, implementation] + cells)
    return out


def markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in table[1:]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(RENTING + FINETUNING),
                        help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--targets", default="",
                        help=f"default: {', '.join(TARGETS)} (fine-tuning rows: "
                             f"{', '.join(FINETUNING_TARGETS)})")
    parser.add_argument("--gpu_python", default=sys.executable,
                        help="a python with JAX's CUDA plugin, for the GPU targets")
    parser.add_argument("--no_attention", action="store_true")
    parser.add_argument("--attention_only", default="", help=argparse.SUPPRESS)
    parser.add_argument("--render", default="",
                        help="comma-separated JSON files of earlier runs: write their rows "
                             "as one table (no compiling)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--name", default="compile_table",
                        help="file stem in --out (the date is appended)")
    args = parser.parse_args()
    if args.attention_only:  # the child of a GPU run (it needs the CUDA python)
        print(json.dumps(attention_rows(args.attention_only)))
        return 0
    unknown = [m for m in args.models.split(",") if m not in MODELS and not args.render]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    has_cuda = subprocess.run([args.gpu_python, "-c", "import jax_cuda12_plugin"],
                              capture_output=True).returncode == 0
    date = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{args.name}_{date}")
    results = {"date": date, "command": " ".join(sys.argv), "models": [], "attention": []}

    def save():
        with open(stem + ".json", "w") as f:
            json.dump(results, f, indent=1)

    if args.render:  # a later file's row of the same model and target replaces an earlier
        rows, attention = {}, {}
        for path in args.render.split(","):
            with open(path) as f:
                earlier = json.load(f)
            rows.update({(r["model"], r["target"]): r for r in earlier["models"]})
            attention.update({(r["target"], r["implementation"], r["length"]): r
                              for r in earlier["attention"]})
        results["models"], results["attention"] = list(rows.values()), list(attention.values())
        args.models, args.no_attention = "", True
    scratch = tempfile.mkdtemp(prefix="compile_table_")
    try:
        for key in filter(None, args.models.split(",")):
            model = MODELS[key]
            targets = (args.targets.split(",") if args.targets else
                       FINETUNING_TARGETS if model.hf_config else TARGETS)
            for target in targets:
                if is_gpu(target) and not has_cuda:
                    print(f"skipping {target}: {args.gpu_python} has no JAX CUDA plugin")
                    continue
                python = args.gpu_python if is_gpu(target) else sys.executable
                row = compile_model(python, model, target,
                                    os.path.join(scratch, key, target.replace(":", "_")),
                                    os.path.join(scratch, "checkpoints"))
                results["models"].append(row)
                print(markdown(model_table([row])).splitlines()[-1], flush=True)
                save()
        if not args.no_attention:
            for target in ("v5e-8", "h100:8"):
                if is_gpu(target) and not has_cuda:
                    continue
                python = args.gpu_python if is_gpu(target) else sys.executable
                done = subprocess.run([python, os.path.abspath(__file__),
                                       f"--attention_only={target}"], capture_output=True,
                                      text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
                lines = done.stdout.strip().splitlines()
                results["attention"] += json.loads(lines[-1]) if done.returncode == 0 else []
                save()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tables = [("Models (*: XLA's FLOPs are under 80% of the model's, as when it counts a "
               "scanned layer stack's body once: the roofline is the model's FLOPs at the "
               "chip's peak and gives no MFU ceiling)",
               model_table(results["models"]))]
    if results["attention"]:
        tables.append(("Attention alone, one chip, fwd+bwd, causal, 16 x 128 heads, bf16",
                       attention_table(results["attention"])))
    text = "\n\n".join(f"### {title}\n\n{markdown(table)}" for title, table in tables)
    print("\n" + text)
    with open(stem + ".md", "w") as f:
        f.write(f"Written by `{results['command']}` on {date}.\n\n{text}\n")
    with open(stem + ".csv", "w", newline="") as f:
        csv.writer(f).writerows(tables[0][1])
    save()
    print(f"wrote {stem}.json, .csv, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
