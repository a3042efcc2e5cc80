"""BIGRec-style SFT examples: Alpaca or chat prompts, tokenized, padded or packed.

One example is a user's history (at most ``max_history`` items, oldest first) and the next
item. The prompt lists the history titles; the response is the quoted next title plus
EOS. ``tokenize_examples`` drops the OLDEST history items of an example until prompt plus
response fit ``max_length`` (examples that do not fit with one item are dropped and
counted). ``padded_arrays`` / ``packed_arrays`` turn them into fixed-width arrays for an
``eval.data.examples.ArraySource``; ``trim_to_bucket`` cuts a batch to the smallest
length bucket that holds it, so a run compiles one step per bucket, not per length.

Labels follow HF: ``labels[t]`` is the token at ``t`` (the model's output at ``t - 1`` is
scored against it), -100 where not trained: padding, every segment's first token and,
unless ``train_on_inputs``, the prompt tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.data import DATASETS, Ragged
from eval.data.examples import pad_windows, prefix_examples
from eval.errors import FlagError
from eval.io import atomic_dir

IGNORE = -100
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = ("alpaca", "chat")
_VERBS = {"movies": "watched", "video games": "played"}


def item_noun(dataset: str) -> str:
    """The registered data set's item noun for prompts ("movies", ...); "items" otherwise."""
    return DATASETS[dataset].noun if dataset in DATASETS else "items"


def instruction_and_input(history_titles: Sequence[str], noun: str) -> tuple[str, str]:
    """BIGRec's instruction and input for a history (titles oldest first)."""
    verb = _VERBS.get(noun, "bought")
    instruction = (
        f"Given a list of {noun} the user has {verb} before, please recommend a new "
        f"{noun} that the user likes to the user."
    )
    listed = ", ".join(f'"{t}"' for t in history_titles)
    return instruction, f"The user has {verb} the following {noun} before: {listed}"


def shorten_titles(titles: np.ndarray, max_chars: int | None) -> np.ndarray:
    """`titles` cut to at most `max_chars` characters, at a word boundary where there is
    one (None: as they are). Items whose cut titles agree share them, as items with one
    title do."""
    if max_chars is None:
        return titles
    cut = [t if len(t) <= max_chars else t[:max_chars].rsplit(" ", 1)[0] for t in titles]
    return np.asarray(cut, dtype=object)


def response_text(title: str) -> str:
    return f'"{title}"'


