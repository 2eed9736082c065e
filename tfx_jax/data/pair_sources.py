"""One entry point from a config value to ``(source_text, target_text)`` pairs.

A translation config names its data with one string (``train_data``,
``eval_data``); :func:`open_text_pairs` decides what it means:

* ``"number_words"`` or ``"number_words/<config>"`` (``en_de``, ``en_ko``): the
  built-in dataset, generated under ``data_dir`` on first use;
* a file: a user's parallel corpus in TSV format (the file *is* the split,
  so ``split`` is not used). An existing file is a file whatever its name
  (``.txt``, ``.TSV``, no suffix); a missing path ending in ``.tsv`` / ``.txt``
  (any case) is reported as a missing file, not as an unknown dataset;
* anything else: a TFDS translation dataset such as ``"wmt14_translate/de-en"``,
  prepared in ArrayRecord format under ``data_dir``.

Every result is a random-access sequence: ``len(pairs)`` and ``pairs[i] ->
(source_text, target_text)``, which is what Grain's ``MapDataset.source``
reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tfx_jax.errors import ConfigError
from tfx_jax.data.number_words_dataset import NumberWordsConfig, number_words_pairs
from tfx_jax.data.tfds_translation import tfds_translation_pairs
from tfx_jax.data.tsv_pairs import TsvPairs

TextPairs = Sequence[tuple[str, str]]
NUMBER_WORDS = "number_words"
FILE_SUFFIXES = (".tsv", ".txt")


def is_file_spec(spec: str) -> bool:
    """True if ``spec`` names a TSV file: it exists as a file, or ends in .tsv/.txt (any case)."""
    return os.path.isfile(spec) or spec.lower().endswith(FILE_SUFFIXES)


def open_text_pairs(
    spec: str,
    split: str = "train",
    *,
    data_dir: str | None = None,
    source_language: str | None = None,
    target_language: str | None = None,
    number_words_config: NumberWordsConfig | None = None,
    in_memory: bool = False,
) -> TextPairs:
    """Returns the ``(source_text, target_text)`` pairs that ``spec`` names.

    Args:
      spec: ``"number_words[/en_de|/en_ko]"``, ``"path/to/file.tsv"`` or a TFDS
        name like ``"wmt14_translate/de-en"``.
      split: ``"train"``, ``"validation"``, ``"test"`` or a TFDS split expression;
        ignored for a TSV file.
      data_dir: TFDS data directory (number_words is generated there).
      source_language / target_language: translation direction for datasets
        keyed by language (number_words, TFDS); default: the dataset's
        supervised keys (English -> German for number_words).
      number_words_config: sizes and range for number_words (see
        ``number_words_config()``); overrides the config named in ``spec``.
      in_memory: read the whole split into a list now (TFDS-backed sources).
        Worth it for corpora that fit in RAM, such as number_words: reading
        ArrayRecord one example at a time costs far more than tokenizing it.

    Raises:
      TypeError / ValueError: ``spec`` is not a non-empty string or names no
        dataset; FileNotFoundError: a missing TSV file or unprepared TFDS data.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"data spec must be a non-empty string ('number_words', a "
                         f".tsv path or a TFDS name), got {spec!r}")
    if is_file_spec(spec):
        if source_language or target_language:
            raise ConfigError(f"{spec}: a TSV file has a fixed direction (source<TAB>"
                             "target); source_language/target_language do not apply")
        return TsvPairs(spec)
    name, _, config_name = spec.partition("/")
    if name == NUMBER_WORDS:
        config = number_words_config or config_name or "en_de"
        pairs = number_words_pairs(split, data_dir=data_dir, config=config,
                                   source_language=source_language,
                                   target_language=target_language)
    else:
        pairs = tfds_translation_pairs(spec, split, data_dir=data_dir,
                                       source_language=source_language,
                                       target_language=target_language)
    return pairs.to_list() if in_memory else pairs
