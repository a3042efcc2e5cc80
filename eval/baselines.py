"""Two floor baselines every table carries: most-popular and item-to-item transitions."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from eval.data.dataset import Dataset, EvalExamples
from eval.data.splits import Split
from eval.recommender import Recommender


class MostPopular(Recommender):
    """Scores each item by its number of training interactions."""

    def fit(self, ds: Dataset, split: Split, *, budget: str, seed: int) -> dict:
        self.popularity = np.bincount(split.train.values, minlength=ds.num_items + 1).astype(
            np.float32
        )
        return {}

    def score(self, examples: EvalExamples, index: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.popularity, (len(index), len(self.popularity)))


class Transitions(MostPopular):
    """Next-item transition counts from the last history item, popularity as tie-break.

    score(j | last item i) = count(i -> j) + pop(j) / (max pop + 1), so transitions
    dominate and popularity orders items never seen after i.
    """

    def fit(self, ds: Dataset, split: Split, *, budget: str, seed: int) -> dict:
        super().fit(ds, split, budget=budget, seed=seed)
        seq = split.train
        nxt = np.ones(len(seq.values), dtype=bool)
        nxt[seq.offsets[1:][seq.lengths > 0] - 1] = False  # no transition out of a row's last item
        src = seq.values[:-1][nxt[:-1]]
        dst = seq.values[1:][nxt[:-1]]
        n = ds.num_items + 1
        self.counts = sp.csr_matrix((np.ones(len(src), np.float32), (src, dst)), shape=(n, n))
        self.backoff = self.popularity / (self.popularity.max() + 1)
        return {"transitions": int(len(src))}

    def score(self, examples: EvalExamples, index: np.ndarray) -> np.ndarray:
        ends = examples.history.offsets[np.asarray(index) + 1]
        has_history = examples.history.lengths[index] > 0
        last = np.where(has_history, examples.history.values[np.maximum(ends - 1, 0)], 0)
        return self.counts[last].toarray() + self.backoff
