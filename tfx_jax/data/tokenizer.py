"""A shared source/target subword vocabulary with SentencePiece.

"Sentences were encoded using byte-pair encoding, which has a shared
source-target vocabulary of about 37000 tokens" (Vaswani et al. 2017, sec. 5.1).
We train one SentencePiece model (BPE by default) on source and target text
together, so both sides use the same ids and the model may share its
embedding matrices.

Reserved ids, the one set for the whole project (translation, language
modelling and the DALL-E joint stream all use these): ``PAD_ID = 0`` (padding;
the models treat 0 as padding), ``EOS_ID = 1`` (end of sequence), ``BOS_ID = 2``
(start of sequence, the decoder's first input), ``UNK_ID = 3``. Ids from
``NUM_RESERVED_IDS = 4`` on are free: vocabularies start there, and an app that
needs more special tokens (DALL-E's begin-of-image) takes the next ids.

The trained model is cached as a file in a directory the caller chooses (the
run's workdir, local or a gs:// URL: files go through ``etils.epath``):
:func:`load_or_train_tokenizer` loads it if present, so a resumed or evaluation
run reuses the exact vocabulary of training.

A run's model in its workdir: read back, or trained aside and written later. A refused
run must leave its workdir as it was, so a new tokenizer is trained into a local
temporary directory and only its bytes are kept; :func:`write_workdir_file` puts them
into the workdir once every check has passed. A workdir that has its tokenizer already
(a resumed run, or translating/generating with a trained workdir) is read back through a
local copy, because SentencePiece reads local files only. Every workdir path goes
through ``etils.epath``, so a ``gs://`` workdir works the same.
"""
from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
import sentencepiece as spm
from etils import epath

from tfx_jax.errors import ConfigError, DataError, DataNotFound, WorkdirNotFound, say


PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
NUM_RESERVED_IDS = 4


