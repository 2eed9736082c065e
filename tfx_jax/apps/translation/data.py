"""Which text pairs a translation config trains, evaluates and tests on.

A config names its data with ``dataset`` (the built-in ``number_words`` or a
TFDS translation dataset) and, optionally, ``train_data`` / ``eval_data`` /
``test_data``, each a file (TSV, any suffix) or another dataset name that
replaces one split:

* ``train_data`` and ``eval_data``: the user's corpus; the final test runs on
  ``test_data`` if given, else on ``eval_data``.
* ``train_data`` alone, a file: a seeded ``eval_holdout`` fraction of it (at
  most 1,000 pairs) is held out for evaluation and testing, and the run says
  so; it never silently evaluates on number_words. A file too small to spare
  5 pairs is refused with a message asking for ``eval_data``.
* ``train_data`` alone, a dataset name: that dataset's eval and test splits.
* ``eval_data`` or ``test_data`` without ``train_data``: refused (a model
  trained on number_words would be scored on the user's data).

Notes for the console (a skipped TSV header, a removed byte order mark, the
held-out split) come back in :attr:`TranslationData.notes`.
"""
from __future__ import annotations

import collections.abc
import dataclasses

import numpy as np

from tfx_jax.errors import ConfigError
from tfx_jax.data.text_pairs import NUMBER_WORDS, is_file_spec, open_text_pairs

MAX_HOLDOUT = 1_000
TSV_HEADER = {"auto": "auto", "skip": True, "keep": False}  # config.tsv_header -> open_text_pairs
MIN_HOLDOUT = 5


class PairSubset(collections.abc.Sequence):
    """The pairs of ``pairs`` at ``indices`` (a view, random access)."""

    def __init__(self, pairs, indices):
        self.pairs = pairs
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.pairs[int(self.indices[index])]


@dataclasses.dataclass
class TranslationData:
    train: collections.abc.Sequence
    eval: collections.abc.Sequence
    test: collections.abc.Sequence
    notes: list[str]
    user_corpus: bool  # the training pairs are the user's (not the built-in number_words)


def is_number_words(spec: str) -> bool:
    return spec.split("/")[0] == NUMBER_WORDS


def open_split(config, spec: str, split: str, notes: list[str]):
    """The pairs ``spec`` names (a file, or ``split`` of a dataset)."""
    options = dict(data_dir=config.data_dir, in_memory=config.data_in_memory)
    if is_file_spec(spec):
        pairs = open_text_pairs(spec, tsv_header=TSV_HEADER[config.get("tsv_header", "auto")])
        if pairs.had_bom:
            notes.append(f"{spec}: removed the UTF-8 byte order mark before the first line")
        if pairs.header is not None:
            notes.append(f"{spec}: skipped the header line {pairs.header!r} (set "
                         f"--config.tsv_header=keep to train on it)")
        return pairs
    options.update(source_language=config.source_language,
                   target_language=config.target_language)
    if is_number_words(spec):
        from tfx_jax.data.number_words import number_words_config  # pylint: disable=import-outside-toplevel
        config_name = spec.partition("/")[2] or "en_de"
        sizes = number_words_config(config_name.split("_")[-1], **config.number_words.to_dict())
        if sizes.name != config_name:  # not a registered config: generate these sizes
            options["number_words_config"] = sizes
    return open_text_pairs(spec, split, **options)


def hold_out(pairs, fraction: float, seed: int, name: str):
    """(train, held-out) views of ``pairs``: a seeded ``fraction`` (<= 1,000 pairs) held out."""
    count = min(MAX_HOLDOUT, int(round(len(pairs) * fraction)))
    if count < MIN_HOLDOUT or len(pairs) - count < MIN_HOLDOUT:
        raise ConfigError(
            f"config.train_data {name} has {len(pairs)} pairs and no config.eval_data was "
            f"given: {fraction:.0%} of them ({count}) is too few to hold out for evaluation; "
            f"pass --config.eval_data=FILE (or raise config.eval_holdout)")
    order = np.random.default_rng(seed).permutation(len(pairs))
    return PairSubset(pairs, np.sort(order[count:])), PairSubset(pairs, np.sort(order[:count]))


def open_data(config) -> TranslationData:
    """The (train, eval, test) pairs of ``config`` (see the module docstring)."""
    notes: list[str] = []
    if (config.eval_data or config.test_data) and not config.train_data:
        given = "config.eval_data" if config.eval_data else "config.test_data"
        raise ConfigError(f"{given} is set but config.train_data is not: the model would train "
                         f"on {config.dataset!r} and be scored on your data; set "
                         f"--config.train_data too")
    train_spec = config.train_data or config.dataset
    train = open_split(config, train_spec, config.train_split, notes)
    user_corpus = not is_number_words(train_spec)
    if config.eval_data:
        evaluation = open_split(config, config.eval_data, config.eval_split, notes)
    elif config.train_data and is_file_spec(config.train_data):
        train, evaluation = hold_out(train, config.eval_holdout, config.seed, config.train_data)
        notes.append(f"no config.eval_data: held out {len(evaluation)} of "
                     f"{len(train) + len(evaluation)} pairs of {config.train_data} "
                     f"(seed {config.seed}) for evaluation and the final test; "
                     f"training on the other {len(train)}")
    else:
        evaluation = open_split(config, train_spec, config.eval_split, notes)
    if config.test_data:
        test = open_split(config, config.test_data, config.test_split, notes)
    elif config.train_data and (config.eval_data or is_file_spec(config.train_data)):
        test = evaluation
    else:
        test = open_split(config, train_spec, config.test_split, notes)
    return TranslationData(train=train, eval=evaluation, test=test, notes=notes,
                           user_corpus=user_corpus)


def bleu_tokenize(config) -> str:
    """sacrebleu tokenizer: config.bleu_tokenize, or "char" for the one-word number_words."""
    if config.bleu_tokenize:
        return config.bleu_tokenize
    uses_number_words = not (config.train_data or config.eval_data) and is_number_words(
        config.dataset)
    return "char" if uses_number_words else "13a"
