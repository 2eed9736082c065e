"""Issue 14, the training library's side: workdir lock, Ctrl-C, corrupt bytes, best checkpoint,
early stopping, one-line errors. Each row asserts the outcome, the message and the files
of the workdir before and after; only the two signal/lock cases start a subprocess.
"""
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
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
from tfx_jax.train import checkpoint, launch
from tfx_jax.train.loop import EarlyStopping

TESTS_DIR = Path(__file__).resolve().parent


def digests(directory: Path):
    """{relative path: sha256} of every file under ``directory``; None if it does not exist."""
    if not directory.exists():
        return None
    if directory.is_file():
        return hashlib.sha256(directory.read_bytes()).hexdigest()
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    toy.use_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")


def train(workdir, **overrides):
    config = toy.toy_config(**{"num_train_steps": 8, **overrides})
    iterator = toy.make_train_iter(16)  # the loop, not the toy pipeline, must judge the config
    return tr.train(config, str(workdir), toy.make_task(), iterator,
                    eval_batches=toy.make_eval_batches(16))


def run_as_script(call):
    """(exit code, stderr) of ``call()`` under the scripts' error handling (launch.user_errors)."""
    try:
        with launch.user_errors():
            call()
    except SystemExit as e:
        return e.code
    return 0


# --- the workdir lock -----------------------------------------------------------------------------

def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(workdir: Path, pid: int, host: str = None) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / checkpoint.LOCK_FILE).write_text(json.dumps(
        {"host": host or socket.gethostname(), "pid": pid, "since": "earlier"}))


def test_live_lock_refuses_with_holder_host_and_pid_and_changes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    write_lock(workdir, os.getppid())  # the parent process: alive
    before = digests(workdir)
    assert run_as_script(lambda: train(workdir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: workdir {workdir} is in use by process {os.getppid()} on "
                             f"host {socket.gethostname()}")
    assert digests(workdir) == before


def test_lock_held_on_another_host_is_not_taken_over(tmp_path, capsys):
    workdir = tmp_path / "run"
    write_lock(workdir, dead_pid(), host="some-other-host")
    assert run_as_script(lambda: train(workdir)) == 2
    assert "on host some-other-host" in capsys.readouterr().err
    assert "another host" in str(pytest.raises(checkpoint.WorkdirLocked,
                                               checkpoint.acquire, str(workdir)).value)


def test_stale_lock_is_taken_over_with_a_message_and_released(tmp_path, capsys):
    workdir = tmp_path / "run"
    pid = dead_pid()
    write_lock(workdir, pid)
    with checkpoint.workdir_lock(str(workdir)):
        holder = json.loads((workdir / checkpoint.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with checkpoint.workdir_lock(str(workdir)):  # re-entrant in one process
            pass
        assert (workdir / checkpoint.LOCK_FILE).exists()
    assert f"stale lock of workdir {workdir} left by process {pid}" in capsys.readouterr().err
    assert not (workdir / checkpoint.LOCK_FILE).exists()  # released
    assert digests(workdir) == {}


def test_a_run_refused_for_its_lock_leaves_no_new_directory(tmp_path):
    workdir = tmp_path / "new"
    with checkpoint.workdir_lock(str(workdir)):
        assert (workdir / ".lock").exists()
    assert not workdir.exists()  # created by the lock only: removed with it


LOCK_HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    # The module alone (not the tfx_jax package, whose imports take seconds).
    spec = importlib.util.spec_from_file_location("workdir_lock", sys.argv[2])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.workdir_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_second_process_on_a_workdir_fails_then_takes_over_after_sigkill(tmp_path, capsys):
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR.parent))
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(workdir),
                               checkpoint.__file__], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_as_script(lambda: train(workdir)) == 2
        assert f"in use by process {holder.pid} on host" in capsys.readouterr().err
        assert not (workdir / "checkpoints").exists()  # the refused run wrote nothing
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    result = train(workdir, num_train_steps=2)  # the lock of the killed process is stale
    assert int(result.state.step) == 2
    assert f"left by process {holder.pid}" in capsys.readouterr().err
    assert not (workdir / checkpoint.LOCK_FILE).exists()


# --- Ctrl-C ---------------------------------------------------------------------------------------

SIGINT_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import train_toy as toy
    from tfx_jax import train as tr

    def main(config, workdir):
        toy.use_compilation_cache({cache!r})
        config = toy.toy_config(num_train_steps=200, checkpoint_every_steps=0)
        tr.train(config, workdir, toy.make_task(),
                 toy.make_train_iter(config.batch_size, seconds_per_batch=0.05))

    tr.launch.run(main, default_config={config!r})
