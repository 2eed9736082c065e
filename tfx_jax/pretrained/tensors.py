"""Reading named tensors out of a checkpoint, with one clear error per problem.

A checkpoint is a flat mapping ``name -> array`` (an .npz archive, a
safetensors file). Every loader asks for each tensor by name and by the shape
the inferred config expects; a missing tensor, a wrong shape, or tensors left
over that the loader did not use (a checkpoint of another model) raise one
ValueError that names the file, the tensor and the expected shape.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

from tfx_jax.errors import DataError


class TensorReader:
    """Checked access to the tensors of one checkpoint file.

    Args:
      tensors: ``name -> array``.
      source: the file's path, for error messages.
      ignore_prefixes: names starting with one of these are never reported as unused
        (buffers such as GPT-2's causal-mask ``attn.bias``, optimizer state).
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str,
                 ignore_prefixes: Sequence[str] = ()):
        self.tensors = dict(tensors)
        self.source = source
        self.used: set[str] = set()
        self.ignore_prefixes = tuple(ignore_prefixes)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name`` (for inferring the config); missing -> ValueError."""
        if name not in self.tensors:
            raise DataError(f"{self.source}: tensor {name!r} is missing "
                             f"({self._hint(name)})")
        return tuple(self.tensors[name].shape)

    def get(self, name: str, shape: Sequence[int]) -> np.ndarray:
        """The tensor ``name`` as float32, checked to have ``shape``."""
        shape = tuple(int(d) for d in shape)
        if name not in self.tensors:
            raise DataError(f"{self.source}: tensor {name!r} is missing; expected shape "
                             f"{shape} ({self._hint(name)})")
        value = np.asarray(self.tensors[name])
        if value.shape != shape:
            raise DataError(f"{self.source}: tensor {name!r} has shape {value.shape}, "
                             f"expected {shape}")
        if value.dtype.kind == "V" and value.dtype.itemsize == 2:
            value = value.view(ml_dtypes.bfloat16)  # .npz stores bfloat16 as raw 2-byte voids
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16):
            raise DataError(f"{self.source}: tensor {name!r} has dtype {value.dtype}, "
                             f"expected a floating-point array")
        self.used.add(name)
        return value.astype(np.float32)

    def skip(self, name: str) -> None:
        """Marks ``name`` as deliberately not used (e.g. a head being replaced)."""
        self.used.add(name)

    def check_all_used(self, what: str) -> None:
        """Raises if tensors are left over: the file holds more than a ``what`` has."""
        unused = sorted(n for n in self.tensors
                        if n not in self.used and not n.startswith(self.ignore_prefixes))
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise DataError(f"{self.source}: tensors {unused[:5]}{more} have no place in "
                             f"a {what}; is this a checkpoint of another model?")

    def _hint(self, name: str) -> str:
        head = name.rsplit("/", 1)[0].rsplit(".", 1)[0]
        near = sorted(n for n in self.tensors if n.startswith(head))[:3]
        if near:
            return f"the file has {near}"
        return f"the file has {len(self.tensors)} tensors, e.g. {sorted(self.tensors)[:3]}"
