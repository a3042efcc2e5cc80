"""Trainable rows of the frozen token tables: stage 1 of semantic-ID training.

`apply_rows(model, ids)` makes rows `ids` of the embedding (and of an untied LM head) the
only `RowParam` variables: the lookup of those ids and their logits read the rows, every
other token reads the frozen table. `TrainState(..., wrt=RowParam, frozen=nnx.Param)`
then trains those rows alone, with optimizer state of their size ([n, D], not [V, D]),
and leaves every other parameter bit-identical. `merge_rows` writes the rows back into
plain tables, so `save_hf` exports a normal checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_sft.model import Qwen


class RowParam(nnx.Param):
    """Trainable rows of a frozen table (an `nnx.Param` subtype, like `nnx.LoRAParam`)."""


class _Rows(nnx.Module):
    """`rows` [n, D] standing in for rows `ids` of a [V, D] table; `slot[v]` = its row or -1."""

    def __init__(self, table: jax.Array, ids: np.ndarray):
        ids = np.asarray(ids, np.int32)
        slot = np.full(table.shape[0], -1, np.int32)
        slot[ids] = np.arange(len(ids), dtype=np.int32)
        self.ids, self.slot = nnx.Variable(jnp.asarray(ids)), nnx.Variable(jnp.asarray(slot))
        self.rows = RowParam(jnp.asarray(table)[ids])

    def lookup(self, base: jax.Array, tokens: jax.Array) -> jax.Array:
        """`base` (the frozen table's rows of `tokens`, [..., D]) with the trained rows."""
        slot = self.slot[...][tokens]
        rows = self.rows[...][jnp.maximum(slot, 0)].astype(base.dtype)
        return jnp.where((slot >= 0)[..., None], rows, base)

    def logits(self, base: jax.Array, hidden: jax.Array) -> jax.Array:
        """`base` logits [..., V] with the trained rows' columns."""
        new = hidden @ self.rows[...].astype(hidden.dtype).T
        return base.at[..., self.ids[...]].set(new.astype(base.dtype))

    def merged(self, table: jax.Array) -> jax.Array:
        return table.at[self.ids[...]].set(self.rows[...].astype(table.dtype))


class RowEmbed(nnx.Module):
    """An `nnx.Embed` with trainable rows `ids`; same `__call__` / `attend` as the base."""

    def __init__(self, base: nnx.Embed, ids: np.ndarray):
        self.base, self.new = base, _Rows(base.embedding[...], ids)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.new.lookup(self.base(tokens), tokens)

    def attend(self, hidden: jax.Array) -> jax.Array:
        return self.new.logits(self.base.attend(hidden), hidden)


class RowHead(nnx.Module):
    """An untied LM head (`nnx.Linear` [D, V]) with trainable output columns `ids`."""

    def __init__(self, base: nnx.Linear, ids: np.ndarray):
        self.base, self.new = base, _Rows(base.kernel[...].T, ids)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.new.logits(self.base(hidden), hidden)


def apply_rows(model: Qwen, ids: np.ndarray) -> Qwen:
    """Makes rows `ids` of the embedding (and untied head) trainable `RowParam`s, in place."""
    model.embed_tokens = RowEmbed(model.embed_tokens, ids)
    if model.lm_head is not None:
        model.lm_head = RowHead(model.lm_head, ids)
    return model


def merge_rows(model: Qwen) -> Qwen:
    """Writes trained rows back into plain tables and restores `nnx.Embed` / `nnx.Linear`."""
    if isinstance(model.embed_tokens, RowEmbed):
        embed = model.embed_tokens
        embed.base.embedding.set_value(embed.new.merged(embed.base.embedding[...]))
        model.embed_tokens = embed.base
    if isinstance(model.lm_head, RowHead):
        head = model.lm_head
        head.base.kernel.set_value(head.new.merged(head.base.kernel[...].T).T)
        model.lm_head = head.base
    return model
