"""One jitted beam search for every generator, driven by a step function over a cache.

    seqs, scores, leaves = beam_search(step_fn, logits, cache, num_beams=..., max_len=...)

The caller has run its prefix (an LLM prompt, TIGER's encoder + BOS) for B examples x N
beams: `logits` [B * N, V] are the next-token logits of each row (row b * N + j is beam j
of example b) and `cache` is any pytree whose leaves with leading dimension B * N hold
per-row state (a KV cache; other leaves, e.g. a write index, are passed through).
`step_fn(tokens [B * N], cache, t) -> (logits, cache)` consumes the tokens chosen at step
t. Everything is traced by the caller's `jax.jit` (a `lax.while_loop` over steps, no
host round trip) and stops as soon as no beam can improve.

The bookkeeping is HF `transformers` `generate(num_beams=..., do_sample=False)` (checked
against transformers 5.23): per example the top `max(2, 1 + num_eos) * N` continuations
over all beams are kept, the best N non-finished ones keep running (cache rows gathered
by source beam), and a continuation among the top N that emits EOS, or reaches
`max_len`, becomes a finished hypothesis scored `sum(log p) / len ** length_penalty`
(len counts the EOS). `early_stopping` (True / False / "never") has HF's meaning. One
deliberate difference: beams 2..N start at -inf instead of -1e9, which only matters when
`V < 2 N` (or under a trie) and keeps duplicated hypotheses out.

With a trie (`eval.decoding.trie`), each beam carries its node; tokens that are not a
child get log-prob -inf (the log-softmax is not renormalised: a sequence's score is its
full-vocabulary log-likelihood) and only a sequence ending at a leaf is a finished
hypothesis; `leaves` are their sequence indices (-1 for an empty slot). `live`
(`trie.live_nodes`) excludes sequences per example while decoding, e.g. the items already
in each user's history, so that no beam is spent on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from eval.decoding import trie as trie_lib

NEG = -1.0e9  # HF's "very large negative" penalty, kept for parity of beam bookkeeping.
StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


def gather_rows(cache: Any, rows: jax.Array, num_rows: int | None = None) -> Any:
    """Rows `rows` of every cache leaf whose leading dimension is `num_rows` (default:
    `len(rows)`, the beam-search reorder); other leaves pass through."""
    n = rows.shape[0] if num_rows is None else num_rows
    return jax.tree.map(lambda x: x[rows] if x.ndim and x.shape[0] == n else x, cache)


def next_logits(step_fn: StepFn, tokens, cache, logits, t, max_len: int):
    """`step_fn` unless step t was the last one (its logits would never be used)."""
    return jax.lax.cond(t + 1 < max_len, lambda: step_fn(tokens, cache, t), lambda: (logits, cache))


class _Beams(NamedTuple):
    """Loop state; B examples x N beams, L = max_len."""

    t: jax.Array  # scalar: tokens generated so far
    seqs: jax.Array  # [B, N, L] running beams
    scores: jax.Array  # [B, N] running sum of log-probs
    nodes: jax.Array  # [B, N] trie node of each running beam
    done_seqs: jax.Array  # [B, N, L] finished hypotheses, best first
    done_scores: jax.Array  # [B, N] length-penalised scores
    done_nodes: jax.Array  # [B, N]
    is_done: jax.Array  # [B, N] slot holds a finished hypothesis
    improvable: jax.Array  # [B] HF's is_early_stop_heuristic_unsatisfied
    go_on: jax.Array  # scalar bool
    logits: jax.Array  # [B * N, V] next-token logits of the running beams
    cache: Any


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, M, ...] gathered along axis 1 by index [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(
    step_fn: StepFn,
    logits: jax.Array,
    cache: Any,
    *,
    num_beams: int,
    max_len: int,
    eos: jax.Array,
    pad: int | jax.Array = 0,
    trie: trie_lib.TrieArrays | None = None,
    max_fanout: int = 0,
    length_penalty: float | jax.Array = 1.0,
    early_stopping: bool | str = False,
    live: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Beam search -> (sequences [B, N, L], scores [B, N] (-inf: empty), leaves [B, N] or None).

    `eos`: [E] int32 ids that finish a beam (E >= 1; -1 for none). `max_len`, `num_beams`,
    `max_fanout` are static; `length_penalty` may be traced. `live`: [B, num_nodes] bool
    trie nodes each example may still enter (None: all).
    """
    n, steps = num_beams, max_len
    batch = logits.shape[0] // n
    vocab = logits.shape[-1]
    keep = max(2, 1 + eos.shape[0]) * n
    dead = None if trie is None else trie_lib.dead_node(trie)
    in_top_n = jnp.arange(keep) < n
    length_penalty = jnp.asarray(length_penalty, jnp.float32)
    stop_when_full, never = early_stopping is True, early_stopping == "never"

    def body(s: _Beams) -> _Beams:
        gen_len = (s.t + 1).astype(jnp.float32)
        logp = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1)
        if trie is not None:
            logp, child_tokens, child_nodes = trie_lib.constrain(
                logp, trie, s.nodes.reshape(-1), max_fanout, live
            )
        total = (logp.reshape(batch, n, vocab) + s.scores[:, :, None]).reshape(batch, n * vocab)
        cand_scores, flat = jax.lax.top_k(total, keep)  # [B, keep], best first
        source, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand_seqs = _take(s.seqs, source).at[:, :, s.t].set(token)
        finishes = jnp.isin(token, eos) | (s.t + 1 >= steps)
        done_score = cand_scores / gen_len**length_penalty
        if trie is not None:

            def of_source(x):  # [B * N, F] children of each beam -> [B, keep, F]
                return _take(x.reshape(batch, n, max_fanout), source)

            cand_nodes = trie_lib.advance(
                of_source(child_tokens), of_source(child_nodes), token, dead
            )
            # Only a complete sequence (a leaf) is a finished hypothesis.
            done_score = jnp.where(trie.leaf_index[cand_nodes] >= 0, done_score, -jnp.inf)
        else:
            cand_nodes = jnp.zeros_like(token)

        # Best N unfinished continuations keep running.
        run_scores = cand_scores + finishes * NEG
        run_scores, pick = jax.lax.top_k(run_scores, n)
        source = _take(source, pick)
        seqs, nodes = _take(cand_seqs, pick), _take(cand_nodes, pick)

        # Finishing continuations among the top N enter the finished pool if good enough.
        just_done = finishes & in_top_n
        full = jnp.all(s.is_done, axis=-1, keepdims=True) & stop_when_full
        done_score = done_score + full * NEG + (~s.improvable[:, None]) * NEG + (~just_done) * NEG
        merged = jnp.concatenate([s.done_scores, done_score], axis=1)
        done_scores, best = jax.lax.top_k(merged, n)
        done_seqs = _take(jnp.concatenate([s.done_seqs, cand_seqs], axis=1), best)
        done_nodes = _take(jnp.concatenate([s.done_nodes, cand_nodes], axis=1), best)
        is_done = _take(jnp.concatenate([s.is_done, just_done], axis=1), best)

        # HF's early-stop heuristic: can the best running beam still beat the worst finished?
        best_len = jnp.where(never & (length_penalty > 0), jnp.float32(steps), gen_len)
        best_running = run_scores[:, :1] / best_len**length_penalty
        worst_done = jnp.where(is_done, jnp.min(done_scores, axis=1, keepdims=True), NEG)
        improvable = s.improvable & jnp.any(best_running > worst_done, axis=-1)
        go_on = jnp.any(improvable) & ~(jnp.all(is_done) & stop_when_full) & ~jnp.all(finishes)

        rows = (jnp.arange(batch)[:, None] * n + source).reshape(-1)
        tokens = seqs[:, :, s.t].reshape(-1)
        logits, cache = next_logits(
            step_fn, tokens, gather_rows(s.cache, rows), s.logits, s.t, steps
        )
        return _Beams(
            s.t + 1, seqs, run_scores, nodes, done_seqs, done_scores, done_nodes, is_done,
            improvable, go_on, logits, cache,
        )  # fmt: skip

    init = _Beams(
        t=jnp.zeros((), jnp.int32),
        seqs=jnp.full((batch, n, steps), pad, jnp.int32),
        scores=jnp.full((batch, n), -jnp.inf).at[:, 0].set(0.0),
        nodes=jnp.zeros((batch, n), jnp.int32),
        done_seqs=jnp.full((batch, n, steps), pad, jnp.int32),
        done_scores=jnp.full((batch, n), NEG),
        done_nodes=jnp.zeros((batch, n), jnp.int32),
        is_done=jnp.zeros((batch, n), bool),
        improvable=jnp.ones((batch,), bool),
        go_on=jnp.ones((), bool),
        logits=logits,
        cache=cache,
    )
    out = jax.lax.while_loop(lambda s: s.go_on & (s.t < steps), body, init)
    scores = jnp.where(out.is_done, out.done_scores, -jnp.inf)
    leaves = None
    if trie is not None:
        leaves = jnp.where(out.is_done & jnp.isfinite(scores), trie.leaf_index[out.done_nodes], -1)
    return out.done_seqs, scores, leaves
