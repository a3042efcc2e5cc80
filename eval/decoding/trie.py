"""Prefix trie of the valid outputs for constrained decoding, stored as dense CSR arrays.

One trie type serves both generators: catalogue titles (token ids, each followed by an
EOS token: titles differ in length) and semantic IDs (L codes each, no terminator: all
sequences have length L). The path root -> ... ends at a leaf whose `leaf_index` is the
sequence's index. Node `n`'s children are `child_tokens[node_offsets[n]:node_offsets[n+1]]`
(sorted by token) leading to `child_nodes[...]`, so the jitted decoder gathers a row's
allowed tokens as a fixed-width `[rows, max_fanout]` slice without a `[num_nodes, vocab]`
table. Array sizes and `max_fanout` are rounded up to powers of two (padding nodes have
no children), so that catalogues of similar size share one compiled program; the last
node is always a childless padding node, where a row that left the trie stays (`dead`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class TrieArrays(NamedTuple):
    """The device-side part of a `Trie` (a pytree of int32 arrays)."""

    node_offsets: jax.Array  # [num_nodes + 1]
    child_tokens: jax.Array  # [num_edges]
    child_nodes: jax.Array  # [num_edges]
    leaf_index: jax.Array  # [num_nodes]: sequence index at a leaf, else -1


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True, eq=False)
class Trie:
    """Prefix trie of token sequences (root is node 0).

    Attributes:
      node_offsets, child_tokens, child_nodes, leaf_index: CSR arrays (see module doc).
      canonical: [num_sequences] index of the first sequence with the same tokens; decoding
        returns canonical indices (see `members`).
      max_fanout: padded maximum number of children of a node (static for jit).
      depth: longest sequence (+ EOS): the number of decode steps needed.
      eos_token_id: the terminating token, or None for fixed-length sequences.
      paths: [num_sequences, depth] the nodes each sequence passes through (root excluded,
        leaf last), padded with the dead node (`live_nodes` counts sequences per node).
    """

    node_offsets: np.ndarray
    child_tokens: np.ndarray
    child_nodes: np.ndarray
    leaf_index: np.ndarray
    canonical: np.ndarray
    max_fanout: int
    depth: int
    eos_token_id: int | None
    paths: np.ndarray

    @classmethod
    def build(
        cls,
        sequences: Sequence[Sequence[int]],
        eos_token_id: int | None,
        *,
        min_nodes: int = 0,
        min_fanout: int = 0,
    ) -> Trie:
        """The trie of `sequences` (token ids; EOS is appended when `eos_token_id` is set).

        Without EOS all sequences must have one length. `min_nodes` / `min_fanout` pad the
        arrays further (to share compiled shapes across catalogues). Raises ValueError on
        an empty sequence, one containing EOS or a negative id.
        """
        if not len(sequences):
            raise ValueError("Trie.build: no sequences")
        if eos_token_id is None and len({len(s) for s in sequences}) != 1:
            raise ValueError("Trie.build: sequences without EOS must all have one length")
        end = [] if eos_token_id is None else [int(eos_token_id)]
        children: list[dict[int, int]] = [{}]
        leaf_owner: dict[int, int] = {}
        canonical = np.empty(len(sequences), np.int32)
        walks: list[list[int]] = []
        for i, sequence in enumerate(sequences):
            tokens = [int(t) for t in sequence]
            if not tokens:
                raise ValueError(f"Trie.build: sequence {i} is empty")
            if eos_token_id in tokens or min(tokens) < 0:
                raise ValueError(
                    f"Trie.build: sequence {i} contains EOS={eos_token_id} or a negative id: {tokens}"
                )
            node, walk = 0, []
            for token in [*tokens, *end]:
                nxt = children[node].get(token)
                if nxt is None:
                    nxt = children[node][token] = len(children)
                    children.append({})
                node = nxt
                walk.append(node)
            walks.append(walk)
            canonical[i] = leaf_owner.setdefault(node, i)

        # Renumber breadth-first so that each node's children are contiguous, sorted by token.
        order, new_id = [0], {0: 0}
        for old in order:
            for token in sorted(children[old]):
                new_id[children[old][token]] = len(order)
                order.append(children[old][token])
        num_nodes = len(order)
        padded_nodes = _bucket(max(num_nodes + 1, min_nodes))  # >= 1 childless padding node
        fanout = max(len(c) for c in children)
        offsets = np.zeros(padded_nodes + 1, np.int32)
        offsets[1 : num_nodes + 1] = np.cumsum([len(children[old]) for old in order])
        offsets[num_nodes + 1 :] = offsets[num_nodes]
        tokens = np.zeros(padded_nodes, np.int32)  # num_edges = num_nodes - 1 < padded_nodes.
        nodes = np.zeros(padded_nodes, np.int32)
        for new, old in enumerate(order):
            start = offsets[new]
            for j, token in enumerate(sorted(children[old])):
                tokens[start + j] = token
                nodes[start + j] = new_id[children[old][token]]
        leaf_index = np.full(padded_nodes, -1, np.int32)
        for old, index in leaf_owner.items():
            leaf_index[new_id[old]] = index
        depth = max(len(w) for w in walks)
        paths = np.full((len(walks), depth), padded_nodes - 1, np.int32)  # the dead node
        for i, walk in enumerate(walks):
            paths[i, : len(walk)] = [new_id[old] for old in walk]
        return cls(
            node_offsets=offsets,
            child_tokens=tokens,
            child_nodes=nodes,
            leaf_index=leaf_index,
            canonical=canonical,
            max_fanout=_bucket(max(fanout, min_fanout)),
            depth=depth,
            eos_token_id=None if eos_token_id is None else int(eos_token_id),
            paths=paths,
        )

    def arrays(self) -> TrieArrays:
        """The CSR arrays as device arrays, for the jitted decoder."""
        fields = (self.node_offsets, self.child_tokens, self.child_nodes, self.leaf_index)
        return TrieArrays(*(jnp.asarray(a) for a in fields))

    def members(self, index: int) -> np.ndarray:
        """All sequence indices whose tokens equal those of sequence `index`."""
        return np.flatnonzero(self.canonical == self.canonical[index])


def dead_node(trie: TrieArrays) -> int:
    """The last (padding, childless) node: where a row that left the trie stays."""
    return trie.node_offsets.shape[0] - 2


def children(trie: TrieArrays, nodes: jax.Array, max_fanout: int) -> tuple[jax.Array, jax.Array]:
    """Child tokens and child nodes of `nodes` [R], each [R, max_fanout]; -1 past the end."""
    start = trie.node_offsets[nodes]
    count = trie.node_offsets[nodes + 1] - start
    slot = jnp.arange(max_fanout)
    edge = jnp.minimum(start[:, None] + slot, trie.child_tokens.shape[0] - 1)
    valid = slot < count[:, None]
    return (
        jnp.where(valid, trie.child_tokens[edge], -1),
        jnp.where(valid, trie.child_nodes[edge], -1),
    )


def allowed_mask(child_tokens: jax.Array, vocab_size: int) -> jax.Array:
    """[R, vocab] bool mask of the tokens in `child_tokens` [R, F] (-1 entries ignored)."""
    rows = jnp.arange(child_tokens.shape[0])[:, None]
    index = jnp.where(child_tokens >= 0, child_tokens, vocab_size)
    mask = jnp.zeros((child_tokens.shape[0], vocab_size), bool)
    return mask.at[rows, index].set(True, mode="drop")


def advance(
    child_tokens: jax.Array, child_nodes: jax.Array, token: jax.Array, dead: int
) -> jax.Array:
    """Node reached by `token` [...] from rows whose children are given as [..., F];
    `dead` where the token is not a child."""
    match = child_tokens == token[..., None]
    return jnp.where(match.any(-1), jnp.max(jnp.where(match, child_nodes, -1), -1), dead)


def live_nodes(paths: jax.Array, keep: jax.Array, num_nodes: int) -> jax.Array:
    """[B, num_nodes] bool: the nodes with at least one kept sequence below them.

    `paths` [S, depth] is `Trie.paths`; `keep` [B, S] bool marks, per example, the
    sequences decoding may still produce (e.g. the items not in its history). One
    scatter-add, no Python loop."""
    counts = jnp.zeros((keep.shape[0], num_nodes), jnp.int32)
    return counts.at[:, paths].add(keep[:, :, None].astype(jnp.int32)) > 0


def constrain(
    logp: jax.Array, trie: TrieArrays, nodes: jax.Array, max_fanout: int,
    live: jax.Array | None = None,
):  # fmt: skip
    """Masks `logp` [R, V] to the children of `nodes` [R] (others -inf); also returns
    the children (tokens, nodes), each [R, F]. `live` [B, num_nodes] (`live_nodes`, R = B
    x beams, rows grouped by example) further drops children with no kept sequence below."""
    child_tokens, child_nodes = children(trie, nodes, max_fanout)
    if live is not None:
        example = jnp.arange(nodes.shape[0]) // (nodes.shape[0] // live.shape[0])
        alive = live[example[:, None], jnp.maximum(child_nodes, 0)]
        child_tokens = jnp.where(alive, child_tokens, -1)
    allowed = allowed_mask(child_tokens, logp.shape[-1])
    return jnp.where(allowed, logp, -jnp.inf), child_tokens, child_nodes
