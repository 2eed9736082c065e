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

Also in this module: Stop training when an eval metric has stopped improving ("early stopping").

Also in this module: Preemption: turn SIGTERM (and Ctrl-C) into "checkpoint now and exit" at the next step.
"""
from __future__ import annotations

import _thread
import dataclasses
import gc
import itertools
import json
import math
import signal
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from tfx_jax.errors import DataError, say
from tfx_jax.train.checkpoint import Checkpointer, check_iterator_checkpointable, hold_workdir_lock
from tfx_jax.train.mesh import (check_batch_size, check_eval_batches, compile_target, make_mesh,
                                shard_batch)
from tfx_jax.train.metrics import MetricsWriter, average_metrics, make_progress_bar, print_summary
from tfx_jax.train.optim import create_optimizer
from tfx_jax.train.perf import StepProfiler, ThroughputMeter
from tfx_jax.train.run_config import is_plan, save_config, validate_config
from tfx_jax.train.state import (Batch, Task, TrainState, abstract_train_state,
                                 create_sharded_train_state, make_eval_step, make_train_step,
                                 train_state_shardings)


# --- loop -------------------------------------------------------------------------------
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
    that all of them have one, and raise the same DataError if not.
    """
    batches = iter(eval_batches() if callable(eval_batches) else eval_batches)
    for index in itertools.count():
        batch = next(batches, None)
        if jax.process_count() > 1:
            has_batch = multihost_utils.process_allgather(np.asarray(batch is not None))
            if has_batch.any() and not has_batch.all():
                raise DataError(
                    f"eval_batches: process(es) {np.flatnonzero(~has_batch).tolist()} have "
                    f"{index} batches but process(es) {np.flatnonzero(has_batch).tolist()} "
                    f"have more; every process must yield the same number of eval batches "
                    f"(pad the last batches, as tfx_jax.data's eval pipelines do)")
        if batch is None:
            return
        yield batch


WINDOW_FILE = "train_window.json"  # the steps since the last train line, at the last save


def evaluate_batches(eval_step, params, eval_batches, mesh: Mesh, rng,
                     task: Optional[Task] = None) -> dict:
    """The eval line's loss-function metrics: ``eval_step`` (:func:`make_eval_step`) over one
    pass of ``eval_batches``, averaged weighted by ``"weight"``, plus ``task.eval_summary``."""
    per_batch = []
    for batch in _eval_pass(eval_batches):
        loss, metrics = eval_step(params, shard_batch(batch, mesh), rng)
        per_batch.append({"loss": loss, **metrics})
    results = _loss_first(average_metrics(jax.device_get(per_batch)))
    if task is not None and task.eval_summary is not None:
        results.update(task.eval_summary(results))
    return results


