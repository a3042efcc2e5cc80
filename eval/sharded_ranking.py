"""Full ranking against an item table split by rows over a mesh axis, per shard.

`ranks_and_top_k(queries, table, targets, history, k, mesh, axis)` scores each query
against every item on the device that holds it: no [batch, num_items] array is ever built
on one device (each holds [batch, num_items / shards]). Per shard it applies the history
filter (history items out, the target never), counts the competitors that beat the
target (`eval.metrics.target_ranks_jax`'s pessimistic ties and NaN rule) and takes its top
k; the counts are summed and the k-lists merged across shards. Ranks and lists equal the
unsharded computation's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def _shard(queries, table, targets, history, *, k: int, axis: str):
    rows = table.shape[0]
    offset = jax.lax.axis_index(axis) * rows
    ids = offset + jnp.arange(rows)
    scores = queries @ table.T  # [B, rows]
    b = jnp.arange(queries.shape[0])[:, None]
    local = history - offset
    in_shard = (history != 0) & (local >= 0) & (local < rows)
    seen = (
        jnp.zeros(scores.shape, bool).at[b, jnp.where(in_shard, local, rows)].set(True, mode="drop")
    )
    is_target = ids[None, :] == targets[:, None]
    seen &= ~is_target  # the target is never filtered
    target_local = jnp.clip(targets - offset, 0, rows - 1)
    mine = (targets >= offset) & (targets < offset + rows)
    target_scores = jax.lax.psum(
        jnp.where(mine, jnp.take_along_axis(scores, target_local[:, None], 1)[:, 0], 0.0), axis
    )[:, None]
    competitors = (ids[None, :] != 0) & ~is_target & ~seen
    beats = (scores >= target_scores) | jnp.isnan(scores) | jnp.isnan(target_scores)
    ranks = 1 + jax.lax.psum(jnp.sum(competitors & beats, axis=1, dtype=jnp.int32), axis)
    ranked = jnp.where((ids[None, :] != 0) & ~seen, scores, -jnp.inf)
    top_scores, top = jax.lax.top_k(ranked, min(k, rows))
    all_scores = jax.lax.all_gather(top_scores, axis, axis=1, tiled=True)  # [B, shards * k]
    all_ids = jax.lax.all_gather(top + offset, axis, axis=1, tiled=True)
    best, where = jax.lax.top_k(all_scores, k)
    return ranks, jnp.take_along_axis(all_ids, where, axis=1), best


@functools.partial(jax.jit, static_argnames=("k", "mesh", "axis"))
def ranks_and_top_k(
    queries: jax.Array, table: jax.Array, targets: jax.Array, history: jax.Array, *,
    k: int, mesh: Mesh, axis: str = "model",
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """(ranks int32 [B], top-k item ids [B, k], their scores) of `queries` [B, D] against
    `table` [N + 1, D] (row 0 padding; rows split over `axis`), for `targets` [B] with
    `history` [B, H] (item ids, 0-padded) filtered; k <= N + 1."""
    run = jax.shard_map(
        functools.partial(_shard, k=k, axis=axis), mesh=mesh,
        in_specs=(P(), P(axis, None), P(), P()), out_specs=(P(), P(), P()), check_vma=False,
    )  # fmt: skip
    return run(queries, table, targets, history)
