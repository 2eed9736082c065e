"""Hugging Face model directories on disk: config.json + model.safetensors.

:class:`LazyCheckpoint` opens a directory without reading any tensor: names,
shapes and dtypes come from the safetensors headers (every shard of a
``model.safetensors.index.json`` is checked to exist first), and a tensor, or
one block of it, is read only when asked for (``safe_open`` slices), so a
sharded loader reads each device's block straight from disk.

Tensors are read and written with the ``safetensors`` package's NumPy API
(no torch); bfloat16 tensors, which NumPy cannot name, are read through the
package's Flax API and returned as float32. A sharded checkpoint (``model.safetensors.index.json`` naming
several files) is read whole; files are written as one ``model.safetensors``
with the ``{"format": "pt"}`` metadata transformers expects.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from tfx_jax.errors import DataError, DataNotFound

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(directory: str) -> dict[str, Any]:
    """config.json of a model directory (one clear error if absent or not JSON)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    if not os.path.isdir(directory):
        raise DataNotFound(f"no Hugging Face model directory at {directory!r}")
    config_path = os.path.join(directory, CONFIG)
    if not os.path.isfile(config_path):
        raise DataNotFound(f"{directory}: no {CONFIG} (a Hugging Face model directory has "
                                f"{CONFIG} and {WEIGHTS})")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as error:
        raise DataError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise DataError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def weight_files(directory: str) -> list[str]:
    """The safetensors files of a directory: model.safetensors, or every shard of the index."""
    weights = os.path.join(directory, WEIGHTS)
    index = os.path.join(directory, INDEX)
    if os.path.isfile(weights):
        files = [weights]
    elif os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(directory, shard) for shard in shards]
    else:
        raise DataNotFound(f"{directory}: no {WEIGHTS} (or {INDEX}); only safetensors "
                                f"checkpoints are read (convert pytorch_model.bin first)")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataNotFound(f"{index} names shard {os.path.basename(missing[0])}, which is "
                                f"not in {directory} ({len(missing)} of {len(files)} missing)")
    return files


def read_directory(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config dict, name -> array)`` of a model directory, every tensor in memory."""
    config = read_config(directory)
    files = weight_files(directory)
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        tensors.update(_load_tensors(path))
    return config, tensors


def _load_tensors(path: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except TypeError as error:  # NumPy has no bfloat16: read with jax, return float32
        if "bfloat16" not in str(error):
            raise DataError(f"{path}: not a readable safetensors file ({error})") from None
    except Exception as error:  # SafetensorError, OSError
        raise DataError(f"{path}: not a readable safetensors file ({error})") from None
    from safetensors.flax import load_file as load_jax
    return {name: np.asarray(value, np.float32 if value.dtype == "bfloat16" else value.dtype)
            for name, value in load_jax(path).items()}


class LazyCheckpoint:
    """The tensors of a model directory, opened but not read.

    ``shape(name)`` / ``dtype(name)`` come from the file headers; ``block(name,
    index)`` reads ``tensor[index]`` (a tuple of slices) from disk, so that
    nothing larger than the block asked for is ever in host memory.
    """

    def __init__(self, directory: str):
        self.directory = str(directory)
        self._files = {}
        self._slices = {}
        for path in weight_files(directory):
            try:
                handle = safe_open(path, framework="numpy")
            except Exception as error:  # SafetensorError, OSError
                raise DataError(f"{path}: not a readable safetensors file ({error})") from None
            self._files[path] = handle
            for name in handle.keys():
                self._slices[name] = (path, handle.get_slice(name))

    def __contains__(self, name: str) -> bool:
        return name in self._slices

    def names(self) -> list[str]:
        return sorted(self._slices)

    def source(self, name: str) -> str:
        return self._slices[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slices[name][1].get_shape())

    def dtype(self, name: str) -> str:
        return self._slices[name][1].get_dtype()

    def block(self, name: str, index: tuple) -> np.ndarray:
        """``tensor[index]`` as float32 (bfloat16 / float16 stored values are upcast)."""
        return np.asarray(self._slices[name][1][index], np.float32)


def write_directory(directory: str, config: dict[str, Any],
                    tensors: dict[str, np.ndarray], *, max_shard_bytes: int = 5 << 30) -> None:
    """Writes ``config.json`` and the tensors into ``directory`` (created).

    One ``model.safetensors`` if the tensors fit in ``max_shard_bytes``, else
    shards ``model-0000i-of-0000n.safetensors`` (tensors in name order) and
    ``model.safetensors.index.json``, as transformers writes them.
    """
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    shards, size = [[]], 0
    for name in sorted(tensors):
        nbytes = np.asarray(tensors[name]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    for stale in (WEIGHTS, INDEX):
        if os.path.exists(os.path.join(directory, stale)):
            os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        save_file({k: np.ascontiguousarray(tensors[k]) for k in shards[0]},
                  os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: np.ascontiguousarray(tensors[k]) for k in names},
                  os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in names})
    total = sum(np.asarray(v).nbytes for v in tensors.values())
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


class CheckpointTokenizer:
    """A checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers``) with its special ids.

    ``encode(text)`` gives the ids of the text alone (no special tokens; ``add_bos=True``
    puts ``bos_id`` first); ``decode(ids)`` drops special tokens. ``bos_id`` /
    ``eos_id`` / ``pad_id`` (None when the checkpoint has none) come from
    tokenizer_config.json's ``bos_token`` / ``eos_token`` / ``pad_token``, else from
    config.json / generation_config.json's ``*_token_id``; ``eos_ids`` holds every
    end-of-sequence id (Llama 3 lists several).
    """

    def __init__(self, directory: str):
        import tokenizers
        path = os.path.join(str(directory), TOKENIZER)
        if not os.path.isfile(path):
            raise DataNotFound(f"{directory}: no {TOKENIZER}; only fast tokenizers are read "
                                   f"(save one with transformers' AutoTokenizer first)")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as error:  # tokenizers raises a plain Exception
            raise DataError(f"{path}: not a readable tokenizers file "
                            f"({str(error).splitlines()[0]})") from None
        ids = {}
        for file in ("generation_config.json", CONFIG):  # config.json wins over generation
            ids.update({k: v for k, v in _json(os.path.join(str(directory), file)).items()
                        if k in ("bos_token_id", "eos_token_id", "pad_token_id")
                        and v is not None})
        special = _json(os.path.join(str(directory), TOKENIZER_CONFIG))
        for role in ("bos", "eos", "pad"):
            token = special.get(f"{role}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and self.tokenizer.token_to_id(token) is not None:
                ids[f"{role}_token_id"] = self.tokenizer.token_to_id(token)
        eos = ids.get("eos_token_id")
        self.eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        self.bos_id = ids.get("bos_token_id")
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.pad_id = ids.get("pad_token_id")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise DataError("add_bos=True, but this checkpoint's tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    return value if isinstance(value, dict) else {}


def load_tokenizer(directory: str) -> CheckpointTokenizer:
    """The tokenizer of a Hugging Face model directory (``tokenizer.json``)."""
    return CheckpointTokenizer(directory)
