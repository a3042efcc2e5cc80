"""Next-item ranking metrics: HR@K, NDCG@K and MRR@K from 1-based target ranks.

With one target per example HR@K equals Recall@K; NDCG@K is 1 / log2(rank + 1) when
rank <= K, else 0; MRR@K is 1 / rank when rank <= K, else 0; `MRR` has no cutoff.

Conventions shared by every function here:
  * item ids are dense 1..N and column 0 of a score matrix is the padding item, which is
    never ranked;
  * ties are ranked pessimistically: the target's rank is 1 + the number of other,
    non-excluded items whose score is >= the target's score, so a constant scorer gets
    the worst rank, never the best;
  * a target that is absent from a ranked list has rank `np.inf` (never a hit at any K,
    contributes 0 to every metric).

NumPy versions validate their inputs and raise `ValueError`; the jitted JAX versions
(`*_jax`) compute the same numbers on device without checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval.data.dataset import Ragged

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 20)


def check_targets(targets: np.ndarray, batch: int, num_columns: int, where: str) -> np.ndarray:
    """`targets` as an int array of shape [batch] with ids in 1..num_columns-1, else ValueError."""
    targets = np.asarray(targets)
    if targets.shape != (batch,):
        raise ValueError(f"{where}: targets must have shape ({batch},), got {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"{where}: targets must be integer item ids, got dtype {targets.dtype}")
    bad = (targets < 1) | (targets >= num_columns)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: target item id {int(targets[row])} at row {row} is outside 1..{num_columns - 1}"
        )
    return targets


def target_ranks(
    scores: np.ndarray, targets: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """1-based pessimistic rank of each target among all items (higher score = better).

    Args:
      scores: float [B, N+1] scores over item ids; column 0 (padding) is always excluded.
      targets: int [B] target item ids in 1..N.
      mask: optional bool [B, N+1]; True excludes that item from the ranking (e.g. items
        already in the history). The target itself is never excluded, even when masked.

    Returns:
      int64 [B] ranks in 1..N.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"target_ranks: scores must be [B, N+1], got shape {scores.shape}")
    batch, num_columns = scores.shape
    targets = check_targets(targets, batch, num_columns, "target_ranks")
    if np.isnan(scores).any():
        raise ValueError("target_ranks: scores contain NaN")
    rows = np.arange(batch)
    competitors = np.ones(scores.shape, dtype=bool)
    competitors[:, 0] = False
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != scores.shape:
            raise ValueError(
                f"target_ranks: mask shape {mask.shape} != scores shape {scores.shape}"
            )
        competitors &= ~mask
    competitors[rows, targets] = False
    target_scores = scores[rows, targets]
    return 1 + np.count_nonzero(competitors & (scores >= target_scores[:, None]), axis=1)


@jax.jit
def target_ranks_jax(
    scores: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Jitted `target_ranks` (same conventions, no input checks); returns int32 [B].

    NaN is ranked pessimistically instead of raising: a NaN competitor counts as beating
    the target and a NaN target is beaten by every competitor, so a diverged model can
    never score well.
    """
    columns = jnp.arange(scores.shape[1])
    is_target = columns[None, :] == targets[:, None]
    competitors = (columns[None, :] != 0) & ~is_target
    if mask is not None:
        competitors &= ~mask
    target_scores = jnp.take_along_axis(scores, targets[:, None], axis=1)
    beats = (scores >= target_scores) | jnp.isnan(scores) | jnp.isnan(target_scores)
    return 1 + jnp.sum(competitors & beats, axis=1, dtype=jnp.int32)


def ranks_from_lists(ranked_items: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank of each target in a ranked list of item ids (e.g. top-K retrieval output).

    Args:
      ranked_items: int [B, L] item ids, best first; 0 or -1 mark empty slots (which still
        occupy their position).
      targets: int [B] target item ids (>= 1).

    Returns:
      float64 [B]: first position of the target + 1, or `np.inf` when the target is absent.
    """
    ranked_items = np.asarray(ranked_items)
    targets = np.asarray(targets)
    if ranked_items.ndim != 2 or targets.shape != ranked_items.shape[:1]:
        raise ValueError(
            f"ranks_from_lists: need ranked_items [B, L] and targets [B], got "
            f"{ranked_items.shape} and {targets.shape}"
        )
    if (targets < 1).any():
        raise ValueError("ranks_from_lists: target ids must be >= 1 (0/-1 mark empty slots)")
    hits = ranked_items == targets[:, None]
    first = np.argmax(hits, axis=1).astype(np.float64) + 1.0
    return np.where(hits.any(axis=1), first, np.inf)


def history_mask(
    histories: Ragged | Sequence[Sequence[int]],
    num_items: int,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Bool [B, N+1] mask with True at every item id in each example's history.

    Args:
      histories: a `Ragged` of item ids (or a list of id lists) with one row per example.
      num_items: N; ids must lie in 0..N (0 = padding, harmless since column 0 is never ranked).
      rows: optional example indices to build the mask for (default: all rows, in order).
    """
    if not isinstance(histories, Ragged):
        histories = Ragged.from_rows(histories, dtype=np.int64)
    if rows is None:
        rows = np.arange(len(histories))
    rows = np.asarray(rows, dtype=np.int64)
    lengths = histories.lengths[rows]
    row_of_value = np.repeat(np.arange(len(rows)), lengths)
    # Position of each value inside the flat array: its row's start + its offset in the row.
    starts_out = np.cumsum(lengths) - lengths
    positions = np.arange(int(lengths.sum())) - np.repeat(
        starts_out - histories.offsets[rows], lengths
    )
    values = histories.values[positions]
    if values.size and (values.min() < 0 or values.max() > num_items):
        raise ValueError(f"history_mask: history item ids must lie in 0..{num_items}")
    mask = np.zeros((len(rows), num_items + 1), dtype=bool)
    mask[row_of_value, values] = True
    return mask


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean HR@k, NDCG@k, MRR@k for each k, plus uncut `MRR`, over 1-based ranks (inf = miss)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"metrics_from_ranks: need a non-empty [B] rank array, got {ranks.shape}")
    if np.isnan(ranks).any() or (ranks < 1).any():
        raise ValueError("metrics_from_ranks: ranks must be >= 1 (1-based; inf = absent)")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"metrics_from_ranks: cutoffs must be >= 1, got {tuple(ks)}")
    reciprocal = 1.0 / ranks
    gain = 1.0 / np.log2(ranks + 1.0)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, gain, 0.0).mean())
        out[f"MRR@{k}"] = float(np.where(hit, reciprocal, 0.0).mean())
    out["MRR"] = float(reciprocal.mean())
    return out


@jax.jit(static_argnames="ks")
def metrics_from_ranks_jax(
    ranks: jax.Array, ks: tuple[int, ...] = DEFAULT_KS
) -> dict[str, jax.Array]:
    """Jitted `metrics_from_ranks` (`ks` static, a tuple); returns scalar arrays."""
    ranks = jnp.asarray(ranks, dtype=jnp.float32)
    reciprocal = 1.0 / ranks
    gain = 1.0 / jnp.log2(ranks + 1.0)
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"HR@{k}"] = jnp.mean(hit.astype(jnp.float32))
        out[f"NDCG@{k}"] = jnp.mean(jnp.where(hit, gain, 0.0))
        out[f"MRR@{k}"] = jnp.mean(jnp.where(hit, reciprocal, 0.0))
    out["MRR"] = jnp.mean(reciprocal)
    return out
