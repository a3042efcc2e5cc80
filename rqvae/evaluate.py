r"""Re-evaluate an `rqvae.train` or `rqvae.tiger_train` run from its checkpoint.

  python -m rqvae.evaluate --run=runs/rqvae [--which=best|latest]
  python -m rqvae.evaluate --run=runs/tiger [--which=best|latest] [--data_dir=DIR] [--out=FILE.json]

An RQ-VAE run re-encodes its embeddings: reconstruction loss and the index statistics of
the codes (ending with `rqvae.stats`' summary line). A TIGER run reloads its data set and
semantic-ID index from `run.json` and prints validation and test Recall / NDCG @1,5,10,20.
"""

from __future__ import annotations

from absl import flags

from eval import cli
from eval.allocator import reexec_with_tcmalloc
from eval.errors import FlagError
from eval.io import atomic_write_json
from eval.training import read_run
from rqvae import tiger_train, train
from rqvae.stats import format_stats


def evaluate_run(
    run_dir: str, which: str = "best", data_dir: str | None = None
) -> tuple[dict, list[str]]:
    """(metrics, printable lines) of a run folder's checkpoint `which`."""
    package = read_run(run_dir)["package"]
    if package == "rqvae":
        model, x, step = train.load_run(run_dir, which)
        _, stats = train.evaluate_codes(model, x)
        return {"step": step, **stats}, [f"checkpoint {which} (step {step}): recon_loss={stats['recon_loss']:.5f}",
                                         format_stats(stats)]  # fmt: skip
    if package == "tiger":
        model, ds, split, si, config, step = tiger_train.load_run(run_dir, which, data_dir)
        metrics = tiger_train.evaluate_splits(model, split, si, config)
        lines = [f"checkpoint {which} (step {step}), {ds.name}"]
        lines += [
            f"{name}: " + " ".join(f"{k}={m[k]:.4f}" for k in m if "@" in k)
            for name, m in metrics.items()
        ]
        return {"step": step, **metrics}, lines
    raise FlagError(f"--run={run_dir}: a {package!r} run, not an rqvae / tiger one")


def _define_flags() -> None:
    flags.DEFINE_string(
        "run", None, "An `rqvae.train` or `rqvae.tiger_train` --out folder.", required=True
    )
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to evaluate.")
    flags.DEFINE_string("data_dir", None, "TIGER: raw data folder (default: the one in run.json).")
    flags.DEFINE_string("out", None, "Optional JSON file for the metrics.")


def main(argv):
    del argv
    f = flags.FLAGS
    metrics, lines = evaluate_run(f.run, f.which, f.data_dir)
    if f.out:
        atomic_write_json(f.out, metrics, indent=1, default=float)
    print("\n".join(lines))


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
