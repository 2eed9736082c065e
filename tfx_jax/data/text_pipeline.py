"""Grain input pipelines from text pairs to fixed-shape token batches.

A batch is a dict of NumPy arrays:

* ``"inputs"``  int32 ``[b, max_source_length]``: source token ids, then EOS (1),
  then padding (0);
* ``"targets"`` int32 ``[b, max_target_length]``: the same for the target;
* ``"valid"``   bool ``[b]``: False for the all-zero rows that pad the last
  evaluation batch to full size (always True in training batches).

With ``packing=True`` (training only) a row holds as many pairs as fit, source
and target packed in parallel (pair ``i`` of a row is segment ``i`` of both
``"inputs"`` and ``"targets"``), with ``"inputs_segmentation"``,
``"inputs_position"``, ``"targets_segmentation"`` and ``"targets_position"``
(see :mod:`tfx_jax.data.packing`).

``b`` is the process-local batch size, ``global_batch_size //
jax.process_count()``; each process reads its own shard, and the training
loop assembles the global batch (process-local rows in process order).
Shuffling, repetition, sharding, padding and exact resume follow the contract
of every tfx_jax pipeline, :mod:`tfx_jax.data.grain_batches`; this module adds
tokenization.

Training (:func:`train_batches`) shuffles each epoch with a seed and repeats
forever; its iterator's ``get_state()`` / ``set_state()`` make a resumed run see
exactly the batches the interrupted run would have seen. Evaluation
(:func:`eval_batches`) is one finite pass.

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
import numpy as np

from tfx_jax.errors import ConfigError, DataError
from tfx_jax.data import grain_batches, packing as packing_lib
from tfx_jax.data.tokenizer import EOS_ID, PAD_ID


def token_ids(ids: Sequence[int], max_length: int) -> np.ndarray:
    """``ids`` + EOS, truncated to ``max_length`` keeping EOS, unpadded (int32)."""
    return np.asarray(list(ids)[:max_length - 1] + [EOS_ID], dtype=np.int32)


def token_row(ids: Sequence[int], max_length: int) -> np.ndarray:
    """``ids`` + EOS, truncated to ``max_length`` keeping EOS, padded with 0 (int32)."""
    ids = token_ids(ids, max_length)
    row = np.full((max_length,), PAD_ID, dtype=np.int32)
    row[:len(ids)] = ids
    return row


def _encode_pair(pair, rng=None, *, tokenizer, max_source_length, max_target_length,
                 drop_overlong, padded=True):
    """Token rows of one ``(source, target)`` pair (unpadded for packing); None if dropped."""
    del rng  # Tokenization is deterministic.
    source, target = pair
    source_ids = tokenizer.encode(source)
    target_ids = tokenizer.encode(target)
    if drop_overlong and (len(source_ids) >= max_source_length or
                          len(target_ids) >= max_target_length):
        return None
    encode = token_row if padded else token_ids
    return {"inputs": encode(source_ids, max_source_length),
            "targets": encode(target_ids, max_target_length)}


def _check_lengths(max_source_length: int, max_target_length: int) -> None:
    for name, value in (("max_source_length", max_source_length),
                        ("max_target_length", max_target_length)):
        if value < 2:
            raise ConfigError(f"{name} must be >= 2 (one token and EOS), got {value}")


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
    packing: bool = False,
    num_packing_bins: int | None = None,
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
        positions ``p, p + count, p + 2 * count, ...`` of the shuffled stream.
      read_options: Grain threading/prefetch for tokenization.
      packing: pack several pairs per row (see module docstring).
      num_packing_bins: rows the packer fills at once (default: the local batch).

    Returns:
      A Grain ``DatasetIterator`` of batches (``"inputs"``, ``"targets"``,
      ``"valid"``, and with packing the segmentation and position rows) with
      ``get_state()`` / ``set_state(state)`` for checkpointing.
    """
    _check_lengths(max_source_length, max_target_length)
    encode = functools.partial(
        _encode_pair, tokenizer=tokenizer, max_source_length=max_source_length,
        max_target_length=max_target_length, drop_overlong=drop_overlong, padded=not packing)
    if packing:
        return packing_lib.packed_training_batches(
            pairs, global_batch_size=global_batch_size, seed=seed, transform=encode,
            lengths={"inputs": max_source_length, "targets": max_target_length},
            num_packing_bins=num_packing_bins, process_index=process_index,
            process_count=process_count, read_options=read_options)
    return grain_batches.training_batches(
        pairs, global_batch_size=global_batch_size, seed=seed, transform=encode,
        process_index=process_index, process_count=process_count,
        read_options=read_options, drop_nones=drop_overlong)


@dataclasses.dataclass(frozen=True)
class EvalData:
    """One evaluation pass: re-iterable batches plus the raw texts in order.

    Iterating ``for batch in eval_data`` makes one finite, deterministic pass
    (a fresh pass each time). The ``"valid"`` rows of the global batches, in
    order, are examples ``0 .. num_examples - 1`` of this object:
    ``references[i]`` is the untruncated target text of the ``i``-th valid
    global row (for BLEU), ``sources[i]`` its source text. With one process
    that is the order of the data; with several, rows are reordered within
    each global batch (see ``grain_batches.evaluation_order``).
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
    size), process ``p`` those at offsets ``p, p + count, ...`` within it.
    Positions past the end are all-zero rows with ``valid=False``, so every
    process yields the same number of full batches.
    """
    _check_lengths(max_source_length, max_target_length)
    if len(pairs) == 0:  # pylint: disable=g-explicit-length-test
        raise DataError("the evaluation data has no examples")
    encode = functools.partial(
        _encode_pair, tokenizer=tokenizer, max_source_length=max_source_length,
        max_target_length=max_target_length, drop_overlong=False)
    batches = grain_batches.evaluation_dataset(
        pairs, global_batch_size=global_batch_size, transform=encode,
        process_index=process_index, process_count=process_count)
    _, count = grain_batches.process_shard(process_index, process_count)
    texts = [pairs[int(i)] for i in
             grain_batches.evaluation_order(len(pairs), global_batch_size, count)]
    return EvalData(batches=batches, references=[t for _, t in texts],
                    sources=[s for s, _ in texts])
