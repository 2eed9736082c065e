"""Preemption: turn SIGTERM into "checkpoint now and exit" at the next step boundary.

Cloud TPU/GPU VMs (and Kubernetes, SLURM) announce preemption with SIGTERM
and kill the process some seconds later. :class:`PreemptionWatcher` records
the signal; the loop asks :meth:`PreemptionWatcher.should_stop` after every
step, and on True saves a checkpoint at the current step, waits for it, and
raises :class:`Preempted`. Rerunning the same command resumes from it.

Multi-host runs need every host to stop at the *same* step (the save is a
collective). There JAX's own preemption service, started by
``jax.distributed.initialize``, catches SIGTERM and Orbax's
``CheckpointManager.reached_preemption(step)`` tells all hosts together; the
watcher then leaves SIGTERM to JAX and only asks Orbax.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable, Optional

import jax

EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class Preempted(Exception):
    """Raised by the loop after it saved a checkpoint because of a preemption notice.

    Scripts let it propagate or ``sys.exit(Preempted.exit_code)``; either way the
    process ends with a non-zero status and rerunning the same command resumes.
    """
    exit_code = EXIT_CODE

    def __init__(self, step: int, checkpoint_dir: str):
        self.step = step
        self.checkpoint_dir = checkpoint_dir
        super().__init__(
            f"preempted (SIGTERM): saved a checkpoint at step {step} in {checkpoint_dir}; "
            f"rerun the same command to resume")


class PreemptionWatcher:
    """Context manager that notes SIGTERM while a run is in progress."""

    def __init__(self, reached_sync_point: Optional[Callable[[int], bool]] = None):
        """``reached_sync_point(step)``: Orbax's multi-host check, used when process_count > 1."""
        self._reached_sync_point = reached_sync_point
        self._requested = threading.Event()
        self._previous_handler = None
        self._installed = False

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._requested.set()

    def __enter__(self) -> "PreemptionWatcher":
        single_process = jax.process_count() == 1
        if single_process and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._installed = False

    def request(self) -> None:
        """Marks a preemption as requested (what SIGTERM does)."""
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        """True once SIGTERM arrived (or, multi-host, all hosts reached the sync point)."""
        if self._requested.is_set():
            return True
        if jax.process_count() > 1 and self._reached_sync_point is not None:
            return bool(self._reached_sync_point(step))
        return False
