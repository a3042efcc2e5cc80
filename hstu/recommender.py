"""HSTU and SASRec as `eval.recommender.Recommender`s for `tools.leaderboard`.

Each model has a published preset per data-set family (`PRESETS`: MovieLens, the rest);
the budget adjusts it:

* `full`: the preset as published (its epochs, patience and history length, the data
  set's `DatasetSpec.max_seq_len`);
* `demo`: under a minute per model on ml-100k on 2 CPU cores: history 50 with every
  training target in some window (`window_stride` 49), 20 epochs, patience 10, and the
  full-catalogue softmax, which beats sampled softmax on small catalogues at equal epochs
  (ml-100k test NDCG@10 at 30 epochs: SASRec 0.098 vs 0.058, HSTU 0.091 vs 0.079; at 20
  epochs SASRec 0.087, HSTU 0.091, in two thirds of the time). Above
  `FULL_SOFTMAX_MAX_ITEMS` items its cost (tokens x items) is not a demo's: there the demo
  keeps sampled softmax with 256 negatives per row. RecGPT's prompt-tuning, whose softmax
  head always spans the catalogue, runs one epoch above `DEMO_PROMPT_MAX_ITEMS` items.
"""

from __future__ import annotations

import numpy as np

from eval import data
from eval.data.dataset import Dataset, EvalExamples
from eval.data.splits import Split
from eval.recommender import Recommender
from hstu.recgpt_stages import fit_recgpt
from hstu.trainer import Trainer, make_trainer

BUDGETS: dict[str, dict] = {
    "demo": dict(max_seq_len=50, window_stride=49, num_epochs=20, patience=10, loss="full_softmax"),
    "full": dict(),
}
FULL_SOFTMAX_MAX_ITEMS = 4096
DEMO_LARGE_CATALOGUE = dict(loss="sampled_softmax", num_negatives=256, negatives_shared="sequence")
# RecGPT's demo prompt-tuning above this many items: amazon-sports-2014 (18,357 items) takes
# 3.9 s a step on one core, ~9 min an epoch, so the demo's 10 epochs would take 1.5 hours;
# amazon-scientific-2018 (4,344) takes 17 s an epoch and gains on validation through all 10
# (NDCG@10 0.0601 after one, 0.0811 after ten).
DEMO_PROMPT_MAX_ITEMS = 8192
DEMO_LARGE_CATALOGUE_PROMPT = dict(num_epochs=1)


def is_movielens(name: str) -> bool:
    return name.startswith("ml-")


def large_demo(ds: Dataset, budget: str, max_items: int = FULL_SOFTMAX_MAX_ITEMS) -> bool:
    """Whether `budget` is the demo on a catalogue of more than `max_items` items."""
    return budget == "demo" and ds.num_items > max_items


class _Sequential(Recommender):
    # "movielens" / "other" -> preset name; a data set's own name, where validation chose
    # another preset for it, overrides its family's.
    presets: dict[str, str]

    def preset(self, ds: Dataset) -> str:
        family = "movielens" if is_movielens(ds.name) else "other"
        return self.presets.get(ds.name, self.presets[family])

    def budget_overrides(self, ds: Dataset, budget: str) -> dict:
        """The preset overrides of `budget` on `ds` (before `tuned`): its history length,
        the budget's settings, the demo's sampled softmax on a large catalogue."""
        spec = data.DATASETS.get(ds.name)
        overrides = {"max_seq_len": spec.max_seq_len if spec else None, **BUDGETS[budget]}
        if large_demo(ds, budget):
            overrides |= DEMO_LARGE_CATALOGUE
        return overrides

    def fit(self, ds: Dataset, split: Split, *, budget: str, seed: int) -> dict:
        spec = data.DATASETS.get(ds.name)
        preset, tuned = self.preset(ds), self.tuned_for(budget, ds.name)
        overrides = {**self.budget_overrides(ds, budget), **tuned, "seed": seed}
        self.trainer: Trainer = make_trainer(preset, ds.num_items, overrides)
        protocol = spec.protocol if spec else "full"
        info = self.trainer.fit(ds, split, None, protocol, progress=True)
        return {
            "preset": preset, "overrides": tuned, "steps": info.steps, "best_step": info.best_step,
            "stopped_early": info.stopped_early, "valid_NDCG@10": info.valid.get("NDCG@10"),
            "curve": info.curve,
        }  # fmt: skip

    def score(self, examples: EvalExamples, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.trainer.scores(examples, index))


