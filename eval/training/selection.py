"""Model selection on validation: the best evaluation so far and early stopping.

Tie rule (the one every trainer uses): an evaluation improves on the best only when its
metric is strictly better; a tie keeps the earlier (cheaper) state. A non-finite metric
never improves and counts as an evaluation without improvement. Training stops after
`patience` consecutive evaluations without improvement (None: never).
"""

from __future__ import annotations

import math
from typing import Any

from eval.errors import FlagError


class Selection:
    """Tracks the best value of `metric` (`mode` 'max' or 'min') and the patience count."""

    def __init__(self, metric: str, mode: str = "max", patience: int | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"selection mode must be 'max' or 'min', got {mode!r}")
        if patience is not None and patience < 1:
            raise FlagError(f"--patience={patience}: must be >= 1 (or unset: never stop early)")
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, Any] = {}
        self.bad = 0

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def update(self, metrics: dict[str, Any], step: int) -> bool:
        """Records an evaluation; True when it is the new best."""
        if self.metric not in metrics:
            raise KeyError(
                f"validation returned {sorted(metrics)}, no {self.metric!r} to select on"
            )
        value = float(metrics[self.metric])
        if self.improves(value):
            self.best, self.best_step, self.best_metrics, self.bad = value, step, dict(metrics), 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    def state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "best_metrics": self.best_metrics,
            "bad": self.bad,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.best_metrics, self.bad = state["best_metrics"], state["bad"]
