"""(source, target) text pairs from one config value: a TSV file, a TFDS dataset or
the built-in number_words.

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

TSV files. The file is UTF-8, one sentence pair per line, exactly one tab per line
and non-empty text on both sides. Line endings ``\\n`` and ``\\r\\n`` are accepted;
text is otherwise kept as written. The whole file is checked when it is opened, so a
bad line fails at start-up with its file and line number rather than hours into
training.

Spreadsheet exports add two things that are not pairs: a UTF-8 byte order
mark (BOM, U+FEFF) before the first character, which is removed, and a
header line such as ``source<TAB>target`` or ``en<TAB>de``. With
``header="auto"`` (the default) a first line whose two fields are both column
names (source/target/src/tgt/input/output/text/..., a language name or code,
optionally with a ``_text`` / ``_lang`` suffix) is skipped; ``header=True``
always skips the first line, ``False`` never does. :attr:`TsvPairs.header`
holds the skipped line (None when nothing was skipped) so callers can say so.

TFDS datasets. TFDS translation datasets (``wmt14_translate/de-en``,
``wmt17_translate/de-en``, ``ted_hrlr_translate/pt_to_en``, ...) store each example
as a dict keyed by language code, ``{"de": b"...", "en": b"..."}`` (the
``tfds.features.Translation`` feature). ``tfds.data_source`` opens a prepared
ArrayRecord copy for random access; :class:`TranslationPairs` turns its records into
``(source_text, target_text)`` tuples for a chosen direction.

The data must be prepared in ArrayRecord format beforehand (TFDS cannot write
TFRecord or download WMT here), for example on a machine with internet::

    tfds build wmt14_translate/de-en --data_dir=DIR --file_format=array_record

and then read with ``data_dir=DIR``.
"""
from __future__ import annotations

import collections.abc
import importlib
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import tensorflow_datasets as tfds
from etils import epath

from tfx_jax.errors import ConfigError, DataError, DataNotFound

if TYPE_CHECKING:  # the built-in dataset is imported when a config names it
    from tfx_jax.data.number_words import NumberWordsConfig


# --- one entry point: a config value -> pairs ----------------------------------------------

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
    tsv_header: bool | str = "auto",
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
      tsv_header: a TSV file's header line, :class:`TsvPairs`'s ``header``.

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
        return TsvPairs(spec, header=tsv_header)
    name, _, config_name = spec.partition("/")
    if name == NUMBER_WORDS:
        from tfx_jax.data.number_words import number_words_pairs  # pylint: disable=import-outside-toplevel
        config = number_words_config or config_name or "en_de"
        pairs = number_words_pairs(split, data_dir=data_dir, config=config,
                                   source_language=source_language,
                                   target_language=target_language)
    else:
        pairs = tfds_translation_pairs(spec, split, data_dir=data_dir,
                                       source_language=source_language,
                                       target_language=target_language)
    return pairs.to_list() if in_memory else pairs


# --- a user's corpus: a TSV file -----------------------------------------------------------

_COLUMN_WORDS = (
    "source|target|src|tgt|trg|input|output|inputs|targets|text|sentence|translation|"
    "original|reference|question|answer|prompt|response|from|to|lang|language|"
    "english|german|french|spanish|italian|portuguese|dutch|russian|chinese|japanese|"
    "korean|arabic|hindi|turkish|polish|czech|swedish|finnish|greek|romanian|"
    "en|de|fr|es|it|pt|nl|ru|zh|ja|ko|ar|hi|tr|pl|cs|sv|fi|el|ro|uk|vi|id|th|he|da|no|hu|"
    "eng|deu|ger|fra|fre|spa|ita|por|nld|rus|zho|jpn|kor")
_HEADER_FIELD = re.compile(
    rf"^(?:{_COLUMN_WORDS})(?:[-_ ](?:{_COLUMN_WORDS}|text|sentence|lang|language|"
    rf"[a-z]{{2}}))?$")
