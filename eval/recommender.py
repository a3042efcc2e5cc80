"""The interface every recommender implements to appear in `tools.leaderboard`.

A recommender is fitted on a `Split` and then either scores every item for a batch of
evaluation examples (`score`) or returns ranked item lists (`rank`, for generative models).
`evaluate` runs the data set's protocol on whichever the recommender provides.

Packages never import each other, so one model that builds on another's output (the
SID LLM on TIGER's semantic IDs) reads it from a file: a recommender names the models it
`needs`, writes what others may read under its `workdir`, and finds theirs in `inputs`.
"""

from __future__ import annotations

import abc
import dataclasses
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from eval import protocols
from eval.data.dataset import Dataset, EvalExamples
from eval.data.splits import Split
from eval.metrics import DEFAULT_KS, metrics_from_ranks, ranks_from_lists

BUDGETS = ("demo", "full")


class Recommender(abc.ABC):
    """Base class: implement `fit` and one of `score` / `rank`."""

    needs: tuple[str, ...] = ()  # registered models whose `workdir` files `fit` reads
    # Item fields `fit` generates or embeds text from: where no item has any, it is not run.
    item_text: tuple[str, ...] = ()
    # Budget -> data set -> config overrides that validation chose for that data set; `fit`
    # applies `tuned_for(budget, ds.name)` over the budget's config (`replace_nested`) and
    # reports it.
    tuned: Mapping[str, Mapping[str, dict]] = {}

    def __init__(
        self, workdir: pathlib.Path | None = None, inputs: Mapping[str, pathlib.Path] | None = None
    ):
        self.workdir = workdir  # where `fit` writes files for later models (None: nowhere)
        self.inputs = dict(inputs or {})  # {needed model: its workdir}

    def tuned_for(self, budget: str, dataset: str) -> dict:
        """The overrides `tuned` holds for `dataset` at `budget` ({} where none)."""
        return dict(self.tuned.get(budget, {}).get(dataset, {}))

    def validation(
        self, ds: Dataset, split: Split, max_rows: int | None, seed: int,
        use: Callable[[Any], None],
    ) -> Callable[[Any], dict[str, float]] | None:  # fmt: skip
        """A trainer's validation function (None where `max_rows` is None): `use(model)`
        makes `rank` / `score` read that model, then `evaluate` on a fixed seeded subset
        of `max_rows` validation examples (`EvalExamples.sample_rows`)."""
        if max_rows is None:
            return None
        valid = validation_rows(split, max_rows, seed)

        def validate(model: Any) -> dict[str, float]:
            use(model)
            return evaluate(self, ds, valid)

        return validate

    @abc.abstractmethod
    def fit(self, ds: Dataset, split: Split, *, budget: str, seed: int) -> dict:
        """Train on `split.train`; may select on `split.valid`. Returns info to report."""

    def score(self, examples: EvalExamples, index: np.ndarray) -> np.ndarray:
        """Scores [len(index), N+1] (higher = better) for examples `index`."""
        raise NotImplementedError

    def rank(self, examples: EvalExamples, index: np.ndarray, k: int) -> np.ndarray:
        """Ranked item ids [len(index), k] (0 = empty slot) for examples `index`."""
        raise NotImplementedError

    @property
    def generative(self) -> bool:
        return type(self).rank is not Recommender.rank


def replace_nested(config: Any, overrides: Mapping[str, Any]) -> Any:
    """Dataclass `config` with `overrides`; a mapping given for a dataclass field overrides
    that field's own fields (e.g. {"stage2": {"num_epochs": 8}})."""
    fields = {
        k: replace_nested(getattr(config, k), v)
        if isinstance(v, Mapping) and dataclasses.is_dataclass(getattr(config, k))
        else v
        for k, v in overrides.items()
    }
    return dataclasses.replace(config, **fields)


def validation_rows(split: Split, max_rows: int, seed: int) -> EvalExamples:
    """The fixed seeded subset of `max_rows` validation examples a run selects on."""
    return split.valid.take(split.valid.sample_rows(max_rows, seed))


def row_chunks(n: int) -> list[np.ndarray]:
    """Indices of `n` examples in the chunks (~256 each) that `evaluate` ranks."""
    return np.array_split(np.arange(n), max(1, n // 256))


def evaluate(
    rec: Recommender,
    ds: Dataset,
    examples: EvalExamples,
    protocol: str = "full",
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of `rec` on `examples` under `protocol` ('full' or 'sampled')."""
    if rec.generative:
        if protocol != "full":
            raise ValueError(f"protocol {protocol!r} needs scores; {type(rec).__name__} only ranks")
        k = max(ks)
        lists = np.concatenate([rec.rank(examples, idx, k) for idx in row_chunks(len(examples))])
        return {
            **metrics_from_ranks(ranks_from_lists(lists, examples.targets), ks),
            "num_examples": len(examples),
        }
    if protocol == "full":
        return protocols.full_ranking(
            lambda idx: rec.score(examples, idx), examples, ds.num_items, ks
        )
    if protocol == "sampled":

        def sampled(idx, candidates):
            return np.take_along_axis(rec.score(examples, idx), candidates, axis=1)

        return protocols.sampled_ranking(sampled, examples, ds.num_items, seed=seed, ks=ks)
    raise ValueError(f"unknown protocol {protocol!r}; use 'full' or 'sampled'")
