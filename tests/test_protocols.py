"""Tests for eval/protocols.py on tiny synthetic data with hand-computed answers."""

import math

import numpy as np
import pytest

from eval.data.dataset import EvalExamples, Ragged
from eval.metrics import history_mask, metrics_from_ranks, target_ranks
from eval.protocols import (
    full_ranking,
    generative_ranking,
    grounding_ranking,
    grounding_ranks,
    sample_negatives,
    sampled_ranking,
    select_gamma,
)

NUM_ITEMS = 8


def make_examples(histories, targets):
    return EvalExamples(
        users=np.arange(len(targets)),
        history=Ragged.from_rows(histories),
        targets=np.asarray(targets, dtype=np.int64),
    )


EXAMPLES = make_examples([[1, 2], [3], [4, 5, 6]], [3, 4, 7])


def lower_id_is_better(index):
    return np.tile(-np.arange(NUM_ITEMS + 1, dtype=np.float32), (len(index), 1))


# ---------------------------------------------------------------- full ranking


@pytest.mark.parametrize(
    "filter_history, expected_ranks",
    [
        # Items 1..t-1 beat target t; filtering drops the history items among them:
        # ex0 t=3 beaten by {1,2} all in history -> 1; ex1 t=4 by {1,2,3}, 3 in history -> 3;
        # ex2 t=7 by {1..6}, {4,5,6} in history -> 4.
        (True, [1, 3, 4]),
        (False, [3, 4, 7]),
    ],
)
def test_full_ranking_known_answer(filter_history, expected_ranks):
    seen_shapes = set()

    def score_fn(index):
        seen_shapes.add(index.shape)
        return lower_id_is_better(index)

    metrics = full_ranking(
        score_fn, EXAMPLES, NUM_ITEMS, ks=(1, 3), batch_size=2, filter_history=filter_history
    )
    assert seen_shapes == {(2,)}  # last batch padded to the static batch size
    assert metrics == pytest.approx(
        {**metrics_from_ranks(expected_ranks, (1, 3)), "num_examples": 3}
    )
    if filter_history:
        # HR@3: ranks 1, 3 hit -> 2/3; NDCG@3: (1/log2(2) + 1/log2(4)) / 3 = (1 + 0.5) / 3.
        assert metrics["HR@3"] == pytest.approx(2 / 3)
        assert metrics["NDCG@3"] == pytest.approx(0.5)


def test_full_ranking_matches_direct_ranks_for_any_batch_size():
    rng = np.random.default_rng(0)
    num_items, num_examples = 30, 11
    histories = [
        rng.integers(1, num_items + 1, size=rng.integers(0, 6)) for _ in range(num_examples)
    ]
    examples = make_examples(histories, rng.integers(1, num_items + 1, size=num_examples))
    scores = rng.normal(size=(num_examples, num_items + 1)).astype(np.float32)
    ranks = target_ranks(scores, examples.targets, history_mask(examples.history, num_items))
    expected = {**metrics_from_ranks(ranks), "num_examples": num_examples}
    for batch_size in (1, 4, 64):
        got = full_ranking(lambda index: scores[index], examples, num_items, batch_size=batch_size)
        assert got == pytest.approx(expected)


def test_full_ranking_rejects_wrong_score_shape():
    with pytest.raises(ValueError, match="score_fn returned shape"):
        full_ranking(lambda index: np.zeros((len(index), NUM_ITEMS)), EXAMPLES, NUM_ITEMS)


# ---------------------------------------------------------------- sampled ranking


def test_sample_negatives_respects_exclusions_and_seed():
    examples = make_examples([[1, 2, 3], [], [5]] * 4, [4, 6, 5] * 4)
    negatives = sample_negatives(examples, NUM_ITEMS, num_negatives=50, seed=3, chunk_size=5)
    assert negatives.shape == (12, 50) and negatives.dtype == np.int32
    assert ((negatives >= 1) & (negatives <= NUM_ITEMS)).all()
    assert (negatives != examples.targets[:, None]).all()
    assert not history_mask(examples.history, NUM_ITEMS)[np.arange(12)[:, None], negatives].any()
    np.testing.assert_array_equal(
        negatives, sample_negatives(examples, NUM_ITEMS, num_negatives=50, seed=3, chunk_size=5)
    )
    assert (negatives != sample_negatives(examples, NUM_ITEMS, num_negatives=50, seed=4)).any()
    # Without history exclusion, history items of example 0 do show up among 50 draws from 7.
    kept = sample_negatives(examples, NUM_ITEMS, num_negatives=50, seed=3, exclude_history=False)
    assert np.isin(kept[0], [1, 2, 3]).any() and (kept != examples.targets[:, None]).all()


