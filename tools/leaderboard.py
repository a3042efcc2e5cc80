r"""Run every registered recommender on each data set with its protocol; write the tables.

  python -m tools.leaderboard --datasets=ml-100k --budget=demo
  python -m tools.leaderboard --datasets=ml-100k,amazon-sports-2014 --data_root=../shared/data
  python -m tools.leaderboard --datasets=my-data --format=p5 --data_root=DIR --seeds=3

Models are selected on the validation examples (inside `fit`); the test examples are
evaluated once. Writes `<out>/leaderboard.md` (a table per data set, a note under it for
every learned model that does not beat the count baselines), `<out>/leaderboard.json`,
`<out>/leaderboard.png` (test NDCG@10 and HR@10 per model per data set) and
`<out>/curves_<dataset>.png` (validation NDCG@10 against step, per trained model).
`--seeds=N` trains every model N times (seeds 0..N-1) and reports mean ± std; differences
within the spread are called ties. A model that builds on another's files (`sid-llm` on
`tiger`'s semantic IDs) runs after it; each run's files are kept under
`<out>/work/<dataset>/seed<k>/<model>/`. The models that read item text (`tiger`, `bigrec`,
`sid-llm`) are not run on a data set whose items have none (the P5 sets: ids only); the
note under its table says so.
"""

from __future__ import annotations

import importlib
import pathlib
import tempfile
import time

import numpy as np
from absl import flags, logging

from eval import cli, data
from eval.allocator import reexec_with_tcmalloc
from eval.data.registry import FORMATS, get_spec
from eval.errors import FlagError, MissingFileError
from eval.io import atomic_path, atomic_write_json, atomic_write_text
from eval.recommender import BUDGETS, Recommender, evaluate
from eval.results import leaderboard_markdown
from tools.fetch_data import ensure_dataset

# name -> "module:Class". Adding a model is one line here (see WORKSPACE.md).
RECOMMENDERS: dict[str, str] = {
    "most-popular": "eval.baselines:MostPopular",
    "transitions": "eval.baselines:Transitions",
    "sasrec": "hstu.recommender:SASRecRecommender",
    "hstu": "hstu.recommender:HSTURecommender",
    "recgpt": "hstu.recommender:RecGPTRecommender",
    "tiger": "rqvae.recommender:TigerRecommender",
    "bigrec": "llm_sft.recommender:BigRecRecommender",
    "sid-llm": "llm_sft.recommender:SidLLMRecommender",
}
COUNT_BASELINES = ("most-popular", "transitions")
KS = (5, 10, 20)  # the table's cutoffs


def recommender_class(name: str) -> type[Recommender]:
    """The class of a registered recommender."""
    if name not in RECOMMENDERS:
        raise FlagError(f"--models: unknown {name!r}; registered: {sorted(RECOMMENDERS)}")
    module, cls = RECOMMENDERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def ordered(models: list[str]) -> list[str]:
    """`models` in their order, except that each comes after the models it `needs`."""
    done: list[str] = []

    def visit(model: str) -> None:
        for need in recommender_class(model).needs:
            if need not in models:
                raise FlagError(f"--models: {model} reads the files of {need}; add {need}")
            visit(need)
        if model not in done:
            done.append(model)

    for model in models:
        visit(model)
    return done


def not_runnable(cls: type[Recommender], ds: data.Dataset) -> str:
    """Why `cls` cannot run on `ds` ('' if it can): a text model on items without text."""
    if cls.item_text and not ds.items.has_text(cls.item_text):
        return f"no item has a {' / '.join(cls.item_text)} (it reads item text)"
    return ""


def data_dir(name: str, root: str | None) -> pathlib.Path:
    """Where the raw files of `name` are: under `root`, else fetched (ml-100k only)."""
    if root:
        folder = pathlib.Path(root) / name
        if not folder.is_dir():
            raise MissingFileError(f"--data_root={root}: no sub-folder {name!r}")
        return folder
    return ensure_dataset(name)


