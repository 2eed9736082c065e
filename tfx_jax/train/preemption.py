"""Preemption: turn SIGTERM (and Ctrl-C) into "checkpoint now and exit" at the next step.

Cloud TPU/GPU VMs (and Kubernetes, SLURM) announce preemption with SIGTERM
and kill the process some seconds later. :class:`PreemptionWatcher` records
the signal; the loop asks :meth:`PreemptionWatcher.should_stop` after every
step, and on True saves a checkpoint at the current step, waits for it, and
raises :class:`Preempted`. Rerunning the same command resumes from it.

Ctrl-C (SIGINT) is treated the same way: the step finishes, a checkpoint is
saved and the script exits with 130 (128 + SIGINT) and one line. A second
Ctrl-C while that happens interrupts at once (Python's KeyboardInterrupt).

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
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT


class Preempted(Exception):
    """Raised by the loop after it saved a checkpoint because of a preemption notice.

    Scripts let it propagate or ``sys.exit(Preempted.exit_code)``; either way the
    process ends with a non-zero status and rerunning the same command resumes.
    """
    exit_code = EXIT_CODE

    def __init__(self, step: int, checkpoint_dir: str, signal_name: str = "SIGTERM"):
        self.step = step
        self.checkpoint_dir = checkpoint_dir
        self.signal_name = signal_name
        self.exit_code = INTERRUPT_EXIT_CODE if signal_name == "SIGINT" else EXIT_CODE
        what = "interrupted" if signal_name == "SIGINT" else "preempted"
        super().__init__(
            f"{what} ({signal_name}): saved a checkpoint at step {step} in {checkpoint_dir}; "
            f"rerun the same command to resume")


class PreemptionWatcher:
    """Context manager that notes SIGTERM and SIGINT while a run is in progress."""

    def __init__(self, reached_sync_point: Optional[Callable[[int], bool]] = None):
        """``reached_sync_point(step)``: Orbax's multi-host check, used when process_count > 1."""
        self._reached_sync_point = reached_sync_point
        self._requested = threading.Event()
        self._previous_handlers: dict = {}
        self.signal_name = "SIGTERM"

    def _on_signal(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name
        self._requested.set()
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, self._previous_handlers.get(
                signal.SIGINT, signal.default_int_handler))

    def __enter__(self) -> "PreemptionWatcher":
        # Several processes: JAX's preemption service owns SIGTERM, and a Ctrl-C seen by
        # one host only cannot stop all hosts at one step, so it stays a KeyboardInterrupt.
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def request(self, signal_name: str = "SIGTERM") -> None:
        """Marks a preemption as requested (what SIGTERM / SIGINT do)."""
        self.signal_name = signal_name
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        """True once SIGTERM arrived (or, multi-host, all hosts reached the sync point)."""
        if self._requested.is_set():
            return True
        if jax.process_count() > 1 and self._reached_sync_point is not None:
            return bool(self._reached_sync_point(step))
        return False
