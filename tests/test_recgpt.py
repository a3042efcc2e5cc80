"""RecGPT: parity with the PyTorch forward, prompt construction, the prompt loss, two-stage
recall, negatives outside the sequence, and `hstu.train --preset=recgpt` end to end."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import assert_killed, flat, run_module, train_losses, write_tiny_ml100k

from hstu import convert, train
from hstu.losses import negatives_not_in, next_item_loss
from hstu.recgpt import RecGPT, RecGPTConfig, generate_prompts, prompt_loss
from hstu.recgpt_stages import recall_splits

NUM_ITEMS = 30
KW = dict(num_items=NUM_ITEMS, max_seq_len=10, embedding_dim=16, num_blocks=2, num_heads=2,
          ffn_dim=24, dropout_rate=0.0, user_buckets=7)  # fmt: skip
IDS = np.array([[3, 4, 5, 6, 7, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                [5, 6, 0, 0, 0, 0, 0, 0, 0, 0]])  # fmt: skip
LENGTHS = np.array([5, 10, 2])
USERS = np.array([0, 3, 12])  # 12 wraps to bucket 5


def _model(seed=0, **kw) -> RecGPT:
    return RecGPT(RecGPTConfig(**{**KW, **kw}), rngs=nnx.Rngs(seed))


@pytest.mark.parametrize(
    "attention,user_buckets,positions",
    [("softmax", 7, "end"), ("flow", 7, "end"), ("flow", 0, "start"), ("softmax", 0, "start")],
)
def test_torch_parity_both_ways(attention, user_buckets, positions):
    torch = pytest.importorskip("torch")
    from tools.baselines.torch_recgpt import RecGPT as TorchRecGPT

    torch.manual_seed(0)
    kw = {k: v for k, v in KW.items() if k != "num_items"}
    kw |= dict(attention=attention, user_buckets=user_buckets, positions=positions)
    t_model = TorchRecGPT(NUM_ITEMS, **kw).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for name, p in t_model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    segments = (np.arange(10)[None, :] == LENGTHS[:, None] - 1).astype(np.int64)
    t_in = [torch.from_numpy(x.astype(np.int64)) for x in (IDS, USERS, segments)]
    with torch.no_grad():
        expected = t_model(*t_in)
        expected_head = t_model.output_layer(expected).numpy()
    model = convert.torch_state_dict_to_flax(t_model.state_dict(), _model(1, **kw))
    out = model(jnp.asarray(IDS), users=jnp.asarray(USERS), segments=jnp.asarray(segments))
    np.testing.assert_allclose(np.asarray(out), expected.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        np.asarray(model.head_logits(out))[..., 1:], expected_head[..., 1:], atol=1e-5, rtol=0
    )
    back = TorchRecGPT(NUM_ITEMS, **kw).eval()
    back.load_state_dict(convert.flax_to_torch_state_dict(model))
    with torch.no_grad():
        np.testing.assert_allclose(back(*t_in).numpy(), np.asarray(out), atol=1e-5, rtol=0)


def test_outputs_are_causal_and_users_and_segments_matter():
    model = _model(attention="flow")
    ids, users = jnp.asarray(IDS), jnp.asarray(USERS)
    out = model(ids, users=users)
    changed = ids.at[1, 6:].set(11)
    np.testing.assert_allclose(model(changed, users=users)[1, :6], out[1, :6], atol=1e-6)
    assert not np.allclose(model(ids, users=users + 1)[:, 0], out[:, 0])
    assert not np.allclose(model(ids, users=users, segments=jnp.ones_like(ids))[:, 0], out[:, 0])
    # An unseen user id (beyond the buckets) still gets a row.
    assert np.isfinite(np.asarray(model(ids, users=users + 10_000))).all()


def test_replace_prompts_are_the_heads_greedy_items_after_the_prefix():
    model = _model(prompt_items=2)
    ids, lengths, users = map(jnp.asarray, (IDS, LENGTHS, USERS))
    new, seg, targets = map(np.asarray, generate_prompts(model, ids, lengths, users))
    # Targets are the real next items; the last item of each row is never an input.
    np.testing.assert_array_equal(targets[:, :-1], IDS[:, 1:])
    assert (new[np.arange(3), LENGTHS - 1] == 0).all()
    # Row 0 (4 inputs): slots 2 and 3 generated one after the other from the prefix
    # (causal: the later slots' content is not seen; positions align on the 4 inputs).
    prefix = jnp.asarray([[3, 4, 5, 6, 0, 0, 0, 0, 0, 0]])
    g1 = int(jnp.argmax(model.head_logits(model(prefix, users=users[:1])[0, 1])))
    second = prefix.at[0, 2].set(g1)
    h = model(second, users=users[:1], segments=jnp.zeros_like(second).at[0, 2].set(1))[0, 2]
    g2 = int(jnp.argmax(model.head_logits(h)))
    np.testing.assert_array_equal(new[0, :5], [3, 4, g1, g2, 0])
    np.testing.assert_array_equal(seg[0, :5], [0, 0, 1, 1, 0])
    # Row 2 (one input) keeps its only real item; nothing is generated.
    assert new[2, 0] == 5 and seg[2].sum() == 0


def test_insert_prompts_follow_every_real_item_and_are_never_targets():
    model = _model(prompt_items=1, prompt_placement="insert")
    ids, lengths, users = map(jnp.asarray, (IDS, LENGTHS, USERS))
    new, seg, targets = map(np.asarray, generate_prompts(model, ids, lengths, users))
    # Row 0: inputs 3 4 5 6 -> 3 g 4 g 5 g 6, targets 4 _ 5 _ 6 _ 7.
    np.testing.assert_array_equal(new[0, [0, 2, 4, 6]], [3, 4, 5, 6])
    np.testing.assert_array_equal(seg[0, :8], [0, 1, 0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(targets[0, :8], [4, 0, 5, 0, 6, 0, 7, 0])
    top = np.asarray(jnp.argmax(model.head_logits(model(ids.at[0, 4].set(0), users=users)), -1))
    np.testing.assert_array_equal(new[0, [1, 3, 5]], top[0, :3])
    # Row 1: 9 inputs -> 17 tokens, the newest 10 kept (starting at a generated item).
    assert seg[1, 0] == 1 and new[1, -1] == 9 and targets[1, -1] == 10
    assert (targets[seg == 1] == 0).all()


def test_prompt_loss_is_the_heads_full_cross_entropy():
    model = _model(prompt_items=1)
    batch = {"ids": jnp.asarray(IDS), "lengths": jnp.asarray(LENGTHS), "users": jnp.asarray(USERS)}
    loss, _ = prompt_loss(model, batch, jax.random.key(0))
    ids, seg, targets = generate_prompts(model, batch["ids"], batch["lengths"], batch["users"])
    logits = model.head(model(ids, users=batch["users"], segments=seg))[..., 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    t = np.asarray(targets)
    picked = np.take_along_axis(np.asarray(logp), np.maximum(t - 1, 0)[..., None], -1)[..., 0]
    assert float(loss) == pytest.approx(-picked[t > 0].mean(), rel=1e-5)


def test_two_stage_recall_lists_stage_one_then_stage_two():
    model = _model(prompt_items=1)
    inputs = {"ids": jnp.asarray(IDS), "lengths": jnp.asarray(LENGTHS), "users": jnp.asarray(USERS)}
    mask = np.zeros((3, NUM_ITEMS + 1), bool)
    mask[0, [3, 4, 5, 6, 7]] = True
    s1 = np.asarray(model.query_scores(inputs))
    scores = np.asarray(model.query_scores({**inputs, "mask": jnp.asarray(mask)}, recall_n=4))
    order = np.argsort(-scores, axis=1, kind="stable")
    first = np.argsort(-np.where(mask, -np.inf, s1), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(order[:, :4], first)
    # Stage 2: the head's greedy item appended (row 1 is full: its oldest item drops).
    g = np.asarray(jnp.argmax(model.head_logits(model(inputs["ids"], users=inputs["users"])[
        np.arange(3), LENGTHS - 1]), -1))  # fmt: skip
    ids2 = IDS.copy()
    ids2[0, 5], ids2[2, 2] = g[0], g[2]
    ids2[1] = [*IDS[1, 1:], g[1]]
    last = np.array([5, 9, 2])
    seg = (np.arange(10)[None, :] == last[:, None]).astype(np.int32)
    h2 = model(jnp.asarray(ids2), users=inputs["users"], segments=jnp.asarray(seg))
    s2 = np.asarray(model.item_scores(h2[np.arange(3), last]))
    for row in range(3):
        rest = [i for i in np.argsort(-s2[row], kind="stable") if i not in first[row] and i != 0]
        np.testing.assert_array_equal(order[row, 4:NUM_ITEMS], rest)


def test_recall_splits_at_each_cutoff():
    assert recall_splits((0.9, 0.8, 0.5)) == {5: [4, 2], 10: [9, 8, 5], 20: [18, 16, 10]}


def test_negatives_avoid_the_rows_items():
    ids = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 0]] * 64)
    neg = np.asarray(negatives_not_in(jax.random.key(0), (64, 7), ids, 100))
    assert neg.min() >= 1 and neg.max() <= 100 and not np.isin(neg, np.arange(1, 8)).any()
    # With every item in the row, the last draw stands (no endless redraw).
    assert np.asarray(negatives_not_in(jax.random.key(0), (64, 7), ids, 7)).max() <= 7
    model = _model()
    batch = {"ids": jnp.asarray(IDS), "lengths": jnp.asarray(LENGTHS), "users": jnp.asarray(USERS),
             "timestamps": jnp.zeros_like(jnp.asarray(IDS))}  # fmt: skip
    assert np.isfinite(float(next_item_loss(model, batch, jax.random.key(0))[0]))
    with pytest.raises(ValueError, match="negatives_not_in_sequence"):
        next_item_loss(_model(loss="sampled_softmax"), batch, jax.random.key(0))


TINY = dict(max_seq_len=8, embedding_dim=8, num_blocks=1, ffn_dim=16, batch_size=8,
            num_epochs=2, eval_every=2, learning_rate=5e-3)  # fmt: skip


def _run(folder, out, **extra):
    return train.train("ml-100k", str(folder), "recgpt", {**TINY, **extra}, str(out),
                       prompt_lengths=(1, 2), recall_shares=(0.9, 0.5))  # fmt: skip


def test_train_runs_every_stage_and_resumes_exactly(tmp_path):
    folder = write_tiny_ml100k(tmp_path / "ml-100k")
    full = _run(folder, tmp_path / "full")
    ab = full["ablation"]
    assert set(ab["prompt"]) == {"K=1", "K=2"} and ab["best_K"] in (1, 2)
    assert set(ab["prompt+two_stage"]) == {"N=18", "N=10", "N=9", "N=5", "N=4", "N=2"}
    for k in (5, 10, 20):
        for m in ("HR", "NDCG"):
            assert 0 <= ab["pretrain"]["test"][f"{m}@{k}"] <= 1
        assert ab["selected"][f"@{k}"]["N"] + ab["selected"][f"@{k}"]["M"] == k
    n = ab["selected"]["@10"]["N"]
    assert full["recall_n"] == (n if n < 10 else None)
    one_stage = ab["prompt"][f"K={ab['best_K']}"] if ab["best_K"] else ab["pretrain"]
    chosen = ab["prompt+two_stage"][f"N={n}"] if n < 10 else one_stage
    assert full["test"]["full_filtered"]["NDCG@10"] == pytest.approx(chosen["test"]["NDCG@10"])
    stages = ["pretrain", "prompt_k1", "prompt_k2"]
    assert all((tmp_path / "full" / s / "result.json").is_file() for s in stages)
    # Killed after pre-training's 2nd checkpoint, then rerun: the same losses in every
    # stage and the same results as the uninterrupted run.
    args = ["-m", "hstu.train", "--dataset=ml-100k", f"--data_dir={folder}", "--preset=recgpt",
            f"--out={tmp_path / 'killed'}", "--prompt_lengths=1,2", "--recall_shares=0.9,0.5"]  # fmt: skip
    args += [f"--{k}={v}" for k, v in TINY.items()]
    assert_killed(run_module(args, kill_at="after:2"))
    assert (tmp_path / "killed" / "pretrain" / "checkpoints" / "latest").is_dir()
    assert not (tmp_path / "killed" / "pretrain" / "result.json").exists()
    resumed = _run(folder, tmp_path / "killed")
    assert flat(resumed["ablation"]) == pytest.approx(flat(full["ablation"]), abs=1e-6)
    for s in stages:
        assert train_losses(tmp_path / "killed" / s) == pytest.approx(
            train_losses(tmp_path / "full" / s), abs=1e-6
        ), s
    assert _run(folder, tmp_path / "killed") == resumed  # finished: left alone


def test_validation_keeps_the_pretrained_model_when_prompt_tuning_loses():
    """Prompt-tuning at a learning rate that wrecks the model: validation picks pre-training
    (K = 0), whose ranking, one-stage or two-stage, is then the entry's."""
    from tiny import ring_split

    from hstu.recgpt_stages import fit_recgpt

    ds, sp = ring_split()
    trainer, info = fit_recgpt(
        ds, sp, {**TINY, "num_epochs": 6, "user_buckets": 0}, prompt_lengths=(1,),
        recall_shares=(0.9,), prompt_overrides={"learning_rate": 30.0}, progress=False,
    )  # fmt: skip
    ab = info["ablation"]
    assert ab["prompt"]["K=1"]["valid"]["NDCG@10"] < ab["pretrain"]["valid"]["NDCG@10"]
    assert ab["best_K"] == 0 and info["best_stage"] == "pretrain"
    assert ab["prompt+two_stage"] == ab["pretrain+two_stage"]
    chosen = ab["pretrain+two_stage"]["N=9"] if trainer.recall_n == 9 else ab["pretrain"]
    test = trainer.evaluate(ds, sp.test, "full", True, (10,))
    assert test["NDCG@10"] == pytest.approx(chosen["test"]["NDCG@10"])


