"""Rendering metric dicts (as returned by `eval.protocols`) as Markdown and JSON tables."""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
from collections.abc import Mapping, Sequence

from eval.metrics import DEFAULT_KS

_CUTOFF_KEY = re.compile(r"^(?P<name>[A-Za-z_]+)@(?P<k>\d+)$")
MISSING = "-"


def _fmt(value) -> str:
    """Floats with 4 decimals, integers as is, absent values as `MISSING`."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{float(value):.4f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _metric_ks(metrics: Mapping[str, float], names: Sequence[str]) -> list[int]:
    """Cutoffs k of every `name@k` key in `metrics` with name in `names`."""
    found = (_CUTOFF_KEY.match(key) for key in metrics)
    return sorted({int(m["k"]) for m in found if m and m["name"] in names})


@dataclasses.dataclass
class ResultTable:
    """One model's metrics as a table: rows = metric names, columns = cutoffs @k.

    Columns are @1 @3 @5 @10 @20 plus any other cutoff present in `metrics`; cells with
    no value show `-`.
    """

    metrics: dict[str, float]
    rows: tuple[str, ...] = ("NDCG", "HR")

    @classmethod
    def from_json(cls, text: str, rows: tuple[str, ...] = ("NDCG", "HR")) -> ResultTable:
        return cls(json.loads(text), rows)

    @property
    def ks(self) -> list[int]:
        return sorted(set(DEFAULT_KS) | set(_metric_ks(self.metrics, self.rows)))

    def to_markdown(self) -> str:
        header = ["Metric", *(f"@{k}" for k in self.ks)]
        body = [
            [name, *(_fmt(self.metrics.get(f"{name}@{k}")) for k in self.ks)] for name in self.rows
        ]
        return _markdown(header, body)

    def to_json(self) -> str:
        plain = {
            key: int(v)
            if isinstance(v, numbers.Integral)
            else float(v)
            if isinstance(v, numbers.Real)
            else v
            for key, v in self.metrics.items()
        }
        return json.dumps(plain, indent=2, sort_keys=True)


def leaderboard_markdown(
    results: Mapping[str, Mapping[str, float]],
    ks: Sequence[int] = DEFAULT_KS,
    extra_columns: Sequence[str] = (),
    std: Mapping[str, Mapping[str, float]] | None = None,
    bold_best: bool = False,
) -> str:
    """Several models in one Markdown table.

    One row per model (in the given order); for each k the columns `NDCG@k` and `HR@k`,
    then the `extra_columns` (e.g. `train_s`, `invalid_rate`). Missing values show `-`.
    `std`: per model, a spread shown as `mean ± std` beside each metric it has;
    `bold_best`: the best value of each metric column in bold.
    """
    metric_columns = [f"{name}@{k}" for k in ks for name in ("NDCG", "HR")]
    best = {
        c: max((m[c] for m in results.values() if isinstance(m.get(c), numbers.Real)), default=None)
        for c in metric_columns
    }

    def cell(model: str, column: str) -> str:
        value = results[model].get(column)
        text = _fmt(value)
        spread = (std or {}).get(model, {}).get(column)
        if value is not None and spread is not None and column in best:
            text += f" ± {spread:.4f}"
        if bold_best and value is not None and best.get(column) == value:
            text = f"**{text}**"
        return text

    columns = metric_columns + list(extra_columns)
    body = [[model, *(cell(model, c) for c in columns)] for model in results]
    return _markdown(["Model", *columns], body)
