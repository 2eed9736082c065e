"""Orbax checkpoints of the train state *and* the data iterator, so a resumed run is the same run.

Layout: ``<workdir>/checkpoints/<step>/state`` (the :class:`TrainState`,
``ocp.args.StandardSave``) and ``<workdir>/checkpoints/<step>/data_iterator/
process_<i>-of-<n>.json`` (``ocp.args.JsonSave`` of each host's
``iterator.get_state()``; every host writes its own file because each host
reads its own slice of the data). Grain iterator states are dicts
(``DatasetIterator``) or bytes (``DataLoaderIterator``); both round-trip.

Restoring uses an abstract target that carries the *current* mesh's
shardings, so a checkpoint written on 8 devices restores onto 1 and vice
versa. Before reading any array the stored shapes are compared with the
model's; a mismatch raises ValueError naming the parameter paths and the
workdir, and nothing is deleted. A checkpoint that cannot be read (damaged
files, an iterator state of another pipeline) raises ValueError naming its
directory; nothing is deleted either.

Saves are atomic: Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it
to ``<step>`` when complete, so a process killed mid-save leaves only a
temporary directory, which is never restored (the training loop deletes it).

Every save also stores a checksum of each array of the state
(``<step>/checksums``, :mod:`tfx_jax.train.checkpoint`). Restoring recomputes
them; a step whose bytes changed since it was written (disk or copy errors,
hand edits) raises :class:`CorruptCheckpointError` naming the step and the
arrays. Restoring the *latest* step then falls back to the newest good one:
the training loop (the workdir's owner) moves the corrupt step aside to
``<workdir>/checkpoints_corrupt/<step>`` (nothing is deleted) and says so;
readers only skip it.

A save that storage refuses (full, read-only, not ours to write) raises
:class:`CheckpointWriteError` naming that step and the step kept: at once when a
probe file cannot be written before the save, else as soon as the asynchronous save
has failed (the loop asks after every step; with several processes all hosts agree
at every logged step and before each save, so all stop together). Orbax's per-thread
tracebacks of such failures are kept out of the log (``--verbosity=1`` shows them).

With ``best_metric`` set, the checkpoint with the best value of that eval
metric is kept besides the latest ``max_to_keep`` (Orbax ``BestN`` +
``LatestN`` preservation policies), so a run that later diverges keeps its
best state; :meth:`Checkpointer.best_step` names it.

For inference (prediction, decoding, evaluation) :func:`restore_params` reads
only the model parameters of a workdir's latest checkpoint: no optimizer
state (so no optimizer config is needed) and no data iterator.

Also in this module: A checksum per array of the train state, so corrupt checkpoint bytes are caught on restore.

Also in this module: One run per workdir: process 0 holds ``<workdir>/.lock`` (host and pid) while it runs.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import errno
import functools
import json
import logging
import math
import os
import posixpath
import re
import socket
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from tfx_jax.errors import USER_ERRNOS, WorkdirError, WorkdirNotFound, say
from tfx_jax.train.mesh import make_data_mesh, param_shardings
from tfx_jax.train.metrics import is_url
from tfx_jax.train.state import TrainState, abstract_params_with_axes

# --- checkpoint -------------------------------------------------------------------------
STATE_ITEM = "state"
ITERATOR_ITEM = "data_iterator"
CHECKSUM_ITEM = "checksums"
CORRUPT_DIR = "checkpoints_corrupt"


class _NoMissingMetricWarning(logging.Filter):
    """Orbax warns at every save without eval metrics when it tracks the best; most
    saves have none (evaluation is rarer than checkpointing), so that is not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMissingMetricWarning())


# What a full, read-only or forbidden disk looks like, as Python (errno) or TensorStore
# (status text inside a ValueError) reports it.
_STORAGE_ERRNOS = {number: os.strerror(number) for number in USER_ERRNOS}
_STORAGE_TEXTS = tuple(_STORAGE_ERRNOS.values()) + ("RESOURCE_EXHAUSTED",)


