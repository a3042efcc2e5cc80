"""hstu.trainer: training, checkpoints + exact resume, data-parallel equivalence, evaluation."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from eval import data
from eval.data.dataset import ItemTable, Ragged
from eval.training import Checkpoints
from hstu import trainer as T

TINY = dict(
    max_seq_len=12,
    embedding_dim=16,
    num_blocks=1,
    num_heads=2,
    dropout_rate=0.1,
    num_negatives=8,
    batch_size=8,
    learning_rate=5e-3,
)


def tiny_split(num_users=32, num_items=40, seed=0):
    """Users walk a ring of items (next = current + 1), so the next item is learnable."""
    rng = np.random.default_rng(seed)
    seqs = [
        (rng.integers(num_items) + np.arange(rng.integers(5, 14))) % num_items + 1
        for _ in range(num_users)
    ]
    ts = [1_000_000 + 3600 * np.arange(len(s)) for s in seqs]
    ds = data.Dataset(
        "tiny",
        ItemTable([""] * (num_items + 1), [""] * (num_items + 1)),
        [str(u) for u in range(num_users)],
        Ragged.from_rows(seqs),
        timestamps=Ragged.from_rows(ts, dtype=np.int64),
    )
    return ds, data.split(ds)


def flat_params(trainer):
    leaves = jax.tree.leaves(trainer.state)
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in leaves if np.issubdtype(x.dtype, np.floating)]
    )


@pytest.mark.parametrize("kind,preset", [("hstu", "hstu-ml"), ("sasrec", "sasrec-ml")])
def test_fit_learns_and_logs(tmp_path, kind, preset):
    ds, sp = tiny_split()
    tr = T.make_trainer(kind, preset, ds.num_items, {**TINY, "num_epochs": 25, "patience": 1000})
    before = tr.evaluate(ds, sp.valid)["NDCG@10"]
    info = tr.fit(ds, sp, tmp_path, progress=False)
    after = tr.evaluate(ds, sp.valid)["NDCG@10"]
    assert info["steps"] == 25 * (32 // 8)
    assert after == pytest.approx(info["valid"]["NDCG@10"])  # the best state is kept
    assert after > before + 0.2, (before, after)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "valid"}
    assert list((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "checkpoints" / "best").is_dir()


@pytest.mark.parametrize("sl_alpha", [None, 1.5])
def test_resume_reproduces_uninterrupted_run(tmp_path, sl_alpha):
    ds, sp = tiny_split()
    over = {
        **TINY,
        "eval_every": 3,
        "max_steps": 6,
        "patience": 1000,
        "num_epochs": 10,
        "stochastic_length_alpha": sl_alpha,
    }
    full = T.make_trainer("hstu", "hstu-ml", ds.num_items, over)
    full.fit(ds, sp, tmp_path / "full", progress=False)
    part = T.make_trainer("hstu", "hstu-ml", ds.num_items, {**over, "max_steps": 3})
    part.fit(ds, sp, tmp_path / "resumed", progress=False)
    resumed = T.make_trainer("hstu", "hstu-ml", ds.num_items, over)
    info = resumed.fit(ds, sp, tmp_path / "resumed", progress=False)
    assert info["steps"] == 6
    # The best-by-validation state is restored at the end; compare the latest checkpoints.
    s_full = Checkpoints(tmp_path / "full" / "checkpoints").restore(full.state, "latest")
    s_res = Checkpoints(tmp_path / "resumed" / "checkpoints").restore(resumed.state, "latest")
    assert s_full[2] == s_res[2] == 6
    for x, y in zip(jax.tree.leaves(s_full[0]), jax.tree.leaves(s_res[0]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    losses = [
        [
            r["loss"]
            for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"
        ]
        for d in ("full", "resumed")
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_stochastic_length_keeps_ordered_subsequences():
    rng = np.random.default_rng(0)
    b, n, alpha = 4000, 16, 1.5
    keep = int(n ** (alpha / 2))  # 8
    lengths = rng.integers(1, n + 1, b).astype(np.int32)
    ids = np.where(np.arange(n)[None, :] < lengths[:, None], np.arange(1, n + 1)[None, :] * 10, 0)
    batch = {"ids": ids, "timestamps": ids * 7, "lengths": lengths}
    out = T.stochastic_length(batch, alpha, np.random.default_rng(1))
    changed = out["lengths"] != lengths
    assert np.all(lengths[changed] > keep) and np.all(out["lengths"][changed] == keep)
    for row in np.flatnonzero(changed)[:50]:
        kept = out["ids"][row, :keep]
        assert np.all(np.diff(kept) > 0) and set(kept) <= set(ids[row, : lengths[row]])
        assert not out["ids"][row, keep:].any()
    np.testing.assert_array_equal(
        out["timestamps"], out["ids"] * 7
    )  # timestamps follow their items
    np.testing.assert_array_equal(out["ids"][~changed], ids[~changed])
    # Rows longer than L are subsampled with probability 1 - N^alpha / n^2.
    for length in (9, 12, 16):
        rows = lengths == length
        expected = 1 - n**alpha / length**2
        assert abs(changed[rows].mean() - expected) < 4 * np.sqrt(
            expected * (1 - expected) / rows.sum()
        )
    with pytest.raises(ValueError, match="alpha"):
        T.stochastic_length(batch, 2.5, rng)


def test_data_parallel_matches_single_device():
    ds, sp = tiny_split()
    over = {**TINY, "dropout_rate": 0.0}
    devices = np.array(jax.devices()[:8])
    if len(devices) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
    single = T.make_trainer("hstu", "hstu-ml", ds.num_items, over)
    multi = T.make_trainer("hstu", "hstu-ml", ds.num_items, over, mesh=mesh, shard_items=True)
    batch = T.training_source(sp, TINY["max_seq_len"]).arrays
    batch = {k: v[:8] for k, v in batch.items()}
    for step in range(3):
        a, b = single.train_step(batch, step), multi.train_step(batch, step)
        assert float(a) == pytest.approx(float(b), abs=1e-5)
    np.testing.assert_allclose(flat_params(single), flat_params(multi), atol=1e-5)


def test_query_inputs_right_pad_last_items():
    ex = data.EvalExamples(
        np.array([0, 1]),
        Ragged.from_rows([[1, 2, 3], [4]]),
        np.array([5, 6]),
        Ragged.from_rows([[10, 20, 30], [40]], dtype=np.int64),
        np.array([35, 45]),
    )
    q = T.query_inputs(ex, np.array([0, 1]), max_len=2)
    np.testing.assert_array_equal(q["ids"], [[2, 3], [4, 0]])
    np.testing.assert_array_equal(q["timestamps"], [[20, 30], [40, 0]])
    np.testing.assert_array_equal(q["lengths"], [2, 1])
    np.testing.assert_array_equal(q["target_ts"], [35, 45])


def test_train_cli_run_is_reevaluated_from_its_checkpoint(tmp_path):
    from conftest import write_tiny_ml100k

    from hstu import evaluate, train

    folder = write_tiny_ml100k(tmp_path / "ml-100k")
    over = {**TINY, "num_epochs": 3, "max_seq_len": 8}
    result = train.train("ml-100k", str(folder), "sasrec", "sasrec-ml", over, str(tmp_path / "run"))
    assert set(result["test"]) == set(evaluate.PROTOCOLS)
    trainer, ds, split, step = evaluate.load_run(tmp_path / "run")
    assert 1 <= step <= result["steps"]
    again = evaluate.test_metrics(trainer, ds, split.test)
    for name in evaluate.PROTOCOLS:
        assert again[name]["NDCG@10"] == pytest.approx(result["test"][name]["NDCG@10"], abs=1e-6)
        assert again[name]["num_examples"] == 20
    with pytest.raises(FileNotFoundError, match="no run.json"):
        evaluate.load_run(tmp_path)
