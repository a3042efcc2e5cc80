"""Semantic-ID index files and collision-free IDs.

Index file format (as in LC-Rec / LETTER and /work/shared/data/.../indexes):
`{"0": ["<a_12>", "<b_3>", "<c_200>"], "1": [...], ...}`: keys are 0-based item
indices as strings, tokens `<{level letter}_{code}>` with letters a, b, c, ...

Two ways to make every item's ID unique:
  * `append_collision_level`: TIGER's extra level, the item's ordinal within its
    group of identical IDs (IDs become L+1 codes long);
  * `reassign_last_level`: within each prefix group (first L-1 codes), a
    minimum-cost assignment of distinct last-level codes (cost = squared distance
    between the item's last-level residual and the code vector); IDs stay L long.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from eval.errors import UserError
from eval.io import atomic_write_json


def group_ids(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (group index per item [N], group sizes [G]) of identical rows of codes [N, L]."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def ordinal_in_group(group: np.ndarray) -> np.ndarray:
    """0-based rank of each item among the items of its group, in item order."""
    order = np.argsort(group, kind="stable")
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    ordinal = np.empty_like(group)
    ordinal[order] = np.arange(len(group)) - run_start
    return ordinal


def append_collision_level(codes: np.ndarray) -> np.ndarray:
    """TIGER: appends a level with each item's ordinal within its collision group."""
    codes = np.asarray(codes)
    group, _ = group_ids(codes)
    return np.concatenate([codes, ordinal_in_group(group)[:, None]], 1).astype(codes.dtype)


class PrefixOverflowError(UserError, ValueError):
    """A prefix group has more items than there are last-level codes."""


def reassign_last_level(
    codes: np.ndarray, last_residuals: np.ndarray, last_codebook: np.ndarray
) -> np.ndarray:
    """Minimum-cost reassignment of the last level to distinct codes per prefix group.

    Args:
      codes: [N, L] codes, L >= 1 (with L == 1 the whole index is one prefix group).
      last_residuals: [N, D], the input of the last quantisation level for each item.
      last_codebook: [K, D], the last level's code vectors.
    Returns:
      [N, L] codes with unique rows; prefixes unchanged. Only groups that contain a
      collision are reassigned (Hungarian algorithm over the group's K codes).
    Raises:
      PrefixOverflowError if a colliding prefix group holds more than K items (no
      L-long collision-free assignment exists); `append_collision_level` is the
      fallback.
    """
    codes = np.asarray(codes)
    n, num_levels = codes.shape
    k = last_codebook.shape[0]
    if last_residuals.shape != (n, last_codebook.shape[1]):
        raise ValueError(
            f"last_residuals shape {last_residuals.shape} != ({n}, {last_codebook.shape[1]})"
        )
    prefix_group, _ = group_ids(codes[:, :-1]) if num_levels > 1 else (np.zeros(n, np.int64), None)
    full_group, full_sizes = group_ids(codes)
    colliding = np.unique(prefix_group[full_sizes[full_group] > 1])
    order = np.argsort(prefix_group, kind="stable")
    bounds = np.searchsorted(prefix_group[order], np.r_[colliding, colliding + 1].reshape(2, -1))
    members = [order[a:b] for a, b in zip(*bounds, strict=True)]
    too_big = [(codes[m[0], :-1].tolist(), len(m)) for m in members if len(m) > k]
    if too_big:
        raise PrefixOverflowError(
            f"reassign_last_level: {len(too_big)} prefix group(s) have more items than the "
            f"{k} last-level codes (prefix, size; first 5: {too_big[:5]}); use "
            "append_collision_level or a larger codebook"
        )
    out = codes.copy()
    sq_codebook = np.sum(last_codebook.astype(np.float64) ** 2, -1)
    for m in members:  # one assignment problem per colliding prefix group
        r = last_residuals[m].astype(np.float64)
        cost = np.sum(r * r, -1, keepdims=True) - 2.0 * r @ last_codebook.T + sq_codebook
        rows, cols = linear_sum_assignment(cost)
        out[m[rows], -1] = cols
    return out


def codes_to_index(codes: np.ndarray) -> dict[str, list[str]]:
    """[N, L] int codes -> index dict."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] > 26:
        raise ValueError(f"codes must be [N, L<=26], got shape {codes.shape}")
    letters = [chr(ord("a") + i) for i in range(codes.shape[1])]
    return {
        str(i): [f"<{letters[j]}_{int(c)}>" for j, c in enumerate(row)]
        for i, row in enumerate(codes.tolist())
    }


def write_index(path: str | Path, codes: np.ndarray) -> None:
    """Writes [N, L] int codes as an index json file (atomically)."""
    atomic_write_json(path, codes_to_index(codes))
