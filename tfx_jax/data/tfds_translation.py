"""Translation datasets from the TFDS catalogue, as (source, target) text pairs.

TFDS translation datasets (``wmt14_translate/de-en``, ``wmt17_translate/de-en``,
``ted_hrlr_translate/pt_to_en``, ...) store each example as a dict keyed by
language code, ``{"de": b"...", "en": b"..."}`` (the ``tfds.features.Translation``
feature). ``tfds.data_source`` opens a prepared ArrayRecord copy for random
access; :class:`TranslationPairs` turns its records into ``(source_text,
target_text)`` tuples for a chosen direction.

The data must be prepared in ArrayRecord format beforehand (TFDS cannot write
TFRecord or download WMT here), for example on a machine with internet::

    tfds build wmt14_translate/de-en --data_dir=DIR --file_format=array_record

and then read with ``data_dir=DIR``.
"""

from __future__ import annotations

import collections.abc
import importlib

import tensorflow_datasets as tfds

from tfx_jax.errors import ConfigError, DataError, DataNotFound


def _as_text(value) -> str:
    """TFDS ``Text`` features decode to bytes from ArrayRecord; mocks give str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


class TranslationPairs(collections.abc.Sequence):
    """Random-access ``(source_text, target_text)`` view of translation records.

    Args:
      records: a random-access sequence of dicts keyed by language code (a TFDS
        data source, or any ``Sequence[dict]``).
      source_language: record key of the source side, e.g. ``"en"``.
      target_language: record key of the target side, e.g. ``"de"``.
      name: used in error messages.
    """

    def __init__(self, records, source_language: str, target_language: str,
                 *, name: str = "dataset"):
        if source_language == target_language:
            raise ConfigError(f"{name}: source_language and target_language are both "
                             f"{source_language!r}")
        if len(records) == 0:  # pylint: disable=g-explicit-length-test
            raise DataError(f"{name}: the split is empty")
        languages = sorted(k for k in records[0] if isinstance(k, str))
        for field, language in (("source_language", source_language),
                                ("target_language", target_language)):
            if language not in languages:
                raise ConfigError(f"{name}: {field}={language!r} is not a language of "
                                 f"this dataset; it has {languages}")
        self._records = records
        self.source_language = source_language
        self.target_language = target_language

    def __len__(self) -> int:
        return len(self._records)

    def to_list(self, chunk_size: int = 4096) -> list[tuple[str, str]]:
        """All pairs in memory, read in chunks (much faster than one by one)."""
        read_many = getattr(self._records, "__getitems__", None)
        pairs = []
        for start in range(0, len(self), chunk_size):
            indices = list(range(start, min(start + chunk_size, len(self))))
            records = (read_many(indices) if read_many
                       else [self._records[i] for i in indices])
            pairs += [self._pair(record) for record in records]
        return pairs

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = index.__index__()
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        return self._pair(self._records[index % len(self)])

    def _pair(self, record) -> tuple[str, str]:
        return (_as_text(record[self.source_language]),
                _as_text(record[self.target_language]))


def _register_translation_builders() -> None:
    # `import tensorflow_datasets` imports its catalogue lazily; without this,
    # `tfds.data_source("wmt14_translate/de-en")` raises DatasetNotFoundError
    # (checked with tensorflow-datasets 4.9.10).
    importlib.import_module("tensorflow_datasets.translate")


def tfds_translation_pairs(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    source_language: str | None = None,
    target_language: str | None = None,
    download: bool = False,
) -> TranslationPairs:
    """Opens a TFDS translation dataset as ``(source_text, target_text)`` pairs.

    Args:
      name: TFDS name with config, e.g. ``"wmt14_translate/de-en"``.
      split: TFDS split expression, e.g. ``"train"``, ``"validation[:500]"``.
      data_dir: directory holding the prepared dataset (TFDS default if None).
      source_language / target_language: language keys of the direction; by
        default the dataset's ``supervised_keys`` (for ``wmt14_translate/de-en``
        that is de -> en; pass ``source_language="en", target_language="de"`` for
        the paper's English -> German). Giving only one side picks the other.
      download: let TFDS download and prepare the data if it is missing.

    Raises:
      ValueError: unknown dataset name or language.
      FileNotFoundError: the dataset is not prepared in ArrayRecord format under
        ``data_dir`` and ``download`` is False.
    """
    _register_translation_builders()
    try:
        records = tfds.data_source(name, split=split, data_dir=data_dir,
                                   download=download)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(f"unknown TFDS dataset name {name!r} (expected e.g. "
                         "'wmt14_translate/de-en')") from e
    except (NotImplementedError, FileNotFoundError, AssertionError) as e:
        if download:
            raise
        raise DataNotFound(
            f"TFDS dataset {name!r} split {split!r} is not prepared in ArrayRecord "
            f"format under data_dir={data_dir!r}; prepare it with `tfds build "
            f"{name} --data_dir=DIR --file_format=array_record`") from e
    info = getattr(records, "dataset_info", None)
    supervised_keys = tuple(info.supervised_keys or ()) if info else ()
    source_language, target_language = translation_direction(
        name, supervised_keys, source_language, target_language)
    return TranslationPairs(records, source_language, target_language, name=name)


def translation_direction(
    name: str,
    supervised_keys,
    source_language: str | None,
    target_language: str | None,
) -> tuple[str, str]:
    """(source, target) language keys: both given, one given (the other is the
    remaining supervised key), or neither (the dataset's supervised_keys)."""
    if source_language is not None and target_language is not None:
        return source_language, target_language
    if len(supervised_keys) != 2:
        raise ConfigError(f"{name}: has no supervised_keys; pass source_language "
                         "and target_language")
    if source_language is None and target_language is None:
        return supervised_keys
    given = source_language if source_language is not None else target_language
    if given not in supervised_keys:
        raise ConfigError(f"{name}: language {given!r} is not one of "
                         f"{list(supervised_keys)}")
    other = supervised_keys[1 - supervised_keys.index(given)]
    return (given, other) if source_language is not None else (other, given)
