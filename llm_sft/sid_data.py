"""Multi-task semantic-ID SFT data from an `eval` data set, its item text and an index.

Four tasks, each a (instruction, input, response) triple in the chosen prompt template:

- `text_to_sid`: an item's text (title, brand, categories, description) -> its ID;
- `sid_to_text`: an item's ID -> its title;
- `sequential`: a user's history as IDs (optionally with titles), oldest first -> the next ID;
- `copurchase`: an item's ID -> the item users most often take next.

Sequential and co-purchase examples come from the split's training sequences only, so no
validation or test target (nor any later item) is ever a training response or history.
`SIDTasks.weights` sets the mixture: a task's examples are subsampled (weight < 1) or
repeated (> 1, seeded draws beyond the whole copies); 0 drops the task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from eval.data.dataset import Dataset, Ragged
from eval.data.splits import Split
from llm_sft.data import SFTExamples, prompt_text, train_histories
from llm_sft.sid_tokens import sid_text

TASKS = ("text_to_sid", "sid_to_text", "sequential", "copurchase")
TEXT_FIELDS = ("title", "brand", "categories", "description")


@dataclasses.dataclass(frozen=True)
class SIDTasks:
    """Which tasks, in what proportion, and how their prompts are built."""

    weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(TASKS, 1.0)
    )
    max_history: int = 20
    history_titles: bool = False  # sequential / co-purchase inputs also show titles
    text_fields: tuple[str, ...] = TEXT_FIELDS

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(TASKS))
        if unknown or any(w < 0 for w in self.weights.values()):
            raise ValueError(f"task weights {dict(self.weights)}: tasks are {TASKS}, weights >= 0")


@dataclasses.dataclass
class TaskExamples:
    """Untokenized examples: task name, instruction, input text, response text, and the
    item the response names (its dense id)."""

    task: list[str]
    instruction: list[str]
    input: list[str]
    response: list[str]
    item: np.ndarray

    def __len__(self) -> int:
        return len(self.task)

    def take(self, rows: np.ndarray) -> TaskExamples:
        pick = lambda values: [values[r] for r in rows]  # noqa: E731
        return TaskExamples(
            pick(self.task), pick(self.instruction), pick(self.input), pick(self.response),
            self.item[np.asarray(rows, np.int64)],
        )  # fmt: skip

    def sample(self, n: int, seed: int) -> TaskExamples:
        """A seeded subset of `n` examples in their order (all of them when n < 0 or >= len)."""
        if not 0 <= n < len(self):
            return self
        return self.take(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))

    @staticmethod
    def concat(parts: list[TaskExamples]) -> TaskExamples:
        join = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        return TaskExamples(
            join("task"), join("instruction"), join("input"), join("response"),
            np.concatenate([p.item for p in parts]).astype(np.int64),
        )  # fmt: skip


def _item_ref(ds: Dataset, codes: np.ndarray, item: int, titles: bool) -> str:
    sid = sid_text(codes[item])
    return f"{sid} ({ds.items.titles[item]})" if titles and ds.items.titles[item] else sid


def next_item_pairs(train: Ragged) -> np.ndarray:
    """[M, 2] (item, the item most often right after it) over the training sequences
    (ties: the smaller id), one row per item that has a successor."""
    lengths = train.lengths
    last = np.zeros(len(train.values), bool)
    last[train.offsets[1:][lengths > 0] - 1] = True
    a, b = train.values[:-1][~last[:-1]], train.values[1:][~last[:-1]]
    if not len(a):
        return np.zeros((0, 2), np.int64)
    pairs, counts = np.unique(np.stack([a, b], 1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # per item: most frequent first
    pairs = pairs[order]
    first = np.concatenate([[True], pairs[1:, 0] != pairs[:-1, 0]])
    return pairs[first].astype(np.int64)


def sequential_examples(
    ds: Dataset, codes: np.ndarray, histories: Ragged, targets: np.ndarray, tasks: SIDTasks,
    noun: str,
) -> TaskExamples:  # fmt: skip
    """`sequential` examples of (history, next item) pairs: the last `tasks.max_history`
    items as IDs (with titles when `tasks.history_titles`), oldest first -> the next ID.
    Training uses the split's training prefixes; evaluation its valid / test examples."""
    inputs = []
    for r in range(len(targets)):
        items = histories[r][-tasks.max_history :]
        inputs.append("; ".join(_item_ref(ds, codes, int(h), tasks.history_titles) for h in items))
    instruction = (
        f"Here are the {noun} a user took, oldest first. Which comes next? {_ask_id(noun)}"
    )
    return TaskExamples(
        ["sequential"] * len(targets), [instruction] * len(targets), inputs,
        [sid_text(codes[t]) for t in targets], np.asarray(targets, np.int64),
    )  # fmt: skip


