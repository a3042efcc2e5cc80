"""Decoding semantic IDs: constrained beams -> ranked items, greedy -> code accuracy.

- `sid_trie`: the trie over every item's ID tokens (`<|sid_start|>` codes `<|sid_end|>` EOS);
  under it beam search (and greedy) only emits complete IDs of catalogue items.
- `beam_items`: constrained beams for `sequential` prompts -> ranked item ids (items that
  share an ID listed together, ascending, as TIGER's evaluation does); `rank_items`: their
  Recall / NDCG over the full item set, through `eval.metrics`.
- `code_scores`: greedy (unconstrained) outputs against the expected IDs: first-code
  accuracy and full-ID exact match (the metrics a SID model card reports), and the share
  of outputs that are no item's ID.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from eval.decoding import Trie
from eval.metrics import DEFAULT_KS, metrics_from_ranks, ranks_from_lists
from llm_sft.data import prompt_text
from llm_sft.evaluate import (
    decode_batched,
    items_of_beams,
    response_trie,
    title_items,
    unseen_items,
)
from llm_sft.model import Qwen
from llm_sft.sid_data import TaskExamples
from llm_sft.sid_tokens import sid_text


def sid_trie(codes: np.ndarray, tokenizer) -> Trie:
    """Trie over the ID responses of items 1..N (`codes` row = dense item id; trie index
    i = item i + 1), tokenized as in training."""
    return response_trie([sid_text(row) for row in codes[1:]], tokenizer)


def prompt_ids(ex: TaskExamples, tokenizer, template: str = "chat") -> list[list[int]]:
    """Generation prompts (up to where the response starts) of `ex`, token ids."""
    texts = [prompt_text(i, x, template, tokenizer) for i, x in zip(ex.instruction, ex.input, strict=True)]  # fmt: skip
    return tokenizer(texts, add_special_tokens=template == "alpaca")["input_ids"]


def beam_items(
    model: Qwen, tokenizer, ex: TaskExamples, codes: np.ndarray, *, template: str = "chat",
    num_beams: int = 20, batch_size: int = 8, k: int | None = None,
    exclude: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, dict[str, int]]:  # fmt: skip
    """Ranked item ids [E, k or num_beams] (0 = empty slot; `exclude[e]`: items left out of
    row e, pruned from the trie while decoding) from constrained beam search on `ex`'s
    prompts, and the beam counts `invalid` (returned beams that are no item's ID: 0 under
    the trie) and `empty_slots` (beams left empty: fewer distinct IDs than beams)."""
    trie = sid_trie(codes, tokenizer)
    beams = decode_batched(
        model, prompt_ids(ex, tokenizer, template), batch_size=batch_size,
        pad_id=tokenizer.pad_token_id, method="beam", num_beams=num_beams,
        num_return_sequences=num_beams, trie=trie, max_new_tokens=trie.depth,
        keep=None if exclude is None else unseen_items(exclude, len(codes) - 1),
    )  # fmt: skip
    items = items_of_beams(beams.titles, title_items(trie), k or num_beams, exclude)
    valid = _valid_ids(codes, tokenizer)
    width = len(next(iter(valid)))
    filled = beams.titles >= 0
    invalid = sum(tuple(seq[:width].tolist()) not in valid for seq in beams.sequences[filled])
    return items, {"invalid": invalid, "empty_slots": int((~filled).sum())}


def rank_items(
    model: Qwen, tokenizer, ex: TaskExamples, codes: np.ndarray, *, template: str = "chat",
    num_beams: int = 20, batch_size: int = 8, ks: Sequence[int] = DEFAULT_KS,
) -> dict:  # fmt: skip
    """Item-level metrics of `beam_items` on `ex` (targets `ex.item`), plus `items`
    [E, num_beams] and its beam counts."""
    if num_beams < max(ks):
        raise ValueError(f"num_beams={num_beams} < the largest cutoff {max(ks)}")
    items, counts = beam_items(
        model, tokenizer, ex, codes, template=template, num_beams=num_beams, batch_size=batch_size
    )
    return {**metrics_from_ranks(ranks_from_lists(items, ex.item), ks), "items": items, **counts}


def _valid_ids(codes: np.ndarray, tokenizer) -> set[tuple[int, ...]]:
    """The token tuples of every item's ID."""
    texts = [sid_text(row) for row in codes[1:]]
    return {tuple(t) for t in tokenizer(texts, add_special_tokens=False)["input_ids"]}


def code_scores(
    generated: np.ndarray, expected: Sequence[Sequence[int]], valid: set[tuple[int, ...]]
) -> dict[str, float]:
    """First-code accuracy, exact match and invalid share of generated token rows [E, T]
    against each row's expected ID tokens (`<|sid_start|>`, L codes, `<|sid_end|>`);
    `valid`: the token tuples of every item's ID."""
    first = exact = invalid = 0
    for row, want in zip(np.asarray(generated), expected, strict=True):
        got = tuple(int(t) for t in row[: len(want)])
        first += got[:2] == tuple(want[:2])
        exact += got == tuple(want)
        invalid += got not in valid
    n = max(len(expected), 1)
    return {
        "first_code_accuracy": first / n,
        "exact_match": exact / n,
        "invalid_share": invalid / n,
    }


def greedy_scores(
    model: Qwen, tokenizer, ex: TaskExamples, codes: np.ndarray, *, template: str = "chat",
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """`code_scores` per task of unconstrained greedy decoding on `ex` (ID-answer tasks)."""
    valid = _valid_ids(codes, tokenizer)
    expected = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
    out = decode_batched(
        model, prompt_ids(ex, tokenizer, template), batch_size=batch_size,
        pad_id=tokenizer.pad_token_id, method="greedy", max_new_tokens=max(map(len, expected)) + 1,
    )  # fmt: skip
    tasks = np.asarray(ex.task)
    return {
        task: code_scores(
            out.sequences[tasks == task, 0], [expected[i] for i in np.flatnonzero(tasks == task)], valid
        )
        for task in dict.fromkeys(ex.task)
    }  # fmt: skip
