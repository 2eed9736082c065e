"""Text corpora for language modelling: the built-in Python standard library, or TFDS.

Built-in: ``"python_stdlib"``, the source files (``*.py``) of the Python
standard library that runs this code (``sysconfig.get_paths()["stdlib"]``):
real, varied code that ships with every Python, about 12 MB in some 700 files
for CPython 3.11 once the test suites (``test/``, ``tests/``, ``idle_test/``)
and ``site-packages`` are left out -- enough that a small model overfits only
slowly. Files are read in sorted order; a file is held out for evaluation when
``crc32(relative path) mod 1000 < 1000 * eval_fraction``, so the split is fixed
by the file names alone (deterministic on every host and every run).

An *example* is one block of a file: consecutive lines between blank lines (a
function, a class header, a docstring, a group of imports), the code analogue
of lm1b's sentences. Blocks are short (a few hundred characters) next to a
training row, which is what makes packing pay. The exact numbers depend on
the Python version, so results tables name it.

A directory: its ``*.py``, ``*.txt`` and ``*.md`` files, split and cut into
blocks the same way (your own code base or notes); a single file of any name
the same way (part of its blocks held out). Files must be UTF-8 text: others
are skipped and named, and a corpus that would lose most of its files is refused.

A JSONL file (``*.jsonl``): one ``{"prompt": ..., "response": ...}`` object a
line, for supervised fine-tuning (the loss is on the response only; see
``pipeline``); the last ``eval_fraction`` of the examples (at least one) is
held out.

TFDS: any dataset with a text feature (default key ``"text"``), e.g.
``"lm1b"`` (one sentence per example), prepared in ArrayRecord format and read
with random access through ``tfds.data_source``.
"""
from __future__ import annotations

import collections
import collections.abc
import dataclasses
import importlib
import json
import os
import re
import sysconfig
import zlib
from typing import Optional, Sequence

import tensorflow_datasets as tfds

from tfx_jax.apps.language_model.pipeline import PromptResponse
from tfx_jax.data.text_pairs import is_file_spec
from tfx_jax.errors import ConfigError, DataError, DataNotFound, require, say

STDLIB = "python_stdlib"
TEST_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
DIRECTORY_EXTENSIONS = (".py", ".txt", ".md")
# Blocks of more than 65,536 UTF-8 bytes (the LM tokenizer's SentencePiece
# max_sentence_length: it drops longer sentences) are cut into pieces of at most
# MAX_BLOCK_CHARS characters (4 bytes per character at most).
MAX_BLOCK_BYTES = 1 << 16
MAX_BLOCK_CHARS = MAX_BLOCK_BYTES // 4
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """Training and held-out texts (random-access sequences of str) and where they came from."""
    name: str
    train: Sequence[str]
    eval: Sequence[str]
    description: str


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: Optional[str] = None, extensions: tuple[str, ...] = (".py",)
                 ) -> list[str]:
    """Relative paths of the standard library's ``*.py`` files (or ``root``'s files with
    these extensions), sorted, test suites left out."""
    root = stdlib_root() if root is None else root
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in TEST_DIRS)
        for name in files:
            if name.endswith(extensions):
                paths.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(paths)


def is_held_out(relative_path: str, eval_fraction: float) -> bool:
    """Whether a file belongs to the evaluation split (a hash of its path, not its content)."""
    bucket = zlib.crc32(relative_path.replace(os.sep, "/").encode()) % 1000
    return bucket < round(1000 * eval_fraction)


def split_blocks(text: str) -> list[str]:
    """The blank-line-separated blocks of a file, without trailing whitespace, none empty."""
    blocks = (block.rstrip() for block in _BLANK_LINES.split(text.replace("\r\n", "\n")))
    return [block for block in blocks if block.strip()]


def read_text_file(path: str) -> str:
    """The UTF-8 text of ``path`` (a byte order mark removed, line ends made ``\\n``).

    Raises DataError naming the file for a binary file (NUL bytes) or bytes that
    are not UTF-8 (the offset and a way to convert it). Corpus files and prompt
    files are read with it.
    """
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data[:65536]:
        raise DataError(f"{path}: a binary file (NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start}); convert it, e.g. `iconv -f latin1 -t utf-8`") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as open() in text mode


