"""Two processes on localhost train together on JAX's own multi-host runtime.

Each child runs ``tests/multihost_runner.py`` (``launch.run`` -> ``jax.distributed.
initialize`` with a coordinator on 127.0.0.1, Gloo CPU collectives, 4 CPU devices per
process) and reads only its shard of the toy data. The reference is one process on 8
devices fed the same *global* batches (both shards, concatenated in process order),
so the two runs compute the same thing up to the order of the gradient all-reduce.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import train_toy as toy
from tfx_jax import train as tr

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
RUNNER = TESTS_DIR / "multihost_runner.py"
NUM_PROCESSES = 2
BATCH_SIZE = 16


def concatenate(parts: list[dict]) -> dict:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


class GlobalBatches:
    """What all processes read together, as one process sees it: the shards concatenated."""

    def __init__(self, batch_size: int, process_count: int):
        self.shards = [toy.make_train_iter(batch_size, process_index=i,
                                           process_count=process_count)
                       for i in range(process_count)]

    def __iter__(self):
        return self

    def __next__(self):
        return concatenate([next(shard) for shard in self.shards])

    def get_state(self):
        return [shard.get_state() for shard in self.shards]

    def set_state(self, state):
        for shard, s in zip(self.shards, state, strict=True):
            shard.set_state(s)


class GlobalEvalBatches:
    """The eval batches of all processes (the runner's), concatenated; re-iterable."""

    def __init__(self, batch_size: int, process_count: int):
        self.shards = [toy.make_eval_batches(batch_size, process_index=i,
                                             process_count=process_count)
                       for i in range(process_count)]

    def __iter__(self):
        return (concatenate(list(parts)) for parts in zip(*self.shards, strict=True))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    directory = tmp_path_factory.getbasetemp() / "jax_cache"  # shared with the children
    toy.use_compilation_cache(directory)
    return directory


def reference_run(workdir: Path, num_train_steps: int, **overrides):
    config = toy.toy_config(num_train_steps=num_train_steps, **overrides)
    return tr.train(config, str(workdir), toy.make_task(),
                    GlobalBatches(config.batch_size, NUM_PROCESSES),
                    eval_batches=GlobalEvalBatches(config.batch_size, NUM_PROCESSES))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """NUM_PROCESSES runner processes with one coordinator; output goes to log files."""

    def __init__(self, workdir: Path, cache: Path, *flags: str, name: str = "job"):
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(TESTS_DIR.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                       if p])
        self.logs = [workdir.parent / f"{workdir.name}.{name}.process{i}.log"
                     for i in range(NUM_PROCESSES)]
        self.processes = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as out:
                self.processes.append(subprocess.Popen(
                    [sys.executable, str(RUNNER), f"--workdir={workdir}",
                     f"--coordinator_address=127.0.0.1:{port}",
                     f"--num_processes={NUM_PROCESSES}", f"--process_id={i}",
                     f"--cache_dir={cache}", *flags],
                    env=env, stdout=out, stderr=subprocess.STDOUT))

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait(self, timeout: float = 180.0) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in self.processes]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("multi-process run timed out:\n" + "\n".join(
                self.output(i)[-3000:] for i in range(NUM_PROCESSES))) from None

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def losses(workdir: Path, split: str = "train") -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in tr.read_metrics(str(workdir), split)]


def restored_params(workdir: Path):
    """The latest checkpoint's params, read by this single process onto its 8 devices."""
    config = toy.toy_config()
    optimizer, _ = tr.create_optimizer(config)
    target = tr.abstract_train_state(toy.make_task().init_params, optimizer, config.seed,
                                     tr.replicated_sharding(tr.make_data_mesh()))
    checkpointer = tr.Checkpointer(str(workdir))
    try:
        return jax.device_get(checkpointer.restore(target).params)
    finally:
        checkpointer.close()