class RecGPTRecommender(_Sequential):
    """RecGPT (`hstu.recgpt_stages`): pre-training, prompt-tuning, two-stage recall, each
    chosen on validation (the pre-trained model where no prompt length beats it; one
    stage or the N at k = 10). The `demo` budget pre-trains as the other demos
    train (history-50 windows, full softmax) a one-layer (the README's count), 64-wide model
    for 30 epochs, then prompt-tunes with K = 1 for at most 10 epochs (ml-100k test
    NDCG@10: 0.102; 30 + 5 epochs 0.081, 20 + 5 0.077) and tries one stage against 9 + 1
    items (the paper's best split); ~1.7 min on 2 cores. The `full` budget tries K = 1, 2,
    3 and the shares 0.9, 0.8, 0.5 of each cutoff."""

    # Per-user rows memorise on Sports and Scientific, and help on Yelp (validation NDCG@10
    # of pre-training 0.0426 with them vs 0.0390 without; docs/results.md).
    presets = {"movielens": "recgpt", "other": "recgpt-nouser", "yelp-p5": "recgpt"}
    prompt_budgets: dict[str, dict] = {
        "demo": dict(prompt_lengths=(1,), prompt_overrides=dict(num_epochs=10, patience=5),
                     arch=dict(embedding_dim=64, ffn_dim=128, num_blocks=1, num_epochs=30,
                               negatives_not_in_sequence=False), recall_shares=(0.9,)),
        "full": dict(prompt_lengths=(1, 2, 3), prompt_overrides={}, arch={},
                     recall_shares=(0.9, 0.8, 0.5)),
    }  # fmt: skip

    def fit(self, ds: Dataset, split: Split, *, budget: str, seed: int) -> dict:
        spec = data.DATASETS.get(ds.name)
        plan = self.prompt_budgets[budget]
        tuned = self.tuned_for(budget, ds.name)  # pre-training settings, over the budget's
        overrides = {**self.budget_overrides(ds, budget), **plan["arch"], **tuned, "seed": seed}
        protocol = spec.protocol if spec else "full"
        prompt = plan["prompt_overrides"] | (
            DEMO_LARGE_CATALOGUE_PROMPT if large_demo(ds, budget, DEMO_PROMPT_MAX_ITEMS) else {}
        )
        self.trainer, info = fit_recgpt(
            ds, split, overrides, preset=self.preset(ds), protocol=protocol,
            prompt_lengths=plan["prompt_lengths"], prompt_overrides=prompt,
            recall_shares=plan["recall_shares"],
        )  # fmt: skip
        self.ablation = info["ablation"]
        best = info["stages"][info["best_stage"]]
        return {
            "preset": self.preset(ds), "overrides": tuned, "steps": best["steps"],
            "best_step": best["best_step"],
            "stopped_early": best["stopped_early"], "valid_NDCG@10": best["valid"].get("NDCG@10"),
            "curve": best["curve"], "stage": info["best_stage"], "recall_n": info["recall_n"],
            "pretrain_valid_NDCG@10": info["stages"]["pretrain"]["valid"].get("NDCG@10"),
        }  # fmt: skip


class HSTURecommender(_Sequential):
    """HSTU: the reference MovieLens settings (`hstu-ml`), `hstu-amazon` elsewhere."""

    presets = {"movielens": "hstu-ml", "other": "hstu-amazon"}
    # amazon-sports-2014 at `full`: SASRec's recipe (dot products, item dropout 0.2, dropout
    # 0.2, 256 negatives per row, end-aligned positions) on HSTU's blocks, with the preset's
    # patience 50: validation NDCG@10 0.0374 against the preset's 0.0354; test 0.0290
    # against 0.0274 (docs/results.md).
    tuned = {
        "full": {
            "amazon-sports-2014": dict(
                l2_norm_output=False, temperature=1.0, item_dropout=0.2, dropout_rate=0.2,
                num_negatives=256, positions="end", length_buckets=True,
            )
        }
    }  # fmt: skip


class SASRecRecommender(_Sequential):
    """SASRec: the HSTU paper's baseline on MovieLens (`sasrec-ml`), the eSASRec
    benchmark's sampled-softmax recipe (`sasrec-ss`) elsewhere.

    At the `full` budget on `amazon-cds-vinyl-2018` (histories of <= 10 items, 10,696
    training examples) it trains with dropout 0.5, the SASRec paper's rate for its sparse
    Amazon data: validation NDCG@10 0.0575 / 0.0576 / 0.0581 (seeds 0-2) against 0.0537 /
    0.0542 (seeds 0, 1) at the preset's 0.2 (docs/results.md)."""

    presets = {"movielens": "sasrec-ml", "other": "sasrec-ss"}
    tuned = {"full": {"amazon-cds-vinyl-2018": dict(dropout_rate=0.5)}}