def storage_cause(error: BaseException) -> Optional[str]:
    """The storage problem behind ``error`` (e.g. ``"No space left on device"``), or None.

    Follows ``__cause__`` / ``__context__``: Orbax re-raises what its writer threads met.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[error.errno]
        text = str(error)
        for cause in _STORAGE_TEXTS[:-1]:
            if cause in text:
                return cause
        if "RESOURCE_EXHAUSTED" in text:
            return "RESOURCE_EXHAUSTED (storage full or over quota)"
        error = error.__cause__ or error.__context__
    return None


# checkpoint directory -> the exception an Orbax writer thread of this process met
_BACKGROUND_ERRORS: dict[str, BaseException] = {}


class _BackgroundSaveErrors(logging.Filter):
    """Orbax's writer thread says that a write failed in two ways: a log record carrying
    the exception, and the exception raised again by a ``join`` that, with several
    processes, first waits at a barrier for every host (minutes, until its timeout, when a
    host's write failed). The record is the word that comes without waiting: kept per
    checkpoint directory for :meth:`Checkpointer._save_error`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and "orbax" in record.pathname:
            written = re.search(r"directory: (\S+)", record.getMessage())
            if written:
                _BACKGROUND_ERRORS[posixpath.dirname(written.group(1).rstrip("/"))] = (
                    record.exc_info[1])
        return True


logging.getLogger("absl").addFilter(_BackgroundSaveErrors())  # before the next filter


_STORAGE_CAUSES = (*_STORAGE_ERRNOS.values(), "RESOURCE_EXHAUSTED (storage full or over quota)")


def _failure_code(error: BaseException) -> int:
    """1 + the index of ``error``'s storage cause in _STORAGE_CAUSES; past them: another error."""
    cause = storage_cause(error)
    return 1 + (_STORAGE_CAUSES.index(cause) if cause in _STORAGE_CAUSES
                else len(_STORAGE_CAUSES))


class _NoStorageTracebacks(logging.Filter):
    """A save that fails for a full or read-only disk is reported by :class:`Checkpointer`
    in one line (:class:`CheckpointWriteError`); Orbax's writer threads would log the same
    error with a traceback once per thread (~350 lines). Shown with ``--verbosity=1``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "orbax" not in record.pathname:
            return True
        if logging.getLogger("absl").getEffectiveLevel() <= logging.DEBUG:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return storage_cause(error) is None and storage_cause(
            Exception(record.getMessage())) is None


logging.getLogger("absl").addFilter(_NoStorageTracebacks())


class CheckpointWriteError(WorkdirError):
    """A checkpoint could not be written: the disk is full, read-only or not ours to write."""

    def __init__(self, step: Optional[int], directory: str, cause: str, kept: Optional[int]):
        self.step = step
        self.kept = kept
        what = "a checkpoint" if step is None else f"the checkpoint at step {step}"
        kept_text = (f"the checkpoint at step {kept} is kept" if kept is not None
                     else "no checkpoint was written before it")
        fix = ("free some space" if "space" in cause or "quota" in cause or
               "RESOURCE_EXHAUSTED" in cause else f"make {directory} writable")
        super().__init__(f"cannot write {what} to {directory}: {cause}; "
                         f"{kept_text}. {fix[0].upper() + fix[1:]} and rerun the same command "
                         f"to resume")


class CheckpointError(WorkdirError, ValueError):
    """A workdir's checkpoint that cannot be restored: unreadable, or of another model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's arrays do not match the checksums written with them."""

    def __init__(self, step: int, step_dir: str, paths: list[str]):
        self.step = step
        paths = sorted(paths, key=lambda p: (not p.startswith("params"), p))
        listed = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        super().__init__(f"the checkpoint at step {step} ({step_dir}) is corrupt: the bytes of "
                         f"{listed} no longer match their checksums")


def encode_iterator_state(state: Any) -> dict:
    """A JSON-ready dict for a Grain iterator state (dict or bytes)."""
    if isinstance(state, bytes):
        return {"format": "bytes", "base64": base64.b64encode(state).decode("ascii")}
    return {"format": "json", "state": state}


def decode_iterator_state(encoded: dict) -> Any:
    """Inverse of :func:`encode_iterator_state`."""
    if encoded.get("format") == "bytes":
        return base64.b64decode(encoded["base64"])
    if encoded.get("format") == "json":
        return encoded["state"]
    raise ValueError(f"unknown data iterator state format in checkpoint: {encoded!r}")


def check_iterator_checkpointable(iterator) -> None:
    if not (hasattr(iterator, "get_state") and hasattr(iterator, "set_state")):
        raise TypeError(
            f"the data iterator ({type(iterator).__name__}) must have get_state() and "
            f"set_state(state) so checkpoints can resume it; use a Grain iterator")


def _shapes_by_path(tree, is_leaf=None) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {path_name(path): tuple(leaf.shape) for path, leaf in leaves}


def _mismatches(stored: dict, expected: dict) -> list[str]:
    problems = []
    for path in sorted(set(stored) | set(expected),
                       key=lambda p: (not p.startswith("params"), p)):
        if path not in stored:
            problems.append(f"{path}: missing in the checkpoint (model has shape {expected[path]})")
        elif path not in expected:
            problems.append(f"{path}: in the checkpoint (shape {stored[path]}) but not in the model")
        elif stored[path] != expected[path]:
            problems.append(f"{path}: checkpoint has shape {stored[path]}, "
                            f"model expects {expected[path]}")
    return problems


class Checkpointer:
    """Saves and restores (TrainState, data iterator) pairs under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
                 remove_unfinished: bool = False, best_metric: str = "",
                 best_mode: str = "min"):
        """``remove_unfinished=True`` deletes what saves cut short left behind.

        A save goes to ``<step>.orbax-checkpoint-tmp`` and is renamed to
        ``<step>`` only once complete, so a process killed mid-save leaves a
        temporary directory that is never restored. Only the run that owns the
        workdir (the training loop) should delete them: anyone else, e.g. an
        evaluation job reading checkpoints, would delete a save in progress.
        The owner also moves corrupt checkpoints aside (see the module doc).

        ``best_metric`` (e.g. ``"loss"``, with ``best_mode`` ``"min"``): also
        keep the checkpoint whose ``metrics`` passed to :meth:`save` are best.
        """
        self.workdir = os.fspath(workdir)
        root = self.workdir if is_url(self.workdir) else os.path.abspath(self.workdir)
        self.directory = os.path.join(root, "checkpoints")  # gs://... stays a URL
        iterator_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        iterator_handler = ocp.handlers.JsonCheckpointHandler(
            filename=iterator_file,
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(STATE_ITEM, ocp.args.StandardSave, ocp.handlers.StandardCheckpointHandler)
        registry.add(STATE_ITEM, ocp.args.StandardRestore, ocp.handlers.StandardCheckpointHandler)
        registry.add(ITERATOR_ITEM, ocp.args.JsonSave, iterator_handler)
        registry.add(ITERATOR_ITEM, ocp.args.JsonRestore, iterator_handler)
        checksum_handler = ocp.handlers.JsonCheckpointHandler(filename="checksums.json")
        registry.add(CHECKSUM_ITEM, ocp.args.JsonSave, checksum_handler)
        registry.add(CHECKSUM_ITEM, ocp.args.JsonRestore, checksum_handler)
        self.owner = remove_unfinished
        self.best_metric = best_metric
        keep: dict = dict(max_to_keep=max_to_keep)
        if best_metric:
            if best_mode not in ("min", "max"):
                raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
            best_fn = _metric_getter(best_metric, best_mode)
            keep = dict(best_fn=best_fn, best_mode=best_mode,
                        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
                            ocp.checkpoint_managers.LatestN(n=max_to_keep),
                            ocp.checkpoint_managers.BestN(
                                get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                keep_checkpoints_without_metrics=False)]))
        self._async = async_save
        self._saving: Optional[int] = None  # the step of an asynchronous save in progress
        self._failed = False  # a CheckpointWriteError was raised (close() then stays quiet)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, handler_registry=registry,
                options=ocp.CheckpointManagerOptions(
                    create=True, enable_async_checkpointing=async_save,
                    cleanup_tmp_directories=remove_unfinished, **keep))
        except Exception as e:
            cause = storage_cause(e)
            if cause is None:
                raise
            raise WorkdirError(f"cannot use the checkpoint directory {self.directory}: "
                               f"{cause}") from e

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> Optional[int]:
        """The kept step with the best ``best_metric`` (None without one or no metrics yet)."""
        if not self.best_metric:
            return None
        best = self._manager.best_step()  # Orbax falls back to the latest without metrics
        return best if best is not None and self._manager.metrics(best) is not None else None

    def save(self, state: TrainState, data_iterator,
             metrics: Optional[Mapping[str, float]] = None) -> bool:
        """Starts saving ``state`` and ``data_iterator.get_state()`` at ``state.step``.

        ``metrics``: the eval metrics of this step, for keeping the best
        checkpoint (ignored without ``best_metric``). Returns False (and writes
        nothing) if that step is already saved. Asynchronous unless the
        Checkpointer was made with ``async_save=False``; call
        :meth:`wait_until_finished` before relying on the files.
        """
        check_iterator_checkpointable(data_iterator)
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        self._finish_pending()
        self._probe_writable(step)
        iterator_state = encode_iterator_state(data_iterator.get_state())
        kept_metrics = None
        if self.best_metric and metrics and _finite(metrics.get(self.best_metric)):
            kept_metrics = {self.best_metric: float(metrics[self.best_metric])}
        try:
            saved = self._manager.save(
                step, force=True, metrics=kept_metrics,
                args=ocp.args.Composite(**{
                    STATE_ITEM: ocp.args.StandardSave(state),
                    ITERATOR_ITEM: ocp.args.JsonSave(iterator_state),
                    CHECKSUM_ITEM: ocp.args.JsonSave(tree_checksums(state))}))
        except Exception as e:
            raise self._write_error(step, e) from e
        self._saving = step if saved and self._async else None
        return saved

    # A save that cannot be written (full, read-only or forbidden storage) raises
    # CheckpointWriteError naming its step and the step kept: at once when the directory
    # refuses a probe file, otherwise as soon as the asynchronous save has failed
    # (check_saves, after every step; with several processes at every logged step, on
    # every host together), and at the latest at the next save or wait. Orbax deletes old
    # steps only after a save succeeded, so the previous checkpoint stays.

    def _probe_writable(self, step: int) -> None:
        """Writes and deletes a small file first, so read-only storage fails at this save
        (on every host together: each probes its own file and all learn what any met)."""
        error = None
        if not is_url(self.directory):
            probe = os.path.join(self.directory, f".write_test.process_{jax.process_index()}")
            try:
                with open(probe, "wb") as f:
                    f.write(b"\0")
                os.remove(probe)
            except OSError as e:
                error = e
        if jax.process_count() > 1:
            self._agree(step, error)
        elif error is not None:
            raise self._write_error(step, error) from error

    def _write_error(self, step: Optional[int], error: Exception) -> Exception:
        """A :class:`CheckpointWriteError` for a storage failure; ``error`` itself otherwise."""
        _BACKGROUND_ERRORS.pop(self.directory, None)  # this failure is being reported
        cause = storage_cause(error)
        if cause is None:
            return error
        self._failed = True
        return CheckpointWriteError(step, self.directory, cause, self._kept_before(step))

    def _kept_before(self, step: Optional[int]) -> Optional[int]:
        """The newest checkpoint on disk before ``step`` (None: none), after a failed save."""
        self._manager.reload()
        return max((s for s in self._manager.all_steps() if step is None or s < step),
                   default=None)

    def _finish_pending(self) -> None:
        """Waits for the save in progress; raises CheckpointWriteError if it failed."""
        if self._saving is not None and jax.process_count() > 1:
            # Orbax's writers of the other hosts wait at a barrier for a host whose write
            # failed until a timeout of minutes: all hosts first agree that every write is done
            while not self._agree(self._saving, self._save_error(), waiting=True):
                time.sleep(0.05)
        step, self._saving = self._saving, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            error = self._write_error(step, e)
            if error is e:
                raise
            raise error from e

    def check_saves(self) -> None:
        """Raises CheckpointWriteError once the asynchronous save in progress has failed.

        Cheap (no waiting); the training loop calls it after every step of a
        one-process run, so a failed save stops the run at the next step. With several
        processes it is a collective (every process calls it at the same steps: the loop
        does at each logged step) and raises on every host when any host's save failed.
        """
        if jax.process_count() > 1:
            self._agree(self._saving, self._save_error() if self._saving is not None else None)
        elif self._saving is not None and not self._manager.is_saving_in_progress():
            self._finish_pending()

    def _save_error(self) -> Optional[BaseException]:
        """What this host's writers of the save in progress met (None: nothing, yet)."""
        if self.directory in _BACKGROUND_ERRORS:
            return _BACKGROUND_ERRORS.pop(self.directory)
        try:
            self._manager.check_for_errors()
        except Exception as e:  # pylint: disable=broad-except
            return e
        return None

    def _agree(self, step: Optional[int], error: Optional[Exception], *,
               waiting: bool = False) -> bool:
        """Every process says what its own part of the save at ``step`` met (a collective);
        raises on every host when any failed: the failing hosts their own error, the others
        a CheckpointWriteError naming the hosts and their storage problem. With ``waiting``:
        True once every host's writes are done."""
        code = 0 if error is None else _failure_code(error)
        done = error is None and not (waiting and self._manager.is_saving_in_progress())
        codes = np.asarray(multihost_utils.process_allgather(np.array([code, done], np.int32)))
        failed = [i for i, c in enumerate(codes[:, 0]) if c]
        if not failed:
            return bool(codes[:, 1].all())
        self._saving = None
        if error is not None:
            converted = self._write_error(step, error)
            if converted is error:
                raise error
            raise converted from error
        self._failed = True
        first = int(codes[failed[0], 0])
        if first > len(_STORAGE_CAUSES):  # not a storage problem: that host's traceback says
            raise RuntimeError(f"the checkpoint save at step {step} failed on process(es) "
                               f"{failed}; see their error")
        hosts = ", ".join(map(str, failed))
        raise CheckpointWriteError(
            step, self.directory,
            f"{_STORAGE_CAUSES[first - 1]} on process{'es' * (len(failed) > 1)} {hosts}",
            self._kept_before(step))

    def restore(self, abstract_state: TrainState, data_iterator=None,
                step: Optional[int] = None) -> TrainState:
        """Restores the state at ``step`` (default: latest) and sets the iterator's state.

        ``abstract_state`` is a TrainState of ``jax.ShapeDtypeStruct`` with the
        shardings the restored arrays should have (the current mesh's), e.g.
        from :func:`tfx_jax.train.abstract_train_state`. Without
        ``data_iterator`` only the state is read (evaluation, decoding).
        """
        if data_iterator is not None:
            check_iterator_checkpointable(data_iterator)
        if step is not None:
            return self._restore_step(abstract_state, data_iterator, step)
        if self.latest_step() is None:
            raise WorkdirNotFound(f"no checkpoint in {self.directory}")
        return self._fall_back(lambda s: self._restore_step(abstract_state, data_iterator, s))

    def _fall_back(self, restore_step: Callable[[int], Any]) -> Any:
        """``restore_step`` of the newest step that is not corrupt (see the module doc)."""
        error = None
        for step in sorted(self.all_steps(), reverse=True):
            try:
                result = restore_step(step)
            except CorruptCheckpointError as e:
                error = error or e
                aside = self._move_aside(step)
                say(f"warning: {e}; {aside}trying the checkpoint before it")
                continue
            if error is not None:
                say(f"Restored the checkpoint at step {step} instead")
            return result
        raise CheckpointError(f"{error}. No earlier checkpoint in {self.directory} is intact; "
                         f"use a new --workdir") from error

    def _move_aside(self, step: int) -> str:
        """The owner moves a corrupt step to checkpoints_corrupt/ (so it is not saved over)."""
        if not self.owner:
            return ""
        target = epath.Path(self.workdir) / CORRUPT_DIR / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (epath.Path(self.directory) / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"tfx_jax_corrupt_checkpoint_{step}")
        self._manager.reload()
        return f"moved it to {target}; "

    def _restore_step(self, abstract_state: TrainState, data_iterator, step: int) -> TrainState:
        try:
            metadata = self._manager.item_metadata(step)[STATE_ITEM]
        except Exception as e:  # Orbax/TensorStore raise many types for unreadable files
            raise self._unreadable(step, e) from e
        self._check_shapes(step, metadata, abstract_state)
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[ITERATOR_ITEM] = ocp.args.JsonRestore()
        if self._has_checksums(step):
            items[CHECKSUM_ITEM] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except FileNotFoundError as e:
            raise WorkdirNotFound(
                f"checkpoint at step {step} in {self.directory} has no data iterator state "
                f"for process {jax.process_index()} of {jax.process_count()} (was it written "
                f"with a different number of processes?): {e}") from e
        except Exception as e:
            raise self._unreadable(step, e) from e
        if CHECKSUM_ITEM in items:
            self._verify(step, restored[CHECKSUM_ITEM], restored[STATE_ITEM])
        if data_iterator is not None:
            try:
                data_iterator.set_state(decode_iterator_state(restored[ITERATOR_ITEM]))
            except Exception as e:
                raise CheckpointError(
                    f"the data iterator state in the checkpoint at step {step} in "
                    f"{self.directory} does not fit this data pipeline "
                    f"({type(data_iterator).__name__}.set_state raised {e!r}); was it written "
                    f"with another dataset or pipeline? Nothing was deleted.") from e
        return restored[STATE_ITEM]

    def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
        """Only ``state.params`` of the checkpoint at ``step`` (default: latest).

        ``abstract_params`` is the model's params pytree of ``jax.ShapeDtypeStruct``
        (with the shardings to restore onto). The optimizer state and the data
        iterator are not read (Orbax partial restore), so inference needs
        neither the optimizer config nor the pipeline.
        """
        if step is None:
            if self.latest_step() is None:
                raise WorkdirNotFound(f"no checkpoint in {self.directory}")
            return self._fall_back(lambda s: self.restore_params(abstract_params, s))
        target = {"params": abstract_params}
        try:
            metadata = self._manager.item_metadata(step)[STATE_ITEM]
        except Exception as e:  # Orbax/TensorStore raise many types for unreadable files
            raise self._unreadable(step, e) from e
        self._check_shapes(step, metadata, target, only_prefix="params/")
        try:
            with ocp.PyTreeCheckpointer() as reader:
                restored = reader.restore(
                    os.path.join(self.directory, str(step), STATE_ITEM),
                    args=ocp.args.PyTreeRestore(
                        item=target, partial_restore=True,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
        except Exception as e:
            raise self._unreadable(step, e) from e
        if self._has_checksums(step):
            with ocp.Checkpointer(ocp.handlers.JsonCheckpointHandler(
                    filename="checksums.json")) as reader:
                stored = reader.restore(os.path.join(self.directory, str(step), CHECKSUM_ITEM),
                                        args=ocp.args.JsonRestore())
            stored = {k: v for k, v in stored.items() if k.startswith("params/")}
            self._verify(step, stored, restored)
        return restored["params"]

    def _has_checksums(self, step: int) -> bool:
        return (epath.Path(self.directory) / str(step) / CHECKSUM_ITEM).exists()

    def _verify(self, step: int, stored: Mapping[str, str], restored: Any) -> None:
        bad = mismatching(dict(stored), tree_checksums(restored))
        if bad:
            raise CorruptCheckpointError(step, os.path.join(self.directory, str(step)), bad)

    def _unreadable(self, step: int, error: Exception) -> CheckpointError:
        step_dir = os.path.join(self.directory, str(step))
        return CheckpointError(
            f"cannot read the checkpoint at step {step} in {step_dir} (workdir "
            f"{self.workdir}): {type(error).__name__}: {str(error)[:500]}\nThe directory is "
            f"corrupt or incomplete, or was written by another model or optimizer. Nothing "
            f"was deleted: move {step_dir} aside to resume from the checkpoint before it, or "
            f"use a new --workdir.")

    def _check_shapes(self, step: int, metadata, abstract_state: Any,
                      only_prefix: str = "") -> None:
        """ValueError naming each path whose stored shape differs (paths under
        ``only_prefix`` when a part of the state is restored)."""
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            return
        stored = {path: shape for path, shape in
                  _shapes_by_path(tree, is_leaf=lambda x: hasattr(x, "shape")).items()
                  if path.startswith(only_prefix)}
        problems = _mismatches(stored, _shapes_by_path(abstract_state))
        if problems:
            listed = "\n  ".join(problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} does not match the model "
                f"(workdir {self.workdir}); was it written by a different config?\n  "
                f"{listed}{more}\nNothing was deleted; use a new --workdir or the config "
                f"that wrote it.")

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption sync point (False in a single process)."""
        return self._manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (quietly after a failed save,
        which was reported already)."""
        if self._failed:
            return
        self._finish_pending()
        self._manager.close()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _metric_getter(name: str, mode: str) -> Callable[[Mapping[str, float]], float]:
    worst = math.inf if mode == "min" else -math.inf
    return lambda metrics: float(metrics.get(name, worst))


def check_checkpoint_fits(workdir: str, init_params: Callable[[jax.Array], Any]) -> None:
    """ValueError if ``workdir`` has a checkpoint whose parameters do not fit ``init_params``.

    Reads metadata only (no arrays) and writes nothing, so a script can check a
    workdir before it writes anything into it (tokenizer, config.json).
    """
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.exists() or not any(p.name.isdigit() for p in directory.iterdir()):
        return
    shapes = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        step = checkpointer.latest_step()
        if step is None:
            return
        try:
            metadata = checkpointer._manager.item_metadata(step)[STATE_ITEM]  # pylint: disable=protected-access
        except Exception as e:  # Orbax/TensorStore raise many types for unreadable files
            raise checkpointer._unreadable(step, e) from e  # pylint: disable=protected-access
        checkpointer._check_shapes(step, metadata, {"params": shapes},  # pylint: disable=protected-access
                                   only_prefix="params/")
    finally:
        checkpointer.close()


def restore_params(workdir: str, init_params: Callable[[jax.Array], Any], *,
                   step: Optional[int] = None, mesh: Optional[Mesh] = None) -> Any:
    """The trained parameters in ``workdir`` (latest checkpoint, or ``step``), for inference.

    Args:
      workdir: a run directory written by :func:`tfx_jax.train.train`.
      init_params: the Task's ``init_params(rng) -> params``; only traced
        (``jax.eval_shape``) for the expected shapes and dtypes.
      step: which checkpoint; default the latest.
      mesh: the parameters are placed on it by the partitioning rules, as in
        training (default: all devices on the ``data`` axis, i.e. replicated);
        any mesh works, whatever mesh wrote the checkpoint.

    Raises:
      FileNotFoundError: the workdir has no checkpoint (names the directory).
      ValueError: the checkpoint's parameters do not fit ``init_params``'s model
        (names each mismatching parameter), or it cannot be read.
    """
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.exists() or not any(p.name.isdigit() for p in directory.iterdir()):
        raise WorkdirNotFound(
            f"no trained model in workdir {workdir!r}: {directory} holds no checkpoint; "
            f"train one into this --workdir first")
    mesh = make_data_mesh() if mesh is None else mesh
    boxed = abstract_params_with_axes(init_params)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.meta.unbox(boxed), param_shardings(boxed, mesh))
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        return checkpointer.restore_params(abstract, step)
    finally:
        checkpointer.close()


