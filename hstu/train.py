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

`--mesh=data:8` (axes `data`, `model`) splits each batch over the devices of the run;
`--shard_items` splits the item table's rows over `model` (and RecGPT's softmax head's
items: every stage, two-stage recall ranked per shard). A multi-process run
(`eval.distributed`, `python -m tools.launch`) spans every process's devices, by default
all over `data`. The mesh is not part of the run's flags: a run written by N processes
resumes on M.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import jax
from absl import flags, logging

from eval import cli, data
from eval.allocator import reexec_with_tcmalloc
from eval.distributed import define_mesh_flag, run_mesh
from eval.errors import FlagError
from eval.training import RunDir, input_path
from eval.training.flags import (
    config_flag_values,
    define_field_flags,
    define_training_flags,
    training_flag_values,
)
from hstu.evaluate import print_metrics, test_metrics
from hstu.models import MODELS, PRESETS
from hstu.models import preset as preset_spec
from hstu.recgpt_stages import fit_recgpt, print_ablation
from hstu.trainer import TrainConfig, make_trainer

_OVERRIDES: list[str] = []  # config fields settable by flag (`define_field_flags`)


def _define_flags() -> None:
    define_training_flags({"dataset": "ml-100k"}, required=("data_dir",))
    flags.DEFINE_enum("preset", "hstu-ml", sorted(PRESETS), "Published settings (names the model).")
    flags.DEFINE_enum(
        "protocol", None, ["full", "sampled"], "Validation protocol (default: the data set's)."
    )
    flags.DEFINE_list(
        "prompt_lengths", ["1", "2", "3"], "RecGPT: prompt-tuning runs, K generated items each."
    )
    flags.DEFINE_integer(
        "prompt_max_steps",
        None,
        "RecGPT: steps of each prompt-tuning run (default: as pre-training).",
    )
    flags.DEFINE_list(
        "recall_shares", ["0.9", "0.8", "0.5"],
        "RecGPT two-stage recall: stage-1 share N/k of each cutoff k tried (N chosen on validation).",
    )  # fmt: skip
    define_mesh_flag(("data", "model"), "data:4,model:2")
    flags.DEFINE_bool(
        "shard_items", False, "Split the item table's rows over the mesh's model axis."
    )
    configs = [spec.config for spec in MODELS.values()]
    _OVERRIDES.extend(define_field_flags(*configs, TrainConfig, skip=("num_items", "prompt_items")))


def train(dataset: str, data_dir: str, preset: str, overrides: dict, out: str | None = None,
          protocol: str | None = None, fmt: str | None = None, overwrite: bool = False,
          progress: bool = True, prompt_lengths: Sequence[int] = (1, 2, 3),
          recall_shares: Sequence[float] = (0.9, 0.8, 0.5),
          prompt_max_steps: int | None = None, mesh: str | None = None,
          shard_items: bool = False) -> dict:  # fmt: skip
    """Trains with validation selection, evaluates the selected model on test; returns the
    result (also `<out>/result.json`). A finished `out` returns its stored result.
    RecGPT presets run every stage (`hstu.recgpt_stages`; `prompt_lengths`, `recall_shares`).
    `mesh`: `--mesh` (see module doc)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}  # None: the preset's
    recgpt = preset_spec(preset)["model"] == "recgpt"
    config = {
        "dataset": dataset, "data_dir": input_path(data_dir), "format": fmt,
        "preset": preset, "protocol": protocol, "overrides": overrides,
    }  # fmt: skip
    if recgpt:
        config |= {"prompt_lengths": list(prompt_lengths), "recall_shares": list(recall_shares),
                   "prompt_max_steps": prompt_max_steps}  # fmt: skip
    device_mesh = run_mesh(mesh, ("data", "model"))
    info = {"mesh": dict(device_mesh.shape) if device_mesh else None, "shard_items": shard_items,
            "processes": jax.process_count()}  # fmt: skip
    run = RunDir(out, "hstu", config, info=info, overwrite=overwrite) if out else None
    try:
        if run is not None and run.result is not None:
            logging.info("--out=%s is a finished run; its result.json is kept", run.path)
            return run.result
        ds = data.load(dataset, data_dir, fmt=fmt)
        split = data.split(ds)
        protocol = (
            protocol or data.DATASETS[ds.name].protocol if ds.name in data.DATASETS else "full"
        )
        start = time.perf_counter()
        if recgpt:
            trainer, stages = fit_recgpt(
                ds, split, overrides, preset=preset, protocol=protocol,
                prompt_lengths=prompt_lengths, recall_shares=recall_shares,
                prompt_overrides={"max_steps": prompt_max_steps} if prompt_max_steps else None,
                out=run.path if run else None, config=config, overwrite=overwrite,
                progress=progress, mesh=device_mesh, shard_items=shard_items,
            )  # fmt: skip
            best = stages["stages"][stages["best_stage"]]
            info = {k: best[k] for k in ("steps", "best_step", "stopped_early", "valid")}
            info |= {"ablation": stages["ablation"], "recall_n": stages["recall_n"],
                     "item_table_split": trainer.sharded_table}  # fmt: skip
        else:
            trainer = make_trainer(preset, ds.num_items, overrides, device_mesh, shard_items)
            fitted = trainer.fit(ds, split, run, protocol, progress=progress)
            info = {"steps": fitted.steps, "best_step": fitted.best_step,
                    "stopped_early": fitted.stopped_early, "valid": fitted.valid,
                    "item_table_split": trainer.sharded_table}  # fmt: skip
        result = {
            "train_s": time.perf_counter() - start, **info,
            "test": test_metrics(trainer, ds, split.test),
        }  # fmt: skip
        if run is not None:
            run.write_result(result)
        return result
    finally:
        if run is not None:
            run.close()


def _numbers(name: str, cast: type) -> list:
    """The comma-separated numbers of list flag `name` (FlagError naming it otherwise)."""
    try:
        return [cast(v) for v in getattr(flags.FLAGS, name)]
    except ValueError:
        raise FlagError(
            f"--{name}={','.join(getattr(flags.FLAGS, name))}: not {cast.__name__}s"
        ) from None


def main(argv):
    del argv
    f = flags.FLAGS
    shared = training_flag_values()
    overrides = config_flag_values()
    overrides |= {k: getattr(f, k) for k in _OVERRIDES}
    result = train(
        shared["dataset"], shared["data_dir"], f.preset, overrides, shared["out"], f.protocol,
        shared["format"], shared["overwrite"], prompt_lengths=_numbers("prompt_lengths", int),
        recall_shares=_numbers("recall_shares", float), prompt_max_steps=f.prompt_max_steps,
        mesh=f.mesh, shard_items=f.shard_items,
    )  # fmt: skip
    if "ablation" in result:
        print_ablation(result["ablation"])
    print_metrics(result["test"])
    best = result["valid"].get("NDCG@10", math.nan)
    print(f"steps={result['steps']} best_step={result['best_step']} train_s={result['train_s']:.1f} "
          f"best_valid_NDCG@10={best:.4f}")  # fmt: skip


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
