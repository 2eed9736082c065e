"""A fake ``gs://`` bucket on the local disk, for end-to-end runs on a non-local workdir.

Inside ``with local_bucket(root):`` a path ``gs://bucket/run/x`` is the local
file ``<root>/bucket/run/x`` for every way the project reaches files:

* ``etils.epath`` (config.json, metrics.jsonl, TensorBoard events, tokenizer
  caches, patch_vq.npz, reports, PNGs, and Orbax's own file operations), through
  ``epath.testing.mock_epath``;
* TensorStore, which writes Orbax's array data with its own ``gcs`` driver:
  Orbax's kvstore spec for a gs:// path becomes a ``file`` one, and its query
  of the bucket's hierarchical namespace (a Cloud Storage API call) says no.

Code that bypasses the path layer (``open``, ``os.makedirs``, ``np.save``, ...
on the string) touches a local ``./gs:/bucket/...`` folder instead, which the
test then finds; code that reads through the layer finds what it wrote.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator
from unittest import mock

from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils

PREFIX = "gs://"


@contextlib.contextmanager
def local_bucket(root: str | os.PathLike) -> Iterator[None]:
    """Maps ``gs://<path>`` to ``<root>/<path>`` while the context is open."""
    root = os.fspath(root)

    def local(path):
        path = os.fspath(path)
        return os.path.join(root, path[len(PREFIX):]) if path.startswith(PREFIX) else path

    def remote(path, like):
        return PREFIX + os.path.relpath(path, root) if os.fspath(like).startswith(PREFIX) \
            else path

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    def glob(fn, pattern):
        return [remote(p, pattern) for p in fn(local(pattern))]

    def walk(fn, top, **kwargs):
        for directory, dirs, files in fn(local(top), **kwargs):
            yield remote(directory, top), dirs, files

    def kvstore(path):
        return {"driver": "file", "path": local(path)}

    path_fns = dict(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
                    rmtree=one, remove=one, stat=one, rename=two, replace=two, copy=two,
                    glob=glob, walk=walk)
    with epath_testing.mock_epath(**path_fns), \
            mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore), \
            mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda _: False):
        yield
