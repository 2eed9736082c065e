"""End-to-end runs of the training loop on the toy task (8 simulated CPU devices).

Every comparison is against another run of the same toy problem: an
uninterrupted run on 8 devices is the reference for 1-device runs, resumed
runs, runs moved between meshes, and runs with a skipped step.
"""
import os
import signal

import jax
import numpy as np
import pytest

import train_toy as toy
from tfx_jax import train as tr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    toy.use_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")


def run(workdir, *, mesh=None, task=None, iterator=None, eval_batches=None, **overrides):
    config = toy.toy_config(**overrides)
    if iterator is None:
        iterator = toy.make_train_iter(config.batch_size)
    return tr.train(config, str(workdir), task or toy.make_task(), iterator,
                    eval_batches=eval_batches, mesh=mesh)


def train_losses(workdir):
    return [(r["step"], r.get("loss")) for r in tr.read_metrics(str(workdir), "train")]


def host_params(result):
    return jax.tree.map(np.asarray, jax.device_get(result.state.params))


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


def restore_step(workdir, step, mesh=None):
    mesh = mesh or tr.make_data_mesh()
    config = toy.toy_config()
    optimizer, _ = tr.create_optimizer(config)
    abstract = tr.abstract_train_state(toy.make_task().init_params, optimizer, config.seed,
                                       tr.replicated_sharding(mesh))
    checkpointer = tr.Checkpointer(str(workdir))
    try:
        return jax.device_get(checkpointer.restore(abstract, step=step))
    finally:
        checkpointer.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """12 uninterrupted steps on all 8 devices, with an evaluation every 4 steps."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(workdir, eval_batches=toy.make_eval_batches(16), eval_every_steps=4)
    return workdir, result, host_params(result), train_losses(workdir)


def test_reference_run_writes_metrics_tensorboard_and_checkpoints(reference):
    workdir, result, _, losses = reference
    assert [step for step, _ in losses] == list(range(1, 13))
    assert losses[-1][1] < 0.75 * losses[0][1]  # the toy problem is learnt
    first = tr.read_metrics(str(workdir), "train")[0]
    assert {"loss", "learning_rate", "steps_per_sec", "grad_norm", "accuracy"} <= set(first)
    np.testing.assert_allclose(first["learning_rate"], 0.05)
    evals = tr.read_metrics(str(workdir), "eval")
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in evals)
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert result.eval_metrics["step"] == 12 and result.train_metrics["step"] == 12
    assert os.listdir(workdir / "tensorboard")
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")) == [4, 8, 12]
    assert int(result.state.step) == 12


def test_one_device_matches_eight_devices(reference, tmp_path):
    _, _, params8, losses8 = reference
    result = run(tmp_path, mesh=tr.make_data_mesh(jax.devices()[:1]))
    assert result.state.params["Dense_0"]["kernel"].sharding.mesh.devices.size == 1
    losses1 = train_losses(tmp_path)
    assert [s for s, _ in losses1] == [s for s, _ in losses8]
    np.testing.assert_allclose([l for _, l in losses1], [l for _, l in losses8], rtol=1e-5)
    assert_trees_close(host_params(result), params8, rtol=1e-4, atol=1e-6)


class SigtermAtStep:
    """Wraps a checkpointable iterator and sends this process SIGTERM when batch k is drawn."""

    def __init__(self, iterator, step):
        self.iterator, self.step, self.drawn = iterator, step, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def test_preempted_and_resumed_run_is_bitwise_identical(reference, tmp_path):
    _, _, params_ref, losses_ref = reference
    with pytest.raises(tr.Preempted, match="checkpoint at step 5") as info:
        run(tmp_path, iterator=SigtermAtStep(toy.make_train_iter(16), 5))
    assert info.value.step == 5 and info.value.exit_code != 0
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [4, 5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again

    result = run(tmp_path)
    assert result.start_step == 5
    assert train_losses(tmp_path) == losses_ref  # exact, and no step logged twice
    assert_trees_equal(host_params(result), params_ref)


def test_the_first_train_line_after_a_resume_averages_the_same_steps(tmp_path):
    """Issue 23: preempted at step 6 of lines every 4 steps, the resumed run's line at
    step 8 averages steps 5..8 (weight and loss) as the uninterrupted run's does."""
    reference = tmp_path / "reference"
    run(reference, num_train_steps=8, log_every_steps=4, checkpoint_every_steps=0)
    workdir = tmp_path / "run"
    with pytest.raises(tr.Preempted, match="checkpoint at step 6"):
        run(workdir, iterator=SigtermAtStep(toy.make_train_iter(16), 6), num_train_steps=8,
            log_every_steps=4, checkpoint_every_steps=0)
    assert (workdir / "train_window.json").exists()  # steps 5 and 6, kept with checkpoint 6
    run(workdir, num_train_steps=8, log_every_steps=4, checkpoint_every_steps=0)
    lines = {r["step"]: r for r in tr.read_metrics(str(workdir), "train")}
    expected = {r["step"]: r for r in tr.read_metrics(str(reference), "train")}
    assert sorted(lines) == sorted(expected) == [4, 8]
    for key in ("loss", "accuracy", "grad_norm", "weight"):
        np.testing.assert_allclose(lines[8][key], expected[8][key], rtol=1e-6)


