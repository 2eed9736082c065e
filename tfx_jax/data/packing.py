"""Sequence packing: several short examples share one fixed-length row.

A batch of padded rows pays for its padding: with examples of 30 tokens in
rows of 128, three quarters of every matmul multiplies zeros. Packing puts
several examples in one row, one after another, and marks which tokens belong
together, as the Flax lm1b/wmt examples, T5 and MaxText do:

* ``<key>_segmentation`` int32 ``[b, L]``: 1, 2, ... for the 1st, 2nd, ...
  example of the row, 0 on the padding at its end;
* ``<key>_position`` int32 ``[b, L]``: the position of each token within its
  own example (0, 1, ... restarting at every example), for position encodings.

Attention then lets a query see a key only when their segment ids are equal
(``tfx.dot_product_attention(..., q_segment_ids=, kv_segment_ids=)``), so a
packed example is computed exactly as if it had a row of its own.

Several features are packed *in parallel*: an example goes into a row only if
all its features fit, and gets the same segment id in each (for translation,
source ``inputs`` and target ``targets``, as Flax's wmt example does). The
packer is Grain's own first-fit packer
(``grain.experimental.FirstFitPackIterDataset``): it fills
``num_packing_bins`` rows, putting each example in the first row with room,
and emits all of them as soon as an example fits nowhere.

:func:`packed_training_batches` is the packed twin of
:func:`tfx_jax.data.grain_batches.training_batches` (same seeded shuffle,
epochs, process sharding and checkpointable iterator); a batch then holds as
many examples as fit, not a fixed number, so the "examples of step k" property
of the unpacked pipeline does not hold. :func:`padding_fraction` measures what
packing saves.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from tfx_jax.data import grain_batches

SEGMENTATION = "_segmentation"
POSITION = "_position"


def _flax_names(example: dict, *, keys: Sequence[str]) -> dict:
    """Grain's ``<key>_segment_ids`` / ``<key>_positions`` -> ``<key>_segmentation`` / ``_position``."""
    out = {}
    for key in keys:
        out[key] = example[key]
        out[key + SEGMENTATION] = example[f"{key}_segment_ids"]
        out[key + POSITION] = example[f"{key}_positions"]
    return out


def _check_lengths(lengths: Mapping[str, int]) -> dict[str, int]:
    if not lengths:
        raise ValueError("lengths must name at least one feature to pack, got {}")
    for key, length in lengths.items():
        if not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"lengths[{key!r}] must be a positive integer, got {length!r}")
    return {key: int(length) for key, length in lengths.items()}


def pack_dataset(dataset: grain.IterDataset, lengths: Mapping[str, int], *,
                 num_packing_bins: int, seed: int = 0,
                 shuffle_bins: bool = False) -> grain.IterDataset:
    """Packs examples of 1-D token arrays (no padding) into rows of ``lengths[key]``.

    Args:
      dataset: examples ``{key: int array [n_key]}``, each ``n_key <= lengths[key]``
        (longer ones raise: truncate or split them first).
      lengths: row length per feature, e.g. ``{"inputs": 64, "targets": 64}``.
      num_packing_bins: rows filled at once (more rows: less padding).
      seed, shuffle_bins: Grain's optional shuffle of the emitted rows.

    Returns:
      Rows ``{key, key_segmentation, key_position}`` per feature, each int32 ``[L]``.
    """
    lengths = _check_lengths(lengths)
    if num_packing_bins < 1:
        raise ValueError(f"num_packing_bins must be a positive integer, got {num_packing_bins}")
    packed = grain.experimental.FirstFitPackIterDataset(
        dataset, length_struct=lengths, num_packing_bins=num_packing_bins, seed=seed,
        shuffle_bins=shuffle_bins)
    return packed.map(functools.partial(_flax_names, keys=tuple(lengths)))


def _with_valid(batch: dict) -> dict:
    first = next(iter(batch.values()))
    return {**batch, "valid": np.ones((first.shape[0],), np.bool_)}


def _is_kept(example) -> bool:
    return example is not None


def packed_training_batches(
    source,
    *,
    global_batch_size: int,
    seed: int,
    transform: Callable[[Any, np.random.Generator], dict | None],
    lengths: Mapping[str, int],
    num_packing_bins: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Infinite, shuffled, packed training batches for this process.

    Like :func:`tfx_jax.data.grain_batches.training_batches`, except that
    ``transform(example, rng)`` returns *unpadded* 1-D int arrays (or None to
    leave the example out) and the rows are packed (see module docstring).
    Batches hold ``global_batch_size // process_count`` rows with the keys of
    :func:`pack_dataset` plus ``"valid"`` (all True).

    ``num_packing_bins`` defaults to the local batch size (one batch of rows is
    filled at a time).
    """
    lengths = _check_lengths(lengths)
    index, count = grain_batches.process_shard(process_index, process_count)
    batch_size = grain_batches.local_batch_size(global_batch_size, count)
    if len(source) == 0:
        raise ValueError("cannot train on an empty data source")
    dataset = (grain.MapDataset.source(source).seed(seed).shuffle().repeat()
               .random_map(transform))
    dataset = dataset[index::count].to_iter_dataset(read_options, allow_nones=True)
    dataset = dataset.filter(_is_kept)
    packed = pack_dataset(dataset, lengths, num_packing_bins=num_packing_bins or batch_size,
                          seed=seed)
    return iter(packed.batch(batch_size, drop_remainder=True).map(_with_valid))


def padding_fraction(batches: Iterator[Mapping[str, np.ndarray]], keys: Sequence[str], *,
                     num_batches: int = 10, pad_id: int = 0) -> float:
    """Fraction of the ``keys`` token slots of the next ``num_batches`` batches that are padding.

    Consumes those batches from ``batches`` (pass a fresh iterator).
    """
    pad = total = 0
    for _ in range(num_batches):
        batch = next(batches, None)
        if batch is None:
            break
        for key in keys:
            tokens = np.asarray(batch[key])
            pad += int((tokens == pad_id).sum())
            total += tokens.size
    if total == 0:
        raise ValueError(f"no batches to measure padding on (keys {list(keys)})")
    return pad / total


def padding_report(name: str, unpacked: float, packed: float) -> str:
    """One line for a script's startup: padding without and with packing, and the gain."""
    gain = (1 - packed) / max(1 - unpacked, 1e-9)
    return (f"{name}: padding {unpacked:.1%} of token slots without packing, {packed:.1%} with "
            f"packing ({gain:.2f}x real tokens per row)")


def compare_padding(make_batches: Callable[[bool], Iterator[Mapping[str, np.ndarray]]],
                    keys: Sequence[str], *, num_batches: int = 4) -> tuple[float, float]:
    """``(padding without packing, padding with packing)`` of a pipeline's first batches.

    ``make_batches(packing)`` builds a fresh training iterator either way (the
    run's own pipeline is not touched).
    """
    return tuple(padding_fraction(make_batches(packed), keys, num_batches=num_batches)
                 for packed in (False, True))
