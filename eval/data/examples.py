"""Training examples for the trainers: padded prefixes and sliding windows, fed by grain.

All builders are vectorised index arithmetic over `Ragged` rows (no Python loop over items).
Padding uses item id 0. `side="left"` puts the most recent item in the last column;
`side="right"` starts every row at column 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import grain
import numpy as np

from eval.data.dataset import Ragged


def pad_windows(
    values: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    max_len: int,
    side: str = "left",
    pad=0,
) -> np.ndarray:
    """Rows `values[max(start, end - max_len):end]` padded to `[R, max_len]`."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    lengths = np.minimum(ends - starts, max_len)
    cols = np.arange(max_len)
    if side == "left":
        idx = ends[:, None] - max_len + cols
        valid = cols >= max_len - lengths[:, None]
    else:
        idx = ends[:, None] - lengths[:, None] + cols
        valid = cols < lengths[:, None]
    out = np.full((len(ends), max_len), pad, dtype=values.dtype)
    out[valid] = values[idx[valid]]
    return out


def pad(rows: Ragged, max_len: int, side: str = "left", pad_value=0) -> np.ndarray:
    """Each row's last `max_len` values, padded to `[len(rows), max_len]`."""
    return pad_windows(rows.values, rows.offsets[:-1], rows.offsets[1:], max_len, side, pad_value)


@dataclasses.dataclass
class PrefixExamples:
    """Every (history -> next item) position of the training sequences."""

    users: np.ndarray
    starts: np.ndarray  # flat index of each row's first item
    ends: np.ndarray  # flat index of the target (history = values[starts:ends])

    def __len__(self) -> int:
        return len(self.ends)


def prefix_examples(
    train: Ragged, min_history: int = 1, max_targets: int | None = None
) -> PrefixExamples:
    """Positions t >= min_history of every row: history row[:t], target row[t]; with
    `max_targets`, only each row's last `max_targets` positions (the most recent targets)."""
    lengths = train.lengths
    first_t = np.full(len(train), min_history, dtype=np.int64)
    if max_targets is not None:
        first_t = np.maximum(first_t, lengths - max_targets)
    n_ex = np.maximum(lengths - first_t, 0)
    users = np.repeat(np.arange(len(train), dtype=np.int32), n_ex)
    first = np.repeat(np.cumsum(n_ex) - n_ex, n_ex)
    t = np.arange(int(n_ex.sum())) - first + first_t[users]
    starts = train.offsets[:-1][users]
    return PrefixExamples(users, starts, starts + t)