def test_sample_negatives_popularity_distribution():
    # Example history {1}, target 2: allowed items 3..5 with popularity 1:2:5 (items 6..8 have 0).
    popularity = np.array([100, 50, 50, 1, 2, 5, 0, 0, 0], dtype=np.float64)
    examples = make_examples([[1]], [2])
    negatives = sample_negatives(
        examples, NUM_ITEMS, num_negatives=40_000, sampling="popularity", popularity=popularity
    )
    freq = np.bincount(negatives.ravel(), minlength=NUM_ITEMS + 1) / negatives.size
    np.testing.assert_allclose(freq[3:6], [1 / 8, 2 / 8, 5 / 8], atol=0.01)
    assert freq[[0, 1, 2, 6, 7, 8]].sum() == 0


def test_sample_negatives_impossible_raises():
    full_history = make_examples([list(range(1, NUM_ITEMS))], [NUM_ITEMS])
    with pytest.raises(ValueError, match="example 0 has no item left"):
        sample_negatives(full_history, NUM_ITEMS, num_negatives=1)
    with pytest.raises(ValueError, match="needs `popularity`"):
        sample_negatives(EXAMPLES, NUM_ITEMS, sampling="popularity")


def test_sampled_ranking_known_answers():
    def constant(index, candidates):
        np.testing.assert_array_equal(candidates[:, 0], EXAMPLES.targets[index])
        return np.zeros(candidates.shape, dtype=np.float32)

    # All 1 + 4 candidates tie -> pessimistic rank 5 for every example.
    metrics = sampled_ranking(
        constant, EXAMPLES, NUM_ITEMS, num_negatives=4, ks=(3, 5), batch_size=2
    )
    assert metrics["HR@3"] == 0.0 and metrics["HR@5"] == 1.0
    assert metrics["NDCG@5"] == pytest.approx(1 / math.log2(6))  # 1/log2(5+1) = 0.3869
    assert metrics["MRR"] == pytest.approx(1 / 5)
    assert metrics["num_examples"] == 3 and metrics["num_negatives"] == 4

    def oracle(index, candidates):
        return (np.arange(candidates.shape[1]) == 0).astype(np.float32)[None].repeat(len(index), 0)

    metrics = sampled_ranking(oracle, EXAMPLES, NUM_ITEMS, num_negatives=4, ks=(1,))
    assert metrics["HR@1"] == metrics["NDCG@1"] == metrics["MRR"] == 1.0


# ---------------------------------------------------------------- generative ranking


def test_generative_ranking_known_answer():
    titles = ["", "Alpha", "Beta", "Gamma", "Beta"]  # items 2 and 4 share a title
    generated = [
        ["Alpha", "  Gamma ", "Beta"],  # target 3 "Gamma" after strip() at position 2
        [
            "Delta",
            "Beta",
        ],  # target 4 "Beta" (duplicate title, matched by title) -> 2; "Delta" invalid
        ["Alpha", "gamma", "???"],  # target 2 absent ("gamma" and "???" invalid) -> miss
        [],  # nothing generated -> miss
    ]
    metrics = generative_ranking(generated, np.array([3, 4, 2, 1]), titles, ks=(1, 2))
    # Ranks 2, 2, inf, inf.
    assert metrics["HR@1"] == 0.0
    assert metrics["HR@2"] == pytest.approx(2 / 4)
    assert metrics["NDCG@2"] == pytest.approx(2 * (1 / math.log2(3)) / 4)  # 2 * 0.6309 / 4
    assert metrics["MRR"] == pytest.approx((0.5 + 0.5) / 4)
    # 8 strings; invalid: "Delta", "gamma", "???".
    assert metrics["num_generated"] == 8 and metrics["invalid"] == 3
    assert metrics["invalid_rate"] == pytest.approx(3 / 8)
    assert metrics["num_examples"] == 4


def test_generative_ranking_invalid_strings_keep_their_slot():
    metrics = generative_ranking([["nope", "A"]], np.array([1]), ["", "A"], ks=(1, 2))
    assert metrics["HR@1"] == 0.0 and metrics["HR@2"] == 1.0


def test_generative_ranking_rejects_empty_target_title():
    with pytest.raises(ValueError, match="target item 2 has an empty title"):
        generative_ranking([["A"]], np.array([2]), ["", "A", "  "])


# ---------------------------------------------------------------- grounding


