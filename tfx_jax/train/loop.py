"""The training loop shared by every experiment.

``train(config, workdir, task, train_iter)`` does, in order: validate the
config; build the mesh and the optimizer; resume from the latest checkpoint in
``<workdir>/checkpoints`` (state *and* data iterator) or initialise; then for
each step feed the next process-local batch as a global array to the
compiled step, and at step boundaries write metrics, evaluate, checkpoint and
honour preemption. It returns a :class:`TrainResult` after a final
checkpoint, or raises :class:`Preempted` / :class:`NonFiniteError`.

Step numbering: ``step`` is the number of batches trained on, so the metrics
line ``{"step": 100, ...}`` describes steps 91..100 (with log_every_steps =
10) and the checkpoint "100" holds the state after 100 batches.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, Union

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from tfx_jax.train.batch_sizes import check_eval_batches
from tfx_jax.train.checkpoint import Checkpointer, check_iterator_checkpointable
from tfx_jax.train.early_stopping import EarlyStopping
from tfx_jax.train.run_config import save_config, validate_config
from tfx_jax.train.mesh import check_batch_size, make_mesh, shard_batch
from tfx_jax.train.metrics import MetricsWriter, average_metrics
from tfx_jax.train.optimizers import create_optimizer
from tfx_jax.train.preemption import Preempted, PreemptionWatcher
from tfx_jax.train.progress import make_progress_bar, print_summary
from tfx_jax.train.state import (TrainState, abstract_train_state, create_sharded_train_state,
                                 train_state_shardings)
from tfx_jax.train.step import make_eval_step, make_train_step
from tfx_jax.train.topology import compile_run, compile_target
from tfx_jax.train.task import Batch, Task
from tfx_jax.train.workdir_lock import hold_workdir_lock
from tfx_jax.train.trainable import mask_optimizer
from tfx_jax.train.throughput import StepProfiler, ThroughputMeter


class NonFiniteError(FloatingPointError):
    """A step had a NaN/inf loss or gradient norm and ``skip_nonfinite_updates`` is False."""

    def __init__(self, step: int, loss: float, grad_norm: float,
                 checkpoint_step: Optional[int], checkpoint_dir: str):
        self.step = step
        self.checkpoint_step = checkpoint_step
        latest = ("no checkpoint was written yet" if checkpoint_step is None else
                  f"the latest checkpoint (step {checkpoint_step}, finite) is in {checkpoint_dir}")
        super().__init__(
            f"non-finite loss or gradient norm at step {step} (loss={loss}, "
            f"grad_norm={grad_norm}); the run stopped and {latest}. Lower the learning rate, "
            f"clip gradients (config.grad_clip_norm) or set config.skip_nonfinite_updates=True "
            f"to skip such steps.")


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the final state and the last metrics written."""
    state: TrainState
    start_step: int
    train_metrics: dict
    eval_metrics: dict


def _check_batch(batch: Batch, step: int, batch_size: int) -> None:
    expected = batch_size // jax.process_count()
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != expected:
            raise ValueError(
                f"train batch at step {step}: batch{jax.tree_util.keystr(path)} has shape "
                f"{np.shape(leaf)}, expected leading dim config.batch_size / process_count = "
                f"{batch_size} / {jax.process_count()} = {expected}")


def _loss_first(metrics: dict) -> dict:
    return dict(sorted(metrics.items(), key=lambda item: item[0] != "loss"))


def _check_eval_batches(eval_batches) -> None:
    if eval_batches is None or callable(eval_batches):
        return
    if not hasattr(eval_batches, "__iter__") or iter(eval_batches) is eval_batches:
        raise TypeError(
            f"eval_batches must be re-iterable (each iter() starts a fresh pass, like a "
            f"grain.MapDataset or the data layer's EvalData) or a callable returning an "
            f"iterable; got {type(eval_batches).__name__}, which a first pass would exhaust")


