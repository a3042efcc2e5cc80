"""Tests for eval/metrics.py: known answers, a brute-force reference, NumPy/JAX parity."""

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.data.dataset import Ragged
from eval.metrics import (
    history_mask,
    metrics_from_ranks,
    metrics_from_ranks_jax,
    ranks_from_lists,
    target_ranks,
    target_ranks_jax,
)

B, N = 4, 7  # fixed shapes for property tests, so the jitted functions compile once
SETTINGS = settings(max_examples=60, deadline=None)


def reference_ranks(scores, targets, mask):
    """Sort-based reference: the target is placed after every item it ties with."""
    ranks = []
    for row, target in enumerate(targets):
        pool = [i for i in range(1, scores.shape[1]) if i == target or not mask[row, i]]
        order = sorted(pool, key=lambda i: (-scores[row, i], i == target))
        ranks.append(order.index(target) + 1)
    return np.array(ranks)


# ---------------------------------------------------------------- known answers


def test_target_ranks_known_answer():
    scores = np.array(
        [
            # pad  1    2    3    4    5
            [9.0, 0.5, 0.9, 0.5, 0.1, 0.7],  # target 3 (0.5): 2 (0.9), 5 (0.7), 1 (tie) -> 4
            [9.0, 0.5, 0.9, 0.5, 0.1, 0.7],  # same, items 1 and 2 masked -> 5 only -> 2
            [0.0, 0.3, 0.3, 0.3, 0.3, 0.3],  # all tie, target 1 -> 1 + 4 others = 5
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # target 5 masked but never excluded -> 1
        ],
        dtype=np.float32,
    )
    targets = np.array([3, 3, 1, 5])
    mask = np.zeros_like(scores, dtype=bool)
    mask[1, [1, 2]] = True
    mask[3, 5] = True
    expected = [4, 2, 5, 1]
    np.testing.assert_array_equal(target_ranks(scores, targets, mask), expected)
    np.testing.assert_array_equal(np.asarray(target_ranks_jax(scores, targets, mask)), expected)


def test_ranks_from_lists_known_answer():
    ranked = np.array(
        [
            [4, 2, 7, 2],  # target 2: first occurrence at position 2
            [0, -1, 5, 3],  # target 5 after two empty slots -> 3
            [1, 2, 3, 4],  # target 9 absent -> inf
        ]
    )
    ranks = ranks_from_lists(ranked, np.array([2, 5, 9]))
    np.testing.assert_array_equal(ranks, [2.0, 3.0, np.inf])


