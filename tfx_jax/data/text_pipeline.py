"""Grain input pipelines from text pairs to fixed-shape token batches.

A batch is a dict of NumPy arrays:

* ``"inputs"``  int32 ``[b, max_source_length]``: source token ids, then EOS (1),
  then padding (0);
* ``"targets"`` int32 ``[b, max_target_length]``: the same for the target;
* ``"valid"``   bool ``[b]`` (evaluation only): False for the all-zero rows
  that pad the last batch to full size.

``b`` is the process-local batch size, ``global_batch_size //
jax.process_count()``; each process reads its own shard, and the training
loop assembles the global batch (process-local rows in process order).

Training (:func:`train_batches`) shuffles each epoch with a seed and repeats
forever; its iterator's ``get_state()`` / ``set_state()`` make a resumed run see
exactly the batches the interrupted run would have seen. Evaluation
(:func:`eval_batches`) is one finite pass in dataset order.

An example longer than its limit (EOS included) is truncated, keeping EOS as
its last token, or, for training with ``drop_overlong=True``, left out.
Evaluation never leaves examples out (the references would no longer line
up); its reference strings are the full, untruncated targets.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import jax
import numpy as np

from tfx_jax.data.tokenizer import EOS_ID, PAD_ID

# Grain raises if every element of a window of 1000 is filtered out, instead
# of looping forever on a dataset whose examples are all too long.
_ALL_FILTERED = grain.experimental.DatasetOptions(filter_raise_threshold_ratio=1.0)


def _token_row(ids: Sequence[int], max_length: int) -> np.ndarray:
    """``ids`` + EOS, truncated to ``max_length`` keeping EOS, padded with 0."""
    ids = list(ids)[:max_length - 1] + [EOS_ID]
    row = np.full((max_length,), PAD_ID, dtype=np.int32)
    row[:len(ids)] = ids
    return row


def _encode_pair(pair, *, tokenizer, max_source_length, max_target_length,
                 drop_overlong):
    """Token rows of one ``(source, target)`` pair; None if dropped."""
    source, target = pair
    source_ids = tokenizer.encode(source)
    target_ids = tokenizer.encode(target)
    if drop_overlong and (len(source_ids) >= max_source_length or
                          len(target_ids) >= max_target_length):
        return None
    return {"inputs": _token_row(source_ids, max_source_length),
            "targets": _token_row(target_ids, max_target_length)}


def _not_dropped_as_overlong(example) -> bool:
    return example is not None


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the "
            f"process count {process_count}")
    return global_batch_size // process_count


def _check_lengths(max_source_length: int, max_target_length: int) -> None:
    for name, value in (("max_source_length", max_source_length),
                        ("max_target_length", max_target_length)):
        if value < 2:
            raise ValueError(f"{name} must be >= 2 (one token and EOS), got {value}")


def _process(process_index, process_count) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} not in 0..{count - 1}")
    return index, count


def train_batches(
    pairs: Sequence[tuple[str, str]],
    tokenizer,
    *,
    global_batch_size: int,
    max_source_length: int,
    max_target_length: int,
    seed: int = 0,
    drop_overlong: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Infinite, shuffled training batches for this process.

    Args:
      pairs: random-access ``(source_text, target_text)`` pairs (see
        ``open_text_pairs``).
      tokenizer: has ``encode(str) -> list[int]`` (a ``SentencePieceTokenizer``).
      global_batch_size: examples per step over all processes.
      max_source_length / max_target_length: row lengths, EOS included.
      seed: shuffle seed; epoch ``e`` uses a permutation derived from it and ``e``.
      drop_overlong: leave out (True) or truncate (False) too-long examples.
      process_index / process_count: this process's shard; default
        ``jax.process_index()`` / ``jax.process_count()``. Process ``p`` reads
        examples ``p, p + count, p + 2 * count, ...``.
      read_options: Grain threading/prefetch for tokenization.

    Returns:
      A Grain ``DatasetIterator`` of batches (``"inputs"``, ``"targets"``) with
      ``get_state()`` / ``set_state(state)`` for checkpointing.
    """
    _check_lengths(max_source_length, max_target_length)
    index, count = _process(process_index, process_count)
    local_batch_size = _local_batch_size(global_batch_size, count)
    if len(pairs) < count:
        raise ValueError(f"{len(pairs)} training examples cannot be split over "
                         f"{count} processes")
    encode = functools.partial(
        _encode_pair, tokenizer=tokenizer, max_source_length=max_source_length,
        max_target_length=max_target_length, drop_overlong=drop_overlong)
    dataset = (
        grain.MapDataset.source(pairs)[index::count]
        .shuffle(seed=seed)
        .repeat()
        .map(encode)
        .to_iter_dataset(read_options, allow_nones=True)
        .filter(_not_dropped_as_overlong)
        .batch(local_batch_size, drop_remainder=True))
    dataset = grain.experimental.WithOptionsIterDataset(dataset, _ALL_FILTERED)
    return iter(dataset)