def test_checkpoint_moves_from_one_device_to_eight(reference, tmp_path):
    # (8 -> 1 is test_restore_onto_another_mesh_places_arrays_there, test_train_checkpoint.py)
    _, _, params_ref, losses_ref = reference
    run(tmp_path, mesh=tr.make_data_mesh(jax.devices()[:1]), num_train_steps=6)
    result = run(tmp_path, mesh=tr.make_data_mesh())
    assert result.start_step == 6
    assert result.state.params["Dense_0"]["kernel"].sharding.mesh.devices.size == 8
    np.testing.assert_allclose([l for _, l in train_losses(tmp_path)],
                               [l for _, l in losses_ref], rtol=1e-5)
    assert_trees_close(host_params(result), params_ref, rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_stops_run_naming_the_step(tmp_path):
    iterator = toy.make_train_iter(16, nan_at_step=7)
    with pytest.raises(tr.NonFiniteError, match="non-finite loss or gradient norm at step 7"
                       ) as info:
        run(tmp_path, iterator=iterator, log_every_steps=5)  # detected before saving step 8
    assert info.value.step == 7 and info.value.checkpoint_step == 4
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [4]
    state = restore_step(tmp_path, 4)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_nonfinite_update_is_skipped_when_configured(reference, tmp_path):
    iterator = toy.make_train_iter(16, nan_at_step=7)
    result = run(tmp_path, iterator=iterator, skip_nonfinite_updates=True,
                 checkpoint_every_steps=1, max_checkpoints_to_keep=20)
    assert int(result.state.step) == 12
    records = {r["step"]: r for r in tr.read_metrics(str(tmp_path), "train")}
    assert records[7]["nonfinite_steps"] == 1 and "loss" not in records[7]
    assert "nonfinite_steps" not in records[6]
    before, at, after = (restore_step(tmp_path, s) for s in (6, 7, 8))
    assert_trees_equal(at.params, before.params)
    assert_trees_equal(at.opt_state, before.opt_state)
    assert int(at.step) == 7
    assert not np.array_equal(after.params["Dense_0"]["kernel"], at.params["Dense_0"]["kernel"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(host_params(result)))
    # steps 1..6 are the reference run's steps
    _, _, _, losses_ref = reference
    assert train_losses(tmp_path)[:6] == losses_ref[:6]


def test_finished_run_is_not_trained_again(tmp_path):
    first = run(tmp_path, num_train_steps=4)
    again = run(tmp_path, num_train_steps=4)
    assert again.start_step == 4
    assert_trees_equal(host_params(again), host_params(first))
    assert [s for s, _ in train_losses(tmp_path)] == [1, 2, 3, 4]


def test_iterators_that_cannot_resume_or_repeat_raise_clear_errors(tmp_path):
    # (batches of the wrong size, a batch size the mesh cannot split and a checkpoint of
    # another model are cases of tests/test_bad_input.py)
    with pytest.raises(TypeError, match="get_state"):
        run(tmp_path / "c", iterator=iter([]))
    with pytest.raises(TypeError, match="eval_batches must be re-iterable"):
        run(tmp_path / "d", eval_batches=iter(toy.make_eval_batches(16)))


def test_eval_batches_may_be_a_callable(tmp_path):
    passes = []

    def eval_batches():
        passes.append(1)
        return toy.make_eval_batches(16)

    result = run(tmp_path, num_train_steps=4, eval_batches=eval_batches, eval_every_steps=2)
    assert len(passes) == 2 and result.eval_metrics["step"] == 4
    assert [r["step"] for r in tr.read_metrics(str(tmp_path), "eval")] == [2, 4]
