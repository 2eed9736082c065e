"""Token rows for next-token prediction: tokenizer, training batches (packed) and eval data.

An example text becomes ``[BOS] + ids + [EOS]``; the model reads ``inputs =
sequence[:-1]`` and predicts ``targets = sequence[1:]`` (teacher forcing: the
input is the target shifted right, starting at BOS), so every example is
trained to predict its first token from BOS and to end with EOS. ``weights``
(int32, like the rows) is 1 on the targets the loss counts and 0 on padding.
The special ids are the tokenizer's (:func:`special_ids`): the project's
SentencePiece ids, or a checkpoint's own (``pretrained.load_tokenizer``; no
BOS, e.g. Qwen, means none is put first).

A prompt/response example (:class:`PromptResponse`, from a JSONL file) becomes
``[BOS] + prompt ids + response ids + [EOS]``, the two parts tokenized apart
and joined as they are (a separator belongs at the end of the prompt); its
``weights`` are 0 on the targets of the prompt and 1 on the response and EOS,
so the loss is the response's alone (supervised fine-tuning). A too long one
is cut at its end (its start, the prompt, is kept).

Training: an example longer than ``max_len + 1`` tokens is cut to a random
window of ``max_len + 1`` tokens (a new window each epoch, seeded), so every
part of a long block is seen over the epochs. With ``packing`` the rows hold
as many examples as fit (:mod:`tfx_jax.data.packing`), with
``inputs_segmentation`` / ``inputs_position`` (and the same for targets) that
the model reads as ``segment_ids`` / ``positions``.

Evaluation: every held-out example is cut into consecutive windows, so each of
its tokens is predicted exactly once; one row per window, padded, in a
deterministic pass (:func:`tfx_jax.data.grain_batches.evaluation_dataset`).

The tokenizer is SentencePiece (BPE), trained on a seeded sample of at most
``max_chars`` characters of training text and cached in the workdir. It keeps
whitespace as is (identity normalisation, newline a piece of its own, pieces of
spaces for indentation) and spells characters it has no piece for (the rarest
0.05%, and any character missing from the sample) as UTF-8 bytes
(``byte_fallback``, 256 of the ids), so any text decodes back to itself.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import grain
import numpy as np

from tfx_jax.errors import ConfigError, DataError
from tfx_jax.data import grain_batches, packing
from tfx_jax.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, SentencePieceTokenizer,
                                    tokenizer_path, train_sentencepiece)

# Keep text byte-exact through SentencePiece: no NFKC, no whitespace folding.
VERBATIM_OPTIONS = dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                        add_dummy_prefix=False, byte_fallback=True,
                        allow_whitespace_only_pieces=True, split_by_whitespace=False,
                        user_defined_symbols=["\n"], max_sentence_length=1 << 16)
LENGTHS_KEYS = ("inputs", "targets", "weights")
MIN_VOCAB_SIZE = 384


def tokenizer_sample(texts: Sequence[str], max_chars: int, seed: int) -> list[str]:
    """A seeded random sample of ``texts`` with at most ``max_chars`` characters in all."""
    if len(texts) == 0:  # pylint: disable=g-explicit-length-test
        raise DataError("empty corpus: no training text to train the tokenizer on")
    order = np.random.default_rng(seed).permutation(len(texts))
    sample, total = [], 0
    for index in order:
        text = texts[int(index)]
        if total + len(text) > max_chars and sample:
            break
        sample.append(text)
        total += len(text)
    return sample


def lm_tokenizer_path(model_dir: str, vocab_size: int, model_type: str = "bpe") -> str:
    """Where :func:`load_or_train_lm_tokenizer` caches its model."""
    return tokenizer_path(model_dir, vocab_size, f"lm_{model_type}")


def load_or_train_lm_tokenizer(texts: Sequence[str], model_dir: str, *, vocab_size: int,
                               max_chars: int = 1_000_000, seed: int = 0,
                               model_type: str = "bpe") -> SentencePieceTokenizer:
    """The cached ``<model_dir>/sentencepiece_lm_<type>_<vocab>.model``, or trains it.

    Every process trains the same model (same sample, same seed); the write is
    atomic, so processes sharing a workdir do not see half-written files.
    """
    path = lm_tokenizer_path(model_dir, vocab_size, model_type)
    if os.path.exists(path):
        return SentencePieceTokenizer(path)
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size must be >= {MIN_VOCAB_SIZE} for the LM tokenizer (256 "
                         f"byte pieces, 4 reserved ids and the common characters), got "
                         f"{vocab_size}")
    try:
        return train_sentencepiece(tokenizer_sample(texts, max_chars, seed), path,
                                   vocab_size=vocab_size, model_type=model_type,
                                   character_coverage=0.9995, options=VERBATIM_OPTIONS)
    except RuntimeError as e:  # SentencePiece's only error type
        raise DataError(f"cannot train a {vocab_size}-piece tokenizer on this text: {e}") from e


class SpecialIds(NamedTuple):
    """The ids a pipeline puts around examples: BOS first (None: none), EOS last (None:
    none), padding (never counted: its weight is 0)."""
    bos: Optional[int]
    eos: Optional[int]
    pad: int


def special_ids(tokenizer) -> SpecialIds:
    """The tokenizer's own ``bos_id`` / ``eos_id`` / ``pad_id`` (a checkpoint tokenizer's),
    else the project's (:mod:`tfx_jax.data.tokenizer`); padding falls back to EOS, then 0."""
    bos = getattr(tokenizer, "bos_id", BOS_ID)
    eos = getattr(tokenizer, "eos_id", EOS_ID)
    pad = getattr(tokenizer, "pad_id", PAD_ID)
    return SpecialIds(bos, eos, next((i for i in (pad, eos) if i is not None), 0))


