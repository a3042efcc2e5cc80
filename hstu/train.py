r"""Train HSTU or SASRec on an `eval` data set; select on validation, report test once.

  python -m hstu.train --dataset=ml-100k --data_dir=DIR --model=hstu --preset=hstu-ml --out=runs/x
  python -m hstu.train --dataset=amazon-games-2014 --data_dir=DIR --model=sasrec --preset=sasrec-paper

Test metrics (`hstu.evaluate.test_metrics`): full ranking with history items filtered
(the reference protocol) and without, and the SASRec-paper protocol (100 sampled
negatives); written to `<out>/result.json` and printed. `<out>/run.json` records the
data set, model, preset and overrides, so `python -m hstu.evaluate --run=<out>` can
rebuild the model and re-evaluate the best checkpoint.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

from absl import app, flags

from eval import data
from eval.allocator import reexec_with_tcmalloc
from hstu.evaluate import print_metrics, test_metrics
from hstu.model import PRESETS
from hstu.trainer import make_trainer

_OVERRIDES = {
    "max_seq_len": (flags.DEFINE_integer, "Override: sequence length N."),
    "embedding_dim": (flags.DEFINE_integer, "Override: D."),
    "num_blocks": (flags.DEFINE_integer, "Override: layers."),
    "num_heads": (flags.DEFINE_integer, "Override: heads."),
    "dropout_rate": (flags.DEFINE_float, "Override: dropout."),
    "num_negatives": (flags.DEFINE_integer, "Override: sampled-softmax negatives."),
    "learning_rate": (flags.DEFINE_float, "Override: AdamW learning rate."),
    "weight_decay": (flags.DEFINE_float, "Override: AdamW weight decay."),
    "batch_size": (flags.DEFINE_integer, "Override: batch size."),
    "num_epochs": (flags.DEFINE_integer, "Override: epochs."),
    "max_steps": (flags.DEFINE_integer, "Stop after this many steps."),
    "eval_every": (flags.DEFINE_integer, "Validate every this many steps (default: each epoch)."),
    "patience": (flags.DEFINE_integer, "Early stopping patience (evaluations)."),
    "seed": (flags.DEFINE_integer, "Seed."),
    "stochastic_length_alpha": (
        flags.DEFINE_float,
        "HSTU's stochastic length: alpha in (0, 2] (off by default).",
    ),
}


def _define_flags() -> None:
    flags.DEFINE_string("dataset", "ml-100k", "Registered data set name.")
    flags.DEFINE_string("data_dir", None, "Folder with the raw files.", required=True)
    flags.DEFINE_enum("model", "hstu", ["hstu", "sasrec"], "Model family.")
    flags.DEFINE_enum("preset", "hstu-ml", sorted(PRESETS), "Published settings to start from.")
    flags.DEFINE_string("out", None, "Run folder (checkpoints, metrics.jsonl, TensorBoard).")
    flags.DEFINE_enum(
        "protocol", None, ["full", "sampled"], "Validation protocol (default: the data set's)."
    )
    flags.DEFINE_enum("loss", None, ["bce", "sampled_softmax"], "Override (SASRec): loss.")
    flags.DEFINE_enum(
        "attention_impl", None, ["xla", "pallas"], "Override (HSTU): attention kernel."
    )
    for name, (define, help_) in _OVERRIDES.items():
        define(name, None, help_)


def train(dataset: str, data_dir: str, model: str, preset: str, overrides: dict, out: str | None = None,
          protocol: str | None = None) -> dict:  # fmt: skip
    """Trains with validation selection, evaluates the selected model on test; returns the result."""
    ds = data.load(dataset, data_dir)
    split = data.split(ds)
    protocol = protocol or data.DATASETS[ds.name].protocol
    trainer = make_trainer(model, preset, ds.num_items, overrides)
    out_dir = pathlib.Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        run = {"dataset": dataset, "data_dir": str(pathlib.Path(data_dir).absolute()), "model": model,
               "preset": preset, "overrides": overrides}  # fmt: skip
        (out_dir / "run.json").write_text(json.dumps(run, indent=1))
    start = time.perf_counter()
    info = trainer.fit(ds, split, out_dir, protocol)
    result = {
        "train_s": time.perf_counter() - start,
        **info,
        "test": test_metrics(trainer, ds, split.test),
    }
    if out_dir:
        (out_dir / "result.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def main(argv):
    del argv
    f = flags.FLAGS
    overrides = {k: getattr(f, k) for k in [*_OVERRIDES, "loss", "attention_impl"]}
    result = train(f.dataset, f.data_dir, f.model, f.preset, overrides, f.out, f.protocol)
    print_metrics(result["test"])
    best = result["valid"].get("NDCG@10", math.nan)
    print(f"steps={result['steps']} train_s={result['train_s']:.1f} best_valid_NDCG@10={best:.4f}")


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    app.run(main)