class ArraySource(grain.sources.RandomAccessDataSource):
    """A grain source over equal-length arrays: record i is `{name: array[i]}`."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"arrays differ in length: { {k: len(a) for k, a in arrays.items()} }")
        self.arrays = dict(arrays)
        self._len = sizes.pop()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: a[index] for k, a in self.arrays.items()}


def prefix_source(train: Ragged, max_len: int, side: str = "left", timestamps: Ragged | None = None,
                  min_history: int = 1, max_targets: int | None = None) -> ArraySource:  # fmt: skip
    """grain source of padded (history, target) pairs for the training positions of `prefix_examples`."""
    ex = prefix_examples(train, min_history, max_targets)
    arrays = {
        "user": ex.users,
        "history": pad_windows(train.values, ex.starts, ex.ends, max_len, side),
        "target": train.values[ex.ends],
    }
    if timestamps is not None:
        arrays["history_ts"] = pad_windows(timestamps.values, ex.starts, ex.ends, max_len, side)
        arrays["target_ts"] = timestamps.values[ex.ends]
    return ArraySource(arrays)


def window_source(
    train: Ragged, max_len: int, side: str = "right", timestamps: Ragged | None = None
) -> ArraySource:
    """SASRec-style shifted windows, one per user with >= 2 items: the last `max_len + 1`
    items give `inputs = seq[:-1]` and `targets = seq[1:]` (every position predicts the next)."""
    users = np.flatnonzero(train.lengths >= 2).astype(np.int32)
    starts, ends = train.offsets[:-1][users], train.offsets[1:][users]
    arrays = {
        "user": users,
        "inputs": pad_windows(train.values, starts, ends - 1, max_len, side),
        "targets": pad_windows(train.values, starts + 1, ends, max_len, side),
    }
    if timestamps is not None:
        arrays["input_ts"] = pad_windows(timestamps.values, starts, ends - 1, max_len, side)
        arrays["target_ts"] = pad_windows(timestamps.values, starts + 1, ends, max_len, side)
    return ArraySource(arrays)


Buckets = tuple[Sequence[int], str, Sequence[str]]  # (widths, length key, sequence keys)


def _bucket_plan(source: ArraySource, batch_size: int, drop_remainder: bool,
                 buckets: Buckets | None):  # fmt: skip
    """(widths, bucket of each example, batches per bucket and epoch)."""
    n = len(source)
    if buckets is None:
        widths, bucket_of = [None], np.zeros(n, np.int64)
    else:
        widths, key, _ = sorted(buckets[0]), buckets[1], buckets[2]
        lengths = source.arrays[key]
        if lengths.max(initial=0) > widths[-1]:
            raise ValueError(f"buckets: a length {lengths.max()} exceeds the widest {widths}")
        bucket_of = np.searchsorted(widths, lengths, side="left")
    counts = np.bincount(bucket_of, minlength=len(widths))
    per_bucket = counts // batch_size if drop_remainder else -(-counts // batch_size)
    return widths, bucket_of, per_bucket


def batches_per_epoch(source: ArraySource, batch_size: int, *, drop_remainder: bool = True,
                      buckets: Buckets | None = None) -> int:  # fmt: skip
    """How many batches `batches(source, batch_size, ...)` makes per epoch."""
    return int(_bucket_plan(source, batch_size, drop_remainder, buckets)[2].sum())


class BatchSource(grain.sources.RandomAccessDataSource):
    """Record i is the i-th batch of a seeded per-epoch permutation of an `ArraySource`.

    Batching inside the source makes one grain record per batch (a vectorised gather), so a
    loader step costs microseconds instead of one Python call per example. Record indices
    run over all epochs, so a resumed loader at record r reproduces the same batches.

    With `buckets` = (widths, length key, sequence keys), every example goes to the first
    width >= its length; batches are drawn within a bucket and their sequence arrays cut to
    the bucket's width (a few static shapes instead of always the longest), the batch order
    shuffled per epoch. Short-sequence data (Amazon: median 6 of 50) then computes ~5x less.

    With `rows` (positions within a batch, e.g. `eval.distributed.process_rows`), record i
    holds only those rows of the i-th batch: each process of a multi-process run reads
    its part of the same global batch.
    """

    def __init__(
        self, source: ArraySource, batch_size: int, *, seed: int, shuffle: bool, drop_remainder: bool,
        num_epochs: int | None, buckets: Buckets | None = None, rows: np.ndarray | None = None,
    ):  # fmt: skip
        n = len(source)
        if rows is not None and not drop_remainder:
            raise ValueError("BatchSource: `rows` needs full batches (drop_remainder=True)")
        self._rows = rows
        self._epochs = num_epochs
        self._source, self._batch, self._seed, self._shuffle = source, batch_size, seed, shuffle
        self._buckets = buckets
        self._widths, self._bucket_of, self._per_bucket = _bucket_plan(
            source, batch_size, drop_remainder, buckets
        )
        self.batches_per_epoch = int(self._per_bucket.sum())
        if self.batches_per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} examples (drop_remainder)")
        self._plan_epoch, self._plan = -1, []

    def _epoch_plan(self, epoch: int) -> list[tuple[np.ndarray, int | None]]:
        """(rows, width) of every batch of `epoch`, in order."""
        n = len(self._source)
        rng = np.random.default_rng((self._seed, epoch))
        perm = rng.permutation(n) if self._shuffle else np.arange(n)
        plan = []
        for b, width in enumerate(self._widths):
            rows = perm[self._bucket_of[perm] == b]
            plan += [(rows[i * self._batch : (i + 1) * self._batch], width)
                     for i in range(self._per_bucket[b])]  # fmt: skip
        if self._shuffle and len(self._widths) > 1:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def __len__(self) -> int:
        return self.batches_per_epoch * (self._epochs or 1 << 40)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, b = divmod(int(index), self.batches_per_epoch)
        if epoch != self._plan_epoch:
            self._plan, self._plan_epoch = self._epoch_plan(epoch), epoch
        rows, width = self._plan[b]
        if self._rows is not None:
            rows = rows[self._rows]
        out = {k: a[rows] for k, a in self._source.arrays.items()}
        if width is not None:
            out |= {k: out[k][:, :width] for k in self._buckets[2]}
        return out


def batches(
    source: ArraySource,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    start_batch: int = 0,
    buckets: Buckets | None = None,
    rows: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """A seeded, reproducible grain loader of stacked numpy batches, reshuffled every epoch.

    Batch i depends only on (seed, i): `start_batch` starts at batch `start_batch` without
    building the ones before it (resume); `num_epochs=None` repeats forever. `buckets`:
    length-bucketed batches; `rows`: only those rows of each batch (see `BatchSource`).
    """
    batched = BatchSource(
        source,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_remainder=drop_remainder,
        num_epochs=num_epochs,
        buckets=buckets,
        rows=rows,
    )
    return iter(grain.MapDataset.source(batched)[start_batch:])
