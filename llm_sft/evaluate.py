r"""BIGRec-style evaluation of a fine-tuned run (the ``llm_sft.train --out`` folder).

  python -m llm_sft.evaluate --run=runs/sft [--hf_checkpoint=QWEN_DIR] [--split=test] \
      [--num_beams=20] [--max_examples=N] [--batch_size=16] [--gamma=0.0 | --gamma_grid=0,0.5,1] \
      [--unconstrained] [--out=FILE.json]

For every evaluation example the prompt is built as in training (``run.json``: template,
the last ``max_history`` items, oldest dropped first to fit ``max_length`` minus room for
the longest title). Then:

* Title match: trie-constrained beam search (``num_beams`` beams, all returned) over the
  catalogue titles, so every response is a real title followed by EOS. The decoded
  responses (quotes stripped) are scored by ``eval.protocols.generative_ranking``: exact
  title match, so generating the target's title is a hit at that beam's rank whichever
  item carries the title; a string that is no catalogue title is invalid (0 under the trie;
  ``--unconstrained`` also reports unconstrained greedy decoding, where it need not be).
* BIGRec grounding: the top-1 title and every catalogue title (no prompt, left padded) are
  embedded as the final-norm hidden state at their last token by the BASE model (the run's
  or ``--hf_checkpoint``'s HF checkpoint; the fine-tuned model when the run started from
  random init and no base is given), and items are ranked by L2 distance, optionally
  popularity-adjusted with ``--gamma`` (``eval.protocols.grounding_ranking``; popularity =
  interactions in the training split).

Beams -> item ids (``items_of_beams``, shared with ``llm_sft.recommender``): a title shared
by several items stands for all of them at that beam's position, the most popular in
training first (ties by ascending id; later beams move down), and lists are cut at k.
The id lists are written to the JSON output; the title-match metrics above rank titles,
not ids, so shared titles never push a hit down there.

Batches are left padded to one width (the longest prompt, rounded up to a multiple of 8)
and the last batch is padded with copies of its last row, so decoding compiles once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags
from flax import nnx

from eval import cli, data, protocols
from eval.allocator import reexec_with_tcmalloc
from eval.data.dataset import EvalExamples, Ragged
from eval.decoding import Trie
from eval.errors import FlagError
from eval.io import atomic_write_json
from eval.metrics import DEFAULT_KS, history_mask
from eval.results import ResultTable
from eval.training import read_run
from llm_sft import data as sft_data
from llm_sft.generate import GenerateOutput, generate, last_hidden
from llm_sft.lora import load_peft, merge_lora
from llm_sft.model import Qwen
from llm_sft.params import load_hf
from llm_sft.train import DTYPES

SPLITS = ("test", "valid")


# -- catalogue ------------------------------------------------------------------------------


def response_trie(responses: Sequence[str], tokenizer) -> Trie:
    """Trie over the response texts of items 1..N (trie index i = item i + 1), tokenized as
    in training (no special tokens), each followed by EOS."""
    ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return Trie.build(ids, tokenizer.eos_token_id)


def title_trie(titles: Sequence[str], tokenizer) -> Trie:
    """`response_trie` of the responses ``"<title>"`` (``llm_sft.data.response_text``)."""
    return response_trie([sft_data.response_text(t) for t in titles[1:]], tokenizer)


def title_items(trie: Trie, popularity: np.ndarray | None = None) -> dict[int, list[int]]:
    """Canonical trie title -> every item id with that token sequence, ascending; with
    `popularity` [N+1], the most popular first (ties ascending): P(item | title)."""
    groups: dict[int, list[int]] = {}
    for index, canonical in enumerate(trie.canonical):
        groups.setdefault(int(canonical), []).append(index + 1)
    if popularity is not None:
        groups = {t: sorted(items, key=lambda i: -popularity[i]) for t, items in groups.items()}
    return groups


def unseen_items(history: Ragged | Sequence[Sequence[int]], num_items: int) -> np.ndarray:
    """[E, N] bool: item i + 1 is not in row e's history (a `keep` for the item tries,
    whose sequence i is item i + 1)."""
    return ~history_mask(history, num_items)[:, 1:]


def items_of_beams(
    beam_titles: np.ndarray, groups: dict[int, list[int]], k: int,
    exclude: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:  # fmt: skip
    """Ranked item ids [B, k] (0 = empty slot) from canonical beam titles [B, R] (-1 = none).

    A title shared by several items puts all of them, in `groups`' order, at that beam's
    position.
    ``exclude[b]``: item ids left out of row b (e.g. its history); later items move up.
    """
    out = np.zeros((len(beam_titles), k), np.int32)
    for row, titles in enumerate(np.asarray(beam_titles)):
        skip = set() if exclude is None else {int(i) for i in exclude[row]}
        items = [i for t in titles if t >= 0 for i in groups[int(t)] if i not in skip]
        items = list(dict.fromkeys(items))[:k]
        out[row, : len(items)] = items
    return out


# -- batched decoding -----------------------------------------------------------------------


def padded_batches(num_rows: int, batch_size: int):
    """(row index [size], num_valid) with one size for all batches (last one repeats its
    final row), so a jitted function compiles once."""
    size = max(1, min(batch_size, num_rows))
    for start in range(0, num_rows, size):
        index = np.arange(start, min(start + size, num_rows))
        yield np.pad(index, (0, size - len(index)), mode="edge"), len(index)


def round_up(n: int, multiple: int = 8) -> int:
    return -(-max(n, 1) // multiple) * multiple


def decode_batched(
    model: Qwen, prompts: Sequence[Sequence[int]], *, batch_size: int, pad_id: int,
    width: int | None = None, keep: np.ndarray | None = None, **generate_kwargs,
) -> GenerateOutput:  # fmt: skip
    """``llm_sft.generate.generate`` over all ``prompts`` (token id lists) in left-padded
    batches of one shape; ``keep`` [E, num_sequences]: each prompt's row of ``generate``'s
    ``keep``. Returns NumPy arrays [E, R, ...]."""
    if not len(prompts):
        raise ValueError("decode_batched: no prompts")
    width = width or round_up(max(len(p) for p in prompts))
    parts = []
    for index, n in padded_batches(len(prompts), batch_size):
        ids, mask = sft_data.left_pad([prompts[i] for i in index], width, pad_id)
        rows = None if keep is None else keep[index]
        out = generate(model, ids, mask, pad_token_id=pad_id, keep=rows, **generate_kwargs)
        parts.append([None if x is None else np.asarray(x)[:n] for x in out])
    return GenerateOutput(
        *(None if p[0] is None else np.concatenate(p) for p in zip(*parts, strict=True))
    )


def strip_quotes(text: str) -> str:
    """The title inside a response ``"<title>"`` (one quote off each end, if present)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1]
    return text


