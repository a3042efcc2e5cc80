"""The canonical in-memory data set: an item table and per-user chronological sequences.

Item ids are dense, 1..N; 0 is padding. Sequences are stored CSR-style (one flat array
plus offsets) so they round-trip through `.npz` and slice without Python loops.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from eval.errors import FlagError


@dataclasses.dataclass
class DropReport:
    """Counts of what a loader dropped or changed, by reason; nothing is dropped silently."""

    counts: dict[str, int] = dataclasses.field(default_factory=lambda: collections.Counter())

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + int(n)

    def merge(self, other: DropReport) -> None:
        for reason, n in other.counts.items():
            self.add(reason, n)

    def lines(self) -> list[str]:
        return [f"{reason}: {n}" for reason, n in sorted(self.counts.items())]


@dataclasses.dataclass
class ItemTable:
    """Items indexed by dense id; row 0 is the padding item (empty strings)."""

    original_ids: list[str]
    titles: list[str]
    fields: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = len(self.original_ids)
        if len(self.titles) != n or any(len(v) != n for v in self.fields.values()):
            raise ValueError("item table columns must all have num_items + 1 rows")

    @property
    def num_items(self) -> int:
        return len(self.original_ids) - 1

    def has_text(self, keys: Sequence[str] = ("title",)) -> bool:
        """Whether any item 1..N has a non-empty value in one of `keys` (P5 data has none)."""
        columns = [self.titles if key == "title" else self.fields.get(key, []) for key in keys]
        return any(any(column[1:]) for column in columns)

    def text(self, item: int, keys: Sequence[str] = ("title",)) -> str:
        """`Key: value; ...` text of one item from the named fields (empty fields skipped)."""
        parts = []
        for key in keys:
            value = self.titles[item] if key == "title" else self.fields.get(key, [""] * 0)[item]
            if value:
                parts.append(f"{key.capitalize()}: {value}")
        return "; ".join(parts)


@dataclasses.dataclass
class Ragged:
    """Rows of variable length: `values[offsets[i]:offsets[i+1]]` is row i."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence], dtype=np.int32) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = (
            np.concatenate([np.asarray(r, dtype=dtype) for r in rows])
            if len(rows) and offsets[-1]
            else np.zeros(0, dtype=dtype)
        )
        return cls(values.astype(dtype, copy=False), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> Ragged:
        """The sub-table of the given rows, in that order."""
        return Ragged.from_rows([self[int(r)] for r in rows], dtype=self.values.dtype)

    def truncate(self, ends: np.ndarray) -> Ragged:
        """Row i cut to its first `ends[i]` values."""
        ends = np.minimum(np.asarray(ends, dtype=np.int64), self.lengths)
        keep = np.zeros(len(self.values), dtype=bool)
        starts = self.offsets[:-1]
        if len(self.values):
            delta = np.zeros(len(self.values) + 1, dtype=np.int64)
            np.add.at(delta, starts, 1)
            np.add.at(delta, starts + ends, -1)
            keep = np.cumsum(delta[:-1]) > 0
        offsets = np.zeros_like(self.offsets)
        np.cumsum(ends, out=offsets[1:])
        return Ragged(self.values[keep], offsets)


@dataclasses.dataclass
class EvalExamples:
    """Next-item examples: for row e, user `users[e]` saw `history[e]` and then `targets[e]`."""

    users: np.ndarray
    history: Ragged
    targets: np.ndarray
    history_timestamps: Ragged | None = None
    target_timestamps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def sample_rows(self, max_rows: int | None, seed: int) -> np.ndarray:
        """A fixed seeded subset of `max_rows` row indices, ascending (all rows when
        `max_rows` is None or not below their number): the rows a trainer selects on."""
        rows = np.arange(len(self))
        if max_rows is None or max_rows >= len(rows):
            return rows
        return np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))

    def take(self, rows: np.ndarray) -> EvalExamples:
        """Rows `rows` of every field, in that order."""
        rows = np.asarray(rows)
        ts = self.history_timestamps
        return EvalExamples(
            self.users[rows], self.history.take(rows), self.targets[rows],
            None if ts is None else ts.take(rows),
            None if self.target_timestamps is None else self.target_timestamps[rows],
        )  # fmt: skip


@dataclasses.dataclass
class Dataset:
    """Items plus each user's chronological interactions (dense item ids, 1-based).

    `examples` holds evaluation examples shipped with the data (the BIGRec/D3 CSV
    format's `valid`/`test` rows); for other formats splits are derived.
    """

    name: str
    items: ItemTable
    user_ids: list[str]
    sequences: Ragged
    timestamps: Ragged | None = None
    ratings: Ragged | None = None
    examples: dict[str, EvalExamples] = dataclasses.field(default_factory=dict)
    report: DropReport = dataclasses.field(default_factory=DropReport)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return self.items.num_items

    @property
    def num_interactions(self) -> int:
        return int(len(self.sequences.values))

    def require_text(self, who: str, keys: Sequence[str] = ("title",)) -> None:
        """`FlagError` unless some item has text in `keys`: `who` (a model that generates or
        embeds item text) cannot run on ids alone."""
        if not self.items.has_text(keys):
            raise FlagError(
                f"--dataset={self.name}: none of its {self.num_items} items has a "
                f"{' / '.join(keys)} ({who} needs item text; use a data set with titles, "
                "e.g. ml-100k or amazon-scientific-2018)"
            )

    def item_popularity(self) -> np.ndarray:
        """Interaction count per item id (index 0 = padding = 0)."""
        return np.bincount(self.sequences.values, minlength=self.num_items + 1)