def _eval_pass(eval_batches) -> Iterator[Batch]:
    """One pass over the eval batches; with several processes, in step with the others.

    Every eval step is a collective over all hosts, so a host that runs out of
    batches early would leave the others waiting in it (a hang, or on CPU an
    abort). With several processes the hosts therefore agree before each batch
    that all of them have one, and raise the same ValueError if not.
    """
    batches = iter(eval_batches() if callable(eval_batches) else eval_batches)
    for index in itertools.count():
        batch = next(batches, None)
        if jax.process_count() > 1:
            has_batch = multihost_utils.process_allgather(np.asarray(batch is not None))
            if has_batch.any() and not has_batch.all():
                raise ValueError(
                    f"eval_batches: process(es) {np.flatnonzero(~has_batch).tolist()} have "
                    f"{index} batches but process(es) {np.flatnonzero(has_batch).tolist()} "
                    f"have more; every process must yield the same number of eval batches "
                    f"(pad the last batches, as tfx_jax.data's eval pipelines do)")
        if batch is None:
            return
        yield batch


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class _TrainWindow:
    """Metrics of the steps since the last log line, kept on device until needed."""

    def __init__(self):
        self.steps: list[tuple[int, dict]] = []
        self.started = time.perf_counter()
        self.paused_seconds = 0.0

    def fetch(self) -> list[tuple[int, dict]]:
        return [(step, jax.device_get(m)) for step, m in self.steps]

    def first_nonfinite(self) -> Optional[tuple[int, dict]]:
        flags = jax.device_get([m["finite"] for _, m in self.steps])
        for (step, metrics), finite in zip(self.steps, flags):
            if not finite:
                return step, jax.device_get(metrics)
        return None

    def reset(self) -> None:
        self.steps = []
        self.started = time.perf_counter()
        self.paused_seconds = 0.0


def train(config: ml_collections.ConfigDict, workdir: str, task: Task,
          train_iter: Iterator[Batch], *,
          eval_batches: Union[Iterable[Batch], Callable[[], Iterable[Batch]], None] = None,
          mesh: Optional[Mesh] = None) -> TrainResult:
    """Trains ``task`` on ``train_iter`` to ``config.num_train_steps``, resuming from ``workdir``.

    Args:
      config: a ConfigDict extending :func:`tfx_jax.train.default_config`.
      workdir: run directory; gets ``checkpoints/``, ``metrics.jsonl``,
        ``tensorboard/`` and ``config.json``. A workdir with checkpoints is
        resumed from the latest.
      task: the experiment's :class:`Task` (init_params, loss_fn, evaluate).
      train_iter: infinite iterator of process-local batches (dicts of NumPy
        arrays with leading dim ``batch_size // process_count``) with
        ``get_state()`` / ``set_state()``, e.g. a Grain iterator.
      eval_batches: optional; a re-iterable of process-local eval batches (one
        finite pass per ``iter()``, e.g. a ``grain.MapDataset``) or a callable
        returning one. Their ``loss_fn(..., train=False)`` metrics are averaged
        (weighted by ``"weight"``) into the eval line.
      mesh: default: ``make_mesh(config.mesh)`` over all devices of all hosts.
        Params and optimizer state are sharded over it by the partitioning
        rules (``tfx_jax.train.partitioning``), created directly in shards.

    Raises:
      Preempted: SIGTERM arrived; a checkpoint at the current step was saved.
      NonFiniteError: a non-finite step with ``skip_nonfinite_updates=False``.
      ValueError: bad config, batch shapes, or a checkpoint that does not fit.
    """
    validate_config(config)
    check_iterator_checkpointable(train_iter)
    _check_eval_batches(eval_batches)
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    check_batch_size(config.batch_size, mesh)
    check_eval_batches(eval_batches, mesh)
    optimizer, schedule = create_optimizer(config)
    if task.trainable is not None:  # fine-tuning: frozen parameters get zero updates
        optimizer = mask_optimizer(optimizer, task.trainable)
    shardings = train_state_shardings(task.init_params, optimizer, mesh)  # checks the mesh
    if compile_target() is not None:  # --compile_topology: compile, report, stop
        compile_run(config, workdir, task, train_iter, eval_batches, mesh, optimizer, schedule)

    release_lock = hold_workdir_lock(workdir)  # one run per workdir (workdir_lock.py)
    try:
        checkpointer = Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                    async_save=config.async_checkpointing,
                                    remove_unfinished=True, best_metric=config.best_metric,
                                    best_mode=config.best_metric_mode)
    except BaseException:
        release_lock()
        raise
    writer = bar = None
    try:
        if checkpointer.latest_step() is not None:
            state = checkpointer.restore(
                abstract_train_state(task.init_params, optimizer, config.seed, shardings),
                train_iter)
            _say(f"Resuming from the checkpoint at step {int(state.step)} in "
                 f"{checkpointer.directory}")
        else:
            state = create_sharded_train_state(task.init_params, optimizer, config.seed,
                                               shardings)
        start_step = int(jax.device_get(state.step))
        if start_step >= config.num_train_steps:
            _say(f"Nothing to do: the checkpoint is at step {start_step} and "
                 f"config.num_train_steps = {config.num_train_steps}")
        writer = MetricsWriter(workdir, start_step=start_step)
        save_config(config, workdir)
        bar = make_progress_bar(config.num_train_steps, start_step, enabled=config.progress_bar)
        run = _Run(config, task, mesh, train_iter, eval_batches, checkpointer, writer, bar,
                   make_train_step(task.loss_fn, optimizer, schedule, mesh,
                                   grad_accum_steps=config.grad_accum_steps,
                                   state_shardings=shardings), shardings.params)
        run.profiler = StepProfiler(config.get("profile_steps"), workdir, start_step)
        try:
            state = run.loop(state, start_step)
        finally:
            run.profiler.stop()
        checkpointer.wait_until_finished()
        bar.close()
        if checkpointer.best_step() is not None:
            _say(f"Best checkpoint by eval {config.best_metric}: step {checkpointer.best_step()}")
        print_summary(f"Finished at step {int(jax.device_get(state.step))} (workdir {workdir})",
                      {split: {k: v for k, v in record.items() if k != "split"}
                       for split, record in (("train", run.last_train),
                                             ("eval", run.last_eval)) if record})
        return TrainResult(state=state, start_step=start_step,
                           train_metrics=run.last_train, eval_metrics=run.last_eval)
    finally:
        if bar is not None:
            bar.close()
        checkpointer.close()
        if writer is not None:
            writer.close()
        release_lock()