def prompt_text(instruction: str, input_text: str, template: str, tokenizer) -> str:
    """The prompt up to where the response starts ('alpaca' or the tokenizer's 'chat')."""
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input_text)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise FlagError(
                f"--prompt_template=chat: tokenizer {tokenizer.name_or_path!r} has no chat_template"
            )
        messages = [{"role": "user", "content": f"{instruction}\n\n{input_text}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise FlagError(f"--prompt_template={template!r}: choose one of {TEMPLATES}")


def train_histories(train: Ragged, max_history: int = 10) -> tuple[Ragged, np.ndarray]:
    """Every training prefix as (history of its last ``max_history`` items, next item)."""
    ex = prefix_examples(train, min_history=1)
    starts = np.maximum(ex.starts, ex.ends - max_history)
    offsets = np.concatenate([[0], np.cumsum(ex.ends - starts)])
    flat = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, ex.ends - starts)
    return Ragged(train.values[flat], offsets), train.values[ex.ends]


@dataclasses.dataclass
class SFTExamples:
    """Tokenized examples: ``input_ids`` row = prompt + response + EOS."""

    input_ids: Ragged
    prompt_lengths: np.ndarray  # tokens of the prompt part of each row
    history_kept: np.ndarray  # history items left in each prompt after truncation
    source_index: np.ndarray  # index of each row in the input examples
    dropped: int  # examples too long even with a single history item

    def __len__(self) -> int:
        return len(self.prompt_lengths)


def tokenize_examples(
    histories: Ragged,
    targets: np.ndarray,
    titles: Sequence[str],
    noun: str,
    tokenizer,
    *,
    template: str = "alpaca",
    max_length: int = 512,
    max_history: int = 10,
) -> SFTExamples:
    """Prompts for (history, target) item-id pairs, truncated oldest-first to ``max_length``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token")
    texts = [response_text(titles[t]) for t in targets]
    responses = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    budgets = max_length - 1 - np.array([len(r) for r in responses], np.int64)
    prompts, keep = _fit_prompts(histories, titles, noun, tokenizer, template, budgets, max_history)
    rows = [i for i, p in enumerate(prompts) if p is not None]
    seqs = [prompts[i] + responses[i] + [eos] for i in rows]
    return SFTExamples(
        input_ids=Ragged.from_rows(seqs, dtype=np.int32),
        prompt_lengths=np.array([len(prompts[i]) for i in rows], np.int64),
        history_kept=keep[rows],
        source_index=np.asarray(rows, np.int64),
        dropped=int(len(targets) - len(rows)),
    )


def _fit_prompts(
    histories: Ragged, titles: Sequence[str], noun: str, tokenizer, template: str,
    budgets: np.ndarray, max_history: int,
) -> tuple[list[list[int] | None], np.ndarray]:  # fmt: skip
    """Prompt token ids of each history (its last ``max_history`` items), dropping the
    oldest items until the prompt has at most ``budgets[i]`` tokens; None (and 0 items
    kept) when even a single item does not fit. Returns (prompts, items kept)."""
    lengths = histories.lengths
    keep = np.minimum(lengths, max_history)
    prompts: list[list[int] | None] = [None] * len(histories)
    pending = np.flatnonzero(keep > 0)
    while len(pending):
        texts = []
        for i in pending:
            items = histories[i][lengths[i] - keep[i] :]
            texts.append(prompt_text(*instruction_and_input([titles[t] for t in items], noun), template, tokenizer))  # fmt: skip
        ids = tokenizer(texts, add_special_tokens=template == "alpaca")["input_ids"]
        fits = np.array([len(p) <= budgets[i] for p, i in zip(ids, pending, strict=True)])
        for j in np.flatnonzero(fits):
            prompts[pending[j]] = ids[j]
        keep[pending[~fits]] -= 1
        pending = pending[~fits][keep[pending[~fits]] > 0]
    return prompts, keep


def tokenize_prompts(
    histories: Ragged, titles: Sequence[str], noun: str, tokenizer, *,
    template: str = "alpaca", max_length: int = 512, max_history: int = 10, reserve: int = 0,
) -> tuple[list[list[int]], np.ndarray]:  # fmt: skip
    """Generation prompts for evaluation histories, built exactly as in ``tokenize_examples``
    but truncated (oldest items first) to ``max_length - reserve`` tokens, ``reserve``
    being the room left for the response. Returns (token ids per row, history items kept).

    No example is dropped: when even the newest item alone exceeds the budget (a very
    long title), the prompt holds that item only, over budget (decoding has no hard
    length limit). Raises ValueError on an empty history.
    """
    empty = np.flatnonzero(histories.lengths == 0)
    if len(empty):
        raise ValueError(
            f"tokenize_prompts: example {empty[0]} (and {len(empty) - 1} more) has an empty history"
        )
    budgets = np.full(len(histories), max_length - reserve, np.int64)
    prompts, keep = _fit_prompts(histories, titles, noun, tokenizer, template, budgets, max_history)
    over = np.array([i for i, p in enumerate(prompts) if p is None], np.int64)
    if len(over):
        unbounded = np.full(len(over), np.iinfo(np.int64).max)
        extra, _ = _fit_prompts(
            histories.take(over), titles, noun, tokenizer, template, unbounded, 1
        )
        for i, p in zip(over, extra, strict=True):
            prompts[i] = p
        keep[over] = 1
    return prompts, keep


def left_pad(
    rows: Sequence[Sequence[int]], width: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [len(rows), width] int32, rows aligned to the right."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"left_pad: row {i} has {len(row)} > width={width} tokens")
        if len(row):
            ids[i, width - len(row) :] = row
            mask[i, width - len(row) :] = 1
    return ids, mask


def _flat_labels(ex: SFTExamples, train_on_inputs: bool) -> np.ndarray:
    """Labels of the concatenated rows: token ids, -100 on each row's first token and,
    unless ``train_on_inputs``, on its prompt."""
    lengths = ex.input_ids.lengths
    pos = np.arange(len(ex.input_ids.values)) - np.repeat(ex.input_ids.offsets[:-1], lengths)
    start = 1 if train_on_inputs else np.repeat(ex.prompt_lengths, lengths)
    return np.where(pos >= np.maximum(start, 1), ex.input_ids.values, IGNORE).astype(np.int32)


def padded_arrays(
    ex: SFTExamples, max_length: int, pad_id: int, padding_side: str = "right",
    train_on_inputs: bool = False,
) -> dict[str, np.ndarray]:  # fmt: skip
    """One example per row: ``input_ids``, ``labels``, ``attention_mask`` [N, max_length]."""
    starts, ends = ex.input_ids.offsets[:-1], ex.input_ids.offsets[1:]
    if len(ex) and (ends - starts).max() > max_length:
        raise ValueError(f"an example has {(ends - starts).max()} > max_length={max_length} tokens")
    window = lambda values, pad: pad_windows(values, starts, ends, max_length, padding_side, pad)  # noqa: E731
    return {
        "input_ids": window(ex.input_ids.values, pad_id),
        "labels": window(_flat_labels(ex, train_on_inputs), IGNORE),
        "attention_mask": window(np.ones(len(ex.input_ids.values), np.int32), 0),
    }


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy bin packing: examples longest first, each into the first row with room.
    Returns (row, column) of every example."""
    order = np.argsort(-lengths, kind="stable")
    free = np.full(len(lengths), capacity, np.int64)  # at most one row per example
    row = np.empty(len(lengths), np.int64)
    col = np.empty(len(lengths), np.int64)
    opened = 0  # rows in use; a new row is always free[opened]
    for e in order:  # data preparation, once: one vectorised first-fit search per example
        r = int(np.argmax(free[: opened + 1] >= lengths[e]))
        opened = max(opened, r + 1)
        row[e], col[e] = r, capacity - free[r]
        free[r] -= lengths[e]
    return row, col


def packed_arrays(
    ex: SFTExamples, max_length: int, pad_id: int, train_on_inputs: bool = False
) -> dict[str, np.ndarray]:
    """Several examples per row (`first_fit_decreasing`), right padded.

    Adds ``positions`` (restarting at 0 in each segment); ``attention_mask`` holds the
    segment id (1, 2, ...) of each token, 0 on padding.
    """
    lengths = ex.input_ids.lengths
    if len(ex) and lengths.max() > max_length:
        raise ValueError(f"an example has {lengths.max()} > max_length={max_length} tokens")
    row, col = first_fit_decreasing(lengths, max_length)
    order = np.lexsort((col, row))  # by row, then position in the row
    seg = np.empty(len(ex), np.int32)
    seg[order] = np.arange(len(ex)) - np.searchsorted(row[order], row[order]) + 1
    n_rows = int(row.max()) + 1 if len(ex) else 0
    pos = np.arange(len(ex.input_ids.values)) - np.repeat(ex.input_ids.offsets[:-1], lengths)
    flat = np.repeat(row * max_length + col, lengths) + pos
    out = {
        "input_ids": np.full(n_rows * max_length, pad_id, np.int32),
        "labels": np.full(n_rows * max_length, IGNORE, np.int32),
        "attention_mask": np.zeros(n_rows * max_length, np.int32),
        "positions": np.zeros(n_rows * max_length, np.int32),
    }
    out["input_ids"][flat] = ex.input_ids.values
    out["labels"][flat] = _flat_labels(ex, train_on_inputs)
    out["attention_mask"][flat] = np.repeat(seg, lengths)
    out["positions"][flat] = pos
    return {k: v.reshape(n_rows, max_length) for k, v in out.items()}


def buckets_for(max_length: int, buckets: Sequence[int] = BUCKETS) -> tuple[int, ...]:
    """The bucket lengths below ``max_length``, plus ``max_length`` itself."""
    return tuple(sorted({b for b in buckets if b < max_length} | {max_length}))


def token_extent(attention_mask: np.ndarray, padding_side: str = "right") -> np.ndarray:
    """Columns each row's tokens span from its padded side's far end (0 for an empty row):
    the width a row needs."""
    used = np.asarray(attention_mask) > 0
    width = used.shape[-1]
    if padding_side == "right":
        extent = width - np.argmax(used[..., ::-1], axis=-1)
    else:
        extent = width - np.argmax(used, axis=-1)
    return np.where(used.any(-1), extent, 0)


def trim_to_bucket(
    batch: dict[str, np.ndarray], buckets: Sequence[int], padding_side: str = "right",
    need: int | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Cuts the padding columns of a batch down to the smallest bucket holding its tokens
    (`need`: the columns to keep, when the batch is part of a larger one that needs more)."""
    width = batch["attention_mask"].shape[1]
    if need is None:
        need = int(token_extent(batch["attention_mask"], padding_side).max(initial=0))
    need = max(need, 1)
    size = min([b for b in buckets if b >= need] or [width])
    cols = slice(0, size) if padding_side == "right" else slice(width - size, width)
    return {k: v[:, cols] if v.ndim == 2 and v.shape[1] == width else v for k, v in batch.items()}


def load_tokenizer(path: str | Path):
    """A HF tokenizer folder; pad = ``<|endoftext|>`` (or EOS) when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = PAD_TOKEN if PAD_TOKEN in vocab else tokenizer.eos_token
    return tokenizer


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str | Path):
    """Trains a byte-level BPE on ``texts`` and saves it as a HF tokenizer folder.

    Special tokens are Qwen's (``<|endoftext|>`` = pad, ``<|im_end|>`` = EOS) and it gets
    a ChatML chat template, so both prompt templates work with it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token=PAD_TOKEN
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return load_tokenizer(out_dir)
