"""Statistics of a semantic-ID index: codebook usage, uniqueness, collisions.

  python -m rqvae.stats --ids=../shared/data/amazon-scientific-2018/indexes/rqvae_native.index.json

Ends with `items=<n> unique_ids=<u> unique_prefixes=<p> max_group=<g>` where a
prefix is all levels but the last.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import flags

from eval import cli
from eval.data.formats import read_index
from eval.errors import FlagError
from rqvae.ids import group_ids


def code_stats(codes: np.ndarray, codebook_size: int) -> dict[str, Any]:
    """Index statistics of codes [N, L] (a code vocabulary of codebook_size per level)."""
    codes = np.asarray(codes)
    n, num_levels = codes.shape
    usage, perplexity = [], []
    for level in range(num_levels):  # per level, vectorised over items
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / n
        usage.append(float(np.count_nonzero(counts)) / codebook_size)
        perplexity.append(float(np.exp(-np.sum(p * np.log(p)))))
    group, sizes = group_ids(codes)
    prefixes = len(np.unique(codes[:, :-1], axis=0)) if num_levels > 1 else 1
    return dict(
        items=n,
        usage=usage,
        perplexity=perplexity,
        unique_ids=len(sizes),
        unique_item_share=float(np.mean(sizes[group] == 1)),
        collision_groups=int(np.sum(sizes > 1)),
        max_group=int(sizes.max()) if n else 0,
        unique_prefixes=prefixes,
    )


def summary_line(s: dict[str, Any]) -> str:
    return (
        f"items={s['items']} unique_ids={s['unique_ids']} "
        f"unique_prefixes={s['unique_prefixes']} max_group={s['max_group']}"
    )


def format_stats(s: dict[str, Any]) -> str:
    """Multi-line human-readable report ending with the summary line."""
    lines = [f"items: {s['items']}"]
    for level, (u, p) in enumerate(zip(s["usage"], s["perplexity"], strict=True)):
        lines.append(f"level {chr(ord('a') + level)}: usage={u:.3f} perplexity={p:.1f}")
    lines += [
        f"unique ids: {s['unique_ids']} (items with a unique id: {s['unique_item_share']:.4f})",
        f"collision groups: {s['collision_groups']} (largest: {s['max_group']})",
        f"unique prefixes (all levels but the last): {s['unique_prefixes']}",
        summary_line(s),
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.ids:
        raise FlagError("--ids=FILE is required")
    codes = read_index(FLAGS.ids)
    if codes.size and codes.max() >= FLAGS.codebook_size:
        raise FlagError(f"{FLAGS.ids}: code {codes.max()} >= --codebook_size={FLAGS.codebook_size}")
    print(format_stats(code_stats(codes, FLAGS.codebook_size)))


if __name__ == "__main__":
    # Flags are defined here so that importing this module (rqvae.train does) adds none.
    flags.DEFINE_string("ids", None, "Index json file ({item: ['<a_i>', '<b_j>', ...]}).")
    flags.DEFINE_integer("codebook_size", 256, "Codes per level, for the usage fraction.")
    cli.run(main)
