"""Writing matplotlib figures into a workdir that may be a ``gs://`` URL.

Matplotlib writes to local files; a figure is rendered to PNG bytes in memory
and written through ``etils.epath`` (the project's one path layer), so the
same call works for a local directory and an object store.
"""
from __future__ import annotations

import io
import os

from etils import epath


def save_png(figure, path: str | os.PathLike, *, dpi: int = 100) -> epath.Path:
    """Writes ``figure`` (a ``matplotlib.figure.Figure``) as a PNG at ``path``, creating its
    directory; returns the path."""
    path = epath.Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path