class _TrainWindow:
    """Metrics of the steps since the last log line, kept on device until needed.

    ``carried``: the steps a resumed run trained before its checkpoint and after its
    last train line (host values from :data:`WINDOW_FILE`), so that the first line
    after a resume averages the same steps as an uninterrupted run's.
    """

    def __init__(self):
        self.steps: list[tuple[int, dict]] = []
        self.carried: list[tuple[int, dict]] = []
        self.started = time.perf_counter()
        self.paused_seconds = 0.0

    def fetch(self) -> list[tuple[int, dict]]:
        return self.carried + [(step, jax.device_get(m)) for step, m in self.steps]

    def save(self, workdir: str, step: int) -> None:
        """Keeps the window beside the checkpoint at ``step`` (process 0; none if empty)."""
        if jax.process_index() != 0 or not (self.steps or self.carried):
            return
        steps = [[s, {k: float(v) for k, v in m.items()}] for s, m in self.fetch()]
        (epath.Path(workdir) / WINDOW_FILE).write_text(json.dumps({"step": step,
                                                                   "steps": steps}))

    def resume(self, workdir: str, step: int) -> None:
        """Carries the window kept with the checkpoint at ``step``, if there is one."""
        path = epath.Path(workdir) / WINDOW_FILE
        if not path.exists():
            return
        kept = json.loads(path.read_text())
        if kept.get("step") == step:
            self.carried = [(int(s), m) for s, m in kept["steps"]]

    def first_nonfinite(self) -> Optional[tuple[int, dict]]:
        flags = jax.device_get([m["finite"] for _, m in self.steps])
        for (step, metrics), finite in zip(self.steps, flags):
            if not finite:
                return step, jax.device_get(metrics)
        return None

    def reset(self) -> None:
        self.steps = []
        self.carried = []
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
        rules (``tfx_jax.train.mesh``), created directly in shards.

    Raises:
      Preempted: SIGTERM arrived; a checkpoint at the current step was saved.
      NonFiniteError: a non-finite step with ``skip_nonfinite_updates=False``.
      ValueError: bad config, batch shapes, or a checkpoint that does not fit.
    """
    if not is_plan(config):  # a plan (run_config.freeze) was checked by its app already
        validate_config(config)
    check_iterator_checkpointable(train_iter)
    _check_eval_batches(eval_batches)
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    if not is_plan(config):
        check_batch_size(config.batch_size, mesh)
    check_eval_batches(eval_batches, mesh)
    if compile_target() is not None:  # compile, report, stop
        from tfx_jax.train.topology import compile_run  # pylint: disable=import-outside-toplevel
        compile_run(config, workdir, task, train_iter, eval_batches, mesh)
    # fine-tuning: frozen parameters get zero updates
    optimizer, schedule = create_optimizer(config, task.trainable)
    shardings = train_state_shardings(task.init_params, optimizer, mesh)  # checks the mesh

    release_lock = hold_workdir_lock(workdir)  # one run per workdir (checkpoint.py)
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
            say(f"Resuming from the checkpoint at step {int(state.step)} in "
                f"{checkpointer.directory}")
        else:
            state = create_sharded_train_state(task.init_params, optimizer, config.seed,
                                               shardings)
        start_step = int(jax.device_get(state.step))
        if start_step > config.num_train_steps:
            say(f"Nothing to train: config.num_train_steps = {config.num_train_steps} is below "
                f"the checkpoint's step {start_step}; config.json is kept as the run that "
                f"trained it wrote it")
        elif start_step == config.num_train_steps:
            say(f"Nothing to train: the checkpoint is at step {start_step} = "
                f"config.num_train_steps")
        writer = MetricsWriter(workdir, start_step=start_step)
        if start_step < config.num_train_steps:  # a finished run's config.json stays its own
            save_config(config, workdir)
        bar = make_progress_bar(config.num_train_steps, start_step, enabled=config.progress_bar)
        run = _Run(config, task, mesh, train_iter, eval_batches, checkpointer, writer, bar,
                   make_train_step(task.loss_fn, optimizer, schedule, mesh,
                                   grad_accum_steps=config.grad_accum_steps,
                                   state_shardings=shardings), shardings.params, workdir)
        run.window.resume(workdir, start_step)
        run.profiler = StepProfiler(config.get("profile_steps"), workdir, start_step)
        try:
            state = run.loop(state, start_step)
        finally:
            run.profiler.stop()
        checkpointer.wait_until_finished()
        bar.close()
        if checkpointer.best_step() is not None:
            say(f"Best checkpoint by eval {config.best_metric}: step {checkpointer.best_step()}")
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
                 bar, train_step, params_shardings=None, workdir: str = ""):
        self.config = config
        self.workdir = workdir
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
                logged = final or step % config.log_every_steps == 0
                if logged or jax.process_count() == 1:
                    # a failed asynchronous save stops the run now (with several processes
                    # a collective, so at the logged steps only)
                    self.checkpointer.check_saves()
                if logged:
                    self.write_train_metrics(step)
                if wants_eval and (final or (config.eval_every_steps
                                             and step % config.eval_every_steps == 0)):
                    self.evaluate_or_save(state, step)
                    if not final and self.early_stopping.update(step, self.last_eval):
                        self.save(state)
                        say(self.early_stopping.message(step))
                        break
                if final or (config.checkpoint_every_steps
                             and step % config.checkpoint_every_steps == 0):
                    self.save(state)
                if not final and watcher.should_stop(step):
                    self.save(state)
                    self.checkpointer.wait_until_finished()
                    preempted = Preempted(step, self.checkpointer.directory, watcher.signal_name)
                    say(str(preempted))
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
        trained = len(self.window.steps)  # by this process: the speed metrics' steps
        seconds = time.perf_counter() - self.window.started - self.window.paused_seconds
        finite = [m for _, m in fetched if m["finite"]]
        averaged = _loss_first(average_metrics([
            {k: v for k, v in m.items() if k not in ("finite", "learning_rate")}
            for m in finite]))
        averaged["learning_rate"] = float(fetched[-1][1]["learning_rate"])
        averaged["steps_per_sec"] = trained / max(seconds, 1e-9)
        averaged.update(self.meter.rates(trained, seconds))
        if len(finite) < len(fetched):
            averaged["nonfinite_steps"] = len(fetched) - len(finite)
        self.last_train = self.writer.write(step, "train", averaged)
        self.window.reset()
        self.bar.set_postfix(loss=f"{averaged.get('loss', float('nan')):.4f}",
                             steps_per_sec=f"{averaged['steps_per_sec']:.2f}")
        if self.bar.disable:
            say(f"step {step}: " + ", ".join(
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
                say(f"The evaluation at step {step} failed; saved a checkpoint at step {step} "
                    f"first, so a rerun does not repeat the training")
            raise

    def evaluate(self, state: TrainState, step: int) -> None:
        self._stop_if_nonfinite()
        started = time.perf_counter()
        results = {}
        if self.eval_batches is not None:
            results.update(evaluate_batches(self.eval_step, state.params, self.eval_batches,
                                            self.mesh, state.rng, self.task))
        if self.task.evaluate is not None:
            results.update(self.task.evaluate(state.params, step, self.mesh))
        self.last_eval = self.writer.write(step, "eval", results)
        self.window.paused_seconds += time.perf_counter() - started

    def save(self, state: TrainState) -> None:
        self._stop_if_nonfinite()
        started = time.perf_counter()
        step = int(jax.device_get(state.step))
        metrics = self.last_eval if self.last_eval.get("step") == step else None
        # (a full, read-only or forbidden disk: Checkpointer raises CheckpointWriteError)
        self.checkpointer.save(state, self.train_iter, metrics=metrics)
        self.window.save(self.workdir, step)
        self.window.paused_seconds += time.perf_counter() - started


# --- early stopping ---------------------------------------------------------------------
# Stop training when an eval metric has stopped improving ("early stopping").
#
# With ``config.early_stopping_patience = p > 0`` the loop stops after ``p``
# evaluations in a row without a new best ``config.best_metric`` (lower is
# better for ``best_metric_mode = "min"``, higher for ``"max"``), saves a
# checkpoint at that step and returns normally. Improvements smaller than
# ``config.early_stopping_min_delta`` do not count.

class EarlyStopping:
    """Counts evaluations since the best value of one metric."""

    def __init__(self, metric: str, mode: str = "min", patience: int = 0,
                 min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric = metric
        self.sign = 1.0 if mode == "min" else -1.0
        self.patience = patience
        self.min_delta = min_delta
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.evals_since_best = 0

    @property
    def enabled(self) -> bool:
        return self.patience > 0 and bool(self.metric)

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Records one evaluation; True when the run should stop."""
        value = metrics.get(self.metric)
        if not self.enabled or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.best is None or self.sign * (self.best - value) > self.min_delta:
            self.best, self.best_step, self.evals_since_best = float(value), step, 0
            return False
        self.evals_since_best += 1
        return self.evals_since_best >= self.patience

    def message(self, step: int) -> str:
        return (f"Early stopping at step {step}: eval {self.metric} has not improved for "
                f"{self.evals_since_best} evaluations (best {self.best:.4g} at step "
                f"{self.best_step}; config.early_stopping_patience = {self.patience})")