def assert_params_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_two_processes_train_like_one_process_on_the_global_batch(tmp_path, cache):
    reference = reference_run(tmp_path / "reference", 8)
    workdir = tmp_path / "run"
    job = Job(workdir, cache, "--config.num_train_steps=8")
    assert job.wait() == [0, 0], job.output(0) + job.output(1)

    assert "process 0 of 2: 4 of 8 devices" in job.output(0)
    assert "process 1 of 2: 4 of 8 devices" in job.output(1)
    # only process 0 writes metrics and logs: every step appears once
    got, expected = losses(workdir), losses(tmp_path / "reference")
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 9))
    np.testing.assert_allclose([l for _, l in got], [l for _, l in expected], rtol=1e-5)
    # each process evaluated its own eval shard; together they are the global eval set
    (step, eval_loss), = losses(workdir, "eval")
    assert step == 8
    np.testing.assert_allclose(eval_loss, reference.eval_metrics["loss"], rtol=1e-5)
    assert "Finished at step 8" in job.output(0) and "Finished at step" not in job.output(1)
    assert "step 8: loss=" not in job.output(1)
    # both processes took part in each checkpoint, each with its own iterator state
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
    assert sorted(os.listdir(workdir / "checkpoints" / "8" / "data_iterator")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    # the state written by two processes restores in one (8 devices)
    assert_params_close(restored_params(workdir), jax.device_get(reference.state.params))


def test_fsdp_spanning_two_processes_trains_like_one_process(tmp_path, cache):
    """``--config.mesh.fsdp=8``: every weight is split over the devices of both hosts."""
    reference = reference_run(tmp_path / "reference", 4)  # one process, data parallel
    workdir = tmp_path / "run"
    job = Job(workdir, cache, "--config.num_train_steps=4", "--config.mesh.data=1",
              "--config.mesh.fsdp=8", name="fsdp")
    assert job.wait() == [0, 0], job.output(0) + job.output(1)
    for i in range(NUM_PROCESSES):  # (vocab, embed) = (11, 8): embed split 8 ways, 4 per host
        assert (f"process {i}: embedding (11, 8) sharded ('tensor', 'fsdp'), local shard "
                f"(11, 1)" in job.output(i))
    got, expected = losses(workdir), losses(tmp_path / "reference")
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in expected], rtol=1e-5)
    # the shards both hosts wrote restore as whole arrays in one process
    assert_params_close(restored_params(workdir), jax.device_get(reference.state.params))


def wait_for_step(workdir: Path, step: int, job: Job, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in job.processes):
            job.kill()
            raise AssertionError("a process exited early:\n" + job.output(0) + job.output(1))
        if (workdir / "metrics.jsonl").exists() and any(
                s >= step for s, _ in losses(workdir)):
            return
        time.sleep(0.05)
    job.kill()
    raise AssertionError(f"no step {step} after {timeout} s:\n" + job.output(0))


def test_sigterm_to_one_host_stops_all_at_one_step_and_rerun_resumes(tmp_path, cache):
    num_steps = 30
    reference_run(tmp_path / "reference", num_steps, checkpoint_every_steps=0)
    workdir = tmp_path / "run"
    flags = (f"--config.num_train_steps={num_steps}", "--config.checkpoint_every_steps=0")
    job = Job(workdir, cache, *flags, "--seconds_per_batch=0.1")
    wait_for_step(workdir, 3, job)
    job.processes[1].send_signal(signal.SIGTERM)  # a preemption notice for host 1 only
    codes = job.wait()
    assert codes == [tr.Preempted.exit_code] * 2, job.output(0) + job.output(1)

    # JAX's preemption service agreed on one step; both hosts saved it together
    line = next(l for l in job.output(0).splitlines() if l.startswith("preempted (SIGTERM)"))
    step = int(line.split("checkpoint at step ")[1].split()[0])
    assert 3 <= step < num_steps
    assert os.listdir(workdir / "checkpoints") == [str(step)]
    assert sorted(os.listdir(workdir / "checkpoints" / str(step) / "data_iterator")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    rerun = Job(workdir, cache, *flags, name="rerun")
    assert rerun.wait() == [0, 0], rerun.output(0) + rerun.output(1)
    assert f"Resuming from the checkpoint at step {step}" in rerun.output(0)
    got, expected = losses(workdir), losses(tmp_path / "reference")
    assert [s for s, _ in got] == list(range(1, num_steps + 1))  # nothing logged twice
    np.testing.assert_allclose([l for _, l in got], [l for _, l in expected], rtol=1e-5)


def test_hosts_with_unequal_eval_batch_counts_fail_together_with_clear_error(tmp_path, cache):
    """Without the check, one host waits forever in an eval step the other never starts."""
    workdir = tmp_path / "run"
    job = Job(workdir, cache, "--config.num_train_steps=4", "--config.checkpoint_every_steps=2",
              "--config.eval_every_steps=4", "--uneven_eval")
    assert job.wait(timeout=120) == [2, 2]  # launch.run: one "error: ..." line, exit 2
    for i in range(NUM_PROCESSES):
        assert ("error: eval_batches: process(es) [0] have 4 batches but process(es) [1] "
                "have more; every process must yield the same number of eval batches"
                in job.output(i))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]  # earlier checkpoint intact