def split_long_blocks(blocks: Sequence[str], max_chars: int = MAX_BLOCK_CHARS
                      ) -> tuple[list[str], int]:
    """The blocks, those over ``MAX_BLOCK_BYTES`` cut into pieces of at most ``max_chars``
    characters (at their last line break, else their last space, before the limit); also
    how many blocks were cut.

    A one-line 300 KB file is one block: SentencePiece would drop it as a sentence
    (too long) and a training row would keep only its start.
    """
    out, cut = [], 0
    for block in blocks:
        if len(block) <= max_chars or len(block.encode("utf-8")) <= MAX_BLOCK_BYTES:
            out.append(block)
            continue
        cut += 1
        while len(block) > max_chars:
            at = block.rfind("\n", 0, max_chars)
            at = block.rfind(" ", 0, max_chars) if at <= 0 else at
            at = max_chars if at <= 0 else at
            piece, block = block[:at].rstrip(), block[at:].lstrip()
            if piece:
                out.append(piece)
        if block.strip():
            out.append(block)
    return out, cut


def _corpus_files(root: str, extensions: tuple[str, ...]) -> list[str]:
    files = stdlib_files(root, extensions)
    if files or root == stdlib_root():
        return files
    found = collections.Counter(os.path.splitext(name)[1].lower() or "(no extension)"
                                for _, _, names in os.walk(root) for name in names)
    seen = ", ".join(f"{count} {ext}" for ext, count in found.most_common(5)) or "no files"
    raise DataError(f"empty corpus: {root!r} has no {', '.join(extensions)} files (it has "
                    f"{seen}); lm.py reads files with these extensions (a single file of "
                    f"any name can be given as config.dataset)")


