"""eval baselines, the Recommender protocol dispatch and tools.leaderboard end to end."""

import json

import numpy as np
import pytest
from tiny import tiny_bigrec_budget, tiny_sid_budget, tiny_tiger_budget, write_tiny_ml100k

from eval import data
from eval.baselines import MostPopular, Transitions
from eval.data.dataset import ItemTable, Ragged
from eval.data.formats import read_index
from eval.errors import FlagError
from eval.recommender import evaluate
from tools import leaderboard


def tiny_dataset():
    # Leave-one-out train rows: [1,2,3], [1,2], [1,2,3]: transitions 1->2 x3, 2->3 x2.
    seqs = [[1, 2, 3, 4, 4], [1, 2, 1, 3], [1, 2, 3, 2, 1]]
    items = ItemTable([""] + list("abcd"), [""] + list("ABCD"))
    return data.Dataset("tiny", items, ["u", "v", "w"], Ragged.from_rows(seqs))


def test_baseline_scores_are_the_hand_counts():
    ds = tiny_dataset()
    sp = data.split(ds)
    pop = MostPopular()
    pop.fit(ds, sp, budget="demo", seed=0)
    # train rows: [1,2,3], [1,2], [1,2,3] -> counts of items 1..4 = 3, 3, 2, 0
    np.testing.assert_array_equal(pop.popularity, [0, 3, 3, 2, 0])
    tr = Transitions()
    tr.fit(ds, sp, budget="demo", seed=0)
    scores = tr.score(sp.valid, np.array([0, 1]))
    backoff = np.array([0, 3, 3, 2, 0]) / 4  # popularity / (max + 1)
    # valid history of u = [1,2,3] (last 3: no transition out); of v = [1,2] (last 2: 2->3 x2).
    np.testing.assert_allclose(scores[0], backoff)
    np.testing.assert_allclose(scores[1], backoff + [0, 0, 0, 2, 0])


def test_evaluate_full_and_sampled():
    ds = tiny_dataset()
    sp = data.split(ds)
    tr = Transitions()
    tr.fit(ds, sp, budget="demo", seed=0)
    full = evaluate(tr, ds, sp.valid, "full", ks=(1, 2))
    # u: history {1,2,3} filtered, target 4 is the only item left -> rank 1.
    # v: last item 2, target 1 (kept although in history, .75) below item 3 (2.5) -> rank 2.
    # w: history {1,2,3} filtered but target 2 kept (.75) above item 4 (0) -> rank 1.
    assert full["HR@1"] == 2 / 3 and full["HR@2"] == 1.0 and full["num_examples"] == 3


def test_sampled_protocol_ranks_against_negatives():
    rng = np.random.default_rng(0)
    seqs = [rng.permutation(np.arange(1, 301))[:10] for _ in range(50)]
    ds = data.Dataset(
        "r", ItemTable([""] * 301, [""] * 301), [str(u) for u in range(50)], Ragged.from_rows(seqs)
    )
    sp = data.split(ds)
    pop = MostPopular()
    pop.fit(ds, sp, budget="demo", seed=0)
    sampled = evaluate(pop, ds, sp.test, "sampled", ks=(10,))
    full = evaluate(pop, ds, sp.test, "full", ks=(10,))
    assert sampled["num_negatives"] == 100
    # 101 candidates instead of ~290: a target can only rank better.
    assert sampled["HR@10"] >= full["HR@10"]


