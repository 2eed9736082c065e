"""Speed metrics of the training loop (tokens/s, examples/s, MFU) and profiler traces.

Every train metrics line gets, over the steps since the previous line:

* ``examples_per_sec``: examples trained on per second; a packed row counts
  each example it holds (its largest segment id), an unpacked batch its
  ``"valid"`` rows;
* ``tokens_per_sec``: real (non-padding) tokens per second, as the Task's
  ``count_tokens(batch)`` counts them (absent if the Task has no counter);
* ``mfu``: model FLOP utilisation, ``flops_per_example x rows x steps /
  seconds / (peak FLOP/s per device x devices)``, when the Task gives
  ``flops_per_example`` and the device's peak is known
  (:data:`tfx_jax.train.flops.PEAK_BF16_TFLOPS`, or ``config.peak_tflops``).
  The FLOPs are those of whole rows (a padded row costs the same matmuls as a
  full one), so padding shows up as lower ``tokens_per_sec``, not lower MFU.

Counting is host-side NumPy on each process-local batch (microseconds); with
several processes the counts are summed over hosts once per metrics line.

``config.profile_steps`` writes a ``jax.profiler`` trace of some steps into
``<workdir>/profile`` (open it with TensorBoard's profile plugin or Perfetto):
``"10,15"`` traces steps 10 to 15, an integer ``n`` the ``n`` steps after the
run's first (compiling) step, ``""`` or 0 nothing.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from tfx_jax.train.flops import peak_tflops_per_device

PROFILE_DIR = "profile"


def count_examples(batch) -> int:
    """Examples in a process-local batch: segments of packed rows, else valid rows."""
    for key, value in batch.items():
        if key.endswith("_segmentation"):
            return int(np.asarray(value).max(axis=-1).sum())
    if "valid" in batch:
        return int(np.asarray(batch["valid"]).sum())
    return int(np.shape(next(iter(batch.values())))[0])


class ThroughputMeter:
    """Accumulates examples and tokens of the steps since the last metrics line."""

    def __init__(self, task, config, mesh):
        self.task = task
        self.batch_size = config.batch_size
        self.num_devices = mesh.devices.size
        peak = peak_tflops_per_device(mesh.devices.flat[0].device_kind,  # the run's chips
                                      config.get("peak_tflops") or None)
        self.peak_flops = None if peak is None else peak * 1e12 * self.num_devices
        self.reset()

    def reset(self) -> None:
        self.examples = 0
        self.tokens = 0

    def add(self, batch) -> None:
        self.examples += count_examples(batch)
        if self.task.count_tokens is not None:
            self.tokens += int(self.task.count_tokens(batch))

    def rates(self, num_steps: int, seconds: float) -> dict[str, float]:
        """The speed metrics of ``num_steps`` steps in ``seconds``; resets the counts."""
        counts = np.asarray([self.examples, self.tokens], np.int64)
        if jax.process_count() > 1:
            counts = multihost_utils.process_allgather(counts).sum(axis=0)
        seconds = max(seconds, 1e-9)
        out = {"examples_per_sec": float(counts[0]) / seconds}
        if self.task.count_tokens is not None:
            out["tokens_per_sec"] = float(counts[1]) / seconds
        if self.task.flops_per_example and self.peak_flops:
            flops = self.task.flops_per_example * self.batch_size * num_steps
            out["mfu"] = flops / seconds / self.peak_flops
        self.reset()
        return out


def parse_profile_steps(value: Any, start_step: int) -> Optional[tuple[int, int]]:
    """``(first, last)`` step to trace from ``config.profile_steps``, or None (off)."""
    if value in (None, "", 0, "0"):
        return None
    text = str(value).strip()
    try:
        parts = [int(part) for part in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] > 0:
        return start_step + 2, start_step + 1 + parts[0]
    if len(parts) == 2 and 0 < parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise ValueError(f"config.profile_steps must be 'FIRST,LAST' (1 <= FIRST <= LAST), a "
                     f"positive step count, or '' (off); got {value!r}")


class StepProfiler:
    """Starts a ``jax.profiler`` trace before step ``first`` and stops it after ``last``."""

    def __init__(self, profile_steps: Any, workdir: str, start_step: int):
        self.window = parse_profile_steps(profile_steps, start_step)
        self.directory = os.path.join(workdir, PROFILE_DIR)
        self.active = False

    def before(self, step: int) -> None:
        if self.window and step == self.window[0]:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and step >= self.window[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
