"""Shared training plumbing: one loop (`fit`) every trainer runs, and the run folder.

| module | holds |
|---|---|
| `loop` | `fit`, `Task`, `LoopConfig`, `FitResult`, `NonFiniteError` |
| `state` | `TrainState`: split model + optimizer, the jitted donated step, checkpoint pytrees |
| `selection` | `Selection`: best validation metric, tie rule, early stopping |
| `checkpoints` | orbax `latest` / `best` (`Checkpoints`), the in-memory null object |
| `run_dir` | `RunDir`: lock, run.json comparison, result.json |
| `metrics_log` | `RunLogger`: metrics.jsonl + TensorBoard, truncated on resume |
| `optim` | `OptimizerConfig`, `make_optimizer`: AdamW + warm-up / decay schedules |
| `flags` | the shared absl flags and their meaning |
"""

from eval.training.checkpoints import (
    CheckpointError,
    Checkpoints,
    MemoryCheckpoints,
    load_run_checkpoint,
)
from eval.training.loop import FitResult, LoopConfig, NonFiniteError, Task, fit, step_key
from eval.training.metrics_log import RunLogger, read_records
from eval.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from eval.training.run_dir import RunDir, RunLockedError, RunMismatchError, input_path, read_run
from eval.training.selection import Selection
from eval.training.state import TrainState

__all__ = [
    "CheckpointError",
    "Checkpoints",
    "FitResult",
    "LoopConfig",
    "MemoryCheckpoints",
    "NonFiniteError",
    "OptimizerConfig",
    "RunDir",
    "RunLockedError",
    "RunLogger",
    "RunMismatchError",
    "Selection",
    "Task",
    "TrainState",
    "fit",
    "input_path",
    "load_run_checkpoint",
    "lr_schedule",
    "make_optimizer",
    "read_records",
    "read_run",
    "step_key",
]
