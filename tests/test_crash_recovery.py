"""SIGKILL in the middle of a checkpoint save: the previous checkpoint survives and resumes.

A child process trains the toy task and checkpoints every 4 steps. Its save of
step 8 is held just before Orbax renames ``8.orbax-checkpoint-tmp`` to ``8`` (the
array data, the iterator states and the metadata are all written by then, so the
directory looks complete) and the child is killed with SIGKILL there: no handler
runs, nothing is flushed. The rerun must ignore the unfinished save, resume from
step 4, delete the leftover, and end bitwise where an uninterrupted run ends.
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
NUM_STEPS = 12
KILL_STEP = 8
UNFINISHED = f"{KILL_STEP}.orbax-checkpoint-tmp"

CHILD = textwrap.dedent(f"""
    import asyncio, pathlib, sys
    sys.path.insert(0, {str(TESTS_DIR)!r})
    from orbax.checkpoint._src.path import atomicity
    import train_toy as toy
    from tfx_jax import train as tr

    workdir, cache, marker, async_save = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held_finalize(self, *args, **kwargs):
        if self.get_final().name == "{KILL_STEP}":  # the step directory, not its items
            pathlib.Path(marker).write_text(str(self.get()))
            await asyncio.sleep(3600)  # the parent kills us here
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = held_finalize
    toy.use_compilation_cache(cache)
    config = toy.toy_config(num_train_steps={NUM_STEPS}, checkpoint_every_steps=4,
                            async_checkpointing=async_save == "async")
    tr.train(config, workdir, toy.make_task(), toy.make_train_iter(config.batch_size))
""")


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def kill_during_save(workdir: Path, cache: Path, async_save: bool, timeout: float = 120.0):
    marker = workdir.parent / f"{workdir.name}.saving"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(TESTS_DIR.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                   if p]))
    log = workdir.parent / f"{workdir.name}.log"
    with open(log, "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(workdir), str(cache), str(marker),
             "async" if async_save else "sync"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the save of step {KILL_STEP} never started:\n"
                                     + log.read_text()[-3000:])
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_sigkill_during_save_keeps_previous_checkpoint_and_rerun_is_bitwise_identical(
        tmp_path, tmp_path_factory, async_save):
    cache = tmp_path_factory.getbasetemp() / "jax_cache"  # shared with the child
    toy.use_compilation_cache(cache)
    config = toy.toy_config(num_train_steps=NUM_STEPS, checkpoint_every_steps=4,
                            async_checkpointing=async_save)
    reference = tr.train(config, str(tmp_path / "reference"), toy.make_task(),
                         toy.make_train_iter(config.batch_size))

    workdir = tmp_path / "run"
    kill_during_save(workdir, cache, async_save)
    checkpoints = workdir / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["4", UNFINISHED]
    assert {"state", "data_iterator"} <= set(os.listdir(checkpoints / UNFINISHED))
    reader = tr.Checkpointer(str(workdir))  # e.g. an evaluation job: sees only step 4 ...
    assert reader.latest_step() == 4 and reader.all_steps() == [4]
    reader.close()
    assert UNFINISHED in os.listdir(checkpoints)  # ... and deletes nothing

    # The rerun checkpoints only at the end, so the leftover cannot just be overwritten.
    resumed = tr.train(toy.toy_config(num_train_steps=NUM_STEPS, checkpoint_every_steps=0,
                                      async_checkpointing=async_save),
                       str(workdir), toy.make_task(), toy.make_train_iter(config.batch_size))
    assert resumed.start_step == 4
    assert sorted(os.listdir(checkpoints)) == ["12", "4"]  # the unfinished save is gone
    for a, b in zip(jax.tree.leaves(host(resumed.state)), jax.tree.leaves(host(reference.state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    got = [(r["step"], r["loss"]) for r in tr.read_metrics(str(workdir), "train")]
    expected = [(r["step"], r["loss"])
                for r in tr.read_metrics(str(tmp_path / "reference"), "train")]
    assert got == expected  # bitwise, and no step logged twice