def test_leaderboard_writes_tables(tmp_path, monkeypatch):
    from hstu import recommender
    from llm_sft import recommender as llm_recommender
    from rqvae import recommender as tiger_recommender

    # Every registered model runs end to end; the trained ones with a tiny budget, TIGER
    # on random item embeddings (the MiniLM wheel is not fetched in tests).
    monkeypatch.setitem(
        recommender.BUDGETS, "demo", dict(max_seq_len=8, num_epochs=2, embedding_dim=8)
    )
    monkeypatch.setitem(
        recommender.RecGPTRecommender.prompt_budgets,
        "demo",
        dict(prompt_lengths=(1,), prompt_overrides={"num_epochs": 1},
             arch={"ffn_dim": 8, "negatives_not_in_sequence": False}, recall_shares=(0.9, 0.5)),
    )  # fmt: skip
    monkeypatch.setitem(tiger_recommender.BUDGETS, "demo", tiny_tiger_budget())
    monkeypatch.setitem(llm_recommender.BUDGETS, "demo", tiny_bigrec_budget())
    monkeypatch.setitem(llm_recommender.SID_BUDGETS, "demo", tiny_sid_budget())
    # A data set's validation-chosen overrides (`Recommender.tuned`) replace the budget's;
    # the SID LLM's also keep its best stage-2 state by the ranking of 4 validation rows.
    tuned = {
        "sid-llm": dict(max_valid=4, stage2=dict(max_steps=3)),
        "tiger": dict(max_valid=5),
        "sasrec": dict(num_epochs=1),
    }
    for name, fields in tuned.items():
        cls = leaderboard.recommender_class(name)
        monkeypatch.setattr(cls, "tuned", {"demo": {"ml-100k": fields}})
    monkeypatch.setattr(
        tiger_recommender,
        "item_embeddings",
        lambda ds: np.random.default_rng(1).normal(size=(ds.num_items, 16)),
    )
    write_tiny_ml100k(tmp_path / "root" / "ml-100k")
    work = tmp_path / "out" / "work"
    models = list(leaderboard.RECOMMENDERS)[::-1]  # sid-llm first: it still runs after tiger
    results = leaderboard.run(["ml-100k"], models, "demo", 1, str(tmp_path / "root"), work=work)
    ran = list(results["ml-100k"]["models"])
    assert ran.index("tiger") < ran.index("sid-llm")
    # sid-llm trained on the IDs tiger wrote: one token per code, per level, plus 2.
    ids = read_index(work / "ml-100k" / "seed0" / "tiger" / "semantic_ids.json")
    sid = results["ml-100k"]["models"]["sid-llm"]["runs"][0]
    assert sid["sid_tokens"] == 2 + ids.shape[1] * (ids.max() + 1)
    assert sid["stage2"]["steps"] == 3 and sid["stage2"]["best_step"] == 3
    assert [step for step, _ in sid["curve"]] == [3] and "valid_NDCG@10" in sid["stage2"]
    for name, fields in tuned.items():
        assert results["ml-100k"]["models"][name]["runs"][0]["overrides"] == fields
    leaderboard.write(results, tmp_path / "out", "demo")
    table = (tmp_path / "out" / "leaderboard.md").read_text()
    assert all(f"| {name} |" in table for name in leaderboard.RECOMMENDERS) and "NDCG@20" in table
    assert "best learned model:" in table and "![validation curves](curves_ml-100k.png)" in table
    for png in ("leaderboard.png", "curves_ml-100k.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    test = results["ml-100k"]["models"]["transitions"]["test"]
    assert test["num_examples"] == 20 and 0 <= test["NDCG@10"] <= test["HR@10"] <= 1
    recgpt = results["ml-100k"]["models"]["recgpt"]["runs"][0]
    assert recgpt["recall_n"] in (5, 8, 9, None) and recgpt["pretrain_valid_NDCG@10"] >= 0
    assert recgpt["stage"] in ("pretrain", "prompt_k1")
    curve = results["ml-100k"]["models"]["sasrec"]["runs"][0]["curve"]
    assert [step for step, _ in curve] == sorted(step for step, _ in curve) and curve


def test_leaderboard_seeds_mean_std_ties_and_notes(tmp_path):
    write_tiny_ml100k(tmp_path / "root" / "ml-100k")
    models = ["most-popular", "transitions"]
    results = leaderboard.run(["ml-100k"], models, "demo", 2, str(tmp_path / "root"))
    entry = results["ml-100k"]
    pop = entry["models"]["most-popular"]
    assert [r["seed"] for r in pop["runs"]] == [0, 1] and pop["test_std"]["NDCG@10"] == 0.0
    # A learned model below a count baseline is said so under the table, a close one is a tie.
    fake = lambda v, s: {"test": {"NDCG@10": v}, "test_std": {"NDCG@10": s}, "runs": []}  # noqa: E731
    entry["models"] = {"transitions": fake(0.05, 0.0), "most-popular": fake(0.02, 0.0),
                       "a": fake(0.04, 0.001), "b": fake(0.051, 0.002)}  # fmt: skip
    lines = leaderboard.notes(entry)
    assert "- a does not beat transitions at this budget (NDCG@10 0.0400 vs 0.0500)." in lines
    assert any(line.startswith("- b and transitions tie") for line in lines)
    assert lines[-1] == "- best learned model: b, NDCG@10 +0.0010 vs transitions (+2%)."
    assert "0.0200 ± 0.0000" in leaderboard.render({"ml-100k": {**entry, "models": {
        "most-popular": {**fake(0.02, 0.0), "fit_s": 1.25}}}}, seeds=2)  # fmt: skip


def test_leaderboard_runs_a_model_after_the_models_it_needs(tmp_path):
    assert leaderboard.ordered(["sid-llm", "sasrec", "tiger"]) == ["tiger", "sid-llm", "sasrec"]
    with pytest.raises(FlagError, match="sid-llm reads the files of tiger; add tiger"):
        leaderboard.ordered(["sid-llm"])
    from llm_sft.recommender import SidLLMRecommender

    ds = tiny_dataset()
    with pytest.raises(FileNotFoundError, match="no semantic IDs at .*semantic_ids.json"):
        SidLLMRecommender(tmp_path / "sid", {"tiger": tmp_path / "tiger"}).fit(
            ds, data.split(ds), budget="demo", seed=0
        )


def test_the_text_models_are_not_run_on_items_without_text(tmp_path):
    root = tmp_path / "root"
    (root / "yelp-p5").mkdir(parents=True)
    rows = [" ".join(map(str, [u, *(1 + (u + j) % 6 for j in range(5))])) for u in range(1, 9)]
    (root / "yelp-p5" / "sequential_data.txt").write_text("\n".join(rows) + "\n")
    models = ["most-popular", "tiger", "sid-llm", "bigrec"]
    entry = leaderboard.run(["yelp-p5"], models, "demo", 1, str(root))["yelp-p5"]
    assert list(entry["models"]) == ["most-popular"]
    assert entry["not_run"] == {
        "tiger": "no item has a title / brand / categories / description (it reads item text)",
        "sid-llm": "no item has a title (it reads item text)",
        "bigrec": "no item has a title (it reads item text)",
    }
    assert "- bigrec not run: no item has a title (it reads item text)." in leaderboard.notes(entry)
    # Called directly, the model says which data set and why.
    from llm_sft.recommender import BigRecRecommender

    ds = data.load("yelp-p5", root / "yelp-p5")
    with pytest.raises(FlagError, match=r"--dataset=yelp-p5: none of its 6 items has a title"):
        BigRecRecommender().fit(ds, data.split(ds), budget="demo", seed=0)
    ds.items.titles[3] = "a title"
    assert ds.items.has_text() and not ds.items.has_text(("brand",))


@pytest.mark.parametrize("budget", ["full", "demo"])
def test_the_full_budget_applies_a_data_sets_validation_chosen_overrides(monkeypatch, budget):
    from types import SimpleNamespace

    from hstu import recommender

    built = {}

    def make_trainer(preset, num_items, overrides):
        built.update(overrides, preset=preset)
        raise StopIteration  # built: nothing to train

    monkeypatch.setattr(recommender, "make_trainer", make_trainer)
    ds = SimpleNamespace(name="amazon-cds-vinyl-2018", num_items=10)
    with pytest.raises(StopIteration):
        recommender.SASRecRecommender().fit(ds, None, budget=budget, seed=0)
    assert built["preset"] == "sasrec-ss"
    assert built.get("dropout_rate") == (0.5 if budget == "full" else None)


@pytest.mark.parametrize(
    ("budget", "num_items"), [("demo", 10), ("demo", 5000), ("demo", 20_000), ("full", 20_000)]
)
def test_recgpt_demo_prompt_tunes_one_epoch_on_a_large_catalogue(monkeypatch, budget, num_items):
    from types import SimpleNamespace

    from hstu import recommender

    called = {}

    def fit_recgpt(ds, split, overrides, **kwargs):
        called.update(overrides=overrides, **kwargs)
        raise StopIteration  # planned: nothing to train

    monkeypatch.setattr(recommender, "fit_recgpt", fit_recgpt)
    ds = SimpleNamespace(name="amazon-sports-2014", num_items=num_items)
    with pytest.raises(StopIteration):
        recommender.RecGPTRecommender().fit(ds, None, budget=budget, seed=0)
    # 5,000 items: sampled softmax, all 10 prompt epochs; 20,000: one prompt epoch.
    plan = recommender.RecGPTRecommender.prompt_budgets[budget]["prompt_overrides"]
    one_epoch = budget == "demo" and num_items > recommender.DEMO_PROMPT_MAX_ITEMS
    assert called["prompt_overrides"].get("num_epochs") == (
        1 if one_epoch else plan.get("num_epochs")
    )
    sampled = budget == "demo" and num_items > recommender.FULL_SOFTMAX_MAX_ITEMS
    assert (called["overrides"].get("loss") == "sampled_softmax") == sampled


def test_replace_nested_overrides_the_fields_of_a_dataclass_field():
    from eval.recommender import replace_nested
    from llm_sft.recommender import SidLLMConfig
    from llm_sft.trainer import TrainConfig

    cfg = SidLLMConfig(
        model={"a": 1, "b": 2}, stage1=TrainConfig(), stage2=TrainConfig(max_steps=5)
    )
    out = replace_nested(
        cfg, {"max_valid": 9, "stage2": {"max_steps": None, "num_epochs": 8}, "model": {"a": 3}}
    )
    assert (
        out.max_valid == 9 and out.stage1 == cfg.stage1 and out.model == {"a": 3}
    )  # a dict: replaced
    assert out.stage2 == TrainConfig(max_steps=None, num_epochs=8) and cfg.stage2.max_steps == 5
