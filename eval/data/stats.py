r"""Print a data set's statistics and everything its loader dropped or flagged.

  python -m eval.data.stats --dataset=ml-100k --data_dir=../shared/data/ml-100k

The last line is `users=<u> items=<i> interactions=<n>`.
"""

from __future__ import annotations

import collections

import numpy as np
from absl import flags

from eval import cli
from eval.data.cache import load
from eval.data.dataset import Dataset
from eval.data.formats import is_html_debris
from eval.data.registry import FORMATS
from eval.data.splits import split


def title_quirks(ds: Dataset) -> dict[str, int]:
    """Counts of item-title problems: missing, HTML debris, titles shared by several items."""
    titles = ds.items.titles[1:]
    shared = collections.Counter(t for t in titles if t)
    dup_groups = [n for n in shared.values() if n > 1]
    return {
        "items with title": sum(1 for t in titles if t),
        "items without title": sum(1 for t in titles if not t),
        "distinct titles": len(shared),
        "titles shared by several items": len(dup_groups),
        "items whose title is shared": sum(dup_groups),
        "HTML-debris titles": sum(1 for t in titles if t and is_html_debris(t)),
    }


def describe(ds: Dataset) -> list[str]:
    """Human-readable statistics, ending with the `users= items= interactions=` line."""
    lengths = ds.sequences.lengths
    q = np.quantile(lengths, [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]) if len(lengths) else []
    lines = [
        f"dataset: {ds.name}",
        "sequence length quantiles (min/25/50/75/90/99/max): " + " / ".join(f"{v:g}" for v in q),
        f"timestamps: {'yes' if ds.timestamps is not None else 'no (file order)'}; "
        f"ratings: {'yes' if ds.ratings is not None else 'no'}",
        f"item text fields: {', '.join(['title', *ds.items.fields]) or 'none'}",
    ]
    lines += [f"{k}: {v}" for k, v in title_quirks(ds).items()]
    for name, ex in ds.examples.items():
        lines.append(f"{name} examples: {len(ex)} rows ({len(np.unique(ex.users))} users)")
    sp = split(ds)
    lines.append(f"split: {sp.rule}: " + ", ".join(f"{k}={v}" for k, v in sp.summary().items()))
    dropped = ds.report.lines() + sp.report.lines()
    lines.append("dropped or changed: " + ("nothing" if not dropped else ""))
    lines += [f"  {line}" for line in dropped]
    lines.append(f"users={ds.num_users} items={ds.num_items} interactions={ds.num_interactions}")
    return lines


def _define_flags() -> None:
    flags.DEFINE_string(
        "dataset", None, "Registered data set name, or any name with --format.", required=True
    )
    flags.DEFINE_string("data_dir", None, "Folder with the raw files.", required=True)
    flags.DEFINE_enum("format", None, sorted(FORMATS), "Parser of an unregistered data set.")
    flags.DEFINE_float("min_rating", None, "Keep interactions rated at least this.")
    flags.DEFINE_integer("k_core", None, "Iteratively keep users/items with >= k interactions.")
    flags.DEFINE_enum(
        "duplicates", "drop", ["drop", "keep"], "Interactions with the same user, item, timestamp."
    )


def main(argv):
    del argv
    f = flags.FLAGS
    ds = load(
        f.dataset, f.data_dir, fmt=f.format, min_rating=f.min_rating, k_core=f.k_core,
        duplicates=f.duplicates,
    )  # fmt: skip
    print("\n".join(describe(ds)))


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
