"""Next-item training losses of HSTU and SASRec, and their negative sampling.

`next_item_loss(model, batch, rng)` is the loss `eval.training` runs: every position t of
a right-padded training row predicts `ids[:, t + 1]`, with the model config's `loss`
(`LossConfig`, a base of both model configs):

* `"bce"`: SASRec's BCE with one uniform negative per position;
* `"sampled_softmax"`: -log softmax over the positive and `num_negatives` negatives, shared
  per position, row or batch, drawn uniformly or by training popularity (then with logQ
  correction: every logit minus log q(item), Yi et al. 2019); HSTU's loss;
* `"gbce"`: gSASRec's generalised BCE (Petrov & Macdonald, RecSys 2023) with calibration
  `gbce_t`: the positive's BCE term raised to beta = alpha (t (1 - 1/alpha) + 1/alpha),
  alpha = negatives / (num_items - 1);
* `"full_softmax"`: cross-entropy over the whole catalogue, computed in chunks of
  `softmax_chunk` items (no [tokens, num_items] logits kept for the backward pass).

Popularity sampling reads the training counts from the batch's constants
(`popularity_constants`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hstu.dropout import Dropout

NegativeSharing = Literal["position", "sequence", "batch"]
NegativeSampling = Literal["uniform", "popularity"]
LossName = Literal["bce", "sampled_softmax", "gbce", "full_softmax"]
LOSSES = ("bce", "sampled_softmax", "gbce", "full_softmax")
MASKED = -5e4  # logit of a negative equal to the positive (an "accidental hit")
NEGATIVE_TRIES = 8  # draws per negative for `negatives_not_in_sequence`
ITEM_DROPOUT_STREAM = 2  # folded into the step key for `item_dropout`'s mask


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The training loss of a next-item model (fields shared by every model config)."""

    loss: LossName = "sampled_softmax"
    num_negatives: int = 128
    negatives_shared: NegativeSharing = "position"
    negative_sampling: NegativeSampling = "uniform"
    temperature: float = 0.05
    gbce_t: float = 0.75  # gBCE calibration t in [0, 1] (0: plain BCE, 1: fully calibrated)
    softmax_chunk: int = 8192  # items per chunk of the full softmax
    # BCE's negatives redrawn (up to NEGATIVE_TRIES times) until not in the training row,
    # as kang205/SASRec and RecGPT sample them.
    negatives_not_in_sequence: bool = False
    # Dropout on the whole item table once per training step, read by both the inputs and
    # the scores, as RecTools 0.13's `IdEmbeddingsItemNet` (the eSASRec benchmark's SASRec)
    # does. On Sports it moves `sasrec-ss`'s best epoch from 8 to 59 and its test NDCG@10
    # from 0.0265 to 0.0324 (docs/results.md).
    item_dropout: float = 0.0


def popularity_constants(ids: np.ndarray, num_items: int) -> dict[str, np.ndarray]:
    """Training popularity of items 1..num_items from the training rows `ids` (0 = padding):
    `item_cdf` [num_items] (cumulative share, for inverse-CDF sampling) and `item_log_q`
    [num_items + 1] (log share; 0 for padding and for items never seen, never drawn)."""
    counts = np.bincount(np.asarray(ids).ravel(), minlength=num_items + 1)[: num_items + 1]
    counts[0] = 0
    q = counts / max(counts.sum(), 1)
    log_q = np.log(np.where(q > 0, q, 1.0)).astype(np.float32)
    return {"item_cdf": np.cumsum(q[1:]).astype(np.float32), "item_log_q": log_q}


def sample_negatives(
    rng: jax.Array,
    shape: tuple[int, ...],
    num_items: int,
    num_negatives: int,
    shared: NegativeSharing = "position",
    item_cdf: jax.Array | None = None,
) -> jax.Array:
    """Negative item ids in [1, num_items] for targets of `shape` [B, N].

    `shared="position"` draws R negatives per position ([B, N, R]); "sequence" shares them
    along each row ([B, 1, R]) and "batch" across the batch ([1, 1, R]). Sharing makes the
    negative-embedding gather and its gradient R*B*N times cheaper, which dominates a step
    on CPU. Uniform over the catalogue, or by popularity when `item_cdf` (from
    `popularity_constants`) is given. Shapes broadcast against [B, N, R].
    """
    sizes = {"position": shape, "sequence": (*shape[:-1], 1), "batch": (1,) * len(shape)}
    out_shape = (*sizes[shared], num_negatives)
    if item_cdf is None:
        return jax.random.randint(rng, out_shape, 1, num_items + 1)
    u = jax.random.uniform(rng, out_shape, maxval=item_cdf[-1])
    return jnp.minimum(jnp.searchsorted(item_cdf, u, side="right"), num_items - 1) + 1


