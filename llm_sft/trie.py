"""Prefix trie over catalogue titles for constrained decoding, stored as dense CSR arrays.

Every title (a token-id sequence) is followed by EOS; the path root -> ... -> EOS ends at a
leaf. Node ``n``'s children are ``child_tokens[node_offsets[n]:node_offsets[n + 1]]``
(sorted by token) leading to ``child_nodes[...]``, so the jitted decoder can gather a
row's allowed tokens as a fixed-width ``[rows, max_fanout]`` slice without a
``[num_nodes, vocab]`` table. Array sizes and ``max_fanout`` are rounded up to powers of
two (padding nodes have no children) so that catalogues of similar size share one
compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class TrieArrays(NamedTuple):
    """The device-side part of a :class:`Trie` (a pytree of int32 arrays)."""

    node_offsets: jax.Array  # [num_nodes + 1]
    child_tokens: jax.Array  # [num_edges]
    child_nodes: jax.Array  # [num_edges]
    leaf_title: jax.Array  # [num_nodes]: title index at an EOS leaf, else -1


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True, eq=False)
class Trie:
    """Prefix trie of ``title + [eos]`` token sequences (root is node 0).

    Attributes:
      node_offsets, child_tokens, child_nodes, leaf_title: CSR arrays (see module doc).
      canonical: [num_titles] index of the first title with the same token sequence;
        decoding returns canonical indices (see :meth:`members`).
      max_fanout: padded maximum number of children of a node (static for jit).
      depth: longest ``title + eos`` length, the number of decode steps needed.
      eos_token_id: the terminating token.
    """

    node_offsets: np.ndarray
    child_tokens: np.ndarray
    child_nodes: np.ndarray
    leaf_title: np.ndarray
    canonical: np.ndarray
    max_fanout: int
    depth: int
    eos_token_id: int

    @classmethod
    def build(
        cls,
        titles: Sequence[Sequence[int]],
        eos_token_id: int,
        *,
        min_nodes: int = 0,
        min_fanout: int = 0,
    ) -> Trie:
        """Builds the trie of ``titles`` (token ids without EOS; EOS is appended).

        ``min_nodes`` / ``min_fanout`` pad the arrays further (to share compiled shapes
        across catalogues). Raises ValueError on an empty title or one containing EOS.
        """
        if not titles:
            raise ValueError("Trie.build: no titles")
        children: list[dict[int, int]] = [{}]
        leaf_owner: dict[int, int] = {}
        canonical = np.empty(len(titles), np.int32)
        for i, title in enumerate(titles):
            tokens = [int(t) for t in title]
            if not tokens:
                raise ValueError(f"Trie.build: title {i} is empty")
            if eos_token_id in tokens or min(tokens) < 0:
                raise ValueError(
                    f"Trie.build: title {i} contains EOS={eos_token_id} or a negative id: {tokens}"
                )
            node = 0
            for token in [*tokens, eos_token_id]:
                nxt = children[node].get(token)
                if nxt is None:
                    nxt = children[node][token] = len(children)
                    children.append({})
                node = nxt
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
        leaf_title = np.full(padded_nodes, -1, np.int32)
        for old, title in leaf_owner.items():
            leaf_title[new_id[old]] = title
        return cls(
            node_offsets=offsets,
            child_tokens=tokens,
            child_nodes=nodes,
            leaf_title=leaf_title,
            canonical=canonical,
            max_fanout=_bucket(max(fanout, min_fanout)),
            depth=max(len(t) for t in titles) + 1,
            eos_token_id=int(eos_token_id),
        )

    def arrays(self) -> TrieArrays:
        """The CSR arrays as device arrays, for the jitted decoder."""
        return TrieArrays(
            *(
                jnp.asarray(a)
                for a in (self.node_offsets, self.child_tokens, self.child_nodes, self.leaf_title)
            )
        )

    def members(self, title: int) -> np.ndarray:
        """All title indices whose token sequence equals that of ``title``."""
        return np.flatnonzero(self.canonical == self.canonical[title])


def children(trie: TrieArrays, nodes: jax.Array, max_fanout: int) -> tuple[jax.Array, jax.Array]:
    """Child tokens and child nodes of ``nodes`` [R], each [R, max_fanout]; -1 past the end."""
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
    """[R, vocab] bool mask of the tokens in ``child_tokens`` [R, F] (-1 entries ignored)."""
    rows = jnp.arange(child_tokens.shape[0])[:, None]
    index = jnp.where(child_tokens >= 0, child_tokens, vocab_size)
    return (
        jnp.zeros((child_tokens.shape[0], vocab_size), bool).at[rows, index].set(True, mode="drop")
    )


def advance(
    child_tokens: jax.Array, child_nodes: jax.Array, token: jax.Array, dead: int
) -> jax.Array:
    """Node reached by ``token`` [...] from rows whose children are given as [..., F].

    Returns ``dead`` where the token is not a child (the decoder uses the last node, a
    childless padding node, so a beam that left the trie can never continue).
    """
    match = child_tokens == token[..., None]
    return jnp.where(match.any(-1), jnp.max(jnp.where(match, child_nodes, -1), -1), dead)