# --- preemption -------------------------------------------------------------------------
# Preemption: turn SIGTERM (and Ctrl-C) into "checkpoint now and exit" at the next step.
#
# Cloud TPU/GPU VMs (and Kubernetes, SLURM) announce preemption with SIGTERM
# and kill the process some seconds later. :class:`PreemptionWatcher` records
# the signal; the loop asks :meth:`PreemptionWatcher.should_stop` after every
# step, and on True saves a checkpoint at the current step, waits for it, and
# raises :class:`Preempted`. Rerunning the same command resumes from it.
#
# Ctrl-C (SIGINT) is treated the same way: the step finishes, a checkpoint is
# saved and the script exits with 130 (128 + SIGINT) and one line. A second
# Ctrl-C while that happens interrupts at once (Python's KeyboardInterrupt).
#
# Multi-host runs need every host to stop at the *same* step (the save is a
# collective). There JAX's own preemption service, started by
# ``jax.distributed.initialize``, catches SIGTERM and Orbax's
# ``CheckpointManager.reached_preemption(step)`` tells all hosts together; the
# watcher then leaves SIGTERM to JAX and only asks Orbax.

EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT


class Preempted(Exception):
    """Raised by the loop after it saved a checkpoint because of a preemption notice.

    Scripts let it propagate or ``sys.exit(Preempted.exit_code)``; either way the
    process ends with a non-zero status and rerunning the same command resumes.
    """
    exit_code = EXIT_CODE

    def __init__(self, step: int, checkpoint_dir: str, signal_name: str = "SIGTERM"):
        self.step = step
        self.checkpoint_dir = checkpoint_dir
        self.signal_name = signal_name
        self.exit_code = INTERRUPT_EXIT_CODE if signal_name == "SIGINT" else EXIT_CODE
        what = "interrupted" if signal_name == "SIGINT" else "preempted"
        super().__init__(
            f"{what} ({signal_name}): saved a checkpoint at step {step} in {checkpoint_dir}; "
            f"rerun the same command to resume")


