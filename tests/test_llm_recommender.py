"""llm_sft.recommender (BIGRec leaderboard entry) end to end, and the trainer's sparse LM
head (``TrainConfig.max_label_tokens``) that its budget relies on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx
from tiny import tiny_bigrec_budget, write_tiny_ml100k

from eval import data
from eval import recommender as eval_recommender
from eval.recommender import evaluate, validation_rows
from eval.training import loop
from llm_sft import recommender
from llm_sft.data import IGNORE
from llm_sft.model import ModelConfig, Qwen
from llm_sft.trainer import _check_label_tokens, _forward_sums, label_budget


def test_sparse_lm_head_loss_equals_the_full_loss():
    cfg = ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=8, rope_theta=10_000.0, initializer_range=0.3,
    )  # fmt: skip
    model = nnx.jit(lambda: Qwen(cfg, rngs=nnx.Rngs(0)))()  # one compile, not op by op
    # Full head, exactly the scored tokens, every position (unscored ones as filler).
    forward_sums = nnx.jit(lambda m, b: [_forward_sums(m, b, n) for n in (0, 7, 12)])
    ids = np.random.default_rng(0).integers(0, 64, (3, 12), dtype=np.int32)
    labels = np.full((3, 12), IGNORE, np.int32)
    labels[0, 8:11], labels[1, 5:12] = ids[0, 8:11], ids[1, 5:12]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": np.ones((3, 12), np.int32)}
    full, *sparse = forward_sums(model, batch)
    assert int(full[1]) == 3 + 7
    for sums in sparse:
        np.testing.assert_allclose(sums, full, rtol=1e-5)
    _check_label_tokens(labels, 7)
    with pytest.raises(ValueError, match="max_label_tokens=6"):
        _check_label_tokens(labels, 6)
    # The budget that fits these rows (and a packed row of 9), rounded up to 8.
    assert label_budget(labels) == 8 and label_budget(labels, labels[:1].repeat(3, 1)) == 16


def test_bigrec_recommender_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(recommender.BUDGETS, "demo", tiny_bigrec_budget())
    ds = data.load("ml-100k", write_tiny_ml100k(tmp_path / "ml-100k"))
    sp = data.split(ds)
    rec = recommender.BigRecRecommender()
    info = rec.fit(ds, sp, budget="demo", seed=0)
    assert info["steps"] == 3 and info["train_examples"] == 12 and info["vocab"] <= 384
    # All rows in one call, as `evaluate` below does (same shapes: one compiled search).
    lists = rec.rank(sp.test, np.arange(len(sp.test)), 20)
    assert lists.shape == (len(sp.test), 20) and ((lists >= 0) & (lists <= ds.num_items)).all()
    for row, items in enumerate(lists):
        kept = items[items > 0]
        assert len(set(kept)) == len(kept) and not set(kept) & set(sp.test.history[row])
        assert len(kept) > 0
    metrics = evaluate(rec, ds, sp.test, "full")
    assert metrics["num_examples"] == len(sp.test)
    assert 0 <= metrics["NDCG@10"] <= metrics["HR@10"] <= metrics["HR@20"] <= 1


def test_bigrec_ranks_past_the_first_beams_by_popularity_grounding(tmp_path, monkeypatch):
    budget = dataclasses.replace(tiny_bigrec_budget(), beam_items=3, gamma=2.0)
    monkeypatch.setitem(recommender.BUDGETS, "demo", budget)
    ds = data.load("ml-100k", write_tiny_ml100k(tmp_path / "ml-100k"))
    sp = data.split(ds)
    rec = recommender.BigRecRecommender()
    rec.fit(ds, sp, budget="demo", seed=0)
    index = np.arange(len(sp.test))
    lists = rec.rank(sp.test, index, 20)
    rec.cfg = dataclasses.replace(budget, beam_items=None)
    beams = rec.rank(sp.test, index, 20)
    np.testing.assert_array_equal(lists[:, :3], beams[:, :3])
    pop = np.bincount(sp.train.values, minlength=ds.num_items + 1).astype(np.float64)
    for row, items in enumerate(lists):
        history = set(sp.test.history[row].tolist())
        # BIGRec's grounding by hand: distance to the top beam's title embedding, min-max
        # normalised over the catalogue, divided by (1 + popularity share) ** gamma.
        dist = np.linalg.norm(rec.item_emb[1:] - rec.item_emb[items[0]], axis=1)
        score = (
            (dist - dist.min()) / (dist.max() - dist.min()) * (1 + pop[1:] / pop[1:].max()) ** -2.0
        )
        order = [i + 1 for i in np.lexsort((-pop[1:], score))]  # ties: most popular first
        expected = [i for i in order if i not in history and i not in items[:3]]
        expected = (expected + [0] * 20)[:17]
        np.testing.assert_array_equal(items[3:], expected)
        # Every slot the catalogue can fill is filled.
        assert (items > 0).sum() == min(20, ds.num_items - len(history - {0}))


def test_bigrec_keeps_the_state_with_the_best_validation_ranking(tmp_path, monkeypatch):
    """With `max_valid`, every evaluation ranks the same validation rows; the state with
    the best NDCG@10 is the one `rank` uses afterwards."""
    budget = tiny_bigrec_budget()
    train = dataclasses.replace(budget.train, max_steps=None, num_epochs=4, learning_rate=3e-2)
    budget = dataclasses.replace(budget, train=train, max_valid=6, beam_items=2, gamma=1.0)
    monkeypatch.setitem(recommender.BUDGETS, "demo", budget)
    ds = data.load("ml-100k", write_tiny_ml100k(tmp_path / "ml-100k"))
    sp = data.split(ds)
    rec = recommender.BigRecRecommender()
    seen = []  # (step's validation NDCG@10, its lists) of each evaluation
    real = eval_recommender.evaluate

    def spy(r, ds_, examples):
        out = real(r, ds_, examples)
        seen.append((out["NDCG@10"], r.rank(examples, np.arange(len(examples)), 20)))
        return out

    monkeypatch.setattr(eval_recommender, "evaluate", spy)
    lines = []  # the progress lines, one per evaluation
    monkeypatch.setattr(loop.logging, "info", lambda msg, *a: lines.append(msg % a if a else msg))
    info = rec.fit(ds, sp, budget="demo", seed=0)
    assert [m.split(" (")[0] for m in lines if "ETA" in m] == [
        f"bigrec: step {s}/12" for s in (3, 6, 9, 12)
    ]
    assert info["steps"] == 4 * 3 and [s for s, _ in info["curve"]] == [3, 6, 9, 12]
    assert [v for _, v in info["curve"]] == [v for v, _ in seen]
    best = int(np.argmax([v for v, _ in seen]))  # the first of ties, as the loop keeps
    assert info["best_step"] == 3 * (best + 1) and info["valid_NDCG@10"] == seen[best][0]
    valid = sp.valid.take(sp.valid.sample_rows(6, 0))
    np.testing.assert_array_equal(rec.rank(valid, np.arange(len(valid)), 20), seen[best][1])


def test_bigrec_grounding_puts_tied_items_most_popular_first():
    rec = recommender.BigRecRecommender()
    rec.item_emb = np.array([[0, 0], [1, 0], [1, 0], [1, 0], [0, 1]], np.float32)  # 1-3: one title
    rec.pop_norm = np.array([0.0, 0.1, 0.5, 1.0, 0.2], np.float32)
    # The top beam (item 1), then its title's other items at distance 0, most popular first.
    np.testing.assert_array_equal(
        rec._grounded(np.array([[1, 0]]), None, 4, 1, 0.0), [[1, 3, 2, 4]]
    )


def test_bigrec_chooses_its_list_on_validation(tmp_path, monkeypatch):
    """With grids, `fit` keeps the (beam_items, gamma) pair with the best validation
    NDCG@10 (the first of ties), as `evaluate` measures each on the same rows."""
    grid = dict(beam_items_grid=(0, 1, 3), gamma_grid=(0.0, 8.0))
    budget = dataclasses.replace(tiny_bigrec_budget(), beam_items=2, gamma=1.0, **grid)
    monkeypatch.setitem(recommender.BUDGETS, "demo", budget)
    ds = data.load("ml-100k", write_tiny_ml100k(tmp_path / "ml-100k"))
    sp = data.split(ds)
    rec = recommender.BigRecRecommender()
    with pytest.raises(ValueError, match="need max_valid"):
        rec.fit(ds, sp, budget="demo", seed=0)
    monkeypatch.setitem(recommender.BUDGETS, "demo", dataclasses.replace(budget, max_valid=8))
    info = rec.fit(ds, sp, budget="demo", seed=0)
    chosen = rec.cfg
    valid = validation_rows(sp, 8, 0)
    ndcg = {}
    for beams in grid["beam_items_grid"]:
        for gamma in grid["gamma_grid"]:
            rec.cfg = dataclasses.replace(chosen, beam_items=beams, gamma=gamma)
            ndcg[beams, gamma] = evaluate(rec, ds, valid)["NDCG@10"]
    best = max(ndcg, key=ndcg.get)  # the first of ties, in grid order
    assert info["list"] == {"beam_items": best[0], "gamma": best[1]}
    assert (chosen.beam_items, chosen.gamma) == best


def test_long_titles_are_cut_to_leave_room_for_a_prompt(tmp_path, monkeypatch):
    from llm_sft.data import shorten_titles

    titles = np.asarray(["", "Toy Story (1995)", "Anonymous", "A Verylongword"], dtype=object)
    assert shorten_titles(titles, None) is titles
    assert shorten_titles(titles, 12).tolist() == ["", "Toy Story", "Anonymous", "A"]
    ds = data.load("ml-100k", write_tiny_ml100k(tmp_path / "ml-100k"))
    ds.items.titles[1] = "word " * 120  # ~120 tokens: more than half of 128
    budget = dataclasses.replace(tiny_bigrec_budget(), max_length=128)
    monkeypatch.setitem(recommender.BUDGETS, "demo", budget)
    with pytest.raises(ValueError, match=r"titles take up to \d+ tokens.*max_title_chars=None"):
        recommender.BigRecRecommender().fit(ds, data.split(ds), budget="demo", seed=0)
    cut = dataclasses.replace(budget, max_title_chars=40)
    monkeypatch.setitem(recommender.BUDGETS, "demo", cut)
    rec, sp = recommender.BigRecRecommender(), data.split(ds)
    assert rec.fit(ds, sp, budget="demo", seed=0)["steps"] == 3
    assert rec.titles[1] == "word " * 7 + "word" and rec.trie.depth < 64
    # A prompt over its budget (its newest title alone is) is decoded whole.
    rec.cfg = dataclasses.replace(cut, max_length=rec.trie.depth + 8)
    assert rec.rank(sp.test, np.arange(len(sp.test)), 10).shape == (len(sp.test), 10)