# 1-D embeddings: padding at 2.4 (would be the nearest if not excluded), items at 1, 2, 3, 5.
ITEM_EMB = np.array([[2.4], [1.0], [2.0], [3.0], [5.0]], dtype=np.float32)
GEN_EMB = np.array([[2.4], [2.4]], dtype=np.float32)
# Distances to items 1..4: 1.4, 0.4, 0.6, 2.6 -> min-max normalised: 1/2.2, 0, 0.2/2.2, 1.
# Popularity: only item 1 is popular -> pop_norm = [., 1, 0, 0, 0].
POPULARITY = np.array([0, 10, 0, 0, 0], dtype=np.float64)
TARGETS = np.array([1, 2])


def test_grounding_ranks_known_answer():
    ranks = grounding_ranks(GEN_EMB, ITEM_EMB, TARGETS, POPULARITY, gammas=(0.0, 1.0, 3.0))
    # Target 1 scores 0.4545 * 2**-gamma against item 3 at 0.0909 (item 2 is always 0):
    # gamma 0 -> 0.4545 (rank 3), gamma 1 -> 0.2273 (rank 3), gamma 3 -> 0.0568 (rank 2).
    # Target 2 is the nearest item (score 0) for every gamma -> rank 1.
    np.testing.assert_array_equal(ranks, [[3, 1], [3, 1], [2, 1]])


def test_select_gamma_and_grounding_ranking_per_k():
    gammas = select_gamma(GEN_EMB, ITEM_EMB, TARGETS, POPULARITY, gammas=[0.0, 1.0, 3.0], ks=(1, 3))
    # NDCG@1 ties (0.5) for every gamma -> earliest (0.0); NDCG@3 is best with gamma 3.
    assert gammas == {1: 0.0, 3: 3.0}
    metrics = grounding_ranking(
        GEN_EMB, ITEM_EMB, TARGETS, ks=(1, 3), popularity=POPULARITY, gamma=gammas
    )
    assert metrics["gamma@1"] == 0.0 and metrics["gamma@3"] == 3.0
    assert metrics["HR@1"] == pytest.approx(0.5)
    # gamma 3 ranks (2, 1): NDCG@3 = (1/log2(3) + 1) / 2 = (0.6309 + 1) / 2.
    assert metrics["NDCG@3"] == pytest.approx((1 / math.log2(3) + 1) / 2, abs=1e-6)
    assert metrics["MRR"] == pytest.approx((1 / 2 + 1) / 2)  # from the largest k's gamma


def test_grounding_matches_numpy_reference():
    rng = np.random.default_rng(1)
    item_emb = rng.normal(size=(41, 6)).astype(np.float32)
    gen_emb = rng.normal(size=(13, 6)).astype(np.float32)
    targets = rng.integers(1, 41, size=13)
    popularity = rng.integers(0, 50, size=41).astype(np.float64)
    dist = np.linalg.norm(gen_emb[:, None, :] - item_emb[None, :, :], axis=-1)
    lo, hi = dist[:, 1:].min(1, keepdims=True), dist[:, 1:].max(1, keepdims=True)
    pop_norm = popularity / popularity[1:].max()
    ranks = grounding_ranks(gen_emb, item_emb, targets, popularity, gammas=(0.0, 0.5), chunk_size=4)
    for g, gamma in enumerate((0.0, 0.5)):
        score = (dist - lo) / (hi - lo) * (1 + pop_norm) ** -gamma
        np.testing.assert_array_equal(ranks[g], target_ranks(-score, targets))
    metrics = grounding_ranking(gen_emb, item_emb, targets, ks=(5,))
    assert metrics == pytest.approx(
        {
            **metrics_from_ranks(target_ranks(-dist, targets), (5,)),
            "gamma@5": 0.0,
            "num_examples": 13,
        }
    )


def test_grounding_orders_equally_far_items_by_popularity():
    item_emb = np.ones((5, 3), np.float32)  # every item embedded alike
    popularity = np.array([0, 1, 9, 4, 0], dtype=np.float64)
    ranks = grounding_ranks(item_emb[:2], item_emb, np.array([2, 3]), popularity, gammas=(1.0,))
    np.testing.assert_array_equal(ranks, [[1, 2]])  # popularity order: 2, 3, 1, 4


def test_grounding_needs_popularity_for_gamma():
    with pytest.raises(ValueError, match="needs `popularity`"):
        grounding_ranking(GEN_EMB, ITEM_EMB, TARGETS, ks=(1,), gamma=1.0)