_interrupted = threading.Event()  # a Ctrl-C arrived that the run has not acted on yet


def _resend_interrupt() -> None:
    """Sends Ctrl-C to the main thread again in 20 ms, when it runs other code."""
    timer = threading.Timer(0.02, _thread.interrupt_main, args=(signal.SIGINT,))
    timer.daemon = True
    timer.start()


def _caller_of_gc(frame):
    """The frame the garbage collector interrupted, if ``frame`` runs in a gc callback."""
    codes = {getattr(getattr(cb, "__func__", cb), "__code__", None) for cb in gc.callbacks}
    caller = None
    while frame is not None:
        if frame.f_code in codes:
            caller = frame.f_back
        frame = frame.f_back
    return caller


def _raise_in(frame) -> None:
    """Raises KeyboardInterrupt in ``frame`` at its next line (a trace function may raise
    where a gc callback may not), the way debuggers stop a running frame."""
    def stop(frame, event, arg):
        del frame, event, arg
        raise KeyboardInterrupt  # an error in a trace function also turns tracing off

    frame.f_trace = stop
    frame.f_trace_lines = True
    sys.settrace(lambda *args: None)  # tracing on; no other frame is traced


def _raise_interrupt(signum, frame) -> None:
    del signum
    _interrupted.set()
    caller = _caller_of_gc(frame)
    if caller is None:
        raise KeyboardInterrupt
    # In a gc callback (JAX's _xla_gc_callback) Python would swallow the exception.
    if sys.gettrace() is None:
        _raise_in(caller)
    else:  # a debugger or coverage tool traces: send the signal again instead
        _resend_interrupt()


def _unraisable(hook_args) -> None:
    """Python ignores exceptions raised in garbage-collector callbacks and ``__del__``
    (JAX's ``_xla_gc_callback`` runs at any moment); a Ctrl-C that landed there is sent
    again, so it interrupts the code that runs next instead of being lost."""
    if isinstance(hook_args.exc_value, KeyboardInterrupt):
        _resend_interrupt()
        return
    sys.__unraisablehook__(hook_args)


def install_interrupt_handler() -> None:
    """Ctrl-C raises KeyboardInterrupt in the main thread from now on, never to be lost.

    ``launch.run`` calls it first; scripts exit 130 with one line on it. Python
    swallows exceptions raised in garbage-collector callbacks, where JAX's
    ``_xla_gc_callback`` runs at any moment ("Exception ignored in ..."): a Ctrl-C
    that lands there is raised in the frame the collector interrupted, at its next
    line; one swallowed elsewhere (``__del__``) is sent again; and one lost anyway is
    remembered, so the next training loop stops at its first step (checkpoint, exit
    130; see :class:`PreemptionWatcher`). During training the watcher's handler
    takes over (finish the step, save); a second Ctrl-C comes back here.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _raise_interrupt)
    sys.unraisablehook = _unraisable


class PreemptionWatcher:
    """Context manager that notes SIGTERM and SIGINT while a run is in progress."""

    def __init__(self, reached_sync_point: Optional[Callable[[int], bool]] = None):
        """``reached_sync_point(step)``: Orbax's multi-host check, used when process_count > 1."""
        self._reached_sync_point = reached_sync_point
        self._requested = threading.Event()
        self._previous_handlers: dict = {}
        self.signal_name = "SIGTERM"

    def _on_signal(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name
        self._requested.set()
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, self._previous_handlers.get(
                signal.SIGINT, signal.default_int_handler))

    def __enter__(self) -> "PreemptionWatcher":
        # Several processes: JAX's preemption service owns SIGTERM, and a Ctrl-C seen by
        # one host only cannot stop all hosts at one step, so it stays a KeyboardInterrupt.
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        if _interrupted.is_set():  # a Ctrl-C before training that Python swallowed
            _interrupted.clear()
            self.request("SIGINT")
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def request(self, signal_name: str = "SIGTERM") -> None:
        """Marks a preemption as requested (what SIGTERM / SIGINT do)."""
        self.signal_name = signal_name
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        """True once SIGTERM arrived (or, multi-host, all hosts reached the sync point)."""
        if self._requested.is_set():
            return True
        if jax.process_count() > 1 and self._reached_sync_point is not None:
            return bool(self._reached_sync_point(step))
        return False