@dataclasses.dataclass(frozen=True)
class PromptResponse:
    """One supervised example: the loss is on ``response`` only."""
    prompt: str
    response: str


Example = Union[str, PromptResponse]


def sequence_ids(text: str, tokenizer) -> np.ndarray:
    """``[BOS] + tokenizer.encode(text) + [EOS]`` (int32; the tokenizer's special ids)."""
    return example_ids(text, tokenizer)[0]


def example_ids(example: Example, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, weights of its targets ``sequence[1:]``), both int32.

    A text: ``[BOS] + ids + [EOS]``, every target weighted. A :class:`PromptResponse`:
    ``[BOS] + prompt ids + response ids + [EOS]``, the prompt's targets weighted 0.
    """
    bos, eos, _ = special_ids(tokenizer)
    head = [] if bos is None else [bos]
    tail = [] if eos is None else [eos]
    if isinstance(example, PromptResponse):
        prefix = [*head, *tokenizer.encode(example.prompt)]
        body = [*tokenizer.encode(example.response), *tail]
    else:
        prefix, body = head, [*tokenizer.encode(example), *tail]
    sequence = np.asarray([*prefix, *body], np.int32)
    weights = np.ones((max(len(sequence) - 1, 0),), np.int32)
    weights[:max(len(prefix) - 1, 0)] = 0  # targets that are prompt tokens
    return sequence, weights


def _pad(ids: np.ndarray, length: int, pad_id: int = PAD_ID) -> np.ndarray:
    row = np.full((length,), pad_id, np.int32)
    row[:len(ids)] = ids
    return row


def _row(sequence: np.ndarray, weights: np.ndarray, *, max_len: int, padded: bool,
         pad_id: int) -> dict:
    row = {"inputs": sequence[:-1], "targets": sequence[1:], "weights": weights}
    if padded:
        row = {key: _pad(value, max_len, 0 if key == "weights" else pad_id)
               for key, value in row.items()}
    return row


def _training_example(example, rng, *, tokenizer, max_len: int, padded: bool):
    sequence, weights = example_ids(example, tokenizer)
    if len(sequence) > max_len + 1:
        # a text: a random window (another each epoch); a prompt/response: its start
        start = (0 if isinstance(example, PromptResponse)
                 else int(rng.integers(0, len(sequence) - max_len)))
        sequence = sequence[start:start + max_len + 1]
        weights = weights[start:start + max_len]
    return _row(sequence, weights, max_len=max_len, padded=padded,
                pad_id=special_ids(tokenizer).pad)


def check_max_len(max_len: int) -> None:
    if not isinstance(max_len, (int, np.integer)) or max_len < 2:
        raise ConfigError(f"max_len must be an integer >= 2 (tokens per row), got {max_len!r}")


def train_batches(texts: Sequence[str], tokenizer, *, global_batch_size: int, max_len: int,
                  seed: int = 0, packing_enabled: bool = True,
                  num_packing_bins: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
    """Infinite, shuffled LM training batches of rows of ``max_len`` tokens for this process.

    ``texts``: strings, or :class:`PromptResponse` examples. Batches: ``inputs``,
    ``targets``, ``weights`` int32 [b, max_len] and ``valid``; with packing also
    ``<key>_segmentation`` and ``<key>_position`` of each of them.
    """
    check_max_len(max_len)
    if len(texts) == 0:  # pylint: disable=g-explicit-length-test
        raise DataError("empty corpus: no training examples")
    transform = functools.partial(_training_example, tokenizer=tokenizer, max_len=max_len,
                                  padded=not packing_enabled)
    options = dict(global_batch_size=global_batch_size, seed=seed, transform=transform,
                   process_index=process_index, process_count=process_count,
                   read_options=read_options)
    if packing_enabled:
        return packing.packed_training_batches(
            texts, lengths={key: max_len for key in LENGTHS_KEYS},
            num_packing_bins=num_packing_bins, **options)
    return grain_batches.training_batches(texts, **options)


def eval_windows(texts: Sequence[Example], tokenizer, *, max_len: int,
                 max_examples: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(sequence, target weights) windows of the first ``max_examples`` examples.

    A text's ``[BOS] + ids + [EOS]`` is cut into windows of ``max_len + 1`` tokens that
    overlap by one (each token is a target once); a :class:`PromptResponse` is one
    window, cut at its end like in training. Windows with no weighted target are left out.
    """
    check_max_len(max_len)
    windows = []
    for example in texts[:max_examples] if max_examples else texts:
        sequence, weights = example_ids(example, tokenizer)
        starts = ([0] if isinstance(example, PromptResponse)
                  else range(0, len(sequence) - 1, max_len))
        for start in starts:
            window = (sequence[start:start + max_len + 1], weights[start:start + max_len])
            if window[1].any():
                windows.append(window)
    if not windows:
        raise DataError("empty corpus: no held-out examples to evaluate on")
    return windows


def _eval_example(window, *, max_len: int, pad_id: int) -> dict:
    return _row(*window, max_len=max_len, padded=True, pad_id=pad_id)


def eval_batches(windows: Sequence[tuple[np.ndarray, np.ndarray]], *, global_batch_size: int,
                 max_len: int, pad_id: int = PAD_ID, process_index: int | None = None,
                 process_count: int | None = None) -> grain.MapDataset:
    """One padded, deterministic pass over ``windows`` (re-iterable; see grain_batches)."""
    return grain_batches.evaluation_dataset(
        windows, global_batch_size=global_batch_size,
        transform=functools.partial(_eval_example, max_len=max_len, pad_id=pad_id),
        process_index=process_index, process_count=process_count)
