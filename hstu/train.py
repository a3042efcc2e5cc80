r"""Train HSTU or SASRec on an `eval` data set; select on validation, report test once.

  python -m hstu.train --dataset=ml-100k --data_dir=DIR --preset=hstu-ml --out=runs/x
  python -m hstu.train --dataset=amazon-games-2014 --data_dir=DIR --preset=sasrec-paper --out=runs/y

The preset names the model (`hstu.models.PRESETS`); flags left unset keep its values.
Test metrics (`hstu.evaluate.test_metrics`): full ranking with history items filtered
(the reference protocol) and without, and the SASRec-paper protocol (100 sampled
negatives). `--out` is an `eval.training` run folder: `run.json` (data set, preset,
overrides: what `python -m hstu.evaluate --run=<out>` rebuilds the model from),
`metrics.jsonl`, `checkpoints/{latest,best}`, `result.json`. Rerunning the same command
resumes from the last checkpoint; a finished run prints its result and leaves it alone.
"""

from __future__ import annotations

import math
import pathlib
import time

from absl import flags, logging

from eval import cli, data
from eval.allocator import reexec_with_tcmalloc
from eval.training import RunDir
from eval.training.flags import (
    config_flag_values,
    define_field_flags,
    define_training_flags,
    training_flag_values,
)
from hstu.evaluate import print_metrics, test_metrics
from hstu.models import MODELS, PRESETS
from hstu.trainer import TrainConfig, make_trainer

_OVERRIDES: list[str] = []  # config fields settable by flag (`define_field_flags`)


def _define_flags() -> None:
    define_training_flags({"dataset": "ml-100k"}, required=("data_dir",))
    flags.DEFINE_enum("preset", "hstu-ml", sorted(PRESETS), "Published settings (names the model).")
    flags.DEFINE_enum(
        "protocol", None, ["full", "sampled"], "Validation protocol (default: the data set's)."
    )
    configs = [spec.config for spec in MODELS.values()]
    _OVERRIDES.extend(define_field_flags(*configs, TrainConfig, skip=("num_items",)))


def train(dataset: str, data_dir: str, preset: str, overrides: dict, out: str | None = None,
          protocol: str | None = None, fmt: str | None = None, overwrite: bool = False,
          progress: bool = True) -> dict:  # fmt: skip
    """Trains with validation selection, evaluates the selected model on test; returns the
    result (also `<out>/result.json`). A finished `out` returns its stored result."""
    overrides = {k: v for k, v in overrides.items() if v is not None}  # None: the preset's
    config = {
        "dataset": dataset, "data_dir": str(pathlib.Path(data_dir).absolute()), "format": fmt,
        "preset": preset, "protocol": protocol, "overrides": overrides,
    }  # fmt: skip
    run = RunDir(out, "hstu", config, overwrite=overwrite) if out else None
    try:
        if run is not None and run.result is not None:
            logging.info("--out=%s is a finished run; its result.json is kept", run.path)
            return run.result
        ds = data.load(dataset, data_dir, fmt=fmt)
        split = data.split(ds)
        protocol = (
            protocol or data.DATASETS[ds.name].protocol if ds.name in data.DATASETS else "full"
        )
        trainer = make_trainer(preset, ds.num_items, overrides)
        start = time.perf_counter()
        info = trainer.fit(ds, split, run, protocol, progress=progress)
        result = {
            "train_s": time.perf_counter() - start, "steps": info.steps, "best_step": info.best_step,
            "stopped_early": info.stopped_early, "valid": info.valid,
            "test": test_metrics(trainer, ds, split.test),
        }  # fmt: skip
        if run is not None:
            run.write_result(result)
        return result
    finally:
        if run is not None:
            run.close()


def main(argv):
    del argv
    f = flags.FLAGS
    shared = training_flag_values()
    overrides = config_flag_values()
    overrides |= {k: getattr(f, k) for k in _OVERRIDES}
    result = train(
        shared["dataset"], shared["data_dir"], f.preset, overrides, shared["out"], f.protocol,
        shared["format"], shared["overwrite"],
    )  # fmt: skip
    print_metrics(result["test"])
    best = result["valid"].get("NDCG@10", math.nan)
    print(f"steps={result['steps']} best_step={result['best_step']} train_s={result['train_s']:.1f} "
          f"best_valid_NDCG@10={best:.4f}")  # fmt: skip


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
