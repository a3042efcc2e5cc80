"""The item table HSTU, SASRec and RecGPT score against: L2 normalisation, item scores
and the tables full ranking multiplies queries with; the positions of their inputs."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

L2_EPS = 1e-6
Positions = Literal["start", "end"]


def l2_normalize(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
    """x / max(||x||, eps) along the last axis (reference `L2NormEmbeddingPostprocessor`).

    Written as x * rsqrt(max(|x|^2, eps^2)) so that zero rows (padding) get zero, not NaN,
    gradients.
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def last_position(out: jax.Array, lengths: jax.Array) -> jax.Array:
    """out [B, N, ...] at each row's last real position (lengths - 1)."""
    return out[jnp.arange(out.shape[0]), jnp.maximum(lengths - 1, 0)]


def position_ids(ids: jax.Array, max_seq_len: int, positions: Positions) -> jax.Array:
    """Position of every slot of right-padded ids [B, N]: [N] from the start, or [B, N]
    aligned so that each row's last item is at max_seq_len - 1 (padding clipped)."""
    n = ids.shape[1]
    if positions == "start":
        return jnp.arange(n)
    lengths = jnp.sum(ids != 0, axis=1, keepdims=True)
    return jnp.clip(max_seq_len - lengths + jnp.arange(n), 0, max_seq_len - 1)


class ItemScores:
    """Mixin for a model with an `item_emb` table (`nnx.Embed`, row 0 = padding) whose
    items are L2-normalised when `normalize_items` is True."""

    normalize_items: bool

    def item_rows(self, item_ids: jax.Array, table: jax.Array | None = None) -> jax.Array:
        """Raw rows [..., D] of `table` (training's dropped table) or of `item_emb`."""
        return self.item_emb(item_ids) if table is None else table[item_ids]

    def item_embeddings(self, item_ids: jax.Array, table: jax.Array | None = None) -> jax.Array:
        """Item embeddings [..., D] (L2-normalised when `normalize_items`), from `table`
        when given."""
        emb = self.item_rows(item_ids, table)
        return l2_normalize(emb) if self.normalize_items else emb

    def item_table(self, table: jax.Array | None = None) -> jax.Array:
        """The whole item table [num_items + 1, D] (`table` when given), L2-normalised
        when `normalize_items`."""
        table = self.item_emb.embedding[...] if table is None else table
        return l2_normalize(table) if self.normalize_items else table

    def item_scores(self, query: jax.Array, item_ids: jax.Array | None = None) -> jax.Array:
        """Scores of query [..., D] against `item_ids` [..., C], or all items
        ([..., num_items + 1], padding item 0 set to -inf)."""
        if item_ids is None:
            return (query @ self.item_table().T).at[..., 0].set(-jnp.inf)
        return jnp.einsum("...d,...cd->...c", query, self.item_embeddings(item_ids))

    def query_scores(self, inputs: dict[str, jax.Array], recall_n: int | None = None) -> jax.Array:
        """Scores [B, num_items + 1] of `hstu.trainer.query_inputs` rows: the encoder's
        output at each row's last item against the item table (eval mode)."""
        if recall_n is not None:
            raise ValueError(f"{type(self).__name__} has no two-stage recall")
        return self.item_scores(self.query_embeddings(inputs))

    def query_embeddings(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """The encoder's output [B, D] at each `query_inputs` row's last item (eval mode)."""
        out = self(inputs["ids"], inputs["timestamps"], inputs["lengths"], True)
        return last_position(out, inputs["lengths"])

    # Full ranking as `queries @ table.T` (`eval.sharded_ranking` splits the table's rows):
    # the table ranked by and the table generated from (two-stage recall), with encoder
    # outputs h [B, D] mapped into each table's space.
    def ranking_table(self) -> jax.Array:
        """The rows [num_items + 1, D'] `query_scores` ranks by (row 0 padding)."""
        return self.item_table()

    def ranking_queries(self, h: jax.Array) -> jax.Array:
        """Encoder outputs h [B, D] as queries [B, D'] against `ranking_table`."""
        return h

    def generation_table(self) -> jax.Array:
        """The rows [num_items + 1, D'] a generated item is the argmax over."""
        return self.ranking_table()

    def generation_queries(self, h: jax.Array) -> jax.Array:
        """Encoder outputs h [B, D] as queries [B, D'] against `generation_table`."""
        return self.ranking_queries(h)