def _mean_std(runs: list[dict]) -> tuple[dict, dict]:
    keys = [k for k, v in runs[0]["test"].items() if isinstance(v, int | float)]
    values = {k: np.asarray([r["test"][k] for r in runs], np.float64) for k in keys}
    return {k: float(v.mean()) for k, v in values.items()}, {
        k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()
    }


def run(
    datasets, models, budget: str, seeds: int, root: str | None, fmt: str | None = None,
    work: pathlib.Path | None = None,
) -> dict:  # fmt: skip
    """{dataset: {"protocol", "split", "models": {name: {"test" (mean), "test_std", "runs"}}}}.
    `work`: where each run's files go (default: a temporary folder)."""
    if work is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run(datasets, models, budget, seeds, root, fmt, pathlib.Path(tmp))
    models, results = ordered(list(models)), {}
    for name in datasets:
        ds = data.load(name, data_dir(name, root), fmt=fmt)
        sp = data.split(ds)
        protocol = get_spec(name, fmt).protocol
        entry = {"protocol": protocol, "split": sp.rule, **sp.summary(), "models": {}}
        for model in models:
            cls = recommender_class(model)
            if why := not_runnable(cls, ds):
                logging.warning("%s / %s: not run: %s", name, model, why)
                entry.setdefault("not_run", {})[model] = why
                continue
            runs = []
            for seed in range(seeds):
                logging.info("%s / %s (seed %d): training", name, model, seed)
                folder = work / name / f"seed{seed}"
                rec = cls(folder / model, {need: folder / need for need in cls.needs})
                start = time.perf_counter()
                info = rec.fit(ds, sp, budget=budget, seed=seed)
                fit_s = time.perf_counter() - start
                test = evaluate(rec, ds, sp.test, protocol, seed=seed)
                eval_s = time.perf_counter() - start - fit_s
                runs.append({"seed": seed, "test": test, "fit_s": fit_s, "eval_s": eval_s, **info})
                logging.info("%s / %s (seed %d): test NDCG@10 %.4f (fit %.1f s)",
                             name, model, seed, test["NDCG@10"], fit_s)  # fmt: skip
            mean, std = _mean_std(runs)
            entry["models"][model] = {
                "test": mean, "test_std": std, "fit_s": float(np.mean([r["fit_s"] for r in runs])),
                "runs": runs,
            }  # fmt: skip
        results[name] = entry
    return results


def notes(entry: dict, metric: str = "NDCG@10") -> list[str]:
    """One line per learned model at or below a count baseline on `metric` (within the
    seed spread: a tie), and how the best learned model compares with `transitions`."""
    models = entry["models"]
    counts = {b: models[b] for b in COUNT_BASELINES if b in models}
    learned = {m: r for m, r in models.items() if m not in COUNT_BASELINES}
    lines = []
    for model, r in learned.items():
        for base, b in counts.items():
            gap = r["test"][metric] - b["test"][metric]
            spread = r["test_std"].get(metric, 0.0) + b["test_std"].get(metric, 0.0)
            if gap <= 0:
                lines.append(f"- {model} does not beat {base} at this budget ({metric} "
                             f"{r['test'][metric]:.4f} vs {b['test'][metric]:.4f}).")  # fmt: skip
            elif gap <= spread:
                lines.append(f"- {model} and {base} tie ({metric} difference {gap:.4f} within "
                             f"the seed spread {spread:.4f}).")  # fmt: skip
    if learned and "transitions" in counts:
        best = max(learned, key=lambda m: learned[m]["test"][metric])
        base = counts["transitions"]["test"][metric]
        gain = learned[best]["test"][metric] - base
        rel = f" ({gain / base:+.0%})" if base > 0 else ""
        lines.append(f"- best learned model: {best}, {metric} {gain:+.4f} vs transitions{rel}.")
    for model, why in entry.get("not_run", {}).items():
        lines.append(f"- {model} not run: {why}.")
    return lines


