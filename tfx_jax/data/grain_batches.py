"""Process-local Grain batches: the contract every tfx_jax input pipeline keeps.

* Training: a seeded global shuffle of the source, reshuffled every epoch,
  repeated forever, a per-example random transform seeded by (seed, position in
  that stream), then process ``p`` of ``n`` takes stream positions ``p, p+n,
  p+2n, ...`` and batches ``global_batch_size // n`` of them. The examples of
  global step ``k`` are therefore the stream slice ``[k*B, (k+1)*B)`` whatever
  the number of processes, each with the same augmentation.
* Evaluation: one pass in source order, padded with zero examples to a multiple
  of the global batch so every process runs the same number of steps; a bool
  ``"valid"`` [b] marks real examples (training batches carry it too, all True,
  so one masked loss serves both). Global batch ``k`` holds source examples
  ``k*B .. k*B+B-1``, process ``p`` those at offsets ``p, p+n, ...`` within it;
  :func:`evaluation_order` lists the source positions of the valid rows of all
  global batches in order (source order itself when ``n = 1``).
* A training transform may leave an example out by returning None when the
  pipeline is built with ``drop_nones=True``; the batch is then filled from
  the following examples of the stream (the step-k slice property no longer
  holds exactly, since each process skips its own examples).

Both return a Grain ``DatasetIterator``: ``get_state()`` / ``set_state(state)``
restore it so that the next batches are exactly those an uninterrupted run sees.
"""
from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import grain
import jax
import numpy as np

from tfx_jax.errors import ConfigError, DataError


Example = dict[str, Any]


def process_shard(
        process_index: int | None = None, process_count: int | None = None
) -> tuple[int, int]:
    """(index, count) of this process: JAX's by default, or given (for tests)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"need 0 <= process_index < process_count, got {index} and {count}")
    return int(index), int(count)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """Per-process batch size; the global batch must split evenly over processes."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ConfigError(
            f"global batch_size {global_batch_size} must be a positive multiple of the "
            f"number of processes ({process_count})"
        )
    return global_batch_size // process_count


# Grain raises if every element of a window of 1000 is left out, instead of
# looping forever on a dataset whose examples are all dropped.
_RAISE_IF_ALL_DROPPED = grain.experimental.DatasetOptions(filter_raise_threshold_ratio=1.0)


def _training_example(example, rng, *, transform):
    example = transform(example, rng)
    return None if example is None else {**example, "valid": np.bool_(True)}


def _is_kept(example) -> bool:
    return example is not None


def shuffled_shard(source, *, seed: int, transform, process_index: int,
                   process_count: int) -> grain.MapDataset:
    """This process's share of ``source``, shuffled per epoch by ``seed``, repeated forever
    and passed through ``transform(example, rng)`` (positions ``index::count``)."""
    if len(source) == 0:
        raise DataError("cannot train on an empty data source")
    return (grain.MapDataset.source(source).seed(seed).shuffle().repeat()
            .random_map(transform))[process_index::process_count]


def kept_examples(dataset: grain.MapDataset,
                  read_options: grain.ReadOptions | None) -> grain.IterDataset:
    """``dataset`` without the examples its transform left out (None)."""
    return dataset.to_iter_dataset(read_options, allow_nones=True).filter(_is_kept)


def raising_if_all_dropped(dataset: grain.IterDataset) -> grain.IterDataset:
    """``dataset`` with Grain raising when whole windows of examples are dropped."""
    return grain.experimental.WithOptionsIterDataset(dataset, _RAISE_IF_ALL_DROPPED)


def training_batches(
    source,
    *,
    global_batch_size: int,
    seed: int,
    transform: Callable[[Any, np.random.Generator], Example],
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
    drop_nones: bool = False,
) -> grain.DatasetIterator:
    """Infinite, shuffled, per-process training batches (see module docstring).

    Args:
      source: random-access examples (``len`` and ``[i]``).
      global_batch_size: examples per step over all processes.
      seed: fixes the shuffle of every epoch and every example's randomness.
      transform: ``(example, rng) -> dict of arrays``; must draw all its
        randomness from ``rng``.
      process_index, process_count: default to JAX's; pass them to simulate hosts.
      read_options: Grain threading/prefetch options (Grain's default if None).
      drop_nones: ``transform`` may return None to leave an example out.
    """
    index, count = process_shard(process_index, process_count)
    batch_size = local_batch_size(global_batch_size, count)
    dataset = shuffled_shard(source, seed=seed,
                             transform=functools.partial(_training_example, transform=transform),
                             process_index=index, process_count=count)
    if not drop_nones:
        return iter(dataset.batch(batch_size, drop_remainder=True).to_iter_dataset(read_options))
    return iter(raising_if_all_dropped(
        kept_examples(dataset, read_options).batch(batch_size, drop_remainder=True)))


def _evaluation_example(position, *, source, transform, padding):
    if position >= len(source):
        return padding
    return {**transform(source[position]), "valid": np.bool_(True)}


def evaluation_batches(
    source,
    *,
    global_batch_size: int,
    transform: Callable[[Any], Example],
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """One deterministic pass, padded to full batches (see module docstring).

    Every process yields ``ceil(len(source) / global_batch_size)`` batches; over
    all processes the ``valid`` examples are each source example exactly once.
    Padding examples are zeros shaped like ``transform(source[0])``.
    """
    dataset = evaluation_dataset(source, global_batch_size=global_batch_size,
                                 transform=transform, process_index=process_index,
                                 process_count=process_count)
    return iter(dataset.to_iter_dataset(read_options))


def evaluation_dataset(
    source,
    *,
    global_batch_size: int,
    transform: Callable[[Any], Example],
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """The batches of :func:`evaluation_batches` as a ``grain.MapDataset``.

    Re-iterable: each ``iter()`` is a fresh pass, so one object serves every
    evaluation of a run.
    """
    index, count = process_shard(process_index, process_count)
    batch_size = local_batch_size(global_batch_size, count)
    num_examples = len(source)
    num_padded = -(-num_examples // global_batch_size) * global_batch_size
    padding = None
    if num_padded > num_examples:
        padding = jax.tree.map(np.zeros_like, transform(source[0]))
        padding["valid"] = np.bool_(False)
    dataset = grain.MapDataset.range(num_padded).map(
        functools.partial(_evaluation_example, source=source, transform=transform, padding=padding)
    )
    return dataset[index::count].batch(batch_size)


def evaluation_order(num_examples: int, global_batch_size: int,
                     process_count: int | None = None) -> np.ndarray:
    """Source positions of the valid evaluation rows in global order.

    The global order is that of the assembled global batches: batch by batch,
    process-local rows concatenated in process order. Its ``i``-th valid row
    is source example ``evaluation_order(...)[i]``.
    """
    _, count = process_shard(0, process_count)
    batch_size = local_batch_size(global_batch_size, count)
    num_padded = -(-num_examples // global_batch_size) * global_batch_size
    row = np.arange(num_padded)
    batch, within = np.divmod(row, global_batch_size)
    process, local_row = np.divmod(within, batch_size)
    position = batch * global_batch_size + process + local_row * count
    return position[position < num_examples]
