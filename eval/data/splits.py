"""Train/valid/test splits of a `Dataset`.

- Leave-one-out (SASRec's rule): per user, the last item is the test target, the
  second-to-last the valid target, the rest is training. Users with fewer than 3
  interactions train on everything and are not evaluated (counted in the report); a data
  set where no user can be evaluated is a `DataFormatError`.
- Given examples (the BIGRec/D3 Amazon CSV): the `valid.csv`/`test.csv` rows are the
  evaluation examples. A user's training sequence is the part of their history strictly
  before their first evaluation target (in either file), so no evaluation target is ever
  trained on; the trainers take every prefix of it as an example.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from eval.data.dataset import Dataset, DropReport, EvalExamples, Ragged
from eval.errors import DataFormatError


@dataclasses.dataclass
class Split:
    """Per-user training sequences (row u = user u) and the evaluation examples."""

    train: Ragged
    train_timestamps: Ragged | None
    valid: EvalExamples
    test: EvalExamples
    rule: str
    report: DropReport

    def summary(self) -> dict[str, int]:
        lengths = self.train.lengths
        return {
            "train_users": int((lengths > 0).sum()),
            "train_interactions": int(lengths.sum()),
            "train_examples": int(np.maximum(lengths - 1, 0).sum()),
            "valid_examples": len(self.valid),
            "test_examples": len(self.test),
        }


def split(ds: Dataset) -> Split:
    """The data set's own split when it ships examples, else leave-one-out."""
    if "test" in ds.examples:
        return given_examples(ds)
    return leave_one_out(ds)


def leave_one_out(ds: Dataset, min_length: int = 3) -> Split:
    """Leave-one-out split (see module doc)."""
    lengths = ds.sequences.lengths
    evaluated = lengths >= min_length
    if not evaluated.any():
        raise DataFormatError(
            f"{ds.name}: no user has >= {min_length} interactions, so none can be evaluated "
            f"leave-one-out ({ds.num_users} users, longest sequence {int(lengths.max(initial=0))})"
        )
    report = DropReport()
    report.add(
        f"users with < {min_length} interactions (train only, not evaluated)",
        int((~evaluated).sum()),
    )
    train_len = np.where(evaluated, lengths - 2, lengths)
    users = np.flatnonzero(evaluated).astype(np.int32)
    starts = ds.sequences.offsets[:-1]

    def examples(n_hist: np.ndarray) -> EvalExamples:
        hist = ds.sequences.truncate(n_hist)
        return EvalExamples(
            users=users,
            history=hist.take(users),
            targets=ds.sequences.values[starts[users] + n_hist[users]],
            history_timestamps=ds.timestamps.truncate(n_hist).take(users)
            if ds.timestamps
            else None,
            target_timestamps=ds.timestamps.values[starts[users] + n_hist[users]]
            if ds.timestamps
            else None,
        )

    return Split(
        train=ds.sequences.truncate(train_len),
        train_timestamps=ds.timestamps.truncate(train_len) if ds.timestamps else None,
        valid=examples(lengths - 2),
        test=examples(lengths - 1),
        rule="leave-one-out",
        report=report,
    )


def given_examples(ds: Dataset) -> Split:
    """Split of a data set that ships its valid/test examples (see module doc)."""
    report = DropReport()
    n = ds.num_users
    first_target_ts = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    first_history_len = np.full(n, -1, dtype=np.int64)
    for ex in ds.examples.values():
        ts = (
            ex.target_timestamps
            if ex.target_timestamps is not None
            else np.zeros(len(ex), np.int64)
        )
        hist_len = ex.history.lengths
        order = np.argsort(ts, kind="stable")  # the order `read_amazon_csv` rebuilds in
        users = ex.users[order]
        first = np.unique(users, return_index=True)[1]
        cand_u, cand_t, cand_h = users[first], ts[order][first], hist_len[order][first]
        better = cand_t < first_target_ts[cand_u]
        first_target_ts[cand_u[better]] = cand_t[better]
        first_history_len[cand_u[better]] = cand_h[better]
    # The rebuilt sequence starts with the earliest row's history, so that history's length
    # is exactly the number of items before the user's first evaluation target.
    if not len(ds.examples["test"]):
        raise DataFormatError(f"{ds.name}: no test examples left ({ds.report.lines()})")
    train_len = np.maximum(first_history_len, 0)
    report.add("users without evaluation rows (not trained on)", int((first_history_len < 0).sum()))
    empty = EvalExamples(np.zeros(0, np.int32), Ragged.from_rows([]), np.zeros(0, np.int32))
    return Split(
        train=ds.sequences.truncate(train_len),
        train_timestamps=ds.timestamps.truncate(train_len) if ds.timestamps else None,
        valid=ds.examples.get("valid", empty),
        test=ds.examples["test"],
        rule="given examples (train = history before each user's first evaluation target)",
        report=report,
    )