def stdlib_corpus(root: Optional[str] = None, *, eval_fraction: float = 0.02,
                  max_files: Optional[int] = None,
                  extensions: tuple[str, ...] = (".py",),
                  files: Optional[Sequence[str]] = None) -> TextCorpus:
    """The blocks of the standard library's files (or ``root``'s), split into train / eval
    by file. ``max_files`` keeps only the first files of the sorted list (tests, quick runs);
    ``files``: these paths under ``root`` instead of its files with ``extensions``.

    Files that are binary or not UTF-8 are skipped and named in one line; a
    corpus that loses more than half of its files is refused. Blocks longer
    than ``MAX_BLOCK_BYTES`` are cut (said; not in the built-in corpus, which stays
    as published). When the split by name holds out no
    file, or every file (few files, or one), the last ``eval_fraction`` of the
    blocks (at least one) is held out instead, and the run says so.
    """
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    root = stdlib_root() if root is None else root
    files = list(_corpus_files(root, extensions) if files is None else files)[:max_files]
    train, held_out, skipped = [], [], []
    num_eval_files = 0
    for path in files:
        try:
            blocks = split_blocks(read_text_file(os.path.join(root, path)))
        except (DataError, OSError) as e:
            skipped.append((path, "binary" if "binary" in str(e) else
                            "not UTF-8" if "UTF-8" in str(e) else "unreadable"))
            continue
        if is_held_out(path, eval_fraction):
            held_out += blocks
            num_eval_files += 1
        else:
            train += blocks
    if skipped:
        listed = ", ".join(f"{path} ({why})" for path, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        line = f"skipped {len(skipped)} of {len(files)} files: {listed}{more}"
        if root != stdlib_root() and 2 * len(skipped) > len(files):
            raise DataError(f"{root}: {line}; most of the corpus would be lost (lm.py reads "
                            f"UTF-8 text)")
        say(f"{root}: {line}; they are left out")
    cut_train = cut_eval = 0
    if root != stdlib_root():  # the built-in corpus stays as published (docs/lm.md)
        train, cut_train = split_long_blocks(train)
        held_out, cut_eval = split_long_blocks(held_out)
    if cut_train + cut_eval:
        say(f"{root}: cut {cut_train + cut_eval} blocks longer than {MAX_BLOCK_BYTES:,} bytes "
            f"into pieces of at most {MAX_BLOCK_CHARS:,} characters at line breaks or spaces "
            f"(SentencePiece's longest sentence)")
    split = (f"{len(files) - len(skipped) - num_eval_files} train / {num_eval_files} "
             f"held-out files")
    if (not train or not held_out) and len(train) + len(held_out) >= 2:
        blocks = train + held_out
        count = max(1, round(eval_fraction * len(blocks)))
        train, held_out = blocks[:-count], blocks[-count:]
        split = f"{len(files) - len(skipped)} files, the last {count} blocks held out"
        say(f"{root}: no file fell {'out of' if not train else 'in'} the held-out split by "
            f"name; held out the last {count} of {len(blocks)} blocks instead")
    if not train or not held_out:
        raise DataError(
            f"empty corpus: the files under {root!r} gave {len(train)} training and "
            f"{len(held_out)} held-out blocks from {len(files)} files (eval_fraction="
            f"{eval_fraction}, max_files={max_files}); both must be non-empty")
    what = (f"Python {sysconfig.get_python_version()} standard library" if root == stdlib_root()
            else "directory")
    return TextCorpus(
        name=STDLIB if root == stdlib_root() else root, train=train, eval=held_out,
        description=f"{what} ({root}): {split}, {len(train)} / {len(held_out)} blocks")


class TfdsTexts(collections.abc.Sequence):
    """Random-access ``str`` view of one text feature of a TFDS data source."""

    def __init__(self, records, text_key: str, *, name: str):
        if len(records) == 0:  # pylint: disable=g-explicit-length-test
            raise DataError(f"{name}: the split is empty")
        if text_key not in records[0]:
            raise ConfigError(f"{name}: text_key={text_key!r} is not a feature of this dataset; "
                             f"it has {sorted(records[0])}")
        self._records = records
        self._key = text_key

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        value = self._records[index][self._key]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tfds_texts(name: str, split: str, *, data_dir: Optional[str] = None,
               text_key: str = "text") -> TfdsTexts:
    """The texts of a prepared TFDS dataset split (ArrayRecord), e.g. ``("lm1b", "train")``."""
    importlib.import_module("tensorflow_datasets.text")  # registers lm1b & co. (lazy catalogue)
    try:
        records = tfds.data_source(name, split=split, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(f"unknown TFDS dataset name {name!r} (expected e.g. 'lm1b' or "
                         f"{STDLIB!r} for the built-in corpus)") from e
    except (NotImplementedError, FileNotFoundError, AssertionError) as e:
        raise DataNotFound(
            f"TFDS dataset {name!r} split {split!r} is not prepared in ArrayRecord format "
            f"under data_dir={data_dir!r}; prepare it with `tfds build {name} "
            f"--data_dir=DIR --file_format=array_record`") from e
    return TfdsTexts(records, text_key, name=f"{name}[{split}]")


JSONL = ".jsonl"


def jsonl_corpus(path: str, *, eval_fraction: float = 0.02) -> TextCorpus:
    """The ``{"prompt", "response"}`` examples of a JSONL file (:class:`PromptResponse`),
    the last ``eval_fraction`` held out; DataError naming the first bad line."""
    require(os.path.isfile(path), f"config.dataset: no such file {path!r}", DataError)
    examples = []
    for number, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None
        require(isinstance(record, dict) and all(
            isinstance(record.get(key), str) for key in ("prompt", "response")),
            f"{path}:{number}: expected an object with string \"prompt\" and \"response\", "
            f"got {line[:60]!r}", DataError)
        examples.append(PromptResponse(record["prompt"], record["response"]))
    require(len(examples) >= 2, f"{path}: {len(examples)} examples; training and held-out "
            f"examples need at least 2", DataError)
    count = max(1, round(eval_fraction * len(examples)))
    return TextCorpus(name=path, train=examples[:-count], eval=examples[-count:],
                      description=f"JSONL {path}: {len(examples) - count} / {count} "
                                  f"prompt/response examples")


def open_corpus(dataset: str, *, data_dir: Optional[str] = None, train_split: str = "train",
                eval_split: str = "test", text_key: str = "text", eval_fraction: float = 0.02,
                max_files: Optional[int] = None) -> TextCorpus:
    """``"python_stdlib"`` (built in), a directory of text files, a text file, a JSONL
    file of prompt/response examples, or a TFDS name (``"lm1b"``)."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise ConfigError(f"config.dataset must be {STDLIB!r}, a directory or a TFDS name like "
                         f"'lm1b', got {dataset!r}")
    if dataset == STDLIB:
        return stdlib_corpus(eval_fraction=eval_fraction, max_files=max_files)
    if os.path.isdir(dataset):
        return stdlib_corpus(dataset, eval_fraction=eval_fraction, max_files=max_files,
                             extensions=DIRECTORY_EXTENSIONS)
    if dataset.lower().endswith(JSONL):
        return jsonl_corpus(dataset, eval_fraction=eval_fraction)
    if is_file_spec(dataset):  # one file, whatever its name (as translate.py's data flags)
        require(os.path.isfile(dataset), f"config.dataset: no such file {dataset!r}", DataError)
        corpus = stdlib_corpus(os.path.dirname(os.path.abspath(dataset)),
                               eval_fraction=eval_fraction, files=[os.path.basename(dataset)])
        return dataclasses.replace(corpus, name=dataset, description=(
            f"file {dataset}: {len(corpus.train)} / {len(corpus.eval)} blocks"))
    train = tfds_texts(dataset, train_split, data_dir=data_dir, text_key=text_key)
    held_out = tfds_texts(dataset, eval_split, data_dir=data_dir, text_key=text_key)
    return TextCorpus(name=dataset, train=train, eval=held_out,
                      description=f"TFDS {dataset}: {len(train)} {train_split} / "
                                  f"{len(held_out)} {eval_split} examples")
