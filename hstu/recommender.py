"""HSTU and SASRec as `eval.recommender.Recommender`s for `tools.leaderboard`."""

from __future__ import annotations

import numpy as np

from eval import data
from eval.data.dataset import Dataset, EvalExamples
from eval.data.splits import Split
from eval.recommender import Recommender
from hstu.trainer import Trainer, make_trainer

# Overrides of the preset per leaderboard budget. `demo` must train in about a minute per
# model on ml-100k on a 2-core CPU: shorter sequences and negatives shared across the batch.
# `full` keeps the preset, with the data set's history length (`DatasetSpec.max_seq_len`).
BUDGETS: dict[str, dict] = {
    "demo": dict(
        max_seq_len=50, num_epochs=40, learning_rate=3e-3, negatives_shared="batch", patience=5
    ),
    "full": dict(patience=10),
}


class _Sequential(Recommender):
    preset: str

    def fit(self, ds: Dataset, split: Split, *, budget: str, seed: int) -> dict:
        overrides = {
            "max_seq_len": data.DATASETS[ds.name].max_seq_len,
            **BUDGETS[budget],
            "seed": seed,
        }
        self.trainer: Trainer = make_trainer(self.preset, ds.num_items, overrides)
        info = self.trainer.fit(ds, split, None, data.DATASETS[ds.name].protocol, progress=False)
        return {"steps": info.steps, "valid_NDCG@10": info.valid.get("NDCG@10")}

    def score(self, examples: EvalExamples, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.trainer.scores(examples, index))


class HSTURecommender(_Sequential):
    """HSTU, the reference MovieLens settings (`hstu-ml`), sampled softmax."""

    preset = "hstu-ml"


class SASRecRecommender(_Sequential):
    """SASRec with the same sampled-softmax loss and budget as HSTU (`sasrec-ml`)."""

    preset = "sasrec-ml"
