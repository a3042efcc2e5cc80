"""Evaluation protocols for next-item recommendation; each returns metrics plus counts.

Every protocol reduces its inputs to 1-based target ranks and calls
`eval.metrics.metrics_from_ranks`, so all protocols report the same metric keys
(`HR@k`, `NDCG@k`, `MRR@k`, `MRR`) plus `num_examples` and protocol-specific counts.

Score functions are called on fixed-size batches of example indices: the last batch is
padded by repeating its final index (the padded rows are dropped afterwards), so a jitted
scorer compiles once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval.data.dataset import EvalExamples
from eval.distributed import to_host
from eval.metrics import (
    DEFAULT_KS,
    check_targets,
    history_mask,
    metrics_from_ranks,
    ranks_from_lists,
    target_ranks_jax,
)

_MAX_RESAMPLE_ROUNDS = 1000


def _padded_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(index, num_valid) pairs; every index has the same length min(batch_size, num_examples)."""
    if num_examples == 0:
        raise ValueError("no evaluation examples")
    size = min(batch_size, num_examples)
    for start in range(0, num_examples, size):
        index = np.arange(start, min(start + size, num_examples))
        yield np.pad(index, (0, size - len(index)), mode="edge"), len(index)


def _check_scores(scores, shape: tuple[int, int], name: str) -> None:
    if tuple(scores.shape) != shape:
        raise ValueError(f"{name}: score_fn returned shape {tuple(scores.shape)}, expected {shape}")


def _summary(ranks: np.ndarray, ks: Sequence[int], **counts) -> dict[str, float]:
    return {**metrics_from_ranks(ranks, ks), "num_examples": len(ranks), **counts}


def full_ranking(
    score_fn: Callable[[np.ndarray], np.ndarray | jax.Array],
    examples: EvalExamples,
    num_items: int,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
    filter_history: bool = True,
) -> dict[str, float]:
    """Rank each target against all N items.

    Args:
      score_fn: maps int64 example indices [B] (rows of `examples`; the caller builds the
        model inputs from them) to scores [B, N+1] over item ids (higher = better).
      examples: the evaluation examples.
      num_items: N.
      ks: metric cutoffs.
      batch_size: examples per `score_fn` call.
      filter_history: exclude items in each example's history from the ranking (the
        target itself is never excluded).
    """
    targets = check_targets(examples.targets, len(examples), num_items + 1, "full_ranking")

    def rank_fn(index: np.ndarray) -> jax.Array:
        scores = score_fn(index)
        _check_scores(scores, (len(index), num_items + 1), "full_ranking")
        mask = history_mask(examples.history, num_items, rows=index) if filter_history else None
        return target_ranks_jax(scores, targets[index].astype(np.int32), mask)

    return full_ranking_by_ranks(rank_fn, examples, ks, batch_size)


def full_ranking_by_ranks(
    rank_fn: Callable[[np.ndarray], np.ndarray | jax.Array],
    examples: EvalExamples,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
) -> dict[str, float]:
    """`full_ranking` for a model that ranks the catalogue itself (e.g. per shard of a
    split item table, `eval.sharded_ranking`): `rank_fn(index)` -> the targets' ranks [B]."""
    ranks = []
    for index, n in _padded_batches(len(examples), batch_size):
        ranks.append(to_host(rank_fn(index))[:n])  # rows split across processes: gathered
    return _summary(np.concatenate(ranks), ks)


def _draw_items(rng: np.random.Generator, num_items: int, probs: np.ndarray | None, size):
    """Item ids in 1..N, uniform (probs None) or with probabilities `probs` [N+1]."""
    if probs is None:
        return rng.integers(1, num_items + 1, size=size)
    return rng.choice(num_items + 1, size=size, p=probs)


