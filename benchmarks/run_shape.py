"""How much of the project one run of each script touches: the measures of issue 19.

For translate.py, lm.py, vit.py and dalle.py on their built-in data:

* files: the ``tfx_jax`` modules in ``sys.modules`` once the script has imported what it
  needs (its imports, then the run until its first train step is traced);
* frames: the Python frames from the script's ``main`` to the dense attention weights of
  that first traced train step, counted by a spy that stands in for
  ``tfx_jax.attention._dense_attention`` and stops the run (project frames: files under
  ``tfx_jax/`` or ``experiments/``).

Each script runs in its own process, two train steps at most, on the CPU.

Usage: python benchmarks/run_shape.py [--out=benchmarks/results/run_shape.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"translate": [], "lm": ["--config.warmup_steps=1"], "vit": [],
           "dalle": ["--config.warmup_steps=1"]}

CHILD = r'''
import json, os, runpy, sys, traceback
script, workdir, out, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
sys.argv = [script, f"--workdir={workdir}", "--config.num_train_steps=2",
            "--config.progress_bar=False", *extra]
from tfx_jax import attention
real = attention._dense_attention

def spy(*args, **kwargs):
    stack = traceback.extract_stack()[:-1]
    if not any(f.name == "train_step" for f in stack):
        return real(*args, **kwargs)
    start = next(i for i, f in enumerate(stack) if f.name == "main" and "experiments" in f.filename)
    frames = stack[start:] + [traceback.FrameSummary(attention.__file__, 0, "_dense_attention")]
    ours = [f"{os.path.relpath(f.filename, os.getcwd())}:{f.name}" for f in frames
            if "/tfx_jax/" in f.filename or "experiments/" in f.filename]
    files = sorted(m for m in sys.modules if m.startswith("tfx_jax")
                   and getattr(sys.modules[m], "__file__", None))
    with open(out, "w") as f:
        json.dump({"files": files, "frames": len(frames), "project_frames": ours}, f)
    os._exit(0)

attention._dense_attention = spy
runpy.run_path(script, run_name="__main__")
'''


def measure(name: str, extra: list) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        done = subprocess.run(
            [sys.executable, "-c", CHILD, f"experiments/{name}.py", os.path.join(tmp, "w"),
             out, json.dumps(extra)], cwd=ROOT, capture_output=True, text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu",
                 "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})
        if not os.path.exists(out):
            raise RuntimeError(f"{name}: the run ended before its first train step:\n"
                               f"{done.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "run_shape.json"))
    args = parser.parse_args()
    results = {name: measure(name, extra) for name, extra in SCRIPTS.items()}
    print(f"{'script':<10} {'files':>5} {'frames':>6} {'project frames':>14}")
    for name, r in results.items():
        print(f"{name:<10} {len(r['files']):>5} {r['frames']:>6} {len(r['project_frames']):>14}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
