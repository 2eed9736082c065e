"""A run's SentencePiece model in its workdir: read back, or trained aside and written later.

A refused run must leave its workdir as it was, so a new tokenizer is trained
into a local temporary directory and only its bytes are kept;
:func:`write_workdir_file` puts them into the workdir once every check has
passed. A workdir that has its tokenizer already (a resumed run, or
translating/generating with a trained workdir) is read back through a local
copy, because SentencePiece reads local files only. Every workdir path goes
through ``etils.epath``, so a ``gs://`` workdir works the same.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
from etils import epath

from tfx_jax.errors import WorkdirNotFound
from tfx_jax.data.tokenizer import SentencePieceTokenizer


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