# --- checksums --------------------------------------------------------------------------
# A checksum per array of the train state, so corrupt checkpoint bytes are caught on restore.
#
# Orbax's array files carry no checksum of their own, and a byte flipped in an
# uncompressed chunk restores "successfully" as a wrong value (the run then
# diverges, or stalls on NaN, long after the cause). :func:`tree_checksums`
# gives every array a 64-bit fingerprint computed *on device*, under ``jit``:
#
#     c1 = sum_i  u_i * w_i          (mod 2^32)
#     c2 = sum_i  mix(u_i ^ v_i)     (mod 2^32)
#
# where ``u_i`` is element ``i``'s bit pattern as an unsigned integer and
# ``w_i``, ``v_i`` are pseudo-random functions of the position ``i``. Sums of
# unsigned integers modulo 2^32 do not depend on the order of addition, so the
# fingerprint is the same for any sharding, device count or host count (a
# checkpoint written on 8 devices verifies on 1); a changed element or two
# swapped elements change it with probability about 1 - 2^-32 per sum.

_GOLDEN = 0x9E3779B1
_MIX = 0x85EBCA6B


def _mix(x: jax.Array) -> jax.Array:
    """A cheap 32-bit avalanche (the finaliser of MurmurHash3)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_MIX)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _as_uint32(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
    if size == 8:  # a trailing axis of two 32-bit halves
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    raise TypeError(f"no checksum for dtype {x.dtype}")


def _leaf_checksum(x: jax.Array) -> jax.Array:
    u = _as_uint32(x)
    index = jnp.arange(u.size, dtype=jnp.uint32)
    weights = _mix(index * jnp.uint32(_GOLDEN) + jnp.uint32(1)) | jnp.uint32(1)
    first = jnp.sum(u * weights, dtype=jnp.uint32)
    second = jnp.sum(_mix(u ^ _mix(index + jnp.uint32(_MIX))), dtype=jnp.uint32)
    return jnp.stack([first, second])


@functools.partial(jax.jit)
def _checksums(leaves):
    return [_leaf_checksum(x) for x in leaves]


def path_name(path) -> str:
    """'params/dense/kernel' for a key path of dicts, dataclasses, tuples or namedtuples."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def tree_checksums(tree: Any) -> dict[str, str]:
    """``{"params/dense/kernel": "0123abcd89ef4567", ...}`` for every array leaf of ``tree``."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = [leaf for _, leaf in flat]
    # Each result is replicated; with several processes it is not fully addressable, so
    # read this host's copy.
    values = [np.asarray(v.addressable_data(0)) for v in _checksums(leaves)]
    return {path_name(path): "%08x%08x" % tuple(int(v) for v in value)
            for (path, _), value in zip(flat, values)}


def mismatching(stored: dict[str, str], restored: dict[str, str]) -> list[str]:
    """Paths whose checksum differs (paths missing on one side are left to the shape check)."""
    return sorted(path for path in stored.keys() & restored.keys()
                  if stored[path] != restored[path])


# --- workdir lock -----------------------------------------------------------------------
# One run per workdir: process 0 holds ``<workdir>/.lock`` (host and pid) while it runs.
#
# Two runs writing into one workdir interleave their checkpoints, config.json and
# metrics.jsonl without either noticing. :func:`workdir_lock` makes the second
# one stop at once with one line naming the holder::
#
#     WorkdirLocked: workdir /tmp/run is in use by process 4242 on host tpu-vm-0 (since
#     2026-12-02 07:10:03 UTC; lock file /tmp/run/.lock) ...
#
# The lock file is created atomically (``O_CREAT | O_EXCL``) on local disks and
# removed when the run ends, however it ends (an exception, SIGTERM, SIGINT).
# A lock left by a process that was killed (SIGKILL, power loss) is *stale*:
# when its host is this host and its pid is no longer alive, the next run takes
# it over and says so. A lock held from another host cannot be checked from
# here; the message says how to remove it by hand.
#
# Locking is re-entrant within a process (the translation app locks before it
# writes its tokenizer, and :func:`tfx_jax.train.train` locks again inside) and
# is taken by process 0 only: the other hosts of a multi-host run write into the
# same workdir on purpose. Object stores (``gs://``) have no exclusive create;
# there the check-then-write leaves a small race window, still catching the
# common mistake of starting the same command twice.

LOCK_FILE = ".lock"

_held: dict[str, int] = {}  # lock path -> nesting depth, in this process


class WorkdirLocked(WorkdirError):
    """Another live process holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _describe(holder: dict) -> str:
    return f"process {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


