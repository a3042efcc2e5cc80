"""The training loop every trainer runs: `fit(state, task, config, run)`.

A package supplies a `TrainState` (its model and optimizer) and a `Task`: the loss
`(model, batch, rng) -> (loss, aux)`, a batch source indexed by step, and optionally a
validation function and hooks. The loop owns the rest:

* one jitted, donated step (`TrainState.train_step`) with rng `fold_in(key(seed), step)`
  and gradient accumulation; host batches come from `task.batches(start_step)`, so a
  resumed run sees the same batches as an uninterrupted one;
* every `eval_every` steps and at the last step: validation, model selection and early
  stopping (`eval.training.selection`: strictly better improves, ties keep the earlier
  state, non-finite metrics never win), the `best` checkpoint when improved, then the
  `latest` checkpoint (the resumable state, after `task.after_eval`);
* train records every `log_every` steps and at each evaluation (means of the step
  metrics), `metrics.jsonl` + TensorBoard, a progress bar with ETA on a terminal (all by
  process 0 of a multi-process run);
* a non-finite loss or gradient norm stops the run with `NonFiniteError` naming the
  step and the last good checkpoint; the check runs on the host at every log point (no
  per-step sync), always before a checkpoint is written, so no non-finite state is saved;
* at the end the best state (or the last one, without validation) is loaded into `state`.

A run whose latest checkpoint says it finished skips training and only reloads `best`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from eval.distributed import is_primary
from eval.errors import FlagError, UserError
from eval.training.checkpoints import Checkpoints, MemoryCheckpoints
from eval.training.metrics_log import NullLogger, RunLogger
from eval.training.run_dir import RunDir
from eval.training.selection import Selection
from eval.training.state import AfterUpdate, LossFn, TrainState

Batches = Callable[[int], Iterator[Mapping[str, np.ndarray]]]


class NonFiniteError(UserError, FloatingPointError):
    """The loss or the gradient became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Schedule of one run (steps everywhere)."""

    total_steps: int
    eval_every: int
    patience: int | None = None  # evaluations without improvement; None: never stop early
    select: str = "NDCG@10"  # validation metric for `best` and early stopping
    mode: str = "max"  # or "min" (losses)
    gradient_accumulation_steps: int = 1
    log_every: int = 0  # 0: at evaluations only
    seed: int = 0
    progress: bool = True  # a progress bar on a terminal, else a log line per evaluation
    desc: str = "train"
    steps_per_epoch: int | None = None  # for the progress lines' epoch count

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"the run has {self.total_steps} steps: nothing to train")
        if self.eval_every < 1:
            raise FlagError(f"--eval_every={self.eval_every}: must be >= 1 step")


@dataclasses.dataclass
class Task:
    """What a package supplies to the loop (see module doc).

    loss: `(model, batch, rng) -> (loss, aux)`, traced inside the jitted step; `batch`
      holds the host batch's arrays plus `constants`.
    batches: `start_step -> iterator` of host batches (numpy dicts), batch i for step i.
    validate: eval-mode model -> metrics (holding `LoopConfig.select`); None: no selection.
    constants: device arrays every step reads (e.g. an item-code table), not donated.
    after_update: `(model, aux)`, traced after the optimizer update (e.g. EMA codebooks).
    after_eval: `(train-mode model, step) -> extra metrics`, on the host after validation,
      may change the model (e.g. dead-code restarts); its change is in `latest`.
    schedule: the optimizer's learning-rate schedule, logged with the train records.
    """

    loss: LossFn
    batches: Batches
    validate: Callable[[nnx.Module], dict[str, Any]] | None = None
    constants: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    after_update: AfterUpdate | None = None
    after_eval: Callable[[nnx.Module, int], dict[str, Any]] | None = None
    schedule: Callable[[int], Any] | None = None


@dataclasses.dataclass
class FitResult:
    steps: int  # the step training reached
    best_step: int | None  # step of the selected state (None: no validation)
    valid: dict[str, Any]  # its validation metrics
    stopped_early: bool
    losses: list[float]  # per-step train losses of this call (empty when it resumed a finished run)
    curve: list[tuple[int, float]]  # (step, validation `select` metric) of this call's evaluations


def step_key(seed: int | jax.Array, step: int) -> jax.Array:
    """The rng of step `step`: `fold_in(key(seed), step)` (`seed` an int or a key)."""
    base = jax.random.key(seed) if isinstance(seed, int) else seed
    return jax.random.fold_in(base, step)


def _check_finite(records: list[dict[str, float]], first_step: int, last_good: str) -> None:
    for i, record in enumerate(records):
        bad = {k: record[k] for k in ("loss", "grad_norm") if not math.isfinite(record[k])}
        if bad:
            what = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NonFiniteError(
                f"step {first_step + i}: non-finite {what}; the run stopped. Last good "
                f"checkpoint: {last_good}. Lower --learning_rate (or check the data) and rerun."
            )


def _mean_record(records: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def _progress_line(config: LoopConfig, step: int, start: tuple[int, float], loss: float,
                   valid: Mapping[str, Any], selection: Selection) -> str:  # fmt: skip
    """`desc: step s/T (epoch e/E), loss, valid metric (best @ step), elapsed, ETA`."""
    parts = [f"{config.desc}: step {step}/{config.total_steps}"]
    if config.steps_per_epoch:
        epochs = -(-config.total_steps // config.steps_per_epoch)
        parts[0] += f" (epoch {step / config.steps_per_epoch:.1f}/{epochs})"
    parts.append(f"loss {loss:.4f}")
    if config.select in valid:
        best = selection.best_metrics.get(config.select, math.nan)
        parts.append(f"valid {config.select} {valid[config.select]:.4f} "
                     f"(best {best:.4f} @ {selection.best_step})")  # fmt: skip
    first_step, t0 = start
    elapsed = time.perf_counter() - t0
    rate = elapsed / max(step - first_step, 1)
    eta = rate * (config.total_steps - step)
    bound = " at most" if config.patience is not None else ""
    parts.append(f"{elapsed:.1f} s, ETA{bound} {eta:.1f} s")
    return ", ".join(parts)


def fit(state: TrainState, task: Task, config: LoopConfig, run: RunDir | None = None) -> FitResult:
    """Trains `state` on `task` (see module doc); resumes from `run`'s checkpoints."""
    ckpt = Checkpoints(run.path / "checkpoints") if run else MemoryCheckpoints()
    selection = Selection(config.select, config.mode, config.patience)
    step, finished, stopped = 0, False, False
    try:
        restored = ckpt.restore_latest(state.abstract_checkpoint())
        if restored is not None:
            tree, meta, step = restored
            state.load_checkpoint(tree)
            selection.load(meta["selection"])
            finished, stopped = meta["finished"], meta["stopped_early"]
        ckpt.discard_best_after(selection.best_step)
        logger = RunLogger(run.path, resume_step=step) if run and run.primary else NullLogger()
        if run and run.primary and (step or logger.dropped):
            logging.warning(
                "%s: resuming at step %d (%s); %d metric records after it dropped (they are redone)",
                run.path, step, ckpt.describe_latest(), logger.dropped,
            )  # fmt: skip
        key = jax.random.key(config.seed)
        progress = config.progress and is_primary()
        show = progress and sys.stderr.isatty() and not finished
        lines = progress and not show
        start = (step, time.perf_counter())
        bar = tqdm(total=config.total_steps, initial=step, disable=not show, desc=config.desc)
        batches = task.batches(step) if not finished else iter(())
        constants = state.put_constants(task.constants)
        pending: list[dict[str, jax.Array]] = []
        losses: list[float] = []
        curve: list[tuple[int, float]] = []
        try:
            while not finished and step < config.total_steps:
                metrics = state.train_step(
                    task.loss, next(batches), step_key(key, step),
                    constants=constants, accumulation=config.gradient_accumulation_steps,
                    after_update=task.after_update,
                )  # fmt: skip
                pending.append(metrics)
                step += 1
                bar.update(1)
                at_eval = step % config.eval_every == 0 or step == config.total_steps
                if at_eval or (config.log_every and step % config.log_every == 0):
                    records = [{k: float(v) for k, v in r.items()} for r in jax.device_get(pending)]
                    _check_finite(records, step - len(records), ckpt.describe_latest())
                    losses += [r["loss"] for r in records]
                    record = _mean_record(records)
                    if task.schedule is not None:
                        record["learning_rate"] = float(task.schedule(step - 1))
                    logger.log(step, "train", record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    pending = []
                if not at_eval:
                    continue
                valid = {}
                if task.validate is not None:
                    valid = task.validate(state.model())
                    curve.append((step, float(valid[config.select])))
                    if selection.update(valid, step):
                        meta = {"step": step, "valid": valid}
                        ckpt.save_best(step, state.checkpoint(with_optimizer=False), meta)
                    value = f"{valid[config.select]:.4f}"
                    bar.set_postfix(
                        {"loss": f"{record['loss']:.4f}", f"valid_{config.select}": value}
                    )
                if task.after_eval is not None:
                    model = state.model(train=True)
                    valid = {**valid, **task.after_eval(model, step)}
                    state.update_from(model)
                if valid:
                    logger.log(step, "valid", valid)
                if lines:
                    logging.info(
                        _progress_line(config, step, start, record["loss"], valid, selection)
                    )
                stopped = selection.should_stop
                finished = stopped or step == config.total_steps
                meta = {
                    "step": step,
                    "selection": selection.state(),
                    "finished": finished,
                    "stopped_early": stopped,
                }
                ckpt.save_latest(step, state.checkpoint(), meta)
        finally:
            bar.close()
            logger.close()
        if selection.best_step is not None:
            abstract = state.abstract_checkpoint(with_optimizer=False)
            state.load_checkpoint(ckpt.restore_best(abstract, selection.best_step)[0])
    finally:
        ckpt.close()
    return FitResult(step, selection.best_step, selection.best_metrics, stopped, losses, curve)
