"""RecGPT's stages on the hstu trainer: pre-training, prompt-tuning per K, two-stage recall
per N, and the ablation of all three (`fit_recgpt`; `python -m hstu.train --preset=recgpt`).

1. pre-training (`prompt_items` = 0) from scratch;
2. prompt-tuning for every K in `prompt_lengths`, each from the pre-trained weights with a
   fresh optimizer (the code's `run_finetune_full`); validation picks the best K, or the
   pre-trained model (K = 0) when no K beats it;
3. two-stage recall on that model: for each cutoff k of `CUTOFFS` and each share s of
   `recall_shares`, N = round(s k) items from stage 1 and k - N from stage 2 (the paper's
   N/M = 9/1, 8/2, 5/5 at k = 10); N is chosen per k on validation, N = k (one stage)
   among them. The same N on the pre-trained model tests the paper's "two-stage recall
   without prompt-tuning is worse".

Each training stage is an `eval.training` run folder under `<out>/` (`pretrain`,
`prompt_k<K>`): a rerun resumes the stage it stopped in and reloads finished ones.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from eval import data
from eval.training import RunDir, load_run_checkpoint
from hstu.recgpt import head_from_items
from hstu.trainer import Trainer, make_trainer

CUTOFFS = (5, 10, 20)


def recall_splits(
    shares: Sequence[float], cutoffs: Sequence[int] = CUTOFFS
) -> dict[int, list[int]]:
    """{cutoff k: the distinct stage-1 counts N = round(share k), kept in 1..k-1}."""
    out = {}
    for k in cutoffs:
        ns = sorted({min(max(round(s * k), 1), k - 1) for s in shares}, reverse=True)
        out[k] = ns
    return out


def _metrics(trainer: Trainer, ds, examples, protocol: str, recall_n: int | None) -> dict:
    trainer.recall_n = recall_n
    try:
        return trainer.evaluate(ds, examples, protocol, True, CUTOFFS)
    finally:
        trainer.recall_n = None


def _both(trainer: Trainer, ds, split, protocol: str, recall_n: int | None = None) -> dict:
    return {
        "valid": _metrics(trainer, ds, split.valid, protocol, recall_n),
        "test": _metrics(trainer, ds, split.test, protocol, recall_n),
    }


def _stage(ds, split, preset: str, overrides: dict, protocol: str, folder: pathlib.Path | None,
           start_from: Trainer | None, config: dict, overwrite: bool, progress: bool,
           mesh: Mesh | None, shard_items: bool) -> tuple[Trainer, dict]:  # fmt: skip
    """One trained stage: fitted (or resumed) in `folder`, or reloaded when finished there."""
    trainer = make_trainer(preset, ds.num_items, overrides, mesh, shard_items)
    if start_from is not None:  # copies: the new state's buffers are donated to its steps
        graphdef, weights = nnx.split(start_from.state.model())
        model = nnx.merge(graphdef, jax.tree.map(jnp.copy, weights))
        if trainer.model_cfg.head_init == "items":
            head_from_items(model)
        trainer.state.update_from(model)
    run = RunDir(folder, "hstu.recgpt", config, overwrite=overwrite) if folder else None
    try:
        if run is not None and run.result is not None:
            load_run_checkpoint(folder, trainer.state, "best")
            return trainer, run.result
        info = trainer.fit(ds, split, run, protocol, progress=progress)
        result = {"steps": info.steps, "best_step": info.best_step, "valid": info.valid,
                  "stopped_early": info.stopped_early, "curve": info.curve}  # fmt: skip
        if run is not None:
            run.write_result(result)
        return trainer, result
    finally:
        if run is not None:
            run.close()


def fit_recgpt(
    ds: data.Dataset,
    split: data.Split,
    overrides: dict[str, Any],
    *,
    preset: str = "recgpt",
    protocol: str = "full",
    prompt_lengths: Sequence[int] = (1, 2, 3),
    recall_shares: Sequence[float] = (0.9, 0.8, 0.5),
    prompt_overrides: dict[str, Any] | None = None,
    out: pathlib.Path | None = None,
    config: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    mesh: Mesh | None = None,
    shard_items: bool = False,
) -> tuple[Trainer, dict]:
    """Trains the stages and measures the ablation; returns the final trainer (best K, 0:
    the pre-trained model; `recall_n` = the N chosen at k = 10, None: one stage) and
    {"ablation", "stages", "recall_n", "best_stage"} (`best_stage`: its stage's name).
    `overrides` set both stages, `prompt_overrides` (e.g. its epochs) prompt-tuning on top;
    `mesh`, `shard_items`: every stage's (`hstu.trainer.Trainer`)."""
    if not prompt_lengths or min(prompt_lengths) < 1:
        raise ValueError(f"prompt_lengths must be >= 1, got {list(prompt_lengths)}")
    config = config or {}

    def folder(name: str) -> pathlib.Path | None:
        return out / name if out is not None else None

    def stage(name: str, k: int, start: Trainer | None) -> tuple[Trainer, dict]:
        settings = {**overrides, **((prompt_overrides or {}) if k else {}), "prompt_items": k}
        return _stage(ds, split, preset, settings, protocol, folder(name), start,
                      {**config, "stage": name, "settings": settings}, overwrite, progress,
                      mesh, shard_items)  # fmt: skip

    pre, pre_info = stage("pretrain", 0, None)
    stages = {"pretrain": pre_info}
    ablation: dict[str, Any] = {"pretrain": _both(pre, ds, split, protocol), "prompt": {}}
    # Pre-training is a candidate too (K = 0): a K must beat it on validation strictly.
    best, best_k, best_valid = pre, 0, ablation["pretrain"]["valid"]["NDCG@10"]
    for k in prompt_lengths:
        tuned, info = stage(f"prompt_k{k}", k, pre)
        stages[f"prompt_k{k}"] = info
        ablation["prompt"][f"K={k}"] = _both(tuned, ds, split, protocol)
        score = ablation["prompt"][f"K={k}"]["valid"]["NDCG@10"]
        if score > best_valid:
            best, best_k, best_valid = tuned, k, score
    one_stage = ablation["prompt"][f"K={best_k}"] if best_k else ablation["pretrain"]
    splits = recall_splits(recall_shares)
    ns = sorted({n for v in splits.values() for n in v}, reverse=True)
    pre_two_stage = {f"N={n}": _both(pre, ds, split, protocol, n) for n in ns}
    if best is pre:
        two_stage = pre_two_stage
    else:
        two_stage = {f"N={n}": _both(best, ds, split, protocol, n) for n in ns}
    selected = {}
    for k, candidates in splits.items():
        # N = k: one stage. Validation ties go to the larger N, one stage first.
        runs = {n: two_stage[f"N={n}"] for n in candidates} | {k: one_stage}
        n = max(runs, key=lambda n: (runs[n]["valid"][f"NDCG@{k}"], n))
        pre_n = pre_two_stage[f"N={n}"] if n < k else ablation["pretrain"]  # same N
        selected[f"@{k}"] = {
            "N": n, "M": k - n, **{m: runs[n]["test"][f"{m}@{k}"] for m in ("HR", "NDCG")},
            "pretrain+two_stage": {m: pre_n["test"][f"{m}@{k}"] for m in ("HR", "NDCG")},
        }  # fmt: skip
    ablation |= {
        "best_K": best_k, "prompt+two_stage": two_stage, "pretrain+two_stage": pre_two_stage,
        "selected": selected,
    }  # fmt: skip
    at10 = selected["@10"]
    best.recall_n = at10["N"] if at10["M"] else None  # M = 0: one stage
    return best, {
        "ablation": ablation, "stages": stages, "recall_n": best.recall_n,
        "best_stage": f"prompt_k{best_k}" if best_k else "pretrain",
    }  # fmt: skip


def print_ablation(ablation: dict) -> None:
    """The ablation's test HR / NDCG @5, @10, @20, one line per variant."""

    def line(name: str, test: dict) -> str:
        cells = " ".join(f"{m}@{k}={test[f'{m}@{k}']:.4f}" for k in CUTOFFS for m in ("HR", "NDCG"))
        return f"{name:24s} {cells}"

    print(line("pretrain", ablation["pretrain"]["test"]))
    for name, value in ablation["prompt"].items():
        print(line(f"prompt {name}", value["test"]))
    for name, value in ablation["prompt+two_stage"].items():
        model = f"prompt K={ablation['best_K']}" if ablation["best_K"] else "pretrain"
        print(line(f"{model} two-stage {name}", value["test"]))
    for k, sel in ablation["selected"].items():
        print(f"selected {k}: N={sel['N']} M={sel['M']} HR={sel['HR']:.4f} NDCG={sel['NDCG']:.4f} "
              f"(pretrain, same N: HR={sel['pretrain+two_stage']['HR']:.4f} "
              f"NDCG={sel['pretrain+two_stage']['NDCG']:.4f})")  # fmt: skip
