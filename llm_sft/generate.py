"""Jitted decoding for ``llm_sft.model.Qwen``: greedy, sampling, beam search, trie-constrained.

Every method prefills the LEFT-padded prompt batch into a static-length KV cache, then
decodes inside one ``lax.while_loop`` (no Python dispatch per token) that stops as soon
as every row (or every beam search) is finished; finished rows are padded with
``pad_token_id``.

Beam search follows HF ``transformers`` ``generate(num_beams=..., do_sample=False)``
(its vectorised beam search, checked against transformers 5.23): per prompt the top
``max(2, 1 + num_eos) * num_beams`` continuations over all beams are kept, the best
``num_beams`` non-finished ones keep running (the KV cache rows of the flattened
``[B * num_beams]`` batch are gathered by source beam each step), and a continuation
among the top ``num_beams`` that emits EOS, or reaches ``max_new_tokens``, becomes a
finished hypothesis scored ``sum(log p) / generated_len ** length_penalty``
(generated_len counts the EOS). ``early_stopping`` (True / False / "never") has HF's
meaning. One deliberate difference: beams 2..num_beams start at score -inf instead of
-1e9, which only matters when ``vocab_size < 2 * num_beams`` (or under a trie) and keeps
duplicated hypotheses out.

With a :class:`llm_sft.trie.Trie`, each row / beam carries its trie node and tokens that
are not a child of it get log-prob -inf (the model's log-softmax is not renormalised, so
a title's score is its full-vocabulary log-likelihood); only sequences that end at an
EOS leaf count as finished and their title index is returned.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_sft import trie as trie_lib
from llm_sft.model import Cache, Qwen

METHODS = ("greedy", "sample", "beam")
_NEG = -1.0e9  # HF's "very large negative" penalty, kept for parity of beam bookkeeping.


class GenerateOutput(NamedTuple):
    """Decoded continuations (prompt not included), R = num_return_sequences.

    sequences: [B, R, max_new_tokens] int32, ``pad_token_id`` after EOS.
    scores: [B, R] float32. Beam search: HF's ``sequences_scores`` (length-penalised sum
      of log-probs), sorted descending, -inf for an empty slot. Greedy / sampling: sum of
      the model's log-probs (before temperature / top-k / top-p) of the emitted tokens.
    titles: [B, R] int32 canonical title index (see ``Trie.members``) when decoding under
      a trie, -1 for a slot without a complete title; otherwise None.
    """

    sequences: jax.Array
    scores: jax.Array
    titles: jax.Array | None


def generate(
    model: Qwen,
    input_ids: Any,
    attention_mask: Any,
    *,
    max_new_tokens: int | None = None,
    method: str = "greedy",
    num_beams: int = 1,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    trie: trie_lib.Trie | None = None,
    rng: jax.Array | None = None,
) -> GenerateOutput:
    """Continues a LEFT-padded prompt batch ``input_ids`` / ``attention_mask`` [B, T].

    Args:
      max_new_tokens: decode steps (static); defaults to ``trie.depth`` under a trie.
      method: 'greedy', 'sample' (temperature / top_k / top_p with ``rng``; temperature 0
        means greedy) or 'beam' (num_beams, length_penalty, early_stopping as in HF).
      num_return_sequences: samples per prompt ('sample') or best hypotheses ('beam',
        at most num_beams).
      top_k: keep the k most likely tokens (0: all). top_p: nucleus mass in (0, 1].
      eos_token_id: id or ids that finish a row; defaults to ``trie.eos_token_id``.
      trie: restrict continuations to catalogue titles followed by EOS.
      rng: PRNG key for 'sample'.

    Returns:
      A :class:`GenerateOutput`.
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.asarray(attention_mask, jnp.int32)
    vocab = model.config.vocab_size
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(
            f"generate: input_ids {ids.shape} and attention_mask {mask.shape} must be equal [B, T]"
        )
    if method not in METHODS:
        raise ValueError(f"generate: method={method!r}, expected one of {METHODS}")
    if trie is not None:
        if eos_token_id is None:
            eos_token_id = trie.eos_token_id
        if trie.eos_token_id not in np.atleast_1d(eos_token_id):
            raise ValueError(
                f"generate: eos_token_id={eos_token_id} lacks the trie's EOS {trie.eos_token_id}"
            )
        if max_new_tokens is None:
            max_new_tokens = trie.depth
        if max_new_tokens < trie.depth:
            raise ValueError(
                f"generate: max_new_tokens={max_new_tokens} < trie.depth={trie.depth}; the "
                "longest titles could not finish"
            )
        if int(trie.child_tokens.max()) >= vocab:
            raise ValueError(f"generate: trie has token ids >= vocab_size={vocab}")
    if max_new_tokens is None or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if method == "sample" and temperature == 0.0:
        method = "greedy"
    if method != "beam" and num_beams != 1:
        raise ValueError(f"generate: num_beams={num_beams} needs method='beam'")
    if method == "greedy" and num_return_sequences != 1:
        raise ValueError("generate: greedy decoding returns one sequence per prompt")
    if method == "beam" and not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            f"generate: num_return_sequences={num_return_sequences} must be in [1, "
            f"num_beams={num_beams}]"
        )
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"generate: early_stopping={early_stopping!r}, expected bool or 'never'")
    if method == "sample":
        if rng is None:
            raise ValueError("generate: method='sample' needs rng (a jax.random key)")
        if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(
                f"generate: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                f"{temperature}, {top_k}, {top_p}"
            )

    graphdef, state = nnx.split(model)
    eos = jnp.asarray(np.atleast_1d(-1 if eos_token_id is None else eos_token_id), jnp.int32)
    pad = jnp.asarray(pad_token_id, jnp.int32)
    arrays = None if trie is None else trie.arrays()
    fanout = 0 if trie is None else trie.max_fanout
    if method == "beam":
        seqs, scores, titles = _beam_search(
            graphdef,
            state,
            ids,
            mask,
            eos,
            pad,
            arrays,
            jnp.asarray(length_penalty, jnp.float32),
            jnp.asarray(early_stopping is True),
            jnp.asarray(early_stopping == "never"),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            max_fanout=fanout,
        )
        r = num_return_sequences
        return GenerateOutput(seqs[:, :r], scores[:, :r], None if titles is None else titles[:, :r])
    r = num_return_sequences
    seqs, scores, titles = _decode(
        graphdef,
        state,
        jnp.repeat(ids, r, axis=0),
        jnp.repeat(mask, r, axis=0),
        eos,
        pad,
        arrays,
        jax.random.key(0) if rng is None else rng,
        jnp.asarray(temperature if method == "sample" else 1.0, jnp.float32),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32),
        max_new_tokens=max_new_tokens,
        sample=method == "sample",
        max_fanout=fanout,
    )
    batch = ids.shape[0]
    return GenerateOutput(
        seqs.reshape(batch, r, -1),
        scores.reshape(batch, r),
        None if titles is None else titles.reshape(batch, r),
    )


