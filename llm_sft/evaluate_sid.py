r"""Test metrics of a semantic-ID LLM (a `llm_sft.train_sid` run, or its exported model).

  python -m llm_sft.evaluate_sid --run=runs/sid [--split=test] [--max_examples=-1] \
      [--num_beams=20] [--out=metrics.json]

Reloads `<run>/hf` (model + tokenizer with the SID tokens) and the run's data set and index,
then reports, as the SID model cards do, greedy first-code accuracy, full-ID exact match
and invalid share per task (text -> ID on items, sequential on the split's examples), and
for sequential recommendation item-level Recall / NDCG @1..20 over the full item set from
constrained beams (`llm_sft.sid_decode`), the protocol of TIGER's table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import flags

from eval import cli, data
from eval.allocator import reexec_with_tcmalloc
from eval.data.dataset import Dataset
from eval.data.formats import read_item_codes
from eval.data.splits import Split
from eval.io import atomic_write_json
from eval.training import read_run
from llm_sft.data import item_noun, load_tokenizer
from llm_sft.model import Qwen
from llm_sft.params import load_hf
from llm_sft.sid_data import SIDTasks, TaskExamples, sequential_examples, task_examples
from llm_sft.sid_decode import greedy_scores, rank_items

SPLITS = ("test", "valid")


def evaluate(
    model: Qwen, tokenizer, ds: Dataset, split: Split, codes: np.ndarray, *,
    tasks: SIDTasks | None = None, which: str = "test", template: str = "chat",
    max_examples: int = -1, num_beams: int = 20, batch_size: int = 8, seed: int = 0,
) -> dict:  # fmt: skip
    """{"examples", "greedy": {task: scores}, "sequential": Recall/NDCG + invalid beams} on
    `max_examples` seeded examples of split `which` (and as many items for text -> ID)."""
    tasks, noun, examples = tasks or SIDTasks(), item_noun(ds.name), getattr(split, which)
    seq = sequential_examples(ds, codes, examples.history, examples.targets, tasks, noun)
    seq = seq.sample(max_examples, seed)
    text = task_examples(ds, split, codes, SIDTasks(weights={"text_to_sid": 1.0}), noun)
    text = text.sample(max_examples, seed)
    kw = dict(template=template, batch_size=batch_size)
    ranking = rank_items(model, tokenizer, seq, codes, num_beams=num_beams, **kw)
    return {
        "examples": len(seq),
        "greedy": greedy_scores(model, tokenizer, TaskExamples.concat([text, seq]), codes, **kw),
        "sequential": {k: v for k, v in ranking.items() if k != "items"},
    }


def summary_line(dataset: str, result: dict) -> str:
    seq = result["sequential"]
    tasks = " ".join(f"{t}: first_code={s['first_code_accuracy']:.3f} exact={s['exact_match']:.3f}"
                     for t, s in result["greedy"].items())  # fmt: skip
    return (f"sid-llm {dataset}: HR@10={seq['HR@10']:.4f} NDCG@10={seq['NDCG@10']:.4f} "
            f"invalid={seq['invalid']} {tasks}")  # fmt: skip


def _define_flags() -> None:
    flags.DEFINE_string("run", None, "A `llm_sft.train_sid` run folder.", required=True)
    flags.DEFINE_enum("split", "test", list(SPLITS), "Evaluation examples.")
    flags.DEFINE_integer("max_examples", -1, "Seeded subset of the examples (-1: all).")
    flags.DEFINE_integer("num_beams", 20, "Constrained beams (>= the largest cutoff, 20).")
    flags.DEFINE_integer("batch_size", 8, "Prompts per decoding batch.")
    flags.DEFINE_string("data_dir", None, "Override the run's --data_dir.")
    flags.DEFINE_string("out", None, "Write the metrics as JSON here.")


def main(argv):
    del argv
    f = flags.FLAGS
    config = read_run(f.run)["config"]
    ds = data.load(config["dataset"], f.data_dir or config["data_dir"], fmt=config["format"])
    codes = read_item_codes(config["semantic_ids"], ds)
    model, _ = load_hf(Path(f.run) / "hf")
    tasks = SIDTasks(**{**config["tasks"], "text_fields": tuple(config["tasks"]["text_fields"])})
    result = evaluate(
        model, load_tokenizer(Path(f.run) / "hf"), ds, data.split(ds), codes, tasks=tasks,
        which=f.split, template=config["template"], max_examples=f.max_examples,
        num_beams=f.num_beams, batch_size=f.batch_size, seed=config["stage2"]["seed"],
    )  # fmt: skip
    if f.out:
        atomic_write_json(f.out, result, indent=1)
    print(summary_line(config["dataset"], result))


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