BOM = "\ufeff"


def looks_like_header(source: str, target: str) -> bool:
    """True when both fields are column names (``source``/``target``, ``en``/``de``, ...)."""
    return all(_HEADER_FIELD.match(field.strip().lower()) for field in (source, target))


class TsvPairs(collections.abc.Sequence):
    """Random-access ``(source_text, target_text)`` pairs read from a TSV file.

    Attributes:
      header: the skipped header line, or None.
      had_bom: whether a UTF-8 byte order mark was removed.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: a line is not valid UTF-8, has no tab or more than one, or
        has an empty side, or a blank line comes before a pair (blank lines at
        the end are ignored); the message names the file and the 1-based line.
    """

    def __init__(self, path: str | os.PathLike, *, header: bool | str = "auto"):
        if header not in (True, False, "auto"):
            raise ConfigError(f"header must be True, False or 'auto', got {header!r}")
        self.path = os.fspath(path)
        file = epath.Path(self.path)  # a local path or a gs:// URL
        if not file.is_file():
            raise DataNotFound(f"TSV parallel corpus not found: {self.path}")
        self._pairs: list[tuple[str, str]] = []
        self.header: str | None = None
        self.had_bom = False
        blank = None  # the first of the blank lines just read: fine at the end of the file
        with file.open("rb") as f:
            for line_number, raw_line in enumerate(f, start=1):
                if line_number == 1:
                    raw_line = self._strip_bom(raw_line)
                    if self._is_header(raw_line, header):
                        self.header = raw_line.decode("utf-8").rstrip("\r\n")
                        continue
                if not raw_line.strip():
                    blank = blank or line_number
                    continue
                if blank is not None:
                    raise DataError(f"{self.path}:{blank}: a blank line between sentence pairs "
                                    f"(only blank lines at the end of the file are ignored)")
                self._pairs.append(self._parse(raw_line, line_number))
        if not self._pairs:
            raise DataError(f"{self.path}: the file has no sentence pairs")

    def _strip_bom(self, raw_line: bytes) -> bytes:
        encoded_bom = BOM.encode("utf-8")
        if raw_line.startswith(encoded_bom):
            self.had_bom = True
            return raw_line[len(encoded_bom):]
        return raw_line

    @staticmethod
    def _is_header(raw_line: bytes, header) -> bool:
        if header != "auto":
            return bool(header)
        try:
            fields = raw_line.decode("utf-8").rstrip("\r\n").split("\t")
        except UnicodeDecodeError:
            return False
        return len(fields) == 2 and looks_like_header(*fields)

    def _parse(self, raw_line: bytes, line_number: int) -> tuple[str, str]:
        where = f"{self.path}:{line_number}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from e
        line = line.removesuffix("\n").removesuffix("\r")
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(
                f"{where}: expected 'source<TAB>target' (exactly one tab), found "
                f"{len(fields) - 1} tabs in {line[:80]!r}")
        source, target = fields
        for side, text in (("source", source), ("target", target)):
            if not text.strip():
                raise DataError(f"{where}: the {side} side is empty")
        return source, target

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index):
        return self._pairs[index]


def write_tsv_pairs(path: str | os.PathLike, pairs) -> int:
    """Writes ``(source, target)`` pairs as a TSV file that :class:`TsvPairs` reads back.

    Returns the number of pairs written. A side that is empty or holds a tab
    or a line break would not read back as one pair: ValueError naming it.
    """
    lines = []
    for index, (source, target) in enumerate(pairs):
        for side, text in (("source", source), ("target", target)):
            if not text or any(c in text for c in "\t\r\n"):
                raise DataError(f"pair {index}: the {side} {text!r} is empty or holds a tab "
                                 f"or a line break")
        lines.append(f"{source}\t{target}\n")
    epath.Path(path).write_text("".join(lines), encoding="utf-8")
    return len(lines)


# --- translation datasets of the TFDS catalogue --------------------------------------------

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