def negatives_not_in(
    rng: jax.Array, shape: tuple[int, int], ids: jax.Array, num_items: int,
    tries: int = NEGATIVE_TRIES,
) -> jax.Array:  # fmt: skip
    """One uniform negative in [1, num_items] per position of `shape` [B, T], not among
    row b of ids [B, N]: the first of `tries` draws that is not (the last if all are)."""
    draws = jax.random.randint(rng, (*shape, tries), 1, num_items + 1)
    seen = jnp.any(draws[..., None] == ids[:, None, None, :], axis=-1)  # [B, T, tries]
    first_free = jnp.argmin(seen, axis=-1)  # 0 when every draw is seen: then the last
    pick = jnp.where(jnp.all(seen, axis=-1), tries - 1, first_free)
    return jnp.take_along_axis(draws, pick[..., None], axis=-1)[..., 0]


def _negative_logits(query: jax.Array, negative_emb: jax.Array) -> jax.Array:
    """query [..., D] . negative_emb [..., R, D] -> [..., R] (one 2-D matmul when shared)."""
    if all(s == 1 for s in negative_emb.shape[:-2]):  # shared by the batch
        d = query.shape[-1]
        return (query.reshape(-1, d) @ negative_emb.reshape(-1, d).T).reshape(*query.shape[:-1], -1)
    return jnp.einsum("...d,...rd->...r", query, negative_emb)


def _logits(query, positive_emb, negative_emb) -> tuple[jax.Array, jax.Array]:
    """(positive [...], negative [..., R]) dot-product logits."""
    return jnp.sum(query * positive_emb, axis=-1), _negative_logits(query, negative_emb)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def sampled_softmax_loss(
    query: jax.Array,
    positive_emb: jax.Array,
    negative_emb: jax.Array,
    positive_ids: jax.Array,
    negative_ids: jax.Array,
    weights: jax.Array,
    temperature: float,
    log_q: jax.Array | None = None,
) -> jax.Array:
    """Weighted mean of -log softmax([pos, negs] / T)[0] (reference `SampledSoftmaxLoss`).

    Args:
      query: [..., D]; positive_emb: [..., D]; negative_emb: [..., R, D].
      positive_ids: [...]; negative_ids: [..., R] (a negative equal to the positive is masked).
      weights: [...] (0 on padding targets).
      temperature: softmax temperature.
      log_q: [num_items + 1] log sampling probabilities: when given (popularity sampling),
        every logit is corrected by - log q(item).
    """
    pos, neg = _logits(query, positive_emb, negative_emb)
    pos, neg = pos[..., None] / temperature, neg / temperature
    if log_q is not None:
        pos, neg = pos - log_q[positive_ids][..., None], neg - log_q[negative_ids]
    neg = jnp.where(negative_ids == positive_ids[..., None], MASKED, neg)
    nll = -jax.nn.log_softmax(jnp.concatenate([pos, neg], axis=-1), axis=-1)[..., 0]
    return _weighted_mean(nll, weights)