def _ask_id(noun: str) -> str:
    return f"Answer with the {noun[:-1] if noun.endswith('s') else noun} ID."


def task_examples(
    ds: Dataset, split: Split, codes: np.ndarray, tasks: SIDTasks, noun: str, seed: int = 0
) -> TaskExamples:
    """Every task's examples (see module doc), mixed by `tasks.weights`. `codes`: [N + 1, L],
    row = dense item id (row 0 unused)."""
    fields = [f for f in tasks.text_fields if f == "title" or f in ds.items.fields]
    items = np.arange(1, ds.num_items + 1)
    built: dict[str, tuple[list[str], list[str], list[str], np.ndarray]] = {}
    ask_id = _ask_id(noun)
    built["text_to_sid"] = (
        [f"Which of our {noun} is this? {ask_id}"] * len(items),
        [ds.items.text(i, fields) for i in items],
        [sid_text(codes[i]) for i in items],
        items,
    )
    titled = items[[bool(ds.items.titles[i]) for i in items]] if len(items) else items
    built["sid_to_text"] = (
        ["What is the title of this item?"] * len(titled),
        [sid_text(codes[i]) for i in titled],
        [ds.items.titles[i] for i in titled],
        titled,
    )
    histories, targets = train_histories(split.train, tasks.max_history)
    seq = sequential_examples(ds, codes, histories, targets, tasks, noun)
    built["sequential"] = (seq.instruction, seq.input, seq.response, seq.item)
    pairs = next_item_pairs(split.train)
    built["copurchase"] = (
        [f"Users who take this item most often take which one next? {ask_id}"] * len(pairs),
        [_item_ref(ds, codes, int(a), tasks.history_titles) for a in pairs[:, 0]],
        [sid_text(codes[b]) for b in pairs[:, 1]],
        pairs[:, 1],
    )
    rng = np.random.default_rng(seed)
    out = TaskExamples([], [], [], [], np.zeros(0, np.int64))
    chosen = []
    for task in TASKS:
        weight = tasks.weights.get(task, 0.0)
        instructions, inputs, responses, targets_ = built[task]
        n = len(responses)
        whole, frac = divmod(weight * n, n) if n else (0, 0)
        picks = np.concatenate([np.tile(np.arange(n), int(whole)),
                                rng.choice(n, int(round(frac)), replace=False)]) if n else []  # fmt: skip
        picks = np.asarray(picks, np.int64)
        out.task += [task] * len(picks)
        out.instruction += [instructions[i] for i in picks]
        out.input += [inputs[i] for i in picks]
        out.response += [responses[i] for i in picks]
        chosen.append(np.asarray(targets_)[picks])
    out.item = np.concatenate(chosen).astype(np.int64)
    return out


def tokenize_tasks(
    ex: TaskExamples, tokenizer, *, template: str = "chat", max_length: int = 512
) -> SFTExamples:
    """prompt + response + EOS token rows; an example longer than `max_length` is dropped
    (counted in `dropped`). Loss goes on the response tokens (`prompt_lengths`)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token")
    prompts = [
        prompt_text(i, x, template, tokenizer)
        for i, x in zip(ex.instruction, ex.input, strict=True)
    ]
    prompt_ids = (
        tokenizer(prompts, add_special_tokens=template == "alpaca")["input_ids"] if prompts else []
    )
    response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] if prompts else []
    rows = [
        r for r in range(len(ex)) if len(prompt_ids[r]) + len(response_ids[r]) + 1 <= max_length
    ]
    return SFTExamples(
        input_ids=Ragged.from_rows([prompt_ids[r] + response_ids[r] + [eos] for r in rows], np.int32),
        prompt_lengths=np.array([len(prompt_ids[r]) for r in rows], np.int64),
        history_kept=np.zeros(len(rows), np.int64),
        source_index=np.asarray(rows, np.int64),
        dropped=len(ex) - len(rows),
    )  # fmt: skip
