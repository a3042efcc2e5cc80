"""Next-item training losses of HSTU and SASRec, and their negative sampling.

`next_item_loss(model, batch, rng)` is the loss `eval.training` runs: every position t of
a right-padded training row predicts `ids[:, t + 1]`, with the model config's `loss`:
HSTU's sampled softmax (uniform negatives, temperature) or SASRec's BCE with one uniform
negative per position.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

NegativeSharing = Literal["position", "sequence", "batch"]
LossName = Literal["bce", "sampled_softmax"]


def sample_negatives(
    rng: jax.Array,
    shape: tuple[int, ...],
    num_items: int,
    num_negatives: int,
    shared: NegativeSharing = "position",
) -> jax.Array:
    """Uniform negative item ids in [1, num_items] for targets of `shape` [B, N].

    `shared="position"` draws R negatives per position, as the reference does
    ([B, N, R]); "sequence" shares them along each row ([B, 1, R]) and "batch" across the
    batch ([1, 1, R]). All are uniform over the catalogue; sharing makes the loss's
    negative-embedding gather and its gradient R*B*N times cheaper, which dominates a step
    on CPU. Shapes broadcast against [B, N, R] in `sampled_softmax_loss`.
    """
    sizes = {"position": shape, "sequence": (*shape[:-1], 1), "batch": (1,) * len(shape)}
    return jax.random.randint(rng, (*sizes[shared], num_negatives), 1, num_items + 1)


def sampled_softmax_loss(
    query: jax.Array,
    positive_emb: jax.Array,
    negative_emb: jax.Array,
    positive_ids: jax.Array,
    negative_ids: jax.Array,
    weights: jax.Array,
    temperature: float,
) -> jax.Array:
    """Weighted mean of -log softmax([pos, negs] / T)[0] (reference `SampledSoftmaxLoss`).

    Args:
      query: [..., D]; positive_emb: [..., D]; negative_emb: [..., R, D].
      positive_ids: [...]; negative_ids: [..., R] (a negative equal to the positive is masked).
      weights: [...] (0 on padding targets).
      temperature: softmax temperature.
    """
    pos = jnp.sum(query * positive_emb, axis=-1, keepdims=True) / temperature
    if all(s == 1 for s in negative_emb.shape[:-2]):  # shared by the batch: one 2-D matmul
        d = query.shape[-1]
        neg = (query.reshape(-1, d) @ negative_emb.reshape(-1, d).T).reshape(*query.shape[:-1], -1)
    else:
        neg = jnp.einsum("...d,...rd->...r", query, negative_emb)
    neg = neg / temperature
    neg = jnp.where(negative_ids == positive_ids[..., None], -5e4, neg)
    nll = -jax.nn.log_softmax(jnp.concatenate([pos, neg], axis=-1), axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


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
    pos_loss = jnp.sum(jax.nn.softplus(-pos) * pos_weights) / jnp.maximum(jnp.sum(pos_weights), 1.0)
    neg_loss = jnp.sum(jax.nn.softplus(neg) * neg_weights) / jnp.maximum(jnp.sum(neg_weights), 1.0)
    return pos_loss + neg_loss


def next_item_loss(model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array):
    """`(loss, aux)` of HSTU or SASRec on a training batch (dropout on).

    `batch` holds `ids` [B, N] (right-padded, target included), `timestamps` [B, N] and
    `lengths` [B]; position t predicts `ids[:, t + 1]`.
    """
    cfg = model.cfg
    drop_rng, neg_rng = jax.random.split(rng)
    out = model(
        batch["ids"], batch["timestamps"], batch["lengths"], False, rngs=nnx.Rngs(dropout=drop_rng)
    )[:, :-1]
    targets = batch["ids"][:, 1:]
    weights = (targets != 0).astype(out.dtype)
    if cfg.loss == "bce":
        negatives = sample_negatives(neg_rng, targets.shape, cfg.num_items, 1)[..., 0]
        loss = bce_loss(
            out,
            model.item_embeddings(targets),
            model.item_embeddings(negatives),
            weights,
            weights * (negatives != targets),
        )
    elif cfg.loss == "sampled_softmax":
        negatives = sample_negatives(
            neg_rng, targets.shape, cfg.num_items, cfg.num_negatives, cfg.negatives_shared
        )
        loss = sampled_softmax_loss(
            out,
            model.item_embeddings(targets),
            model.item_embeddings(negatives),
            targets,
            negatives,
            weights,
            cfg.temperature,
        )
    else:
        raise ValueError(f"loss must be 'bce' or 'sampled_softmax', got {cfg.loss!r}")
    return loss, {}