def sample_negatives(
    examples: EvalExamples,
    num_items: int,
    num_negatives: int = 100,
    sampling: str = "uniform",
    popularity: np.ndarray | None = None,
    seed: int = 0,
    exclude_history: bool = True,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Negative item ids [E, num_negatives] (int32) for each example.

    Negatives are drawn with replacement (as in SASRec's evaluation) from 1..N, uniformly
    or proportionally to `popularity` [N+1], never equal to the target and, when
    `exclude_history`, never in the example's history. Forbidden draws are resampled in
    vectorised rounds. Example chunk c uses the generator seeded with (seed, c), so the
    result depends only on the seed and the examples.
    """
    if sampling not in ("uniform", "popularity"):
        raise ValueError(
            f"sample_negatives: sampling must be 'uniform' or 'popularity', got {sampling!r}"
        )
    targets = check_targets(examples.targets, len(examples), num_items + 1, "sample_negatives")
    probs = None
    if sampling == "popularity":
        if popularity is None:
            raise ValueError("sample_negatives: sampling='popularity' needs `popularity`")
        probs = np.asarray(popularity, dtype=np.float64).copy()
        if probs.shape != (num_items + 1,) or (probs < 0).any():
            raise ValueError(f"sample_negatives: popularity must be non-negative [{num_items + 1}]")
        probs[0] = 0.0
        if probs.sum() <= 0:
            raise ValueError("sample_negatives: popularity is zero for every item")
        probs /= probs.sum()
    out = np.empty((len(examples), num_negatives), dtype=np.int32)
    for chunk, start in enumerate(range(0, len(examples), chunk_size)):
        rows = np.arange(start, min(start + chunk_size, len(examples)))
        rng = np.random.default_rng([seed, chunk])
        if exclude_history:
            forbidden = history_mask(examples.history, num_items, rows=rows)
        else:
            forbidden = np.zeros((len(rows), num_items + 1), dtype=bool)
        forbidden[:, 0] = True
        forbidden[np.arange(len(rows)), targets[rows]] = True
        allowed_mass = (~forbidden).sum(1) if probs is None else (~forbidden) @ probs
        if (allowed_mass <= 0).any():
            row = int(rows[np.flatnonzero(allowed_mass <= 0)[0]])
            raise ValueError(
                f"sample_negatives: example {row} has no item left to sample as a negative"
            )
        negatives = _draw_items(rng, num_items, probs, (len(rows), num_negatives))
        bad = forbidden[np.arange(len(rows))[:, None], negatives]
        for round_ in range(_MAX_RESAMPLE_ROUNDS + 1):
            if not bad.any():
                break
            if round_ == _MAX_RESAMPLE_ROUNDS:
                raise RuntimeError(
                    f"sample_negatives: still drawing forbidden items after {round_} rounds"
                )
            r, c = np.nonzero(bad)
            negatives[r, c] = _draw_items(rng, num_items, probs, len(r))
            bad[r, c] = forbidden[r, negatives[r, c]]
        out[rows] = negatives
    return out


def sampled_ranking(
    score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray | jax.Array],
    examples: EvalExamples,
    num_items: int,
    num_negatives: int = 100,
    sampling: str = "uniform",
    popularity: np.ndarray | None = None,
    seed: int = 0,
    exclude_history: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
) -> dict[str, float]:
    """SASRec-style sampled ranking: the target against `num_negatives` sampled negatives.

    `score_fn(index [B], candidates [B, 1 + num_negatives]) -> scores [B, 1 + num_negatives]`
    where candidate column 0 is the target. Ties are pessimistic and a duplicated negative
    counts once per occurrence. Negatives come from `sample_negatives` (same arguments).
    """
    negatives = sample_negatives(
        examples, num_items, num_negatives, sampling, popularity, seed, exclude_history
    )
    candidates = np.concatenate([examples.targets[:, None].astype(np.int32), negatives], axis=1)
    ranks = []
    for index, n in _padded_batches(len(examples), batch_size):
        scores = score_fn(index, candidates[index])
        _check_scores(scores, candidates[index].shape, "sampled_ranking")
        # Prepend a padding column so that candidate j sits at column j + 1 (target at 1).
        padded = jnp.pad(jnp.asarray(scores), ((0, 0), (1, 0)))
        ones = jnp.ones(len(index), dtype=jnp.int32)
        ranks.append(np.asarray(target_ranks_jax(padded, ones))[:n])
    return _summary(np.concatenate(ranks), ks, num_negatives=num_negatives)


def generative_ranking(
    generated: Sequence[Sequence[str]],
    targets: np.ndarray,
    titles: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Rank targets in ranked lists of generated item titles (exact match after strip()).

    Titles are compared, not ids: when several items share the target's title, generating
    that title is a hit. A generated string that matches no (non-empty) item title is
    invalid; it still occupies its rank position. Reports `invalid` (count),
    `invalid_rate` (share of all generated strings) and `num_generated`.

    Args:
      generated: per example, the generated strings, best first (rows may differ in length).
      targets: int [B] target item ids.
      titles: item titles indexed by item id (index 0 = padding).
    """
    targets = check_targets(targets, len(generated), len(titles), "generative_ranking")
    title_keys: dict[str, int] = {}
    for title in titles[1:]:
        title = title.strip()
        if title:
            title_keys.setdefault(title, len(title_keys) + 1)
    target_keys = np.array([title_keys.get(titles[t].strip(), 0) for t in targets])
    if (target_keys == 0).any():
        item = int(targets[np.flatnonzero(target_keys == 0)[0]])
        raise ValueError(f"generative_ranking: target item {item} has an empty title")
    lengths = np.array([len(row) for row in generated], dtype=np.int64)
    flat = np.array(
        [title_keys.get(s.strip(), -1) for row in generated for s in row], dtype=np.int64
    )
    # Key matrix: a title key per generated string, -1 for invalid strings, 0 past a row's end.
    keys = np.zeros((len(generated), max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
    columns = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keys[np.repeat(np.arange(len(generated)), lengths), columns] = flat
    invalid = int((flat < 0).sum())
    return _summary(
        ranks_from_lists(keys, target_keys),
        ks,
        num_generated=len(flat),
        invalid=invalid,
        invalid_rate=invalid / len(flat) if len(flat) else 0.0,
    )


@jax.jit
def grounding_scores(
    gen_emb: jax.Array, item_emb: jax.Array, pop_norm: jax.Array, gamma: jax.Array | float
) -> jax.Array:
    """BIGRec grounding scores [B, N+1] (lower = better): `dist_norm * (1 + pop_norm) **
    -gamma`, dist_norm the L2 distance of each generated embedding [B, d] to every item
    embedding [N+1, d], min-max normalised over items 1..N of its row; where all N are
    equally far (e.g. a model whose title embeddings collapsed), dist_norm is 1, so that
    popularity orders them rather than the item ids."""
    sq = (
        jnp.sum(gen_emb**2, axis=1)[:, None]
        + jnp.sum(item_emb**2, axis=1)[None, :]
        - 2.0 * jnp.matmul(gen_emb, item_emb.T, precision=jax.lax.Precision.HIGHEST)
    )
    dist = jnp.sqrt(jnp.maximum(sq, 0.0))
    lo = jnp.min(dist[:, 1:], axis=1, keepdims=True)
    span = jnp.max(dist[:, 1:], axis=1, keepdims=True) - lo
    dist_norm = jnp.where(span > 0, (dist - lo) / jnp.where(span > 0, span, 1.0), 1.0)
    return dist_norm * (1.0 + pop_norm)[None, :] ** -gamma


def popularity_share(popularity: np.ndarray, num_rows: int, where: str) -> np.ndarray:
    """Popularity [N+1] (e.g. training counts) / its maximum over items 1..N, float32."""
    popularity = np.asarray(popularity, dtype=np.float64)
    if popularity.shape != (num_rows,) or (popularity < 0).any():
        raise ValueError(f"{where}: popularity must be non-negative [{num_rows}]")
    top = popularity[1:].max(initial=0.0)
    if top <= 0:
        raise ValueError(f"{where}: popularity is zero for every item")
    return (popularity / top).astype(np.float32)


@jax.jit
def _grounding_ranks_chunk(
    gen_emb: jax.Array,
    item_emb: jax.Array,
    pop_norm: jax.Array,
    targets: jax.Array,
    gammas: jax.Array,
) -> jax.Array:
    """Ranks [G, C] of the targets under each gamma for one chunk of C generated embeddings."""

    def ranks_for(gamma):
        return target_ranks_jax(-grounding_scores(gen_emb, item_emb, pop_norm, gamma), targets)

    return jax.lax.map(ranks_for, gammas)


def grounding_ranks(
    gen_emb: np.ndarray,
    item_emb: np.ndarray,
    targets: np.ndarray,
    popularity: np.ndarray | None = None,
    gammas: Sequence[float] = (0.0,),
    chunk_size: int = 256,
) -> np.ndarray:
    """BIGRec grounding ranks [G, B]: items ranked by popularity-adjusted L2 distance
    (`grounding_scores` under each gamma, pop_norm = popularity / max(popularity)), over
    row chunks of `chunk_size` (last chunk padded).
    """
    gen_emb = np.asarray(gen_emb, dtype=np.float32)
    item_emb = np.asarray(item_emb, dtype=np.float32)
    if gen_emb.ndim != 2 or item_emb.ndim != 2 or gen_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            f"grounding_ranks: need gen_emb [B, d] and item_emb [N+1, d], got "
            f"{gen_emb.shape} and {item_emb.shape}"
        )
    targets = check_targets(targets, len(gen_emb), len(item_emb), "grounding_ranks")
    gammas = np.asarray(gammas, dtype=np.float32).reshape(-1)
    if popularity is None:
        if (gammas != 0).any():
            raise ValueError("grounding_ranks: gamma != 0 needs `popularity`")
        pop_norm = np.zeros(len(item_emb), dtype=np.float32)
    else:
        pop_norm = popularity_share(popularity, len(item_emb), "grounding_ranks")
    ranks = []
    for index, n in _padded_batches(len(gen_emb), chunk_size):
        chunk = _grounding_ranks_chunk(
            gen_emb[index], item_emb, pop_norm, targets[index].astype(np.int32), gammas
        )
        ranks.append(np.asarray(chunk)[:, :n])
    return np.concatenate(ranks, axis=1)


def grounding_ranking(
    gen_emb: np.ndarray,
    item_emb: np.ndarray,
    targets: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    popularity: np.ndarray | None = None,
    gamma: float | Mapping[int, float] = 0.0,
    chunk_size: int = 256,
) -> dict[str, float]:
    """BIGRec grounding metrics (see `grounding_ranks`).

    `gamma` is one value, or a {k: gamma} map (e.g. from `select_gamma`) under which the
    metrics @k use gamma[k]; the uncut `MRR` then uses the gamma of the largest k. The
    gamma used for each k is reported as `gamma@k`.
    """
    per_k = dict(gamma) if isinstance(gamma, Mapping) else {int(k): float(gamma) for k in ks}
    missing = [k for k in ks if k not in per_k]
    if missing:
        raise ValueError(f"grounding_ranking: no gamma for cutoffs {missing}")
    gammas = sorted({float(per_k[k]) for k in ks})
    ranks = grounding_ranks(gen_emb, item_emb, targets, popularity, gammas, chunk_size)
    out: dict[str, float] = {}
    for k in sorted(ks):
        metrics = metrics_from_ranks(ranks[gammas.index(float(per_k[k]))], (k,))
        out.update(metrics)  # "MRR" ends up from the largest k
        out[f"gamma@{k}"] = float(per_k[k])
    out["num_examples"] = ranks.shape[1]
    return out


def select_gamma(
    gen_emb: np.ndarray,
    item_emb: np.ndarray,
    targets: np.ndarray,
    popularity: np.ndarray,
    gammas: Sequence[float],
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 256,
) -> dict[int, float]:
    """Best gamma per cutoff k by validation NDCG@k (ties go to the earliest in `gammas`)."""
    ranks = grounding_ranks(gen_emb, item_emb, targets, popularity, gammas, chunk_size)
    ndcg = np.array([[metrics_from_ranks(r, ks)[f"NDCG@{k}"] for k in ks] for r in ranks])
    best = np.argmax(ndcg, axis=0)
    return {int(k): float(gammas[g]) for k, g in zip(ks, best, strict=True)}