def render(results: dict, seeds: int = 1) -> str:
    """Markdown: one table of test metrics per data set (mean ± std over seeds), the
    best value of each column in bold, notes on learned models vs count baselines."""
    parts = []
    for name, entry in results.items():
        parts.append(
            f"## {name}\n\nprotocol: {entry['protocol']}; split: {entry['split']}; "
            f"test examples: {entry['test_examples']}; seeds: {seeds}\n"
        )
        models = entry["models"]
        rows = {m: {**r["test"], "fit_s": f"{r['fit_s']:.1f}"} for m, r in models.items()}
        stds = {m: r["test_std"] for m, r in models.items()} if seeds > 1 else None
        parts.append(leaderboard_markdown(rows, KS, ("fit_s",), std=stds, bold_best=True))
        if extra := notes(entry):
            parts.append("\n".join(extra) + "\n")
        if any(run.get("curve") for r in models.values() for run in r["runs"]):
            parts.append(f"![validation curves](curves_{name}.png)\n")
    if results:
        parts.append("![test NDCG@10 and HR@10](leaderboard.png)\n")
    return "\n".join(parts)


def plot(results: dict, out: pathlib.Path) -> list[pathlib.Path]:
    """`leaderboard.png` (grouped bars, error bars = seed std) and one validation-curve
    plot per data set; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.2 * len(results)), squeeze=False)
    for row, (name, entry) in enumerate(results.items()):
        models = list(entry["models"])
        for col, metric in enumerate(("NDCG@10", "HR@10")):
            ax = axes[row][col]
            means = [entry["models"][m]["test"][metric] for m in models]
            stds = [entry["models"][m]["test_std"].get(metric, 0.0) for m in models]
            ax.bar(models, means, yerr=stds, color=[f"C{i}" for i in range(len(models))])
            ax.set_title(f"{name}: test {metric}")
            ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with atomic_path(out / "leaderboard.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    written.append(out / "leaderboard.png")
    for name, entry in results.items():
        curves = {
            (m, run["seed"]): run["curve"]
            for m, r in entry["models"].items()
            for run in r["runs"]
            if run.get("curve")
        }
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for (model, seed), curve in curves.items():
            steps, values = zip(*curve, strict=True)
            ax.plot(steps, values, label=f"{model} (seed {seed})")
        ax.set(xlabel="step", ylabel="validation NDCG@10", title=f"{name}: validation")
        ax.legend()
        fig.tight_layout()
        with atomic_path(out / f"curves_{name}.png") as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        written.append(out / f"curves_{name}.png")
    return written


def write(results: dict, out: pathlib.Path, budget: str, seeds: int = 1) -> str:
    """Write `leaderboard.{md,json,png}` and the curve plots under `out`; return the Markdown."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = render(results, seeds)
    atomic_write_text(out / "leaderboard.md", f"# Leaderboard (budget: {budget})\n\n{table}")
    atomic_write_json(out / "leaderboard.json", results, indent=1, default=float)
    plot(results, out)
    return table


def _define_flags() -> None:
    flags.DEFINE_list("datasets", ["ml-100k"], "Registered data set names (any with --format).")
    flags.DEFINE_enum("format", None, sorted(FORMATS), "Parser of unregistered data sets.")
    flags.DEFINE_string(
        "data_root", None, "Folder holding one sub-folder per data set (named as the data set). "
        "Without it, ml-100k is fetched into the cache (GroupLens or the recbole wheel on PyPI).",
    )  # fmt: skip
    flags.DEFINE_list("models", None, f"Subset of {sorted(RECOMMENDERS)} (default: all).")
    flags.DEFINE_enum("budget", "demo", BUDGETS, "Training budget passed to every model.")
    flags.DEFINE_integer("seeds", 1, "Runs per model (seeds 0..N-1): mean ± std.", lower_bound=1)
    flags.DEFINE_string("out", "results", "Output folder.")


def main(argv):
    del argv
    f = flags.FLAGS
    models = f.models or list(RECOMMENDERS)
    out = pathlib.Path(f.out)
    results = run(f.datasets, models, f.budget, f.seeds, f.data_root, f.format, out / "work")
    print(write(results, out, f.budget, f.seeds))


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