class _Run:
    """The per-step bookkeeping of :func:`train` (kept apart to keep ``train`` readable)."""

    def __init__(self, config, task, mesh, train_iter, eval_batches, checkpointer, writer,
                 bar, train_step, params_shardings=None):
        self.config = config
        self.task = task
        self.mesh = mesh
        self.train_iter = train_iter
        self.eval_batches = eval_batches
        self.checkpointer = checkpointer
        self.writer = writer
        self.bar = bar
        self.train_step = train_step
        self.eval_step = (make_eval_step(task.loss_fn, mesh, params_shardings)
                          if eval_batches is not None else None)
        self.window = _TrainWindow()
        self.meter = ThroughputMeter(task, config, mesh)
        self.profiler: Optional[StepProfiler] = None
        self.last_train: dict = {}
        self.last_eval: dict = {}
        self.early_stopping = EarlyStopping(config.best_metric, config.best_metric_mode,
                                            config.early_stopping_patience,
                                            config.early_stopping_min_delta)

    def loop(self, state: TrainState, start_step: int) -> TrainState:
        config = self.config
        last_step = config.num_train_steps
        wants_eval = self.eval_batches is not None or self.task.evaluate is not None
        with PreemptionWatcher(self.checkpointer.reached_preemption) as watcher:
            for step in range(start_step + 1, last_step + 1):
                try:
                    batch = next(self.train_iter)
                except StopIteration:
                    raise ValueError(f"the train iterator ended before step {step}; it must "
                                     f"repeat epochs indefinitely") from None
                _check_batch(batch, step, config.batch_size)
                self.profiler.before(step)
                state, metrics = self.train_step(state, shard_batch(batch, self.mesh))
                self.profiler.after(step, state)
                self.meter.add(batch)
                self.window.steps.append((step, metrics))
                self.bar.update(1)
                final = step == last_step
                if final or step % config.log_every_steps == 0:
                    self.write_train_metrics(step)
                if wants_eval and (final or (config.eval_every_steps
                                             and step % config.eval_every_steps == 0)):
                    self.evaluate_or_save(state, step)
                    if not final and self.early_stopping.update(step, self.last_eval):
                        self.save(state)
                        _say(self.early_stopping.message(step))
                        break
                if final or (config.checkpoint_every_steps
                             and step % config.checkpoint_every_steps == 0):
                    self.save(state)
                if not final and watcher.should_stop(step):
                    self.save(state)
                    self.checkpointer.wait_until_finished()
                    preempted = Preempted(step, self.checkpointer.directory, watcher.signal_name)
                    _say(str(preempted))
                    raise preempted
        return state

    def _stop_if_nonfinite(self) -> None:
        if self.config.skip_nonfinite_updates or not self.window.steps:
            return
        bad = self.window.first_nonfinite()
        if bad is not None:
            step, metrics = bad
            self.checkpointer.wait_until_finished()
            raise NonFiniteError(step, float(metrics["loss"]), float(metrics["grad_norm"]),
                                 self.checkpointer.latest_step(), self.checkpointer.directory)

    def write_train_metrics(self, step: int) -> None:
        self._stop_if_nonfinite()
        fetched = self.window.fetch()
        seconds = time.perf_counter() - self.window.started - self.window.paused_seconds
        finite = [m for _, m in fetched if m["finite"]]
        averaged = _loss_first(average_metrics([
            {k: v for k, v in m.items() if k not in ("finite", "learning_rate")}
            for m in finite]))
        averaged["learning_rate"] = float(fetched[-1][1]["learning_rate"])
        averaged["steps_per_sec"] = len(fetched) / max(seconds, 1e-9)
        averaged.update(self.meter.rates(len(fetched), seconds))
        if len(finite) < len(fetched):
            averaged["nonfinite_steps"] = len(fetched) - len(finite)
        self.last_train = self.writer.write(step, "train", averaged)
        self.window.reset()
        self.bar.set_postfix(loss=f"{averaged.get('loss', float('nan')):.4f}",
                             steps_per_sec=f"{averaged['steps_per_sec']:.2f}")
        if self.bar.disable:
            _say(f"step {step}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in averaged.items()))

    def evaluate_or_save(self, state: TrainState, step: int) -> None:
        """Evaluates; if evaluation fails, the step's training is checkpointed before the error.

        One process only: with several, a host that failed alone would wait in the
        (collective) save for hosts that did not.
        """
        try:
            self.evaluate(state, step)
        except NonFiniteError:
            raise
        except Exception:
            if jax.process_count() == 1 and self.checkpointer.save(state, self.train_iter):
                self.checkpointer.wait_until_finished()
                _say(f"The evaluation at step {step} failed; saved a checkpoint at step {step} "
                     f"first, so a rerun does not repeat the training")
            raise

    def evaluate(self, state: TrainState, step: int) -> None:
        self._stop_if_nonfinite()
        started = time.perf_counter()
        results = {}
        if self.eval_batches is not None:
            per_batch = []
            for batch in _eval_pass(self.eval_batches):
                loss, metrics = self.eval_step(state.params, shard_batch(batch, self.mesh),
                                               state.rng)
                per_batch.append({"loss": loss, **metrics})
            results.update(_loss_first(average_metrics(jax.device_get(per_batch))))
        if self.task.evaluate is not None:
            results.update(self.task.evaluate(state.params, step, self.mesh))
        self.last_eval = self.writer.write(step, "eval", results)
        self.window.paused_seconds += time.perf_counter() - started

    def save(self, state: TrainState) -> None:
        self._stop_if_nonfinite()
        started = time.perf_counter()
        step = int(jax.device_get(state.step))
        metrics = self.last_eval if self.last_eval.get("step") == step else None
        self.checkpointer.save(state, self.train_iter, metrics=metrics)
        self.window.paused_seconds += time.perf_counter() - started
