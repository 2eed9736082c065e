"""Hugging Face model directories on disk: config.json + model.safetensors.

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
from safetensors.numpy import load_file, save_file

from tfx_jax.errors import DataError, DataNotFound


CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_directory(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config dict, name -> array)`` of a model directory."""
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


def write_directory(directory: str, config: dict[str, Any],
                    tensors: dict[str, np.ndarray]) -> None:
    """Writes ``config.json`` and ``model.safetensors`` into ``directory`` (created)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
