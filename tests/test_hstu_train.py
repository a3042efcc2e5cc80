"""hstu on the shared loop: training, crash safety (kill -9), NaN guard, data parallelism, CLI."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from tiny import TINY_HSTU, kill_and_resume, ring_split, train_losses, write_tiny_ml100k

from eval import data
from eval.data.dataset import Ragged
from eval.training import NonFiniteError, RunMismatchError, read_records
from hstu import evaluate, train
from hstu import trainer as T

PRESETS = [("hstu", "hstu-ml"), ("sasrec", "sasrec-ml")]


def flat_params(trainer):
    leaves = jax.tree.leaves(trainer.state.params)
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


@pytest.mark.parametrize("kind,preset", PRESETS)
def test_fit_learns_and_keeps_the_best_state(kind, preset):
    ds, sp = ring_split()
    tr = T.make_trainer(preset, ds.num_items, {**TINY_HSTU, "num_epochs": 25, "patience": 1000})
    assert tr.kind == kind
    before = tr.evaluate(ds, sp.valid)["NDCG@10"]
    info = tr.fit(ds, sp, progress=False)
    after = tr.evaluate(ds, sp.valid)["NDCG@10"]
    assert info.steps == 25 * (32 // 8)
    assert after == pytest.approx(info.valid["NDCG@10"])  # the best state is loaded
    assert after > before + 0.2, (before, after)


def _train_cli(folder, out, preset, **extra):
    over = {**TINY_HSTU, "num_epochs": 3, "max_seq_len": 8, "eval_every": 2, **extra}
    return train.train("ml-100k", str(folder), preset, over, str(out))


def _cli_args(folder, out, preset, **extra):
    over = {**TINY_HSTU, "num_epochs": 3, "max_seq_len": 8, "eval_every": 2, **extra}
    args = ["-m", "hstu.train", "--dataset=ml-100k", f"--data_dir={folder}", f"--preset={preset}",
            f"--out={out}"]  # fmt: skip
    return args + [f"--{k}={v}" for k, v in over.items() if v is not None]


@pytest.mark.parametrize("kind,preset", PRESETS)
def test_kill_9_after_second_checkpoint_then_rerun_matches(tmp_path, kind, preset):
    folder = write_tiny_ml100k(tmp_path / "ml-100k")
    full = _train_cli(folder, tmp_path / "full", preset)
    args = _cli_args(folder, tmp_path / "killed", preset)
    resumed = kill_and_resume(
        args, tmp_path / "killed", lambda out: _train_cli(folder, out, preset)
    )
    for name in evaluate.PROTOCOLS:
        assert resumed["test"][name] == pytest.approx(full["test"][name], abs=1e-6), name
    assert resumed["valid"] == pytest.approx(full["valid"], abs=1e-6)
    assert resumed["best_step"] == full["best_step"] and resumed["steps"] == full["steps"]
    assert train_losses(tmp_path / "killed") == pytest.approx(
        train_losses(tmp_path / "full"), abs=1e-6
    )
    # The finished run is left alone; other flags on it are refused by name.
    again = _train_cli(folder, tmp_path / "killed", preset)
    assert again == resumed == json.loads((tmp_path / "killed" / "result.json").read_text())
    with pytest.raises(RunMismatchError, match=r"learning_rate: 0.005 -> 0.5.*--overwrite"):
        _train_cli(folder, tmp_path / "killed", preset, learning_rate=0.5)


def test_resume_with_stochastic_length_is_exact(tmp_path, monkeypatch):
    folder = write_tiny_ml100k(tmp_path / "ml-100k")
    full = _train_cli(folder, tmp_path / "full", "hstu-ml", stochastic_length_alpha=1.5)
    calls = {"n": 0}
    real = T.Trainer.evaluate

    def crash_on_second_validation(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(T.Trainer, "evaluate", crash_on_second_validation)
    with pytest.raises(RuntimeError, match="crash"):
        _train_cli(folder, tmp_path / "resumed", "hstu-ml", stochastic_length_alpha=1.5)
    monkeypatch.setattr(T.Trainer, "evaluate", real)
    resumed = _train_cli(folder, tmp_path / "resumed", "hstu-ml", stochastic_length_alpha=1.5)
    assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "full")


@pytest.mark.parametrize("kind,preset", PRESETS)
def test_absurd_learning_rate_stops_with_an_error_and_no_nan_best(tmp_path, kind, preset):
    folder = write_tiny_ml100k(tmp_path / "ml-100k")
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite .*Last good checkpoint"):
        _train_cli(folder, tmp_path / "run", preset, learning_rate=1e38, eval_every=1)
    valid = [r for r in read_records(tmp_path / "run") if r["split"] == "valid"]
    assert all(np.isfinite(r["NDCG@10"]) for r in valid)
    assert not (tmp_path / "run" / "result.json").exists()
    best = list((tmp_path / "run" / "checkpoints" / "best").iterdir())
    if best:  # any best state is a finite one: it reloads and scores
        trainer, ds, split, _ = evaluate.load_run(tmp_path / "run")
        assert np.all(np.isfinite(flat_params(trainer)))


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
    # A process's rows of the batch get what the whole batch gives them.
    held = np.arange(1000, 3000)
    part = {k: v[held] for k, v in batch.items()}
    mine = T.stochastic_length(part, alpha, np.random.default_rng(1), (held, b))
    for key in batch:
        np.testing.assert_array_equal(mine[key], out[key][held])


def test_data_parallel_matches_single_device():
    ds, sp = ring_split(num_items=41)  # 42 table rows: split over the 2 'model' devices
    over = {**TINY_HSTU, "dropout_rate": 0.0}
    devices = np.array(jax.devices()[:8])
    if len(devices) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
    single = T.make_trainer("hstu-ml", ds.num_items, over)
    multi = T.make_trainer("hstu-ml", ds.num_items, over, mesh=mesh, shard_items=True)
    table = multi.state.params["item_emb"]["embedding"][...]
    assert tuple(table.sharding.spec) == ("model", None)
    batch = T.training_source(sp, TINY_HSTU["max_seq_len"]).arrays
    batch = {k: v[:8] for k, v in batch.items()}
    for step in range(3):
        a, b = single.train_step(batch, step), multi.train_step(batch, step)
        assert float(a) == pytest.approx(float(b), abs=1e-5)
    np.testing.assert_allclose(flat_params(single), flat_params(multi), atol=1e-5)
    assert multi.sharded_table  # full ranking per shard: the same metrics
    for filtered in (True, False):
        a, b = (
            single.evaluate(ds, sp.valid, filter_history=filtered),
            multi.evaluate(ds, sp.valid, filter_history=filtered),
        )
        assert b == pytest.approx(a, abs=1e-6), filtered


def test_training_windows_cover_every_target_once():
    train = Ragged.from_rows([[1, 2, 3, 4, 5, 6, 7], [8, 9], [10]])
    ts = Ragged.from_rows([[11, 12, 13, 14, 15, 16, 17], [18, 19], [20]], dtype=np.int64)
    sp = data.Split(train, ts, None, None, "test", None)
    last = T.training_source(sp, 3).arrays
    np.testing.assert_array_equal(last["ids"], [[5, 6, 7], [8, 9, 0]])  # one row per user
    rows = T.training_source(sp, 3, window_stride=2).arrays
    np.testing.assert_array_equal(rows["ids"], [[5, 6, 7], [3, 4, 5], [1, 2, 3], [8, 9, 0]])
    np.testing.assert_array_equal(rows["timestamps"][1], [13, 14, 15])
    np.testing.assert_array_equal(rows["lengths"], [3, 3, 3, 2])
    targets = np.concatenate([r[1:n] for r, n in zip(rows["ids"], rows["lengths"], strict=True)])
    assert sorted(targets) == [2, 3, 4, 5, 6, 7, 9]  # stride max_len - 1: each target once
    with pytest.raises(ValueError, match="window_stride"):
        T.training_source(sp, 3, window_stride=0)


def test_query_inputs_right_pad_last_items():
    ex = data.EvalExamples(np.array([0, 1]), Ragged.from_rows([[1, 2, 3], [4]]), np.array([5, 6]),
                           Ragged.from_rows([[10, 20, 30], [40]], dtype=np.int64), np.array([35, 45]))  # fmt: skip
    q = T.query_inputs(ex, np.array([0, 1]), max_len=2)
    np.testing.assert_array_equal(q["ids"], [[2, 3], [4, 0]])
    np.testing.assert_array_equal(q["timestamps"], [[20, 30], [40, 0]])
    np.testing.assert_array_equal(q["lengths"], [2, 1])
    np.testing.assert_array_equal(q["target_ts"], [35, 45])


def test_train_cli_run_is_reevaluated_from_its_checkpoint(tmp_path):
    folder = write_tiny_ml100k(tmp_path / "ml-100k")
    result = _train_cli(folder, tmp_path / "run", "sasrec-ml")
    assert set(result["test"]) == set(evaluate.PROTOCOLS)
    trainer, ds, split, step = evaluate.load_run(tmp_path / "run")
    assert step == result["best_step"]
    again = evaluate.test_metrics(trainer, ds, split.test)
    for name in evaluate.PROTOCOLS:
        assert again[name]["NDCG@10"] == pytest.approx(result["test"][name]["NDCG@10"], abs=1e-6)
        assert again[name]["num_examples"] == 20
    with pytest.raises(FileNotFoundError, match="no run.json"):
        evaluate.load_run(tmp_path)


def test_preset_names_the_model_and_unknown_settings_are_refused():
    assert T.make_trainer("sasrec-paper", 10, {}).kind == "sasrec"
    with pytest.raises(ValueError, match=r"has no setting \['attention_dim'\]"):
        T.make_trainer("sasrec-ml", 10, {"attention_dim": 4})