def test_every_recgpt_setting_has_a_train_flag():
    code = "import json; from absl import flags; from hstu import train; train._define_flags(); print(json.dumps(list(flags.FLAGS)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    fields = {f.name for f in dataclasses.fields(RecGPTConfig)} - {"num_items", "prompt_items"}
    assert fields <= set(json.loads(out.stdout)), fields - set(json.loads(out.stdout))


def test_two_stage_equals_one_stage_up_to_n_even_for_repeated_targets():
    """With N >= k, two-stage HR / NDCG @k equal the one-stage ones under the protocol
    (history filtered, the target kept), here with every target repeated from its history."""
    from tiny import ring_split

    from eval.data.dataset import EvalExamples
    from hstu.trainer import make_trainer

    ds, sp = ring_split()
    tr = make_trainer("recgpt", ds.num_items, {**TINY, "prompt_items": 1, "user_buckets": 64})
    h = sp.test.history
    repeated = EvalExamples(sp.test.users, h, h.values[h.offsets[1:] - 1])
    for examples in (sp.test, repeated):
        one = tr.evaluate(ds, examples, "full", True, (1, 5))
        tr.recall_n = 5
        two = tr.evaluate(ds, examples, "full", True, (1, 5))
        tr.recall_n = None
        assert two["HR@5"] == pytest.approx(one["HR@5"]) and two["NDCG@5"] == pytest.approx(
            one["NDCG@5"]
        )


def test_the_leaderboard_keeps_user_rows_where_validation_chose_them():
    from types import SimpleNamespace

    from hstu.models import config_from_preset
    from hstu.recommender import RecGPTRecommender

    rec = RecGPTRecommender()
    for name, preset, rows in (
        ("ml-100k", "recgpt", 65536),
        ("amazon-sports-2014", "recgpt-nouser", 0),
        ("yelp-p5", "recgpt", 65536),
    ):
        assert rec.preset(SimpleNamespace(name=name)) == preset
        _, cfg = config_from_preset(preset, num_items=10)
        assert cfg.user_buckets == rows and cfg.rank_with == "head" and cfg.head_init == "items"