def decode_responses(tokenizer, sequences: np.ndarray) -> list[list[str]]:
    """Generated token ids [E, R, L] -> response titles (cut at the first EOS, quotes off)."""
    e, r, length = sequences.shape
    flat = sequences.reshape(-1, length)
    is_eos = flat == tokenizer.eos_token_id
    ends = np.where(is_eos.any(1), np.argmax(is_eos, 1), length)
    texts = tokenizer.batch_decode(
        [row[:end].tolist() for row, end in zip(flat, ends, strict=True)]
    )
    texts = [strip_quotes(t) for t in texts]
    return [texts[i * r : (i + 1) * r] for i in range(e)]


def embed_texts(
    model: Qwen, tokenizer, texts: Sequence[str], *, batch_size: int = 128, width: int | None = None
) -> np.ndarray:
    """Final-norm hidden state at the last token [len(texts), D] (BIGRec's embedding)."""
    rows = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    rows = [r or [tokenizer.pad_token_id] for r in rows]  # an empty text: the pad token
    width = width or round_up(max(len(r) for r in rows))
    out = []
    for index, n in padded_batches(len(rows), batch_size):
        ids, mask = sft_data.left_pad([rows[i] for i in index], width, tokenizer.pad_token_id)
        out.append(np.asarray(last_hidden(model, ids, mask))[:n])
    return np.concatenate(out)