def test_metrics_from_ranks_known_answer():
    metrics = metrics_from_ranks(np.array([1, 2, 4, np.inf]), ks=(1, 3, 5))
    log2_3, log2_5 = math.log2(3), math.log2(5)
    expected = {
        "HR@1": 1 / 4,  # only rank 1
        "HR@3": 2 / 4,  # ranks 1, 2
        "HR@5": 3 / 4,  # ranks 1, 2, 4
        "NDCG@1": 1 / 4,  # 1/log2(2) = 1
        "NDCG@3": (1 + 1 / log2_3) / 4,  # (1 + 0.6309) / 4 = 0.4077
        "NDCG@5": (1 + 1 / log2_3 + 1 / log2_5) / 4,  # (1 + 0.6309 + 0.4307) / 4 = 0.5154
        "MRR@1": 1 / 4,
        "MRR@3": (1 + 1 / 2) / 4,  # 0.375
        "MRR@5": (1 + 1 / 2 + 1 / 4) / 4,  # 0.4375
        "MRR": (1 + 1 / 2 + 1 / 4 + 0) / 4,  # inf contributes 0 -> 0.4375
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    jax_metrics = metrics_from_ranks_jax(np.array([1, 2, 4, np.inf]), (1, 3, 5))
    for key, value in expected.items():
        assert float(jax_metrics[key]) == pytest.approx(value, abs=1e-6), key


def test_history_mask_known_answer():
    hist = Ragged.from_rows([[1, 3], [], [2, 2, 5]])
    expected = np.zeros((3, 6), dtype=bool)
    expected[0, [1, 3]] = True
    expected[2, [2, 5]] = True
    np.testing.assert_array_equal(history_mask(hist, 5), expected)
    np.testing.assert_array_equal(history_mask([[1, 3], [], [2, 2, 5]], 5), expected)
    np.testing.assert_array_equal(
        history_mask(hist, 5, rows=np.array([2, 0, 2])), expected[[2, 0, 2]]
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: target_ranks(np.zeros((2, 4)), np.array([1, 0])), "outside 1..3"),
        (lambda: target_ranks(np.zeros((2, 4)), np.array([1, 4])), "outside 1..3"),
        (lambda: target_ranks(np.zeros((2, 4)), np.array([1.0, 2.0])), "integer"),
        (lambda: target_ranks(np.full((1, 4), np.nan), np.array([1])), "NaN"),
        (
            lambda: target_ranks(np.zeros((1, 4)), np.array([1]), np.zeros((1, 3), bool)),
            "mask shape",
        ),
        (lambda: ranks_from_lists(np.ones((1, 3)), np.array([0])), ">= 1"),
        (lambda: history_mask([[1, 9]], 5), "0..5"),
        (lambda: metrics_from_ranks(np.array([0, 1])), ">= 1"),
        (lambda: metrics_from_ranks(np.array([])), "non-empty"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- properties

tie_scores = hnp.arrays(np.float32, (B, N + 1), elements=st.integers(-2, 2).map(float))
targets_st = hnp.arrays(np.int32, (B,), elements=st.integers(1, N))
masks_st = hnp.arrays(np.bool_, (B, N + 1))


@SETTINGS
@given(scores=tie_scores, targets=targets_st, mask=masks_st)
def test_target_ranks_match_reference_and_jax(scores, targets, mask):
    ranks = target_ranks(scores, targets, mask)
    np.testing.assert_array_equal(ranks, reference_ranks(scores, targets, mask))
    np.testing.assert_array_equal(np.asarray(target_ranks_jax(scores, targets, mask)), ranks)
    unmasked = target_ranks(scores, targets)
    np.testing.assert_array_equal(np.asarray(target_ranks_jax(scores, targets)), unmasked)
    # Rank within [1, #non-excluded items]; masking can only improve a rank.
    others_excluded = mask[:, 1:].sum(1) - mask[np.arange(B), targets]
    assert (ranks >= 1).all() and (ranks <= N - others_excluded).all()
    assert (unmasked <= N).all() and (ranks <= unmasked).all()


@SETTINGS
@given(scores=tie_scores, targets=targets_st, mask=masks_st, perm=st.permutations(range(1, N + 1)))
def test_target_ranks_permutation_invariant(scores, targets, mask, perm):
    columns = np.array([0, *perm])  # new column j holds old item columns[j]
    new_id = np.argsort(columns)  # old item id -> new item id
    ranks = target_ranks(scores[:, columns], new_id[targets], mask[:, columns])
    np.testing.assert_array_equal(ranks, target_ranks(scores, targets, mask))


def test_target_ranks_ignore_padding_column():
    scores = np.array([[100.0, 1.0, 2.0]])
    assert target_ranks(scores, np.array([2]))[0] == 1


rank_lists = st.lists(
    st.one_of(st.integers(1, 30).map(float), st.just(math.inf)), min_size=16, max_size=16
)


@SETTINGS
@given(ranks=rank_lists)
def test_metric_properties_and_jax_parity(ranks):
    ks = (1, 3, 5, 10, 20)
    ranks = np.array(ranks)
    metrics = metrics_from_ranks(ranks, ks)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    for small, large in zip(ks, ks[1:], strict=False):
        for name in ("HR", "NDCG", "MRR"):
            assert metrics[f"{name}@{small}"] <= metrics[f"{name}@{large}"] + 1e-12
    for k in ks:  # 1/r <= 1/log2(r+1) <= 1 for r >= 1
        assert metrics[f"MRR@{k}"] <= metrics[f"NDCG@{k}"] + 1e-12
        assert metrics[f"NDCG@{k}"] <= metrics[f"HR@{k}"] + 1e-12
        assert metrics[f"HR@{k}"] == pytest.approx(np.mean(ranks <= k))
    assert metrics["MRR"] >= metrics["MRR@20"] - 1e-12
    # Example order does not matter.
    assert metrics_from_ranks(ranks[::-1], ks) == pytest.approx(metrics)
    jax_metrics = metrics_from_ranks_jax(ranks, ks)
    assert jax_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert float(jax_metrics[key]) == pytest.approx(value, abs=1e-6), key


@SETTINGS
@given(
    lists=hnp.arrays(np.int64, (B, 5), elements=st.integers(-1, 6)),
    targets=hnp.arrays(np.int64, (B,), elements=st.integers(1, 6)),
)
def test_ranks_from_lists_match_reference(lists, targets):
    expected = [
        list(row).index(t) + 1 if t in row else np.inf
        for row, t in zip(lists.tolist(), targets, strict=True)
    ]
    np.testing.assert_array_equal(ranks_from_lists(lists, targets), expected)


@SETTINGS
@given(
    rows=st.lists(st.lists(st.integers(0, N), max_size=6), min_size=1, max_size=5), data=st.data()
)
def test_history_mask_matches_loop(rows, data):
    pick = np.array(data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=6)), dtype=np.int64)
    expected = np.zeros((len(pick), N + 1), dtype=bool)
    for out_row, r in enumerate(pick):
        for item in rows[r]:
            expected[out_row, item] = True
    np.testing.assert_array_equal(history_mask(Ragged.from_rows(rows), N, rows=pick), expected)


def test_jax_ranks_nan_pessimistically():
    scores = np.array([[0.0, np.nan, 1.0, 0.5], [0.0, 1.0, np.nan, 0.5]], dtype=np.float32)
    # row 0: target 2 (1.0) is beaten by the NaN item 1 -> rank 2;
    # row 1: target 2 is NaN -> beaten by items 1 and 3 -> rank 3.
    np.testing.assert_array_equal(np.asarray(target_ranks_jax(scores, np.array([2, 2]))), [2, 3])
