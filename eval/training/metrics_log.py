"""Metric records of a run: `<dir>/metrics.jsonl` (one JSON line each) and TensorBoard.

A run resumed from the checkpoint at step `s` first drops the records logged after `s`
(they are logged again, identically, by the resumed run), so the file never repeats a
step; TensorBoard is told the same with `purge_step`.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import numpy as np

from eval.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def plain(value: Any) -> Any:
    """NumPy / JAX scalars and arrays -> Python numbers and lists (JSON-able)."""
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def read_records(directory: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of `<directory>/metrics.jsonl` (empty when there is none)."""
    path = pathlib.Path(directory) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Appends `{"step", "split", **metrics, "time"}` lines and writes TensorBoard scalars."""

    def __init__(
        self, directory: str | pathlib.Path, *, resume_step: int = 0, tensorboard: bool = True
    ):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / METRICS_FILE
        records = read_records(self.directory)
        kept = [r for r in records if r["step"] <= resume_step]
        self.dropped = len(records) - len(kept)  # logged after the checkpoint resumed from
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._jsonl = open(path, "a")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                str(self.directory / "tensorboard"), purge_step=resume_step + 1 if kept else None
            )

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), "split": split, **{k: plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps({**record, "time": time.time()}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, int | float):
                    # TensorBoard tags allow [A-Za-z0-9_./-]: NDCG@10 -> NDCG_10 (said once
                    # here rather than warned by tensorboardX at every record).
                    self._tb.add_scalar(f"{split}/{key.replace('@', '_')}", value, int(step))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """The logger of a run without a folder (or of a process other than 0): records nothing."""

    dropped = 0

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        del step, split, metrics

    def close(self) -> None:
        pass
