"""Decoding for ``llm_sft.model.Qwen`` on the shared library: greedy, sampling, beam search,
trie-constrained (``eval.decoding``).

Every method prefills the LEFT-padded prompt batch into a static-length KV cache, then runs
``eval.decoding.decode`` (greedy / sampling) or ``eval.decoding.beam_search`` with a step
function that feeds one token per row through the cache. Beam search follows HF
``transformers`` ``generate(num_beams=..., do_sample=False)`` (see ``eval.decoding.beam``).
With a catalogue ``eval.decoding.Trie`` (titles followed by EOS), tokens that are not a
child of a row's node get log-prob -inf, and only sequences that end at an EOS leaf count
as finished; their title index is returned.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.decoding import Trie, beam_search, decode, gather_rows
from eval.decoding.trie import live_nodes
from llm_sft.model import Cache, Qwen

METHODS = ("greedy", "sample", "beam")


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
    trie: Trie | None = None,
    keep: Any = None,
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
      keep: [B, num_sequences] bool, 'beam' under a trie only: the trie sequences each
        prompt may still produce (e.g. the items outside its history); beams never enter
        a prefix with none of them below it.
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
    if keep is not None and (method != "beam" or trie is None):
        raise ValueError("generate: keep needs method='beam' and a trie")
    if keep is not None and np.shape(keep) != (ids.shape[0], len(trie.paths)):
        raise ValueError(
            f"generate: keep is {np.shape(keep)}, expected [{ids.shape[0]}, {len(trie.paths)}]"
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
        live = None if keep is None else (jnp.asarray(trie.paths), jnp.asarray(keep, bool))
        seqs, scores, titles = _beam_search(
            graphdef, state, ids, mask, eos, pad, arrays, jnp.asarray(length_penalty, jnp.float32),
            live, max_new_tokens=max_new_tokens, num_beams=num_beams, max_fanout=fanout,
            early_stopping=early_stopping,
        )  # fmt: skip
        r = num_return_sequences
        return GenerateOutput(seqs[:, :r], scores[:, :r], None if titles is None else titles[:, :r])
    r = num_return_sequences
    seqs, scores, titles = _decode(
        graphdef, state, jnp.repeat(ids, r, axis=0), jnp.repeat(mask, r, axis=0), eos, pad, arrays,
        jax.random.key(0) if rng is None else rng,
        jnp.asarray(temperature if method == "sample" else 1.0, jnp.float32),
        jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32),
        max_new_tokens=max_new_tokens, sample=method == "sample", max_fanout=fanout,
    )  # fmt: skip
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
        cache = gather_rows(cache, jnp.repeat(jnp.arange(batch), repeat), batch)
    return logits, cache


def _step_fn(model: Qwen):
    """One token per row through the KV cache -> next-token logits (the decoders' step)."""

    def step(tokens: jax.Array, cache: Cache, t: jax.Array) -> tuple[jax.Array, Cache]:
        del t  # the cache knows the position
        ones = jnp.ones((tokens.shape[0], 1), jnp.int32)
        logits, cache = model(tokens[:, None], attention_mask=ones, cache=cache)
        return logits[:, -1], cache

    return step


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sample", "max_fanout"))
def _decode(graphdef, state, input_ids, attention_mask, eos, pad, trie, key, temperature, top_k, top_p,
            *, max_new_tokens, sample, max_fanout):  # fmt: skip
    """Greedy / sampled decoding of [R, T] prompts -> (tokens [R, L], scores [R], titles)."""
    model = nnx.merge(graphdef, state)
    logits, cache = _prefill(model, input_ids, attention_mask, max_new_tokens)
    return decode(
        _step_fn(model), logits, cache, max_len=max_new_tokens, eos=eos, pad=pad, trie=trie,
        max_fanout=max_fanout, sample=sample, key=key, temperature=temperature, top_k=top_k,
        top_p=top_p,
    )  # fmt: skip


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "num_beams", "max_fanout", "early_stopping"),
)
def _beam_search(graphdef, state, input_ids, attention_mask, eos, pad, trie, length_penalty, live,
                 *, max_new_tokens, num_beams, max_fanout, early_stopping):  # fmt: skip
    """Beam search -> (sequences [B, N, L], scores [B, N], titles [B, N] or None);
    `live`: None or (trie paths, keep [B, S]) for `trie_lib.live_nodes`."""
    model = nnx.merge(graphdef, state)
    if live is not None:
        live = live_nodes(*live, trie.leaf_index.shape[0])
    logits, cache = _prefill(model, input_ids, attention_mask, max_new_tokens, repeat=num_beams)
    return beam_search(
        _step_fn(model), logits, cache, num_beams=num_beams, max_len=max_new_tokens, eos=eos,
        pad=pad, trie=trie, max_fanout=max_fanout, length_penalty=length_penalty,
        early_stopping=early_stopping, live=live,
    )  # fmt: skip
