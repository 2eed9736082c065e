"""A real SIGTERM to a training process: checkpoint at the current step, exit, resume.

The child process runs the toy task the way an experiment script does
(``except Preempted: sys.exit(exc.exit_code)``); its batches are paced so the
signal arrives mid-run. The rerun, in this process, must end with exactly the
parameters of an uninterrupted run.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import train_toy as toy
from tfx_jax import train as tr

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
NUM_STEPS = 40

CHILD = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(TESTS_DIR)!r})
    import train_toy as toy
    from tfx_jax import train as tr

    workdir, cache = sys.argv[1], sys.argv[2]
    toy.use_compilation_cache(cache)
    config = toy.toy_config(num_train_steps={NUM_STEPS}, checkpoint_every_steps=0)
    try:
        tr.train(config, workdir, toy.make_task(),
                 toy.make_train_iter(config.batch_size, seconds_per_batch=0.1))
    except tr.Preempted as exc:
        sys.exit(exc.exit_code)
""")


def wait_for_train_step(workdir: Path, step: int, process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    path = workdir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"child exited early:\n{process.communicate()[1]}")
        if path.exists() and any(r["step"] >= step for r in tr.read_metrics(str(workdir))):
            return
        time.sleep(0.05)
    raise AssertionError(f"no train step {step} in {path} after {timeout} s")


def test_sigterm_checkpoints_current_step_and_rerun_matches_uninterrupted(tmp_path,
                                                                        tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "jax_cache"  # shared with the child process
    toy.use_compilation_cache(cache)
    config = toy.toy_config(num_train_steps=NUM_STEPS, checkpoint_every_steps=0)
    reference = tr.train(config, str(tmp_path / "reference"), toy.make_task(),
                         toy.make_train_iter(config.batch_size))

    workdir = tmp_path / "run"
    root = TESTS_DIR.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(workdir), str(cache)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_train_step(workdir, 3, child)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == tr.Preempted.exit_code, stderr
    line = next(l for l in stderr.splitlines() if l.startswith("preempted (SIGTERM)"))
    step = int(line.split("checkpoint at step ")[1].split()[0])
    assert 3 <= step < NUM_STEPS
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")) == [step]
    assert max(r["step"] for r in tr.read_metrics(str(workdir))) == step

    resumed = tr.train(config, str(workdir), toy.make_task(),
                       toy.make_train_iter(config.batch_size))
    assert resumed.start_step == step
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state.params)),
                    jax.tree.leaves(jax.device_get(reference.state.params)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ([r["loss"] for r in tr.read_metrics(str(workdir), "train")]
            == [r["loss"] for r in tr.read_metrics(str(tmp_path / "reference"), "train")])