""")


def test_sigint_saves_a_checkpoint_and_exits_130_with_one_line(tmp_path, tmp_path_factory):
    config_file = tmp_path / "config.py"
    config_file.write_text("from tfx_jax import train as tr\n"
                           "def get_config():\n    return tr.default_config()\n")
    script = tmp_path / "child.py"
    script.write_text(SIGINT_CHILD.format(tests=str(TESTS_DIR), config=str(config_file),
                                          cache=str(tmp_path_factory.getbasetemp() / "jax_cache")))
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR.parent))
    child = subprocess.Popen([sys.executable, str(script), f"--workdir={workdir}"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((workdir / "metrics.jsonl").exists()
                   and (workdir / "metrics.jsonl").read_text().strip()):
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Stopped: interrupted (SIGINT): saved a checkpoint at step ")
    step = int(last.split("at step ")[1].split()[0])
    assert 1 <= step < 200 and os.listdir(workdir / "checkpoints") == [str(step)]
    assert not (workdir / checkpoint.LOCK_FILE).exists()


# --- corrupt bytes --------------------------------------------------------------------------------

def test_checksums_are_independent_of_sharding_and_catch_one_changed_element():
    mesh = tr.make_data_mesh()
    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    sharded = jax.device_put(x, tr.batch_sharding(mesh))
    replicated = jax.device_put(x, tr.replicated_sharding(mesh))
    assert checkpoint.tree_checksums({"x": sharded}) == checkpoint.tree_checksums({"x": replicated})
    changed = x.copy()
    changed[17, 2] = np.nextafter(changed[17, 2], np.float32(1e9))  # one ulp
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    reference = checkpoint.tree_checksums({"x": x})["x"]
    assert checkpoint.tree_checksums({"x": changed})["x"] != reference
    assert checkpoint.tree_checksums({"x": swapped})["x"] != reference
    for dtype in (np.int8, np.uint16, np.float16, np.bool_, np.int32):
        assert len(checkpoint.tree_checksums({"y": np.ones(5, dtype)})["y"]) == 16


def test_corrupt_latest_checkpoint_is_refused_moved_aside_and_the_previous_restores(tmp_path,
                                                                                     capsys):
    workdir = tmp_path / "run"
    train(workdir, num_train_steps=8, checkpoint_every_steps=4)
    checkpoints = workdir / "checkpoints"
    # Bytes of the right size and format but not the ones written: step 4's arrays in step 8.
    shutil.rmtree(checkpoints / "8" / "state")
    shutil.copytree(checkpoints / "4" / "state", checkpoints / "8" / "state")
    corrupt = digests(checkpoints / "8")
    result = train(workdir, num_train_steps=12, checkpoint_every_steps=4)
    err = capsys.readouterr().err
    assert f"the checkpoint at step 8 ({checkpoints}/8) is corrupt: the bytes of params/" in err
    assert "Restored the checkpoint at step 4 instead" in err
    assert result.start_step == 4 and int(result.state.step) == 12
    assert digests(workdir / "checkpoints_corrupt" / "8") == corrupt  # kept, not deleted
    assert sorted(os.listdir(checkpoints), key=int) == ["4", "8", "12"]  # 8 saved afresh


def test_a_reader_skips_a_corrupt_step_without_moving_it(tmp_path, capsys):
    workdir = tmp_path / "run"
    train(workdir, num_train_steps=8, checkpoint_every_steps=4)
    checkpoints = workdir / "checkpoints"
    shutil.rmtree(checkpoints / "8" / "state")
    shutil.copytree(checkpoints / "4" / "state", checkpoints / "8" / "state")
    before = digests(workdir)
    params = tr.restore_params(str(workdir), toy.make_task().init_params)
    expected = tr.restore_params(str(workdir), toy.make_task().init_params, step=4)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    assert "step 8" in capsys.readouterr().err
    assert digests(workdir) == before
    with pytest.raises(ValueError, match="the checkpoint at step 8 .* is corrupt"):
        tr.restore_params(str(workdir), toy.make_task().init_params, step=8)


def test_a_failing_evaluation_checkpoints_the_training_before_the_error(tmp_path, capsys):
    def evaluate(params, step, mesh):
        raise ValueError(f"decoding failed at step {step}")
    task = tr.Task(init_params=toy.make_task().init_params, loss_fn=toy.make_task().loss_fn,
                   evaluate=evaluate)
    config = toy.toy_config(num_train_steps=8, eval_every_steps=3, checkpoint_every_steps=4)
    with pytest.raises(ValueError, match="decoding failed at step 3"):
        tr.train(config, str(tmp_path), task, toy.make_train_iter(16))
    assert os.listdir(tmp_path / "checkpoints") == ["3"]
    assert "The evaluation at step 3 failed; saved a checkpoint at step 3 first" in (
        capsys.readouterr().err)


# --- best checkpoint, early stopping --------------------------------------------------------------

def test_best_checkpoint_is_kept_besides_the_latest(tmp_path):
    config = toy.toy_config()
    optimizer, _ = tr.create_optimizer(config)
    state = tr.create_train_state(toy.make_task().init_params, optimizer, 0)
    iterator = toy.make_train_iter(16)
    checkpointer = tr.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False,
                                   best_metric="loss", best_mode="min")
    try:
        for step, loss in zip(range(1, 7), [3.0, 1.0, 2.0, None, 4.0, 5.0]):
            metrics = None if loss is None else {"loss": loss, "accuracy": 0.5}
            checkpointer.save(state.replace(step=step), iterator, metrics=metrics)
        assert checkpointer.all_steps() == [2, 5, 6]  # best (loss 1.0) + latest two
        assert checkpointer.best_step() == 2
    finally:
        checkpointer.close()


def test_diverging_run_keeps_its_best_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    train(workdir, num_train_steps=8, eval_every_steps=2, checkpoint_every_steps=2,
          max_checkpoints_to_keep=1)
    # The learning rate jumps: the eval loss climbs, the latest checkpoint rotates.
    train(workdir, num_train_steps=16, eval_every_steps=2, checkpoint_every_steps=2,
          max_checkpoints_to_keep=1, learning_rate=50.0)
    evals = {r["step"]: r["loss"] for r in tr.read_metrics(str(workdir), "eval")}
    best = min(evals, key=evals.get)
    assert best < 16 and evals[16] > evals[best]
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == sorted({best, 16})


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path, capsys):
    stopper = EarlyStopping("loss", "min", patience=2)
    assert [stopper.update(s, {"loss": v}) for s, v in
            [(1, 3.0), (2, 2.0), (3, 2.5), (4, 1.9), (5, 2.0), (6, 2.0)]] == [
                False, False, False, False, False, True]
    result = train(tmp_path / "run", num_train_steps=40, eval_every_steps=2,
                   checkpoint_every_steps=0, early_stopping_patience=2,
                   early_stopping_min_delta=100.0)  # nothing counts as better: stop at eval 3
    assert int(result.state.step) == 6
    assert "Early stopping at step 6: eval loss has not improved for 2 evaluations" in (
        capsys.readouterr().err)
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["6"]


# --- one-line errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=0), "config.batch_size must be a positive integer, got 0"),
    (dict(num_train_steps=-5), "config.num_train_steps must be a positive integer, got -5"),
    (dict(learning_rate=float("nan")), "config.learning_rate must be a positive number, got nan"),
    (dict(best_metric_mode="lowest"), "config.best_metric_mode must be 'min' or 'max'"),
    (dict(early_stopping_patience=2, best_metric=""), "early_stopping_patience = 2 needs "
                                                      "config.best_metric"),
], ids=["batch_0", "negative_steps", "nan_learning_rate", "bad_best_mode", "patience_no_metric"])
def test_config_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, overrides,
                                                               message):
    assert run_as_script(lambda: train(tmp_path / "run", **overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"] or (len(err) == 1 and message in err[0])
    assert not (tmp_path / "run").exists()


def test_full_disk_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """ENOSPC from the first file a save writes (the checkpointer's write probe)."""
    real_open = open

    def no_space(path, *args, **kwargs):
        if ".write_test" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", no_space)
    assert run_as_script(lambda: train(tmp_path / "run", num_train_steps=2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write the checkpoint at step ")
    assert "No space left on device; no checkpoint was written before it" in err[-1]
    assert not (tmp_path / "run" / checkpoint.LOCK_FILE).exists()  # released


def test_read_only_workdir_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Simulated (the tests run as root, whom permissions do not stop): EROFS on create."""
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(checkpoint.LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", read_only)
    (tmp_path / "run").mkdir()
    assert run_as_script(lambda: train(tmp_path / "run")) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: workdir '{tmp_path / 'run'}' is on a read-only file system")
    assert digests(tmp_path / "run") == {}
