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

For inference (prediction, decoding, evaluation) :func:`restore_params` reads
only the model parameters of a workdir's latest checkpoint: no optimizer
state (so no optimizer config is needed) and no data iterator.
"""
from __future__ import annotations

import base64
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from tfx_jax.train.mesh import make_data_mesh
from tfx_jax.train.partitioning import param_shardings
from tfx_jax.train.metrics import is_url
from tfx_jax.train.state import TrainState, abstract_params_with_axes

STATE_ITEM = "state"
ITERATOR_ITEM = "data_iterator"


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


def _path_name(path) -> str:
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


def _shapes_by_path(tree, is_leaf=None) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves}


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
                 remove_unfinished: bool = False):
        """``remove_unfinished=True`` deletes what saves cut short left behind.

        A save goes to ``<step>.orbax-checkpoint-tmp`` and is renamed to
        ``<step>`` only once complete, so a process killed mid-save leaves a
        temporary directory that is never restored. Only the run that owns the
        workdir (the training loop) should delete them: anyone else, e.g. an
        evaluation job reading checkpoints, would delete a save in progress.
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
        self._manager = ocp.CheckpointManager(
            self.directory, handler_registry=registry,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=remove_unfinished))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, data_iterator) -> bool:
        """Starts saving ``state`` and ``data_iterator.get_state()`` at ``state.step``.

        Returns False (and writes nothing) if that step is already saved.
        Asynchronous unless the Checkpointer was made with ``async_save=False``;
        call :meth:`wait_until_finished` before relying on the files.
        """
        check_iterator_checkpointable(data_iterator)
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        iterator_state = encode_iterator_state(data_iterator.get_state())
        return self._manager.save(
            step, force=True,
            args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardSave(state),
                ITERATOR_ITEM: ocp.args.JsonSave(iterator_state)}))

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
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            metadata = self._manager.item_metadata(step)[STATE_ITEM]
        except Exception as e:  # Orbax/TensorStore raise many types for unreadable files
            raise self._unreadable(step, e) from e
        self._check_shapes(step, metadata, abstract_state)
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[ITERATOR_ITEM] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"checkpoint at step {step} in {self.directory} has no data iterator state "
                f"for process {jax.process_index()} of {jax.process_count()} (was it written "
                f"with a different number of processes?): {e}") from e
        except Exception as e:
            raise self._unreadable(step, e) from e
        if data_iterator is not None:
            try:
                data_iterator.set_state(decode_iterator_state(restored[ITERATOR_ITEM]))
            except Exception as e:
                raise ValueError(
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
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
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
        return restored["params"]

    def _unreadable(self, step: int, error: Exception) -> ValueError:
        step_dir = os.path.join(self.directory, str(step))
        return ValueError(
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
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} does not match the model "
                f"(workdir {self.workdir}); was it written by a different config?\n  "
                f"{listed}{more}\nNothing was deleted; use a new --workdir or the config "
                f"that wrote it.")

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption sync point (False in a single process)."""
        return self._manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


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
        raise FileNotFoundError(
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
