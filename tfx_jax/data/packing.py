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
of the unpacked pipeline does not hold.

Packing pays only when rows are mostly padding. :func:`choose_packing`
measures a pipeline's first batches both ways and decides ``config.packing =
"auto"``: pack when a row then holds at least :data:`AUTO_MIN_GAIN` times more
real tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from tfx_jax.errors import ConfigError, DataError
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
    examples = grain_batches.kept_examples(grain_batches.shuffled_shard(
        source, seed=seed, transform=transform, process_index=index, process_count=count),
        read_options)
    packed = pack_dataset(examples, lengths, num_packing_bins=num_packing_bins or batch_size,
                          seed=seed)
    return iter(grain_batches.raising_if_all_dropped(
        packed.batch(batch_size, drop_remainder=True).map(_with_valid)))


def _first_batches(batches, num_batches: int):
    for _ in range(num_batches):
        batch = next(batches, None)
        if batch is None:
            return
        yield batch


def padding_fraction(batches: Iterator[Mapping[str, np.ndarray]], keys: Sequence[str], *,
                     num_batches: int = 10, pad_id: int = 0) -> float:
    """Fraction of the ``keys`` token slots of the next ``num_batches`` batches that are padding.

    Consumes those batches from ``batches`` (pass a fresh iterator).
    """
    return _measure(batches, keys, num_batches=num_batches, pad_id=pad_id)[0]


def _measure(batches, keys: Sequence[str], *, num_batches: int,
             pad_id: int = 0) -> tuple[float, float]:
    """(padding fraction, mean examples per row) of the next ``num_batches`` batches."""
    pad = total = rows = examples = 0
    for batch in _first_batches(batches, num_batches):
        for key in keys:
            tokens = np.asarray(batch[key])
            pad += int((tokens == pad_id).sum())
            total += tokens.size
        tokens = np.asarray(batch[keys[0]])
        segments = batch.get(keys[0] + SEGMENTATION)
        rows += tokens.shape[0]
        examples += (int(np.asarray(segments).max(axis=-1).sum()) if segments is not None
                     else int((tokens != pad_id).any(axis=-1).sum()))
    if total == 0:
        raise DataError(f"no batches to measure padding on (keys {list(keys)})")
    return pad / total, examples / rows


def real_token_gain(unpacked: float, packed: float) -> float:
    """Real tokens per packed row / per unpacked row, from the two padding fractions."""
    return (1 - packed) / max(1 - unpacked, 1e-9)


def padding_report(name: str, unpacked: float, packed: float) -> str:
    """One line for a script's startup: padding without and with packing, and the gain."""
    return (f"{name}: padding {unpacked:.1%} of token slots without packing, {packed:.1%} with "
            f"packing ({real_token_gain(unpacked, packed):.2f}x real tokens per row)")


AUTO = "auto"
#: ``packing="auto"`` packs when packing puts at least this many times more real
#: tokens in a row. Below it, packing is not worth what it costs: rows then hold a
#: varying number of examples, and attention needs segment ids (which no cuDNN
#: fused kernel takes, so GPUs fall back to the chunked kernel).
AUTO_MIN_GAIN = 1.25


@dataclasses.dataclass(frozen=True)
class PackingChoice:
    """Whether a run packs, and what its first batches showed either way."""

    enabled: bool
    setting: bool | str
    padding_unpacked: float
    padding_packed: float
    examples_per_packed_row: float
    min_gain: float = AUTO_MIN_GAIN  # what "auto" asked of the gain
    # the measured iterator of the chosen layout, rewound (see choose_packing)
    batches: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def gain(self) -> float:
        return real_token_gain(self.padding_unpacked, self.padding_packed)

    @property
    def examples_per_row(self) -> float:
        """Examples per training row as the run will see them (1 unpacked)."""
        return self.examples_per_packed_row if self.enabled else 1.0

    def report(self, name: str) -> str:
        """One startup line: the padding either way, and the decision with its reason."""
        if self.setting == AUTO:
            why = (f"config.packing = 'auto': the gain is "
                   f"{'at least' if self.enabled else 'below'} {self.min_gain:g}x")
        else:
            why = f"config.packing = {str(self.setting).lower()}"
        state = (f"on, {self.examples_per_packed_row:.1f} examples per row" if self.enabled
                 else "off")
        return (f"{padding_report(name, self.padding_unpacked, self.padding_packed)}; "
                f"packing {state} ({why})")


def packing_setting(value) -> bool | str:
    """``config.packing`` as True, False or "auto".

    The config field is a string (so ``--config.packing=false`` and ``=auto``
    both parse): "true" / "false" in any case, or "auto"; Python bools pass.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", AUTO):
        return {"true": True, "false": False, AUTO: AUTO}[value.lower()]
    raise ConfigError(f"config.packing must be 'auto', 'true' or 'false', got {value!r}")


def measurement_pipeline() -> dict:
    """The process arguments of the pipeline :func:`choose_packing` measures.

    One process: none (the run's own pipeline, which :func:`run_pipeline` then hands
    to the run). Several: process 0 of 1 without read threads on every host, so that
    every host measures the same examples and decides alike; each then builds its own
    shard's pipeline.
    """
    if jax.process_count() == 1:
        return {}
    return dict(process_index=0, process_count=1, read_options=grain.ReadOptions(num_threads=0))


def run_pipeline(choice: PackingChoice):
    """The measured iterator of ``choice``'s layout, rewound, when it is this run's own
    pipeline (one process, see :func:`measurement_pipeline`); else None."""
    return choice.batches if jax.process_count() == 1 else None


def choose_packing(setting,
                   make_batches: Callable[[bool], Iterator[Mapping[str, np.ndarray]]],
                   keys: Sequence[str], *, num_batches: int = 4,
                   min_gain: float = AUTO_MIN_GAIN) -> PackingChoice:
    """Measures a pipeline's first batches both ways and decides ``"auto"``.

    ``setting``: ``config.packing`` (see :func:`packing_setting`).
    ``make_batches(packing)`` builds a fresh training iterator either way. In a
    multi-process run it must read the same examples on every process (build it as
    process 0 of 1), so that every process decides alike. The measured iterator of
    the chosen layout comes back rewound to its first batch (``choice.batches``,
    through Grain's ``get_state`` / ``set_state``; None for an iterator without
    them): a one-process run whose own pipeline is built as the measurement's trains
    on it instead of building a third.
    """
    setting = packing_setting(setting)
    iterators = {packed: make_batches(packed) for packed in (False, True)}
    starts = {packed: it.get_state() for packed, it in iterators.items()
              if hasattr(it, "get_state")}
    unpacked, _ = _measure(iterators[False], keys, num_batches=num_batches)
    packed, examples_per_row = _measure(iterators[True], keys, num_batches=num_batches)
    enabled = (setting if isinstance(setting, bool)
               else real_token_gain(unpacked, packed) >= min_gain)
    rewound = None
    if enabled in starts:
        rewound = iterators[enabled]
        rewound.set_state(starts[enabled])
    return PackingChoice(enabled=enabled, setting=setting, padding_unpacked=unpacked,
                         padding_packed=packed, examples_per_packed_row=examples_per_row,
                         min_gain=min_gain, batches=rewound)
