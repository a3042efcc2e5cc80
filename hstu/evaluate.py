r"""Evaluate a trained HSTU / SASRec run on the test examples.

  python -m hstu.evaluate --run=runs/x [--which=best|latest] [--data_dir=DIR]

`--run` is an `hstu.train --out` folder: `run.json` (data set, preset, overrides)
rebuilds the model, `checkpoints/<which>` supplies the weights. Reports full ranking over
the whole catalogue with history items filtered (the reference protocol) and without,
and the SASRec-paper protocol (100 sampled negatives): HR, NDCG @1,10,50,200 and MRR.
"""

from __future__ import annotations

import pathlib

from absl import flags

from eval import cli, data
from eval.allocator import reexec_with_tcmalloc
from eval.data.dataset import EvalExamples
from eval.io import atomic_write_json
from eval.training import load_run_checkpoint, read_run
from hstu.trainer import Trainer, make_trainer

KS = (1, 5, 10, 20, 50, 200)
PROTOCOLS = {
    "full_filtered": ("full", True),
    "full_unfiltered": ("full", False),
    "sampled_100": ("sampled", True),
}


def test_metrics(
    trainer: Trainer, ds: data.Dataset, examples: EvalExamples, seed: int = 0
) -> dict[str, dict]:
    """{protocol name: metrics} for the three protocols of `PROTOCOLS`."""
    return {
        name: trainer.evaluate(ds, examples, protocol, filter_history, KS, seed)
        for name, (protocol, filter_history) in PROTOCOLS.items()
    }


def print_metrics(results: dict[str, dict]) -> None:
    for name, metrics in results.items():
        print(
            f"test {name}: "
            + " ".join(
                f"{k}={metrics[k]:.4f}"
                for k in (
                    "HR@1",
                    "HR@10",
                    "NDCG@10",
                    "HR@50",
                    "NDCG@50",
                    "HR@200",
                    "NDCG@200",
                    "MRR",
                )
            )
        )


def load_run(run_dir: str | pathlib.Path, which: str = "best", data_dir: str | None = None):
    """(trainer holding the checkpoint's weights, data set, split, step) of an `hstu.train` run."""
    config = read_run(run_dir)["config"]
    ds = data.load(config["dataset"], data_dir or config["data_dir"], fmt=config["format"])
    trainer = make_trainer(config["preset"], ds.num_items, config["overrides"])
    step = load_run_checkpoint(run_dir, trainer.state, which)
    return trainer, ds, data.split(ds), step


def _define_flags() -> None:
    flags.DEFINE_string("run", None, "An `hstu.train --out` folder.", required=True)
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to evaluate.")
    flags.DEFINE_string(
        "data_dir", None, "Raw data folder (default: the one recorded in run.json)."
    )
    flags.DEFINE_enum("split", "test", ["test", "valid"], "Examples to evaluate.")
    flags.DEFINE_string("out", None, "Optional JSON file for the metrics.")


def main(argv):
    del argv
    f = flags.FLAGS
    trainer, ds, split, step = load_run(f.run, f.which, f.data_dir)
    results = test_metrics(trainer, ds, getattr(split, f.split))
    if f.out:
        atomic_write_json(f.out, {"step": step, f.split: results}, indent=1, default=float)
    print(
        f"checkpoint {f.which} (step {step}), {f.split} examples: {results['full_filtered']['num_examples']}"
    )
    print_metrics(results)


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
