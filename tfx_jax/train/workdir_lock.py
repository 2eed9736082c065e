"""One run per workdir: process 0 holds ``<workdir>/.lock`` (host and pid) while it runs.

Two runs writing into one workdir interleave their checkpoints, config.json and
metrics.jsonl without either noticing. :func:`workdir_lock` makes the second
one stop at once with one line naming the holder::

    WorkdirLocked: workdir /tmp/run is in use by process 4242 on host tpu-vm-0 (since
    2026-12-02 07:10:03 UTC; lock file /tmp/run/.lock) ...

The lock file is created atomically (``O_CREAT | O_EXCL``) on local disks and
removed when the run ends, however it ends (an exception, SIGTERM, SIGINT).
A lock left by a process that was killed (SIGKILL, power loss) is *stale*:
when its host is this host and its pid is no longer alive, the next run takes
it over and says so. A lock held from another host cannot be checked from
here; the message says how to remove it by hand.

Locking is re-entrant within a process (the translation app locks before it
writes its tokenizer, and :func:`tfx_jax.train.train` locks again inside) and
is taken by process 0 only: the other hosts of a multi-host run write into the
same workdir on purpose. Object stores (``gs://``) have no exclusive create;
there the check-then-write leaves a small race window, still catching the
common mistake of starting the same command twice.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from typing import Callable, Iterator

import jax
from etils import epath

LOCK_FILE = ".lock"

_held: dict[str, int] = {}  # lock path -> nesting depth, in this process


class WorkdirLocked(RuntimeError):
    """Another live process holds the workdir."""


def _is_url(path: str) -> bool:
    return "://" in path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _describe(holder: dict) -> str:
    return f"process {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


def _read_holder(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _create(path: epath.Path, content: str) -> bool:
    """Writes ``content`` to ``path`` unless it exists; False if it does."""
    if _is_url(os.fspath(path)):
        if path.exists():
            return False
        path.write_text(content)
        return True
    try:
        fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(content)
    return True


def _check_directory(workdir: str, directory: epath.Path) -> None:
    """A one-line error for a workdir that is a file or cannot be written."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"workdir {workdir!r} is a file, not a directory; "
                                 f"pass a directory for --workdir")


def acquire(workdir: str) -> tuple[epath.Path, bool]:
    """Takes the lock (process 0); returns (lock path, whether the workdir was created)."""
    directory = epath.Path(workdir)
    _check_directory(workdir, directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise PermissionError(f"cannot create workdir {workdir!r}: permission denied") from e
    path = directory / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now(datetime.timezone.utc).strftime(
              "%Y-%m-%d %H:%M:%S UTC")}
    content = json.dumps(me) + "\n"
    for _ in range(2):
        try:
            if _create(path, content):
                return path, created
        except PermissionError as e:
            raise PermissionError(f"workdir {workdir!r} is not writable (permission denied "
                                  f"creating {path})") from e
        except OSError as e:
            if e.errno == errno.EROFS:
                raise PermissionError(f"workdir {workdir!r} is on a read-only file "
                                      f"system") from e
            raise
        holder = _read_holder(path)
        local = holder.get("host") == me["host"]
        pid = holder.get("pid")
        if local and isinstance(pid, int) and pid != me["pid"] and not _pid_alive(pid):
            print(f"Taking over the stale lock of workdir {workdir} left by "
                  f"{_describe(holder)}: that process is no longer running", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            continue
        where = "" if local else " (another host: check there, then delete the file by hand)"
        raise WorkdirLocked(
            f"workdir {workdir} is in use by {_describe(holder)}{where}; lock file {path}. "
            f"Wait for that run to end or use another --workdir.")
    raise WorkdirLocked(f"could not take the lock {path} of workdir {workdir}")


def release(path: epath.Path, directory_created: bool) -> None:
    path.unlink(missing_ok=True)
    if directory_created:  # leave no empty workdir behind a run that wrote nothing
        parent = path.parent
        try:
            if not any(parent.iterdir()):
                parent.rmdir()
        except OSError:
            pass


def hold_workdir_lock(workdir: str) -> Callable[[], None]:
    """Takes :func:`workdir_lock` now; returns the function that releases it."""
    held = workdir_lock(workdir)
    held.__enter__()  # pylint: disable=unnecessary-dunder-call
    return lambda: held.__exit__(None, None, None)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds ``<workdir>/.lock`` for the duration (process 0; re-entrant in a process)."""
    if jax.process_index() != 0:
        yield
        return
    key = os.fspath(epath.Path(workdir) / LOCK_FILE)
    if not _is_url(key):
        key = os.path.abspath(key)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path, created = acquire(workdir)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        release(path, created)