def bce_loss(
    query: jax.Array,
    positive_emb: jax.Array,
    negative_emb: jax.Array,
    pos_weights: jax.Array,
    neg_weights: jax.Array,
) -> jax.Array:
    """SASRec loss: mean BCE(pos logit, 1) + mean BCE(neg logit, 0) over weighted positions."""
    pos = jnp.sum(query * positive_emb, axis=-1)
    neg = jnp.sum(query * negative_emb, axis=-1)
    return _weighted_mean(jax.nn.softplus(-pos), pos_weights) + _weighted_mean(
        jax.nn.softplus(neg), neg_weights
    )


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """gSASRec's beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = R / (num_items - 1)."""
    alpha = num_negatives / max(num_items - 1, 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce_loss(
    query: jax.Array,
    positive_emb: jax.Array,
    negative_emb: jax.Array,
    positive_ids: jax.Array,
    negative_ids: jax.Array,
    weights: jax.Array,
    beta: float,
) -> jax.Array:
    """gBCE: mean over weighted positions of [beta * BCE(pos, 1) + sum_r BCE(neg_r, 0)] /
    (1 + R), i.e. gSASRec's BCE-with-logits mean with the positive probability ** beta;
    negatives equal to the positive are left out."""
    pos, neg = _logits(query, positive_emb, negative_emb)
    hit = negative_ids == positive_ids[..., None]
    neg_terms = jnp.sum(jnp.where(hit, 0.0, jax.nn.softplus(neg)), axis=-1)
    per_position = (beta * jax.nn.softplus(-pos) + neg_terms) / (1 + neg.shape[-1])
    return _weighted_mean(per_position, weights)


def chunked_softmax_loss(
    query: jax.Array,
    table: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    temperature: float = 1.0,
    chunk: int = 8192,
) -> jax.Array:
    """Weighted mean of -log softmax(query . table[1:] / T)[target] over the catalogue.

    query [..., D]; table [num_items + 1, D] (row 0 = padding, never a class); targets,
    weights [...]. The log-partition is accumulated over item chunks by a rematerialised
    scan, so neither pass keeps more than one [tokens, chunk] block of logits.
    """
    d = query.shape[-1]
    q = query.reshape(-1, d)
    n_rows = table.shape[0]
    chunk = max(1, min(chunk, n_rows))
    n_chunks = -(-n_rows // chunk)
    padded = jnp.pad(table, ((0, n_chunks * chunk - n_rows), (0, 0))).reshape(n_chunks, chunk, d)

    @jax.checkpoint
    def body(carry, xs):
        block, start = xs
        logits = (q @ block.T) / temperature
        col = start + jnp.arange(chunk)
        logits = jnp.where((col > 0) & (col < n_rows), logits, -jnp.inf)
        return jnp.logaddexp(carry, jax.nn.logsumexp(logits, axis=-1)), None

    starts = jnp.arange(n_chunks) * chunk
    lse, _ = jax.lax.scan(body, jnp.full(q.shape[0], -jnp.inf, q.dtype), (padded, starts))
    pos = jnp.sum(q * table[targets.reshape(-1)], axis=-1) / temperature
    return _weighted_mean(lse - pos, weights.reshape(-1))


def next_item_loss(model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array):
    """`(loss, aux)` of HSTU or SASRec on a training batch (dropout on).

    `batch` holds `ids` [B, N] (right-padded, target included), `timestamps` [B, N] and
    `lengths` [B]; position t predicts `ids[:, t + 1]`. With popularity sampling it also
    holds the `popularity_constants`.
    """
    cfg = model.cfg
    drop_rng, neg_rng = jax.random.split(rng)
    table = Dropout(cfg.item_dropout)(
        model.item_emb.embedding[...],
        deterministic=False,
        rngs=nnx.Rngs(dropout=jax.random.fold_in(rng, ITEM_DROPOUT_STREAM)),
    )
    ids = batch["ids"]
    if getattr(cfg, "positions", "start") == "end":
        # The newest input, not the target, at max_seq_len - 1, as at query time.
        ids = jnp.where(jnp.arange(ids.shape[1]) < batch["lengths"][:, None] - 1, ids, 0)
    out = model(
        ids, batch["timestamps"], batch["lengths"], False, rngs=nnx.Rngs(dropout=drop_rng),
        users=batch.get("users"), item_table=table,
    )[:, :-1]  # fmt: skip
    targets = batch["ids"][:, 1:]
    weights = (targets != 0).astype(out.dtype)
    if cfg.loss == "full_softmax":
        loss = chunked_softmax_loss(
            out, model.item_table(table), targets, weights, cfg.temperature, cfg.softmax_chunk
        )
        return loss, {}
    popularity = cfg.negative_sampling == "popularity"
    if popularity and "item_cdf" not in batch:
        raise ValueError("negative_sampling='popularity' needs the batch's popularity_constants")
    cdf = batch["item_cdf"] if popularity else None
    if cfg.negatives_not_in_sequence and (cfg.loss != "bce" or popularity):
        raise ValueError("negatives_not_in_sequence is for loss='bce' with uniform negatives")
    if cfg.loss == "bce":
        if cfg.negatives_not_in_sequence:
            negatives = negatives_not_in(neg_rng, targets.shape, batch["ids"], cfg.num_items)
        else:
            negatives = sample_negatives(neg_rng, targets.shape, cfg.num_items, 1, item_cdf=cdf)
            negatives = negatives[..., 0]
        loss = bce_loss(
            out,
            model.item_embeddings(targets, table),
            model.item_embeddings(negatives, table),
            weights,
            weights * (negatives != targets),
        )
        return loss, {}
    negatives = sample_negatives(
        neg_rng, targets.shape, cfg.num_items, cfg.num_negatives, cfg.negatives_shared, cdf
    )
    emb = model.item_embeddings
    args = (out, emb(targets, table), emb(negatives, table), targets)
    if cfg.loss == "sampled_softmax":
        log_q = batch["item_log_q"] if popularity else None
        loss = sampled_softmax_loss(*args, negatives, weights, cfg.temperature, log_q)
    elif cfg.loss == "gbce":
        beta = gbce_beta(cfg.num_negatives, cfg.num_items, cfg.gbce_t)
        loss = gbce_loss(*args, negatives, weights, beta)
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    return loss, {}
