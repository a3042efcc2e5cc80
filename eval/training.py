"""Run plumbing shared by the trainers: metric logs, orbax checkpoints, early stopping.

- `RunLogger`: one JSON line per record in `<dir>/metrics.jsonl` and TensorBoard events.
- `Checkpoints`: `<dir>/latest` (for exact resume) and `<dir>/best` (best validation
  metric), each an orbax `CheckpointManager` holding a pytree `state` and JSON `meta`.
- `EarlyStopping`: stop after `patience` evaluations without improvement.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _plain(value):
    if isinstance(value, np.generic | jax.Array):
        return value.item()
    return value


class RunLogger:
    """Appends `{"step", "split", **metrics, "time"}` lines and writes TensorBoard scalars."""

    def __init__(self, directory: str | pathlib.Path, tensorboard: bool = True):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.directory / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.directory / "tensorboard"))

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps({**record, "time": time.time()}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, int | float):
                    self._tb.add_scalar(f"{split}/{key}", value, int(step))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Checkpoints:
    """Latest and best checkpoints of a pytree `state` plus JSON-able `meta`."""

    def __init__(self, directory: str | pathlib.Path, best_metric: str = "NDCG@10", keep_latest: int = 1):
        self.directory = pathlib.Path(directory).absolute()
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            self.directory / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, create=True)
        )
        self.best = ocp.CheckpointManager(
            self.directory / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m[best_metric], best_mode="max", create=True
            ),
        )

    @staticmethod
    def _args(state, meta):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state, meta: dict, metrics: dict[str, float] | None = None) -> None:
        """Save as latest; also as best when `metrics` (validation) are given."""
        self.latest.save(step, args=self._args(state, meta), force=True)
        if metrics is not None:
            self.best.save(step, args=self._args(state, meta), metrics={k: float(v) for k, v in metrics.items()}, force=True)
        self.wait()

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def restore(self, abstract_state, which: str = "latest", step: int | None = None):
        """(state, meta, step) from `which` ('latest' or 'best'), or None when there is none."""
        manager = self.latest if which == "latest" else self.best
        step = step if step is not None else (manager.latest_step() if which == "latest" else manager.best_step())
        if step is None:
            return None
        restored = manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["meta"], step

    def close(self) -> None:
        self.latest.close()
        self.best.close()


class EarlyStopping:
    """Tracks the best validation value; `update` returns True when training should stop."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.best = -float("inf")
        self.bad = 0

    def update(self, value: float) -> bool:
        if value > self.best:
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        return self.patience is not None and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "bad": self.bad}

    def load(self, state: dict) -> None:
        self.best, self.bad = state["best"], state["bad"]