def error_lines(job: Job) -> list[list[str]]:
    """Each process's ``error:`` lines. TensorStore writes in flight may print C++ noise
    ("Event loop is closed") anywhere, as in tests/test_robustness_storage.py, so a line
    is found by its text and kept from "error:" on."""
    return [[l[l.index("error:"):] for l in job.output(i).splitlines() if "error:" in l]
            for i in range(NUM_PROCESSES)]


def test_a_save_one_host_cannot_write_stops_every_host_at_once_and_keeps_the_last_checkpoint(
        tmp_path, cache):
    """Issue 23, item 9 on several hosts: process 1's part of the step-8 save meets a full
    disk inside Orbax's writer thread. Without the hosts' agreement both waited at Orbax's
    barrier (minutes, then a crash); now both end with exit 2 and one line at the next
    logged step, before the step-12 save, and the rerun resumes from step 4 (its restore
    checks every array's checksum, so step 4 is as it was written)."""
    workdir = tmp_path / "run"
    flags = ("--config.checkpoint_every_steps=4", "--config.max_checkpoints_to_keep=1")
    started = time.monotonic()
    job = Job(workdir, cache, "--config.num_train_steps=16", *flags, "--fail_save_at_step=8")
    assert job.wait(timeout=120) == [2, 2], job.output(0) + job.output(1)
    assert time.monotonic() - started < 90  # Orbax's own barrier timeout is 10 minutes
    fix = "Free some space and rerun the same command to resume"
    checkpoints = workdir / "checkpoints"
    assert error_lines(job) == [
        [f"error: cannot write the checkpoint at step 8 to {checkpoints}: No space left on "
         f"device on process 1; the checkpoint at step 4 is kept. {fix}"],
        [f"error: cannot write the checkpoint at step 8 to {checkpoints}: No space left on "
         f"device; the checkpoint at step 4 is kept. {fix}"]]
    output = job.output(0) + job.output(1)
    assert "tfx_jax/" not in output and "/orbax/" not in output, output  # no traceback of ours
    assert "step 12:" not in job.output(0)
    assert sorted(os.listdir(checkpoints)) in (["4"], ["4", "8.orbax-checkpoint-tmp"])

    rerun = Job(workdir, cache, "--config.num_train_steps=6", *flags, name="rerun")
    assert rerun.wait() == [0, 0], rerun.output(0) + rerun.output(1)
    assert "Resuming from the checkpoint at step 4" in rerun.output(0)
    assert sorted(os.listdir(checkpoints)) == ["6"]


def test_a_checkpoint_directory_one_host_finds_read_only_stops_every_host_at_the_first_save(
        tmp_path, cache):
    """The probe before each save (issue 23, item 1) on several hosts: process 1's probe file
    is refused; both hosts stop at the step-4 save with exit 2, nothing written."""
    workdir = tmp_path / "run"
    job = Job(workdir, cache, "--config.num_train_steps=8", "--read_only_probe")
    assert job.wait(timeout=120) == [2, 2], job.output(0) + job.output(1)
    checkpoints = workdir / "checkpoints"
    fix = f"Make {checkpoints} writable and rerun the same command to resume"
    assert error_lines(job) == [
        [f"error: cannot write the checkpoint at step 4 to {checkpoints}: Read-only file "
         f"system on process 1; no checkpoint was written before it. {fix}"],
        [f"error: cannot write the checkpoint at step 4 to {checkpoints}: Read-only file "
         f"system; no checkpoint was written before it. {fix}"]]
    assert "step 5:" not in job.output(0)
    assert os.listdir(checkpoints) == []