@dataclasses.dataclass(frozen=True)
class EvalData:
    """One evaluation pass: re-iterable batches plus the raw texts in order.

    Iterating ``for batch in eval_data`` makes one finite, deterministic pass
    (a fresh pass each time). The ``"valid"`` rows of the global batches, in
    order, are examples ``0 .. num_examples - 1``: ``references[i]`` is the
    untruncated target text of example ``i`` (for BLEU), ``sources[i]`` its
    source text.
    """

    batches: grain.MapDataset
    references: list[str]
    sources: list[str]

    @property
    def num_examples(self) -> int:
        return len(self.references)

    def __len__(self) -> int:
        """Number of batches in one pass (the same on every process)."""
        return len(self.batches)

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.batches)


def _eval_example(local_position, *, pairs, local_batch_size,
                  global_batch_size, process_index, encode, zero_example):
    """The example at this process's position in the padded global order."""
    batch, row = divmod(local_position, local_batch_size)
    global_position = (batch * global_batch_size +
                       process_index * local_batch_size + row)
    if global_position >= len(pairs):
        return dict(zero_example, valid=np.bool_(False))
    return dict(encode(pairs[global_position]), valid=np.bool_(True))


def eval_batches(
    pairs: Sequence[tuple[str, str]],
    tokenizer,
    *,
    global_batch_size: int,
    max_source_length: int,
    max_target_length: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalData:
    """One padded pass over ``pairs`` for evaluation, sharded by process.

    Global batch ``k`` holds examples ``k*G .. k*G+G-1`` (``G`` the global batch
    size); process ``p`` holds rows ``p*b .. p*b+b-1`` of it (``b = G //
    count``). Positions past the end are all-zero rows with ``valid=False``, so
    every process yields the same number of full batches.
    """
    _check_lengths(max_source_length, max_target_length)
    index, count = _process(process_index, process_count)
    local_batch_size = _local_batch_size(global_batch_size, count)
    if len(pairs) == 0:  # pylint: disable=g-explicit-length-test
        raise ValueError("the evaluation data has no examples")
    num_batches = -(-len(pairs) // global_batch_size)
    encode = functools.partial(
        _encode_pair, tokenizer=tokenizer, max_source_length=max_source_length,
        max_target_length=max_target_length, drop_overlong=False)
    zero_example = {"inputs": np.zeros((max_source_length,), np.int32),
                    "targets": np.zeros((max_target_length,), np.int32)}
    example = functools.partial(
        _eval_example, pairs=pairs, local_batch_size=local_batch_size,
        global_batch_size=global_batch_size, process_index=index, encode=encode,
        zero_example=zero_example)
    batches = (grain.MapDataset.range(num_batches * local_batch_size)
               .map(example)
               .batch(local_batch_size))
    texts = [pairs[i] for i in range(len(pairs))]
    return EvalData(batches=batches, references=[t for _, t in texts],
                    sources=[s for s, _ in texts])