class SentencePieceTokenizer:
    """Text <-> token ids with a trained SentencePiece model file."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = os.fspath(model_path)
        path = epath.Path(self.model_path)
        if not path.is_file():
            raise DataNotFound(f"SentencePiece model not found: {self.model_path}")
        model_proto = path.read_bytes()  # through epath: the file may be on gs://
        try:
            self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:  # sentencepiece's only error type for unreadable models
            raise DataError(f"{self.model_path}: not a SentencePiece model file (could not "
                             f"parse ModelProto from its {len(model_proto)} bytes); delete it "
                             f"to train a new one, or point to the .model file that "
                             f"train_sentencepiece wrote") from e
        reserved = (self._processor.pad_id(), self._processor.eos_id(),
                    self._processor.bos_id(), self._processor.unk_id())
        if reserved != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
            raise DataError(f"{self.model_path}: reserved ids (pad, eos, bos, unk) "
                             f"are {reserved}, expected {(PAD_ID, EOS_ID, BOS_ID, UNK_ID)}")

    @property
    def vocab_size(self) -> int:
        """Number of ids, reserved ones included (embedding table size)."""
        return self._processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without EOS (the input pipeline appends it)."""
        return self._processor.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first EOS; padding and BOS are dropped."""
        kept = []
        for token in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if token == EOS_ID:
                break
            if token not in (PAD_ID, BOS_ID):
                kept.append(token)
        return self._processor.decode(kept)


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    split_digits: bool = False,
    options: dict | None = None,
) -> SentencePieceTokenizer:
    """Trains a model on ``texts`` and writes it to ``model_path`` atomically.

    ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): a tiny corpus
    gets the vocabulary it can support instead of an error, and a line says so. ``split_digits``
    makes every digit its own piece (as PaLM and LLaMA do), so numbers are
    spelled digit by digit instead of as whole memorised tokens like ``2024``.
    ``options`` are more ``SentencePieceTrainer.train`` arguments (e.g. to keep
    code's whitespace: ``normalization_rule_name="identity"``).
    """
    if vocab_size < 5:
        raise ConfigError(f"vocab_size must be >= 5 (4 reserved ids), got {vocab_size}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type=model_type,
        character_coverage=character_coverage,
        split_digits=split_digits,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
        **(options or {}),
    )
    path = epath.Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a reader never sees a half-written model.
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    temporary.write_bytes(model.getvalue())
    temporary.replace(path)
    tokenizer = SentencePieceTokenizer(path)
    if tokenizer.vocab_size < vocab_size:
        say(f"Tokenizer: {tokenizer.vocab_size:,} pieces instead of vocab_size = {vocab_size:,}: "
            f"the training text supports no more (SentencePiece runs out of pieces to add; "
            f"more text gives more), so the model's vocabulary has {tokenizer.vocab_size:,}")
    return tokenizer


def _training_texts(pairs: Sequence[tuple[str, str]], max_pairs: int,
                    seed: int) -> Iterator[str]:
    """Source and target of every pair, or of ``max_pairs`` sampled pairs."""
    indices = np.arange(len(pairs))
    if len(pairs) > max_pairs:
        indices = np.sort(np.random.default_rng(seed).choice(
            len(pairs), size=max_pairs, replace=False))
    for i in indices:
        source, target = pairs[int(i)]
        yield source
        yield target


def tokenizer_path(model_dir: str | os.PathLike, vocab_size: int,
                   model_type: str = "bpe", split_digits: bool = False) -> str:
    """Where :func:`load_or_train_tokenizer` caches its model."""
    digits = "_split_digits" if split_digits else ""
    return os.fspath(epath.Path(model_dir) /
                     f"sentencepiece_{model_type}_{vocab_size}{digits}.model")


def load_or_train_tokenizer(
    pairs: Sequence[tuple[str, str]],
    model_dir: str | os.PathLike,
    *,
    vocab_size: int = 1000,
    model_type: str = "bpe",
    split_digits: bool = False,
    max_training_pairs: int = 1_000_000,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Loads the cached shared vocabulary from ``model_dir`` or trains it.

    Args:
      pairs: training ``(source_text, target_text)`` pairs; both sides feed one
        vocabulary. Not read when the model file already exists.
      model_dir: cache directory, usually the workdir; the file is
        ``tokenizer_path(model_dir, vocab_size, model_type, split_digits)``.
      vocab_size: requested size, an upper bound for tiny corpora.
      model_type: ``"bpe"`` (the paper) or ``"unigram"``.
      split_digits: one piece per digit (see :func:`train_sentencepiece`).
      max_training_pairs: train on a seeded random sample of at most this many
        pairs (large corpora such as WMT need not be read in full).
      seed: seed of that sample.
    """
    path = tokenizer_path(model_dir, vocab_size, model_type, split_digits)
    if epath.Path(path).exists():
        return SentencePieceTokenizer(path)
    texts = _training_texts(pairs, max_training_pairs, seed)
    return train_sentencepiece(texts, path, vocab_size=vocab_size,
                               model_type=model_type, split_digits=split_digits)


# --- a run's tokenizer in its workdir ------------------------------------------------------

def local_temp_dir() -> str:
    """A fresh local directory, removed when the process exits."""
    directory = tempfile.mkdtemp(prefix="tfx_jax_tokenizer_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def read_workdir_tokenizer(workdir: str, name: str, *, hint: str = "") -> SentencePieceTokenizer:
    """``<workdir>/<name>``, loaded from a local copy; FileNotFoundError (plus ``hint``) if absent."""
    source = epath.Path(workdir) / name
    if not source.exists():
        raise WorkdirNotFound(f"no tokenizer {source} in workdir {workdir!r}{hint}")
    local = os.path.join(local_temp_dir(), source.name)
    with open(local, "wb") as f:
        f.write(source.read_bytes())
    return SentencePieceTokenizer(local)


def workdir_tokenizer(workdir: str, name: str,
                      train: Callable[[str], SentencePieceTokenizer]
                      ) -> tuple[SentencePieceTokenizer, bytes | None]:
    """(tokenizer, bytes to write into the workdir later, or None when it is there already).

    ``train(directory)`` trains a tokenizer into a local directory (called only
    when the workdir has none).
    """
    if (epath.Path(workdir) / name).exists():
        return read_workdir_tokenizer(workdir, name), None
    tokenizer = train(local_temp_dir())
    with open(tokenizer.model_path, "rb") as f:
        return tokenizer, f.read()


def write_workdir_file(workdir: str, name: str, content: bytes) -> None:
    """Writes ``<workdir>/<name>`` (process 0 only), via a temporary name when local."""
    if jax.process_index() != 0:
        return
    directory = epath.Path(workdir)
    target = directory / name  # ``name`` may name a subdirectory: "init_from/config.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    if "://" in os.fspath(workdir):  # object stores write whole objects
        target.write_bytes(content)
        return
    partial = directory / f"{name}.tmp"
    partial.write_bytes(content)
    partial.rename(target)