def greedy_generate(
    model: Qwen,
    input_ids: Any,
    attention_mask: Any,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> jax.Array:
    """Greedy continuation [B, max_new_tokens] of a LEFT-padded batch (pad after EOS)."""
    out = generate(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return out.sequences[:, 0]


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """HF top-k then top-p (nucleus) filtering of ``logits`` [R, V]: dropped entries -> -inf.

    ``top_k`` 0 keeps all (ties with the k-th value are kept, as in HF). Top-p keeps the
    smallest most-likely set whose probability (after top-k) reaches ``top_p``.
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


def last_hidden(model: Qwen, input_ids: Any, attention_mask: Any) -> jax.Array:
    """Final-norm hidden state [B, D] at the last token of a LEFT-padded batch.

    For BIGRec grounding: embed generated titles and catalogue titles the same way.
    """
    graphdef, state = nnx.split(model)
    return _last_hidden(
        graphdef, state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
    )


@functools.partial(jax.jit, static_argnums=0)
def _last_hidden(graphdef, state, input_ids, attention_mask):
    model = nnx.merge(graphdef, state)
    _, _, hidden = model(
        input_ids, attention_mask=attention_mask, return_hidden=True, logits_to_keep=0
    )
    return hidden[:, -1].astype(jnp.float32)


def _prefill(model: Qwen, input_ids, attention_mask, max_new_tokens: int, repeat: int = 1):
    """Prompt forward into a fresh cache; returns (last-position logits, cache), rows
    repeated ``repeat`` times (row ``b * repeat + j``)."""
    batch, prompt_len = input_ids.shape
    cache = Cache.init(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1)
    logits = logits[:, -1]
    if repeat > 1:
        logits = jnp.repeat(logits, repeat, axis=0)
        cache = _gather_rows(cache, jnp.repeat(jnp.arange(batch), repeat))
    return logits, cache


def _gather_rows(cache: Cache, rows: jax.Array) -> Cache:
    return cache.replace(
        k=[k[rows] for k in cache.k], v=[v[rows] for v in cache.v], mask=cache.mask[rows]
    )


def _next_logits(model: Qwen, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    ones = jnp.ones((tokens.shape[0], 1), jnp.int32)
    logits, cache = model(tokens[:, None], attention_mask=ones, cache=cache)
    return logits[:, -1], cache


def _constrain(logp, trie, nodes, max_fanout):
    """Masks ``logp`` [R, V] to the trie children of ``nodes`` [R]; returns the children."""
    child_tokens, child_nodes = trie_lib.children(trie, nodes, max_fanout)
    allowed = trie_lib.allowed_mask(child_tokens, logp.shape[-1])
    return jnp.where(allowed, logp, -jnp.inf), child_tokens, child_nodes


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sample", "max_fanout"))
def _decode(
    graphdef,
    state,
    input_ids,
    attention_mask,
    eos,
    pad,
    trie,
    key,
    temperature,
    top_k,
    top_p,
    *,
    max_new_tokens,
    sample,
    max_fanout,
):
    """Greedy / sampled decoding of [R, T] prompts -> (tokens [R, L], scores [R], titles)."""
    model = nnx.merge(graphdef, state)
    rows = input_ids.shape[0]
    logits, cache = _prefill(model, input_ids, attention_mask, max_new_tokens)
    dead = None if trie is None else trie.node_offsets.shape[0] - 2

    def body(carry):
        t, tokens, scores, done, nodes, logits, cache, key = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if trie is not None:
            logp, child_tokens, child_nodes = _constrain(logp, trie, nodes, max_fanout)
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
        logits, cache = _next_logits(model, token, cache)
        return t + 1, tokens.at[:, t].set(token), scores, done, nodes, logits, cache, key

    def cond(carry):
        t, done = carry[0], carry[3]
        return (t < max_new_tokens) & ~jnp.all(done)

    carry = (
        jnp.zeros((), jnp.int32),
        jnp.full((rows, max_new_tokens), pad, jnp.int32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows,), bool),
        jnp.zeros((rows,), jnp.int32),
        logits,
        cache,
        key,
    )
    _, tokens, scores, _, nodes, *_ = jax.lax.while_loop(cond, body, carry)
    titles = None if trie is None else trie.leaf_title[nodes]
    return tokens, scores, titles


class _Beams(NamedTuple):
    """Beam-search loop state; B prompts x N beams, L = max_new_tokens."""

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
    cache: Cache


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, M, ...] gathered along axis 1 by index [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "num_beams", "max_fanout"),
)
def _beam_search(
    graphdef,
    state,
    input_ids,
    attention_mask,
    eos,
    pad,
    trie,
    length_penalty,
    stop_when_full,
    never,
    *,
    max_new_tokens,
    num_beams,
    max_fanout,
):
    """Beam search -> (sequences [B, N, L], scores [B, N], titles [B, N] or None).

    ``stop_when_full`` / ``never``: HF ``early_stopping`` is True / "never" (traced bools).
    """
    model = nnx.merge(graphdef, state)
    batch, n, steps = input_ids.shape[0], num_beams, max_new_tokens
    keep = max(2, 1 + eos.shape[0]) * n
    logits, cache = _prefill(model, input_ids, attention_mask, steps, repeat=n)
    vocab = logits.shape[-1]
    dead = None if trie is None else trie.node_offsets.shape[0] - 2
    in_top_n = jnp.arange(keep) < n

    def body(s: _Beams) -> _Beams:
        gen_len = (s.t + 1).astype(jnp.float32)
        logp = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1)
        if trie is not None:
            logp, child_tokens, child_nodes = _constrain(
                logp, trie, s.nodes.reshape(-1), max_fanout
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
            # Only a complete title (an EOS leaf) is a finished hypothesis.
            done_score = jnp.where(trie.leaf_title[cand_nodes] >= 0, done_score, -jnp.inf)
        else:
            cand_nodes = jnp.zeros_like(token)

        # Best N unfinished continuations keep running.
        run_scores = cand_scores + finishes * _NEG
        run_scores, pick = jax.lax.top_k(run_scores, n)
        source = _take(source, pick)
        seqs, nodes = _take(cand_seqs, pick), _take(cand_nodes, pick)

        # Finishing continuations among the top N enter the finished pool if good enough.
        just_done = finishes & in_top_n
        full = jnp.all(s.is_done, axis=-1, keepdims=True) & stop_when_full
        done_score = (
            done_score + full * _NEG + (~s.improvable[:, None]) * _NEG + (~just_done) * _NEG
        )
        merged = jnp.concatenate([s.done_scores, done_score], axis=1)
        done_scores, best = jax.lax.top_k(merged, n)
        done_seqs = _take(jnp.concatenate([s.done_seqs, cand_seqs], axis=1), best)
        done_nodes = _take(jnp.concatenate([s.done_nodes, cand_nodes], axis=1), best)
        is_done = _take(jnp.concatenate([s.is_done, just_done], axis=1), best)

        # HF's early-stop heuristic: can the best running beam still beat the worst finished?
        best_len = jnp.where(never & (length_penalty > 0), jnp.float32(steps), gen_len)
        best_running = run_scores[:, :1] / best_len**length_penalty
        worst_done = jnp.where(is_done, jnp.min(done_scores, axis=1, keepdims=True), _NEG)
        improvable = s.improvable & jnp.any(best_running > worst_done, axis=-1)
        go_on = jnp.any(improvable) & ~(jnp.all(is_done) & stop_when_full) & ~jnp.all(finishes)

        rows = (jnp.arange(batch)[:, None] * n + source).reshape(-1)
        logits, cache = _next_logits(
            model, seqs[:, :, s.t].reshape(-1), _gather_rows(s.cache, rows)
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
        done_scores=jnp.full((batch, n), _NEG),
        done_nodes=jnp.zeros((batch, n), jnp.int32),
        is_done=jnp.zeros((batch, n), bool),
        improvable=jnp.ones((batch,), bool),
        go_on=jnp.ones((), bool),
        logits=logits,
        cache=cache,
    )
    out = jax.lax.while_loop(lambda s: s.go_on & (s.t < steps), body, init)
    scores = jnp.where(out.is_done, out.done_scores, -jnp.inf)
    titles = None
    if trie is not None:
        titles = jnp.where(out.is_done, trie.leaf_title[out.done_nodes], -1)
    return out.done_seqs, scores, titles
