"""experiments/attention_memory.py runs end to end on tiny sizes and writes its files."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest

from tests.scripts import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "attention_memory.py")


def _load_script():
    """The script as a module (see tests/scripts.py for its absl flags)."""
    return load_script(SCRIPT, "attention_memory_script")


def test_flop_convention():
    bench = _load_script()
    # 4 * B * N * H * T * S forward; causal counts the T(T+1)/2 attended pairs.
    assert bench.count_flops(2, 3, 8, 16, 16, False, "forward") == 4 * 2 * 3 * 8 * 16 * 16
    assert bench.count_flops(1, 1, 1, 4, 4, True, "forward") == 4 * 10
    assert bench.count_flops(1, 1, 1, 6, 4, True, "forward") == 4 * (10 + 2 * 4)
    assert bench.count_flops(1, 1, 1, 4, 4, False, "forward_backward") == 3.5 * 4 * 16


def _run(tmp_path, *extra):
    out_dir = tmp_path / "results"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, SCRIPT, "--lengths=64,128", "--repeats=2", "--warmup=0",
         f"--out_dir={out_dir}", "--out_name=tiny", *extra],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out_dir, done.stdout


def _check_outputs(out_dir, stdout, implementations, lengths, passes):
    for ext in ("json", "csv", "png", "txt"):
        assert (out_dir / f"tiny.{ext}").stat().st_size > 0, ext
    assert (out_dir / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out_dir / "tiny.json").read_text())
    machine = result["meta"]["machine"]
    assert machine["platform"] == "cpu" and machine["jax"] and machine["cpu_count"] >= 1
    records = {(r["implementation"], r["pass"], r["length"]): r for r in result["records"]}
    assert set(records) == {(i, p, n) for i in implementations for p in passes for n in lengths}
    with open(out_dir / "tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    for row in rows:
        if row["implementation"] == "cudnn":
            assert row["status"].startswith("unavailable: cuDNN attention needs an NVIDIA GPU")
            continue
        assert row["status"] == "ok", row
        assert float(row["temp_mib"]) > 0 and float(row["floor_mib"]) > 0
        assert float(row["median_ms"]) > 0 and float(row["tflops"]) > 0
    assert "implementation" in stdout and "tiny.png" in stdout
    return records


@pytest.mark.slow
def test_benchmark_in_process_writes_table_json_csv_png(tmp_path):
    out_dir, stdout = _run(tmp_path, "--implementations=dense,chunked,cudnn", "--isolate=false")
    records = _check_outputs(out_dir, stdout, ["dense", "chunked", "cudnn"], [64, 128],
                             ["forward", "forward_backward"])
    # Forward+backward needs more temporary memory than forward alone.
    for impl in ("dense", "chunked"):
        assert (records[(impl, "forward_backward", 128)]["temp_bytes"]
                > records[(impl, "forward", 128)]["temp_bytes"])
    # --replot redraws the files from the JSON without measuring.
    (out_dir / "tiny.png").unlink()
    done = subprocess.run([sys.executable, SCRIPT, "--replot", f"--out_dir={out_dir}",
                           "--out_name=tiny"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out_dir / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_benchmark_isolated_subprocess_appends_to_earlier_results(tmp_path):
    # The default path: subprocesses per configuration (on CPU one compiles with
    # the honest-memory flag, one times). --append keeps earlier records.
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    earlier = {"meta": {"settings": {"dtype": "float32", "causal": False}},
               "records": [{"implementation": "dense", "pass": "forward", "length": 32,
                            "status": "oom"}]}
    (out_dir / "tiny.json").write_text(json.dumps(earlier))
    out_dir, stdout = _run(tmp_path, "--implementations=chunked", "--passes=forward",
                           "--lengths=64", "--append")
    result = json.loads((out_dir / "tiny.json").read_text())
    status = {(r["implementation"], r["length"]): r for r in result["records"]}
    assert status[("dense", 32)]["status"] == "oom"
    chunked = status[("chunked", 64)]
    assert chunked["status"] == "ok" and chunked["temp_bytes"] > 0 and chunked["median_s"] > 0
    assert "chunked" in stdout


def test_too_big_configuration_is_skipped_not_run():
    bench = _load_script()
    cfg = dict(implementation="dense", length=32, batch=1, heads=1, head_dim=8,
               dtype="float32", causal=False, warmup=1, repeats=1, time_budget_s=1.0,
               **{"pass": "forward"})
    rec = bench.measure(cfg, time_it=True, memory_limit_bytes=16)
    assert rec["status"].startswith("skipped: needs") and "median_s" not in rec
    assert rec["temp_bytes"] >= 0 and rec["floor_bytes"] == 4 * 32 * 8 * 4


def _flags_of(script_path, module_name):
    module = load_script(script_path, module_name)
    from absl import flags
    return {f.name for f in flags.FLAGS.flags_by_module_dict().get(module_name, ())}, module


@pytest.mark.parametrize("shell_script", ["gpu.sh", "tpu.sh"])
def test_device_benchmark_scripts_parse_and_use_only_defined_flags(shell_script):
    path = os.path.join(REPO, "benchmarks", shell_script)
    done = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = open(path).read()
    # Every --flag the script passes to a Python script is one that script defines.
    text = "\n".join(line for line in text.replace("\\\n", " ").splitlines()
                     if not line.lstrip().startswith("#"))
    flag = r"--([a-z_]+)(?==|\s|\"|$)"
    used = {"attention_memory": set(re.findall(flag, re.search(r'ATTN="(.*?)"', text,
                                                                  re.S).group(1))),
            "throughput": set()}
    for line in text.splitlines():
        if "$ATTN" in line:
            used["attention_memory"].update(re.findall(flag, line))
        if "throughput.py" in line or "TP_EXTRA=" in line:
            used["throughput"].update(re.findall(flag, line.split("TP_EXTRA=")[-1]
                                                 if "TP_EXTRA=" in line else line))
    assert {"lengths", "implementations", "variants", "out_name"} <= used["attention_memory"]
    assert {"dtype", "out_name"} <= used["throughput"]
    defined, bench = _flags_of(SCRIPT, "attention_memory_script")
    assert used["attention_memory"] <= defined, used["attention_memory"] - defined
    for variant in re.findall(r"(?:gqa\d+|window\d+)", text):
        bench.parse_variant(variant, 8)  # the variants it names are valid
    throughput = os.path.join(REPO, "experiments", "throughput.py")
    defined, _ = _flags_of(throughput, "throughput_script")
    assert used["throughput"] <= defined, used["throughput"] - defined
