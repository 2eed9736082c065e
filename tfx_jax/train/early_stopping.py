"""Stop training when an eval metric has stopped improving ("early stopping").

With ``config.early_stopping_patience = p > 0`` the loop stops after ``p``
evaluations in a row without a new best ``config.best_metric`` (lower is
better for ``best_metric_mode = "min"``, higher for ``"max"``), saves a
checkpoint at that step and returns normally. Improvements smaller than
``config.early_stopping_min_delta`` do not count.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional


class EarlyStopping:
    """Counts evaluations since the best value of one metric."""

    def __init__(self, metric: str, mode: str = "min", patience: int = 0,
                 min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric = metric
        self.sign = 1.0 if mode == "min" else -1.0
        self.patience = patience
        self.min_delta = min_delta
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.evals_since_best = 0

    @property
    def enabled(self) -> bool:
        return self.patience > 0 and bool(self.metric)

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Records one evaluation; True when the run should stop."""
        value = metrics.get(self.metric)
        if not self.enabled or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.best is None or self.sign * (self.best - value) > self.min_delta:
            self.best, self.best_step, self.evals_since_best = float(value), step, 0
            return False
        self.evals_since_best += 1
        return self.evals_since_best >= self.patience

    def message(self, step: int) -> str:
        return (f"Early stopping at step {step}: eval {self.metric} has not improved for "
                f"{self.evals_since_best} evaluations (best {self.best:.4g} at step "
                f"{self.best_step}; config.early_stopping_patience = {self.patience})")
