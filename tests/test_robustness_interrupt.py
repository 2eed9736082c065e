"""Issue 23, item 10: Ctrl-C at any moment ends the run with one line and exit code 130.

Training steps are covered by test_robustness_train.py (checkpoint, then exit 130). Here:
during a script's imports (deterministic: SIGINT is sent once ``-X importtime`` reports
that NumPy was imported, i.e. while JAX is still importing), and while a garbage-collector
callback runs, where Python swallows a KeyboardInterrupt ("Exception ignored in: <function
_xla_gc_callback ...>") and the run used to carry on to its end; and one lost all the same.
"""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import train_toy as toy
from tfx_jax import train as tr
from tfx_jax.train import loop

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def test_ctrl_c_during_the_imports_of_a_script_is_one_line_exit_130(tmp_path):
    workdir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-X", "importtime", str(REPO / "experiments" / "lm.py"),
         f"--workdir={workdir}", "--config.num_train_steps=1", "--config.max_files=2"], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in child.stderr:
            lines.append(line)
            if line.split("|")[-1].strip() == "numpy":
                child.send_signal(signal.SIGINT)
                break
        lines += child.stderr.readlines()
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    err = [line for line in lines if not line.startswith("import time:")]
    assert child.returncode == 130
    assert [line.strip() for line in err] == [
        "Stopped: interrupted (SIGINT) while starting; nothing was written"]
    assert not workdir.exists()


GC_CHILD = textwrap.dedent("""
    import gc, os, signal, time
    from tfx_jax import train as tr

    armed = []

    def callback(phase, info):  # like JAX's _xla_gc_callback: Python code inside the collector
        if phase == "start" and armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands here, in the callback
            sum(range(10000))

    def main(config, workdir):
        gc.callbacks.append(callback)
        armed.append(True)
        end = time.perf_counter() + 20
        while time.perf_counter() < end:  # "data preparation"
            gc.collect()
            sum(range(100000))
        print("finished")

    tr.launch.run(main, default_config={config!r})
""")


def test_ctrl_c_inside_a_garbage_collector_callback_still_stops_the_run(tmp_path):
    """Python swallows an exception raised in a gc callback: the run used to go on."""
    config = tmp_path / "config.py"
    config.write_text("from tfx_jax import train as tr\n"
                      "def get_config():\n    return tr.default_config()\n")
    script = tmp_path / "child.py"
    script.write_text(GC_CHILD.format(config=str(config)))
    done = subprocess.run([sys.executable, str(script), f"--workdir={tmp_path / 'run'}"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert "finished" not in done.stdout
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "Stopped: interrupted (SIGINT) outside training steps; nothing was saved by this "
        "interruption (checkpoints already written are kept)")


def test_a_ctrl_c_lost_before_training_stops_the_loop_at_its_first_step(tmp_path):
    """The last line of defence: a Ctrl-C that was swallowed all the same (the handler
    noted it, nothing raised) stops the next training loop after one step, with a save."""
    loop._interrupted.set()  # pylint: disable=protected-access
    config = toy.toy_config(num_train_steps=50, checkpoint_every_steps=0)
    with pytest.raises(tr.Preempted, match=r"interrupted \(SIGINT\): saved a checkpoint at "
                                           r"step 1 ") as stopped:
        tr.train(config, str(tmp_path / "run"), toy.make_task(),
                 toy.make_train_iter(config.batch_size))
    assert stopped.value.exit_code == 130
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["1"]
    assert not loop._interrupted.is_set()  # pylint: disable=protected-access