def prompts_for(
    examples: EvalExamples, titles: Sequence[str], noun: str, tokenizer, *, template: str,
    max_length: int, max_history: int, reserve: int, rows: np.ndarray | None = None,
) -> list[list[int]]:  # fmt: skip
    """Training-format prompts of ``examples`` (rows ``rows``, default all)."""
    history = examples.history if rows is None else examples.history.take(np.asarray(rows))
    prompts, _ = sft_data.tokenize_prompts(
        history, titles, noun, tokenizer, template=template, max_length=max_length,
        max_history=max_history, reserve=reserve,
    )  # fmt: skip
    return prompts


# -- runs -----------------------------------------------------------------------------------


def load_run(
    run: str | Path, hf_checkpoint: str | None = None
) -> tuple[dict, Qwen, Qwen | None, Any]:
    """(run.json, fine-tuned model, base model or None, tokenizer) of a finished run.

    A LoRA run needs its base checkpoint (recorded in run.json or ``hf_checkpoint``); its
    adapter is merged into a copy of the base.
    """
    run = Path(run)
    recorded = read_run(run)
    info = {**recorded["config"], **recorded["info"]}
    if not info.get("export"):
        raise ValueError(f"{run}: training has not finished (run.json has no export)")
    export = Path(info["export"])
    if not export.is_dir():  # the run folder was moved: the export is still inside it
        export = run / export.name
    dtype = DTYPES[info.get("dtype", "float32")]
    base_dir = hf_checkpoint or info.get("hf_checkpoint")
    tokenizer = sft_data.load_tokenizer(export)
    base = load_hf(base_dir, dtype=dtype)[0] if base_dir else None
    if info.get("lora"):
        if base is None:
            raise ValueError(f"{run} is a LoRA run: pass --hf_checkpoint=BASE_DIR")
        model = merge_lora(load_peft(nnx.clone(base), export))
    else:
        model = load_hf(export, dtype=dtype)[0]
    return info, model, base, tokenizer


def evaluate_model(
    model: Qwen,
    tokenizer,
    ds: data.Dataset,
    examples: EvalExamples,
    popularity: np.ndarray,
    *,
    template: str = "alpaca",
    max_length: int = 512,
    max_history: int = 10,
    num_beams: int = 20,
    batch_size: int = 16,
    gamma: float | Mapping[int, float] = 0.0,
    gamma_grid: Sequence[float] = (),
    embed_model: Qwen | None = None,
    unconstrained: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, Any]:
    """Title-match and grounding metrics of ``model`` on ``examples`` (see module doc).

    ``embed_model`` embeds for grounding (default ``model``); ``gamma`` is one popularity
    exponent or a {k: gamma} map. Returns {"title_match", "grounding", "empty_slots",
    "items" [E, num_beams], "top1" [E] strings, with ``gamma_grid`` "best_gamma" (the
    {k: gamma} of the grid with the best NDCG@k of the constrained top-1 on ``examples``:
    run it on validation examples), and with ``unconstrained`` "unconstrained_greedy":
    {"title_match", "grounding"}}.
    """
    if num_beams < max(ks):
        raise ValueError(f"num_beams={num_beams} < the largest cutoff {max(ks)}")
    titles = ds.items.titles
    noun = sft_data.item_noun(ds.name)
    trie = title_trie(titles, tokenizer)
    prompts = prompts_for(
        examples, titles, noun, tokenizer, template=template, max_length=max_length,
        max_history=max_history, reserve=trie.depth,
    )  # fmt: skip
    pad = tokenizer.pad_token_id
    beams = decode_batched(
        model, prompts, batch_size=batch_size, pad_id=pad, method="beam", num_beams=num_beams,
        num_return_sequences=num_beams, trie=trie, max_new_tokens=trie.depth,
    )  # fmt: skip
    responses = decode_responses(tokenizer, beams.sequences)
    filled = beams.titles >= 0
    generated = [[s for s, f in zip(row, ok, strict=True) if f] for row, ok in zip(responses, filled, strict=True)]  # fmt: skip
    result: dict[str, Any] = {
        "title_match": protocols.generative_ranking(generated, examples.targets, titles, ks),
        "empty_slots": int((~filled).sum()),
        "items": items_of_beams(beams.titles, title_items(trie, popularity), num_beams),
        "top1": [row[0] if row else "" for row in generated],
    }
    if unconstrained:
        greedy = decode_batched(
            model, prompts, batch_size=batch_size * num_beams, pad_id=pad, method="greedy",
            max_new_tokens=trie.depth,
        )  # fmt: skip
        texts = [row[0] for row in decode_responses(tokenizer, greedy.sequences)]
        result["unconstrained_greedy"] = {
            "title_match": protocols.generative_ranking(
                [[t] for t in texts], examples.targets, titles, ks
            ),  # fmt: skip
            "top1": texts,
        }
    # Grounding: catalogue titles and top-1 responses embedded in one pass (one shape).
    runs = [result] + ([result["unconstrained_greedy"]] if unconstrained else [])
    embedder = embed_model if embed_model is not None else model
    emb = embed_texts(embedder, tokenizer, [*titles[1:], *(t for r in runs for t in r["top1"])])
    catalogue = np.concatenate([np.zeros_like(emb[:1]), emb[: len(titles) - 1]])  # row 0: padding
    for i, r in enumerate(runs):
        start = len(titles) - 1 + i * len(examples)
        r["grounding"] = protocols.grounding_ranking(
            emb[start : start + len(examples)], catalogue, examples.targets, ks, popularity, gamma
        )
    if gamma_grid:
        top1 = emb[len(titles) - 1 : len(titles) - 1 + len(examples)]
        result["best_gamma"] = protocols.select_gamma(
            top1, catalogue, examples.targets, popularity, gamma_grid, ks
        )
    return result


