"""TensorBoard event files on object stores, written through ``etils.epath``.

tensorboardX writes event files with ``open`` for local paths and with its own
clients for ``gs://`` (google-cloud-storage) and ``s3://`` (boto3). A run's
workdir reaches every other file through ``etils.epath``, so the event files
do too: :func:`route_through_epath` registers a tensorboardX writer for the
workdir's scheme that keeps the file's bytes and rewrites the object at each
flush (an object store cannot append), as tensorboardX's own GCS writer does.
"""
from __future__ import annotations

import io

from etils import epath
from tensorboardX import record_writer


class _EpathEventFile:
    """A tensorboardX record writer whose flush rewrites the whole file through epath."""

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        self._path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathEventFiles:
    """A tensorboardX writer factory (``open`` and ``directory_check``) on epath."""

    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def route_through_epath(url: str) -> None:
    """Makes tensorboardX write files under ``url``'s scheme (``gs``, ``s3``, ...) via epath."""
    scheme = url.split("://", 1)[0]
    record_writer.register_writer_factory(scheme, _EpathEventFiles())
