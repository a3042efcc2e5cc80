r"""Trains and evaluates TIGER on a data set with a semantic-ID index file.

  python -m rqvae.tiger_train --dataset=amazon-scientific-2018 \
      --data_dir=../shared/data/amazon-scientific-2018 \
      --semantic_ids=../shared/data/amazon-scientific-2018/indexes/rqvae_zcr.index.json --out=runs/tiger

Selects the state with the best validation Recall@10 and reports test Recall/NDCG
@1,5,10,20 (item level, full item set, trie-constrained beam search). `--out` is an
`eval.training` run folder (`run.json`, `metrics.jsonl`, `checkpoints/{latest,best}`,
`result.json`); rerunning the command resumes, a finished run is left alone, and
`python -m rqvae.evaluate --run=<out>` reloads the best checkpoint and re-evaluates.

`--mesh=data:8` trains data parallel over the devices of the run and splits each
evaluation batch over them; a multi-process run (`eval.distributed`, `python -m
tools.launch`) spans every process's devices (by default all over `data`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import time
from typing import Any

import jax
from absl import flags, logging
from jax.sharding import Mesh

from eval import cli, data
from eval.allocator import reexec_with_tcmalloc
from eval.distributed import define_mesh_flag, run_mesh
from eval.training import RunDir, input_path, load_run_checkpoint, read_run
from eval.training.flags import (
    config_defaults,
    config_flag_values,
    define_training_flags,
    training_flag_values,
)
from rqvae.tiger import SemanticIndex, Tiger, TigerConfig
from rqvae.tiger_trainer import (
    TigerTrainConfig,
    as_semantic_index,
    evaluate_tiger,
    fit_tiger,
    init_state,
    load_index,
)

KS = (1, 5, 10, 20)


def run_config(
    dataset: str, data_dir: str, fmt: str | None, semantic_ids: str, config: TigerTrainConfig
) -> dict:
    """run.json `config` of a TIGER run (the index file is named by its hash too)."""
    digest = hashlib.sha256(pathlib.Path(semantic_ids).read_bytes()).hexdigest()[:16]
    return {"dataset": dataset, "data_dir": input_path(data_dir), "format": fmt,
            "semantic_ids": input_path(semantic_ids), "semantic_ids_sha256": digest,
            "train": dataclasses.asdict(config)}  # fmt: skip


def config_of_run(config: dict[str, Any]) -> TigerTrainConfig:
    train = dict(config["train"])
    return TigerTrainConfig(**{**train, "model": TigerConfig(**train["model"])})


def load_run(run_dir: str | pathlib.Path, which: str = "best", data_dir: str | None = None):
    """(model, data set, split, semantic index, config, step) of a `tiger_train` run folder."""
    config = read_run(run_dir)["config"]
    ds = data.load(config["dataset"], data_dir or config["data_dir"], fmt=config["format"])
    train = config_of_run(config)
    si = as_semantic_index(
        load_index(config["semantic_ids"], ds, train.codebook_size), train.codebook_size
    )
    state = init_state(train, si)
    step = load_run_checkpoint(run_dir, state, which)
    return state.model(), ds, data.split(ds), si, train, step


def evaluate_splits(
    model: Tiger, split: data.Split, si: SemanticIndex, config: TigerTrainConfig,
    mesh: Mesh | None = None,
) -> dict:  # fmt: skip
    kw = dict(
        beam_size=config.beam_size, batch_size=config.eval_batch_size, mesh=mesh,
        filter_history=config.filter_history,
    )  # fmt: skip
    return {
        name: evaluate_tiger(model, getattr(split, name), si, KS, **kw)
        for name in ("valid", "test")
    }


def result_line(dataset: str, semantic_ids: str, test: dict) -> str:
    metrics = " ".join(
        f"{m}@{k}={test[f'{n}@{k}']:.4f}"
        for m, n in (("Recall", "HR"), ("NDCG", "NDCG"))
        for k in KS
    )
    return f"TIGER {dataset} {pathlib.Path(semantic_ids).name}: {metrics}"


def run(dataset: str, data_dir: str, semantic_ids: str, out: str, config: TigerTrainConfig,
        fmt: str | None = None, overwrite: bool = False, progress: bool = True,
        mesh: str | None = None) -> dict:  # fmt: skip
    """Trains, selects on validation, evaluates on test; returns (and writes) the result.
    `mesh`: `--mesh` (see module doc; not part of the run's config: N processes resume on M)."""
    device_mesh = run_mesh(mesh, ("data",))
    info = {"mesh": dict(device_mesh.shape) if device_mesh else None,
            "processes": jax.process_count()}  # fmt: skip
    config_json = run_config(dataset, data_dir, fmt, semantic_ids, config)
    with RunDir(out, "tiger", config_json, info=info, overwrite=overwrite) as rd:
        if rd.result is not None:
            logging.info("--out=%s is a finished run; its result.json is kept", rd.path)
            return rd.result
        ds = data.load(dataset, data_dir, fmt=fmt)
        split = data.split(ds)
        si = as_semantic_index(
            load_index(semantic_ids, ds, config.codebook_size), config.codebook_size
        )
        start = time.time()
        model = fit_tiger(ds, split, si, config, rd, progress, device_mesh)
        result = {
            "model": "TIGER", "dataset": dataset, "semantic_ids": str(semantic_ids), "num_ids": len(si.ids),
            "colliding_items": si.num_collisions, "train_seconds": time.time() - start,
            **evaluate_splits(model, split, si, config, device_mesh),
        }  # fmt: skip
        rd.write_result(result)
        return result


def _define_flags() -> None:
    d, t = TigerConfig(), TigerTrainConfig()
    define_training_flags(config_defaults(t), required=("dataset", "data_dir", "out"))
    flags.DEFINE_string(
        "semantic_ids", None, "Index json {0-based item: ['<a_1>', ...]}.", required=True
    )
    flags.DEFINE_integer(
        "codebook_size", None, "Codes per level; every code must be below it (default: inferred)."
    )
    flags.DEFINE_float("weight_decay", t.weight_decay, "AdamW weight decay.")
    flags.DEFINE_integer("warmup_steps", t.warmup_steps, "Linear warm-up steps.")
    flags.DEFINE_integer("beam_size", t.beam_size, "Beam size of the constrained beam search.")
    flags.DEFINE_integer(
        "max_valid", t.max_valid, "Validation examples used for selection (default all)."
    )
    flags.DEFINE_bool(
        "filter_history", t.filter_history, "Exclude each example's history items while "
        "decoding, as full ranking filters them (--nofilter_history: TIGER's paper protocol).",
    )  # fmt: skip
    flags.DEFINE_integer(
        "max_targets", t.max_targets, "Train on each user's last N positions only (default all)."
    )
    flags.DEFINE_integer("d_model", d.d_model, "Model width.")
    flags.DEFINE_integer("num_layers", d.encoder_layers, "Encoder and decoder layers (each).")
    flags.DEFINE_integer("num_heads", d.num_heads, "Attention heads.")
    flags.DEFINE_integer("head_dim", d.head_dim, "Width of each head.")
    flags.DEFINE_integer("d_ff", d.d_ff, "MLP width.")
    flags.DEFINE_float("dropout", d.dropout, "Dropout rate.")
    flags.DEFINE_integer("num_user_buckets", d.num_user_buckets, "Hashed user tokens.")
    flags.DEFINE_integer("max_items", d.max_items, "History items read by the encoder.")
    define_mesh_flag(("data",), "data:8")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    shared = training_flag_values()
    model = TigerConfig(
        d_model=f.d_model, num_heads=f.num_heads, head_dim=f.head_dim, d_ff=f.d_ff, encoder_layers=f.num_layers,
        decoder_layers=f.num_layers, dropout=f.dropout, num_user_buckets=f.num_user_buckets, max_items=f.max_items,
    )  # fmt: skip
    config = TigerTrainConfig(
        model=model, weight_decay=f.weight_decay, warmup_steps=f.warmup_steps, beam_size=f.beam_size,
        max_valid=f.max_valid, max_targets=f.max_targets, codebook_size=f.codebook_size,
        filter_history=f.filter_history,
        **config_flag_values(),
    )  # fmt: skip
    result = run(shared["dataset"], shared["data_dir"], f.semantic_ids, shared["out"], config,
                 shared["format"], shared["overwrite"], mesh=f.mesh)  # fmt: skip
    print(result_line(shared["dataset"], f.semantic_ids, result["test"]))


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
