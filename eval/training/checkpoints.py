"""Checkpoints of a run: orbax `latest` (exact resume) and `best` (validation selection).

`Checkpoints(<run>/checkpoints)` holds two orbax `CheckpointManager`s, each step a pytree
`state` plus JSON `meta`. Orbax writes a step into a temporary folder and renames it when
complete, so a kill during a write leaves only a `*.orbax-checkpoint-tmp*` folder, which
is deleted when the run is reopened; the last complete step is what a rerun resumes
from. `best` keeps two steps: a best saved after the last `latest` (in the window a
crash loses) is discarded on resume (`discard_best_after`), the recorded one remains. A complete step that cannot be read (a truncated or deleted file) raises
`CheckpointError` naming its folder: never a silent restart over existing work.

`MemoryCheckpoints` is the null object for runs without a folder (the leaderboard's
in-process fits): no resume, the best state kept as a device copy.

Fault injection for the crash tests: `LLM4REC_KILL_AT=after:N` sends SIGKILL to this
process once the N-th `latest` checkpoint is complete, `during:N` while it is being
written.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from eval.errors import FlagError, MissingFileError, UserError

KILL_ENV = "LLM4REC_KILL_AT"


def _quiet_orbax(record: logging.LogRecord) -> bool:
    """Orbax logs every save step by step at INFO (absl): keep its warnings only."""
    return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


logging.getLogger("absl").addFilter(_quiet_orbax)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be restored."""


def _kill_point() -> tuple[str, int] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    when, _, count = spec.partition(":")
    if when not in ("after", "during") or not count.isdigit():
        raise ValueError(f"{KILL_ENV}={spec!r}: expected 'after:N' or 'during:N'")
    return when, int(count)


class Checkpoints:
    """`<directory>/latest` and `<directory>/best`, each an orbax manager of (state, meta)."""

    def __init__(
        self, directory: str | pathlib.Path, keep_latest: int = 1, read_only: bool = False
    ):
        """`read_only`: for evaluation (a live run's temporary folders are left alone)."""
        self.directory = pathlib.Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise MissingFileError(f"{self.directory}: no checkpoints")
        options = dict(create=not read_only, cleanup_tmp_directories=not read_only)
        self.latest = ocp.CheckpointManager(
            self.directory / "latest",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, **options),
        )
        self.best = ocp.CheckpointManager(
            self.directory / "best", options=ocp.CheckpointManagerOptions(max_to_keep=2, **options)
        )
        self._saves = 0
        self._kill = _kill_point()

    @staticmethod
    def _save_args(state, meta):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save_latest(self, step: int, state, meta: dict) -> None:
        """Saves the resumable state of `step` and waits until it is complete on disk."""
        self.latest.save(step, args=self._save_args(state, meta), force=True)
        self._saves += 1
        if self._kill == ("during", self._saves):
            os.kill(os.getpid(), signal.SIGKILL)
        self.latest.wait_until_finished()
        if self._kill == ("after", self._saves):
            os.kill(os.getpid(), signal.SIGKILL)

    def save_best(self, step: int, state, meta: dict) -> None:
        """Saves the selected state of `step` (replacing the previous best)."""
        self.best.save(step, args=self._save_args(state, meta), force=True)
        self.best.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def latest_meta(self) -> dict:
        """The JSON meta of the last `latest` step (without reading its state)."""
        step = self.latest_step()
        restored = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def discard_best_after(self, step: int | None) -> None:
        """Deletes `best` steps newer than `step` (all of them for None)."""
        for s in self.best.all_steps():
            if step is None or s > step:
                self.best.delete(s)

    def _restore(self, manager: ocp.CheckpointManager, abstract_state, step: int | None):
        if step is None:
            return None
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # orbax / tensorstore raise many types for a damaged step
            folder = pathlib.Path(manager.directory) / str(step)
            raise CheckpointError(
                f"{folder}: the checkpoint of step {step} cannot be read "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Delete that "
                "folder to resume from an earlier checkpoint, or pass --overwrite to start over."
            ) from e
        return restored["state"], restored["meta"], step

    def restore_latest(self, abstract_state) -> tuple[Any, dict, int] | None:
        """(state, meta, step) of the last complete `latest` step, or None when there is none."""
        return self._restore(self.latest, abstract_state, self.latest_step())

    def restore_best(self, abstract_state, step: int) -> tuple[Any, dict, int]:
        """(state, meta, step) of the `best` checkpoint of `step`."""
        if step not in self.best.all_steps():
            raise CheckpointError(
                f"{self.directory / 'best'}: no checkpoint of the best step {step}"
            )
        return self._restore(self.best, abstract_state, step)

    def describe_latest(self) -> str:
        step = self.latest_step()
        return "none" if step is None else f"{self.directory / 'latest' / str(step)} (step {step})"

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def load_run_checkpoint(run_dir: str | pathlib.Path, state, which: str = "best") -> int:
    """Loads checkpoint `which` ('best' or 'latest') of a run folder into `state`
    (an `eval.training.TrainState`); returns its step. A run without validation has no
    `best`: its latest state is the final one and is loaded instead."""
    if which not in ("best", "latest"):
        raise FlagError(f"--which={which!r}: 'best' or 'latest'")
    ckpt = Checkpoints(pathlib.Path(run_dir) / "checkpoints", read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise MissingFileError(f"--run={run_dir}: no checkpoint under checkpoints/latest")
        best_step = ckpt.latest_meta()["selection"]["best_step"]
        if which == "best" and best_step is not None:
            tree, _, step = ckpt.restore_best(state.abstract_checkpoint(False), best_step)
        else:
            tree, _, step = ckpt.restore_latest(state.abstract_checkpoint())
        state.load_checkpoint(tree)
        return step
    finally:
        ckpt.close()


class MemoryCheckpoints:
    """Checkpoints of a run without a folder: nothing to resume, the best kept in memory."""

    def __init__(self):
        self._best: tuple[Any, dict, int] | None = None

    def save_latest(self, step: int, state, meta: dict) -> None:
        del step, state, meta

    def save_best(self, step: int, state, meta: dict) -> None:
        # A copy: the train step donates (reuses) the buffers of the live state.
        self._best = jax.tree.map(jnp.copy, state), meta, step

    def latest_step(self) -> None:
        return None

    def discard_best_after(self, step: int | None) -> None:
        del step

    def restore_latest(self, abstract_state) -> None:
        del abstract_state

    def restore_best(self, abstract_state, step: int) -> tuple[Any, dict, int]:
        del abstract_state
        if self._best is None or self._best[2] != step:
            raise CheckpointError(f"no in-memory checkpoint of the best step {step}")
        return self._best

    def describe_latest(self) -> str:
        return "none (the run has no folder)"

    def close(self) -> None:
        pass