def _subset(examples: EvalExamples, n: int, seed: int) -> EvalExamples:
    """A seeded random subset of ``n`` examples in their original order (all when n < 0)."""
    if not 0 <= n < len(examples):
        return examples
    return examples.take(
        np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
    )


def evaluate_run(
    run: str | Path,
    *,
    hf_checkpoint: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    num_beams: int = 20,
    max_examples: int = -1,
    batch_size: int = 16,
    gamma: float = 0.0,
    gamma_grid: Sequence[float] = (),
    max_valid_examples: int = 1000,
    unconstrained: bool = False,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Loads the run, its data set and split, evaluates (``evaluate_model``) and returns the
    JSON-ready summary (written to ``out`` when given). ``max_examples`` >= 0 evaluates a
    seeded random subset of that many examples. With ``gamma_grid``, the grounding gamma
    per cutoff is first selected on (``max_valid_examples`` of) the validation examples,
    as BIGRec does, and replaces ``gamma``."""
    if split not in SPLITS:
        raise FlagError(f"--split={split!r}: choose one of {SPLITS}")
    info, model, base, tokenizer = load_run(run, hf_checkpoint)
    ds = data.load(info["dataset"], data_dir or info["data_dir"], fmt=info.get("format"))
    sp = data.split(ds)
    examples = _subset(getattr(sp, split), max_examples, seed)
    popularity = np.bincount(sp.train.values, minlength=ds.num_items + 1)
    settings = dict(
        template=info.get("prompt_template", "alpaca"), max_length=info.get("max_length", 512),
        max_history=info.get("max_history", 10), num_beams=num_beams, batch_size=batch_size,
        embed_model=base, ks=ks,
    )  # fmt: skip
    selection = None
    if gamma_grid:
        valid = _subset(sp.valid, max_valid_examples, seed)
        gamma = evaluate_model(model, tokenizer, ds, valid, popularity, gamma_grid=gamma_grid, **settings)["best_gamma"]  # fmt: skip
        selection = {"grid": list(gamma_grid), "valid_examples": len(valid)}
    result = evaluate_model(
        model, tokenizer, ds, examples, popularity, gamma=gamma, unconstrained=unconstrained, **settings
    )  # fmt: skip
    summary = {
        "run": str(run),
        "dataset": info["dataset"],
        "split": split,
        "num_examples": len(examples),
        "num_beams": num_beams,
        "gamma": gamma,
        "gamma_selection": selection,
        "grounding_model": "base" if base is not None else "finetuned",
        **{k: v for k, v in result.items() if k != "items"},
        "predictions": {
            "users": examples.users.tolist(),
            "targets": examples.targets.tolist(),
            "items": result["items"].tolist(),
        },
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, summary, indent=1, default=float)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The metric tables (NDCG / HR @1 @3 @5 @10 @20) of both protocols plus invalid shares."""
    tm = summary["title_match"]
    lines = [
        f"{summary['run']}: {summary['dataset']} {summary['split']}, {summary['num_examples']} "
        f"examples, {summary['num_beams']} beams",
        "",
        "Title match (trie-constrained beam search)",
        ResultTable(tm).to_markdown(),
        f"invalid generations: {tm['invalid']}/{tm['num_generated']} = {tm['invalid_rate']:.4f}"
        f" (empty beam slots: {summary['empty_slots']})",
        "",
        f"BIGRec grounding (top-1 title, {summary['grounding_model']} model embeddings, "
        f"gamma={_gamma_text(summary)})",
        ResultTable(summary["grounding"]).to_markdown(),
    ]
    if "unconstrained_greedy" in summary:
        ug = summary["unconstrained_greedy"]
        lines += [
            f"Unconstrained greedy: invalid generations {ug['title_match']['invalid']}/"
            f"{ug['title_match']['num_generated']} = {ug['title_match']['invalid_rate']:.4f}",
            "",
            "Unconstrained greedy, BIGRec grounding",
            ResultTable(ug["grounding"]).to_markdown(),
        ]
    return "\n".join(lines)


def _gamma_text(summary: dict[str, Any]) -> str:
    gamma, selection = summary["gamma"], summary.get("gamma_selection")
    if not isinstance(gamma, Mapping):
        return f"{gamma:g}"
    text = ", ".join(f"@{k}: {g:g}" for k, g in sorted(gamma.items(), key=lambda kv: int(kv[0])))
    if selection:
        text += f"; selected on {selection['valid_examples']} validation examples from {selection['grid']}"
    return text


def _define_flags() -> None:
    f = flags
    f.DEFINE_string("run", None, "llm_sft.train --out folder (with run.json).", required=True)
    f.DEFINE_string("hf_checkpoint", None, "Base HF checkpoint (LoRA runs; grounding embeddings).")
    f.DEFINE_string("data_dir", None, "Raw data folder (default: the one in run.json).")
    f.DEFINE_enum("split", "test", list(SPLITS), "Evaluation examples.")
    f.DEFINE_integer("num_beams", 20, "Beams (all returned); >= the largest cutoff 20.")
    f.DEFINE_integer("max_examples", -1, "Evaluate a seeded random subset (-1: all).")
    f.DEFINE_integer("batch_size", 16, "Prompts per beam-search call.")
    f.DEFINE_float("gamma", 0.0, "Grounding popularity exponent (BIGRec).")
    f.DEFINE_list(
        "gamma_grid", [], "Select the gamma per cutoff on validation from these (replaces --gamma)."
    )
    f.DEFINE_integer("max_valid_examples", 1000, "Validation examples for --gamma_grid (-1: all).")
    f.DEFINE_bool("unconstrained", False, "Also report unconstrained greedy decoding.")
    f.DEFINE_integer("seed", 0, "Seed of the --max_examples subset.")
    f.DEFINE_string("out", None, "Write the summary (metrics + ranked item ids) as JSON here.")


def main(argv):
    del argv
    f = flags.FLAGS
    summary = evaluate_run(
        f.run, hf_checkpoint=f.hf_checkpoint, data_dir=f.data_dir, split=f.split,
        num_beams=f.num_beams, max_examples=f.max_examples, batch_size=f.batch_size,
        gamma=f.gamma, gamma_grid=[float(g) for g in f.gamma_grid], max_valid_examples=f.max_valid_examples,
        unconstrained=f.unconstrained, seed=f.seed, out=f.out,
    )  # fmt: skip
    print(format_summary(summary))


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
