"""Greedy and sampled decoding driven by a step function (the shape `eval.decoding.beam` uses).

    tokens, scores, leaves = decode(step_fn, logits, cache, max_len=..., eos=...)

`logits` [R, V] are each row's next-token logits after its prefix, `step_fn(tokens [R],
cache, t) -> (logits, cache)` consumes the tokens of step t. One `lax.while_loop` that
stops when every row has finished; finished rows are padded with `pad`. Sampling follows
HF: temperature, then top-k, then top-p (nucleus) filtering (`filter_logits`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from eval.decoding import trie as trie_lib
from eval.decoding.beam import StepFn, next_logits


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """HF top-k then top-p (nucleus) filtering of `logits` [R, V]: dropped entries -> -inf.

    `top_k` 0 keeps all (ties with the k-th value are kept, as in HF). Top-p keeps the
    smallest most-likely set whose probability (after top-k) reaches `top_p`.
    """
    vocab = logits.shape[-1]
    ranked = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranked = jnp.where(jnp.arange(vocab) < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.maximum(jnp.sum((mass_before < top_p) & (probs > 0), axis=-1), 1)
    threshold = jnp.take_along_axis(ranked, kept[:, None] - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def decode(
    step_fn: StepFn,
    logits: jax.Array,
    cache: Any,
    *,
    max_len: int,
    eos: jax.Array,
    pad: int | jax.Array = 0,
    trie: trie_lib.TrieArrays | None = None,
    max_fanout: int = 0,
    sample: bool = False,
    key: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    top_k: int | jax.Array = 0,
    top_p: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Greedy (or, with `sample`, sampled) decoding of R rows.

    Returns (tokens [R, max_len], scores [R]: the sum of the model's log-probs (before
    temperature / top-k / top-p) of the emitted tokens, leaves [R]: the trie sequence
    index reached, -1 if incomplete; None without a trie).
    """
    rows = logits.shape[0]
    dead = None if trie is None else trie_lib.dead_node(trie)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)
    key = jax.random.key(0) if key is None else key

    def body(carry):
        t, tokens, scores, done, nodes, logits, cache, key = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if trie is not None:
            logp, child_tokens, child_nodes = trie_lib.constrain(logp, trie, nodes, max_fanout)
        if sample:
            key, sub = jax.random.split(key)
            warped = jax.lax.cond(
                (top_k > 0) | (top_p < 1.0),
                filter_logits,
                lambda x, *_: x,
                logp / temperature,
                top_k,
                top_p,
            )
            token = jax.random.categorical(sub, warped, axis=-1).astype(jnp.int32)
        else:
            token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        token = jnp.where(done, pad, token)
        step_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        scores = scores + jnp.where(done, 0.0, step_logp)
        if trie is not None:
            nodes = jnp.where(done, nodes, trie_lib.advance(child_tokens, child_nodes, token, dead))
        done = done | jnp.isin(token, eos)
        logits, cache = next_logits(step_fn, token, cache, logits, t, max_len)
        return t + 1, tokens.at[:, t].set(token), scores, done, nodes, logits, cache, key

    def cond(carry):
        t, done = carry[0], carry[3]
        return (t < max_len) & ~jnp.all(done)

    carry = (
        jnp.zeros((), jnp.int32),
        jnp.full((rows, max_len), pad, jnp.int32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows,), bool),
        jnp.zeros((rows,), jnp.int32),
        logits,
        cache,
        key,
    )
    _, tokens, scores, _, nodes, *_ = jax.lax.while_loop(cond, body, carry)
    leaves = None if trie is None else trie.leaf_index[nodes]
    return tokens, scores, leaves
