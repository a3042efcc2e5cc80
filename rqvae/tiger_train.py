"""Trains and evaluates TIGER on a data set with a semantic-ID index file.

  python -m rqvae.tiger_train --dataset=amazon-scientific-2018 \
      --data_dir=../shared/data/amazon-scientific-2018 \
      --semantic_ids=../shared/data/amazon-scientific-2018/indexes/rqvae_zcr.index.json --out=runs/tiger

Selects the epoch with the best validation Recall@10 and reports test Recall/NDCG
@1,5,10,20 (item level, full item set, trie-constrained beam search). Writes to --out:
`metrics.jsonl` (validation per evaluation), `model/` (orbax, nnx.state of the selected
model) and `result.json`; prints one result line.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx

from eval import data
from eval.allocator import reexec_with_tcmalloc
from eval.training import RunLogger
from rqvae.tiger import TigerConfig
from rqvae.tiger_trainer import (
    TigerTrainConfig,
    as_semantic_index,
    evaluate_tiger,
    fit_tiger,
    load_index,
)

KS = (1, 5, 10, 20)


def run(dataset: str, data_dir: str, semantic_ids: str, out: str, config: TigerTrainConfig) -> dict:
    """Trains, selects on validation, evaluates on test; returns (and writes) the result."""
    ds = data.load(dataset, data_dir)
    split = data.split(ds)
    si = as_semantic_index(load_index(semantic_ids, ds))
    out_dir = Path(out).absolute()
    logger = RunLogger(out_dir, tensorboard=False)
    start = time.time()
    model = fit_tiger(ds, split, si, config, logger)
    train_s = time.time() - start
    kw = dict(beam_size=config.beam_size, batch_size=config.eval_batch_size)
    valid = evaluate_tiger(model, split.valid, si, KS, **kw)
    test = evaluate_tiger(model, split.test, si, KS, **kw)
    logger.log(0, "test", test)
    logger.close()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out_dir / "model", nnx.state(model), force=True)
    result = {
        "model": "TIGER",
        "dataset": dataset,
        "semantic_ids": str(semantic_ids),
        "num_ids": len(si.trie.ids),
        "colliding_items": si.num_collisions,
        "config": dataclasses.asdict(dataclasses.replace(config, model=model.cfg)),
        "valid": valid,
        "test": test,
        "train_seconds": train_s,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(
        f"TIGER {dataset} {Path(semantic_ids).name}: "
        + " ".join(
            f"{m}@{k}={test[f'{n}@{k}']:.4f}"
            for m, n in (("Recall", "HR"), ("NDCG", "NDCG"))
            for k in KS
        )
    )
    return result


def _define_flags() -> None:
    d, t = TigerConfig(), TigerTrainConfig()
    flags.DEFINE_string("dataset", None, "Data set name (eval.data.DATASETS).", required=True)
    flags.DEFINE_string("data_dir", None, "Folder with the data set's raw files.", required=True)
    flags.DEFINE_string(
        "semantic_ids", None, "Index json {0-based item: ['<a_1>', ...]}.", required=True
    )
    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_integer("epochs", t.epochs, "Training epochs (upper bound with early stopping).")
    flags.DEFINE_integer("batch_size", t.batch_size, "Training batch size.")
    flags.DEFINE_float("lr", t.lr, "Peak AdamW learning rate.")
    flags.DEFINE_float("weight_decay", t.weight_decay, "AdamW weight decay.")
    flags.DEFINE_integer("warmup_steps", t.warmup_steps, "Linear warm-up steps.")
    flags.DEFINE_integer("beam_size", t.beam_size, "Beam size of the constrained beam search.")
    flags.DEFINE_integer("eval_every", t.eval_every, "Epochs between validations.")
    flags.DEFINE_integer("patience", t.patience, "Validations without improvement before stopping.")
    flags.DEFINE_integer(
        "max_valid", t.max_valid, "Validation examples used for selection (default all)."
    )
    flags.DEFINE_integer(
        "max_targets", t.max_targets, "Train on each user's last N positions only (default all)."
    )
    flags.DEFINE_integer("seed", t.seed, "Random seed.")
    flags.DEFINE_integer("d_model", d.d_model, "Model width.")
    flags.DEFINE_integer("num_layers", d.encoder_layers, "Encoder and decoder layers (each).")
    flags.DEFINE_integer("num_heads", d.num_heads, "Attention heads.")
    flags.DEFINE_integer("head_dim", d.head_dim, "Width of each head.")
    flags.DEFINE_integer("d_ff", d.d_ff, "MLP width.")
    flags.DEFINE_float("dropout", d.dropout, "Dropout rate.")
    flags.DEFINE_integer("num_user_buckets", d.num_user_buckets, "Hashed user tokens.")
    flags.DEFINE_integer("max_items", d.max_items, "History items read by the encoder.")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    model = TigerConfig(
        d_model=f.d_model, num_heads=f.num_heads, head_dim=f.head_dim, d_ff=f.d_ff, encoder_layers=f.num_layers,
        decoder_layers=f.num_layers, dropout=f.dropout, num_user_buckets=f.num_user_buckets, max_items=f.max_items,
    )  # fmt: skip
    config = TigerTrainConfig(
        model=model, epochs=f.epochs, batch_size=f.batch_size, lr=f.lr, weight_decay=f.weight_decay,
        warmup_steps=f.warmup_steps, beam_size=f.beam_size, eval_every=f.eval_every, patience=f.patience,
        max_valid=f.max_valid, max_targets=f.max_targets, seed=f.seed,
    )  # fmt: skip
    run(f.dataset, f.data_dir, f.semantic_ids, f.out, config)


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    app.run(main)