def _read_holder(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _create(path: epath.Path, content: str) -> bool:
    """Writes ``content`` to ``path`` unless it exists; False if it does."""
    if is_url(os.fspath(path)):
        if path.exists():
            return False
        path.write_text(content)
        return True
    try:
        fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(content)
    return True


def _check_directory(workdir: str, directory: epath.Path) -> None:
    """A one-line error for a workdir that is a file or cannot be written."""
    if directory.exists() and not directory.is_dir():
        raise WorkdirError(f"workdir {workdir!r} is a file, not a directory; "
                                 f"pass a directory for --workdir")


def acquire(workdir: str) -> tuple[epath.Path, bool]:
    """Takes the lock (process 0); returns (lock path, whether the workdir was created)."""
    directory = epath.Path(workdir)
    _check_directory(workdir, directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise WorkdirError(f"cannot create workdir {workdir!r}: permission denied") from e
    path = directory / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now(datetime.timezone.utc).strftime(
              "%Y-%m-%d %H:%M:%S UTC")}
    content = json.dumps(me) + "\n"
    for _ in range(2):
        try:
            if _create(path, content):
                return path, created
        except PermissionError as e:
            raise WorkdirError(f"workdir {workdir!r} is not writable (permission denied "
                                  f"creating {path})") from e
        except OSError as e:
            if e.errno == errno.EROFS:
                raise WorkdirError(f"workdir {workdir!r} is on a read-only file "
                                      f"system") from e
            raise
        holder = _read_holder(path)
        local = holder.get("host") == me["host"]
        pid = holder.get("pid")
        if local and isinstance(pid, int) and pid != me["pid"] and not _pid_alive(pid):
            say(f"Taking over the stale lock of workdir {workdir} left by {_describe(holder)}: "
                f"that process is no longer running")
            path.unlink(missing_ok=True)
            continue
        where = "" if local else " (another host: check there, then delete the file by hand)"
        raise WorkdirLocked(
            f"workdir {workdir} is in use by {_describe(holder)}{where}; lock file {path}. "
            f"Wait for that run to end or use another --workdir.")
    raise WorkdirLocked(f"could not take the lock {path} of workdir {workdir}")


def release(path: epath.Path, directory_created: bool) -> None:
    path.unlink(missing_ok=True)
    if directory_created:  # leave no empty workdir behind a run that wrote nothing
        parent = path.parent
        try:
            if not any(parent.iterdir()):
                parent.rmdir()
        except OSError:
            pass


def hold_workdir_lock(workdir: str) -> Callable[[], None]:
    """Takes :func:`workdir_lock` now; returns the function that releases it."""
    held = workdir_lock(workdir)
    held.__enter__()  # pylint: disable=unnecessary-dunder-call
    return lambda: held.__exit__(None, None, None)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds ``<workdir>/.lock`` for the duration (process 0; re-entrant in a process)."""
    if jax.process_index() != 0:
        yield
        return
    key = os.fspath(epath.Path(workdir) / LOCK_FILE)
    if not is_url(key):
        key = os.path.abspath(key)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path, created = acquire(workdir)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        release(path, created)
