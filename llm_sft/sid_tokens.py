"""Semantic-ID tokens: the vocabulary a Qwen model needs to speak an index's item IDs.

An item's ID is written `<|sid_start|><a_12><b_201><c_7><d_3><|sid_end|>`: two structural
tokens and one token per code of every level (`<a_0>` .. `<a_{K-1}>`, `<b_0>` ..., all K
codes of every level, K from the index or given). `expand_vocabulary` adds them to a
tokenizer as single, never-split tokens and grows the model's embedding (and untied LM
head) to match: rows of existing tokens stay bit-identical, each new token's row is the
mean of the existing rows plus noise with their covariance, scaled by `noise` (HF's
`resize_token_embeddings(mean_resizing=True)` uses 1e-9).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from eval.errors import DataFormatError
from llm_sft.model import Qwen

SID_START, SID_END = "<|sid_start|>", "<|sid_end|>"
STRUCTURAL = (SID_START, SID_END)


def sid_vocabulary(codes: np.ndarray, codebook_size: int | None = None) -> list[str]:
    """Structural tokens, then every code of every level of [N, L] `codes` (K per level:
    `codebook_size`, or the largest code + 1)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or not codes.size:
        raise DataFormatError(f"semantic-ID codes must be a non-empty [N, L], got {codes.shape}")
    k = int(codes.max()) + 1 if codebook_size is None else codebook_size
    if codes.max() >= k:
        raise DataFormatError(f"a code {codes.max()} is outside --codebook_size={k}")
    levels = [chr(ord("a") + j) for j in range(codes.shape[1])]
    return [*STRUCTURAL, *(f"<{level}_{c}>" for level in levels for c in range(k))]


def sid_text(row: Sequence[int]) -> str:
    """The token string of one item's ID: `<|sid_start|><a_12><b_201>...<|sid_end|>`."""
    return (
        SID_START + "".join(f"<{chr(ord('a') + j)}_{int(c)}>" for j, c in enumerate(row)) + SID_END
    )


def add_tokens(tokenizer, tokens: Sequence[str]) -> np.ndarray:
    """Adds `tokens` (those the tokenizer lacks) as single, unnormalised tokens; returns the
    id of every one of `tokens`."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [AddedToken(t, normalized=False, special=False) for t in tokens if t not in vocab]
    tokenizer.add_tokens(new)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    return np.asarray(ids, np.int64)


def _grown_rows(
    table: np.ndarray, rows: np.ndarray, size: int, known: int, noise: float, key: jax.Array
) -> np.ndarray:
    """[size, D] copy of `table` ([V, D]) with `rows` set to the mean of the first `known`
    rows plus covariance-shaped noise (multivariate normal, covariance x `noise`)."""
    table = np.asarray(table)
    out = np.zeros((size, table.shape[1]), table.dtype)
    out[: len(table)] = table
    old = table[:known].astype(np.float64)
    mean = old.mean(0)
    centered = old - mean
    new = np.repeat(mean[None], len(rows), 0)
    if noise > 0:
        cov = centered.T @ centered / max(len(old), 1) * noise
        chol = np.linalg.cholesky(cov + np.eye(len(cov)) * 1e-12 * noise)  # jitter: PD
        new += np.asarray(jax.random.normal(key, new.shape), np.float64) @ chol.T
    out[rows] = new.astype(table.dtype)
    return out


def grow_vocab(
    model: Qwen, new_ids: np.ndarray, known: int, *, noise: float = 1e-9, seed: int = 0
) -> Qwen:
    """`model` with `vocab_size` >= max(new_ids) + 1; rows `new_ids` of the embedding (and of
    an untied LM head) initialised from the first `known` rows (see module doc); every other
    parameter and row unchanged."""
    cfg = model.config
    size = max(cfg.vocab_size, int(new_ids.max()) + 1)
    grown = dataclasses.replace(cfg, vocab_size=size)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen(grown, rngs=nnx.Rngs(0))))
    old = dict(nnx.to_flat_state(nnx.state(model)))
    keys = jax.random.split(jax.random.key(seed))
    for path, var in nnx.to_flat_state(state):
        value = old[path][...]
        if path == ("embed_tokens", "embedding"):
            value = _grown_rows(value, new_ids, size, known, noise, keys[0])
        elif path == ("lm_head", "kernel"):
            value = _grown_rows(np.asarray(value).T, new_ids, size, known, noise, keys[1]).T
        var.set_value(jax.numpy.asarray(value))
    return nnx.merge(graphdef, state)


def expand_vocabulary(
    model: Qwen,
    tokenizer,
    codes: np.ndarray,
    codebook_size: int | None = None,
    *,
    noise: float = 1e-9,
    seed: int = 0,
) -> tuple[Qwen, np.ndarray]:
    """Adds the semantic-ID tokens of `codes` to `tokenizer` (in place) and grows `model`
    to match; returns (model, the ids of `sid_vocabulary(codes, codebook_size)`)."""
    known = len(tokenizer)
    ids = add_tokens(tokenizer, sid_vocabulary(codes, codebook_size))
    fresh = ids[ids >= known]
    if not len(fresh):
        return model, ids
    return grow_vocab(
        model, fresh, min(known, model.config.vocab_size), noise=noise, seed=seed
    ), ids
