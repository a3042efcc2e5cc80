"""eval.training: the shared loop, checkpoints, crash safety, NaN guard, run-folder guards."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny import TESTS, assert_killed, regression_fit, run_module

from eval.training import (
    CheckpointError,
    NonFiniteError,
    RunDir,
    RunLockedError,
    RunMismatchError,
    Selection,
    input_path,
    read_records,
)


def _losses(folder):
    return [r["loss"] for r in read_records(folder) if r["split"] == "train"]


def test_fit_learns_selects_best_and_writes_the_run_folder(tmp_path):
    result, state = regression_fit(tmp_path / "run")
    assert result["steps"] == 40
    assert result["valid"]["mse"] < 0.5, result  # from ~30 at init
    assert result["final"]["mse"] == pytest.approx(result["valid"]["mse"], rel=1e-6)
    records = read_records(tmp_path / "run")
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [8, 16, 24, 32, 40]
    assert min(r["mse"] for r in valid) == pytest.approx(result["valid"]["mse"])
    for name in (
        "run.json",
        "result.json",
        "checkpoints/latest",
        "checkpoints/best",
        "tensorboard",
    ):
        assert (tmp_path / "run" / name).exists(), name
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["package"] == "toy" and run["config"]["learning_rate"] == 0.2


def test_rerun_of_a_finished_run_leaves_its_result_alone(tmp_path):
    first, _ = regression_fit(tmp_path / "run")
    before = (tmp_path / "run" / "result.json").read_text()
    again, state = regression_fit(tmp_path / "run")
    assert state is None and again == json.loads(before)
    assert (tmp_path / "run" / "result.json").read_text() == before


def test_resume_after_an_interrupted_call_is_exact(tmp_path):
    full, _ = regression_fit(tmp_path / "full")
    # A crash in the third validation (two checkpoints written) loses only that window.
    with pytest.raises(RuntimeError, match="crash_at_eval"):
        regression_fit(tmp_path / "resumed", crash_at_eval=3)
    resumed, _ = regression_fit(tmp_path / "resumed")
    assert resumed == full
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")
    steps = [(r["step"], r["split"]) for r in read_records(tmp_path / "resumed")]
    assert len(steps) == len(set(steps)), "a step was logged twice"


@pytest.mark.parametrize("kill_at", ["after:2", "during:2"])
def test_kill_9_then_rerun_ends_like_an_uninterrupted_run(tmp_path, kill_at):
    full, _ = regression_fit(tmp_path / "full")
    script = [str(TESTS / "tiny.py"), "regression", str(tmp_path / "killed")]
    assert_killed(run_module(script, kill_at=kill_at))
    assert not (tmp_path / "killed" / "result.json").exists()
    done = run_module(script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == full
    assert _losses(tmp_path / "killed") == pytest.approx(_losses(tmp_path / "full"), abs=1e-7)
    leftovers = list((tmp_path / "killed" / "checkpoints").rglob("*orbax-checkpoint-tmp*"))
    assert not leftovers, leftovers


def test_non_finite_loss_stops_with_the_step_and_last_good_checkpoint(tmp_path):
    # Adam moves each weight by ~lr per step: the squares overflow float32 at step 5.
    with pytest.raises(
        NonFiniteError,
        match=r"step 5: non-finite loss=inf.*Last good checkpoint: .*latest/4 \(step 4\)",
    ):
        regression_fit(tmp_path / "run", learning_rate=3e18, eval_every=4)
    valid = [r for r in read_records(tmp_path / "run") if r["split"] == "valid"]
    assert valid and not any(math.isfinite(r["mse"]) for r in valid)  # already overflowing
    assert not list((tmp_path / "run" / "checkpoints" / "best").iterdir())  # never selected
    assert not (tmp_path / "run" / "result.json").exists()


def test_truncated_checkpoint_file_is_reported(tmp_path):
    regression_fit(tmp_path / "run", total_steps=16)
    (tmp_path / "run" / "result.json").unlink()  # pretend the run had not finished
    files = [p for p in (tmp_path / "run" / "checkpoints" / "latest").rglob("*") if p.is_file()]
    data = [p for p in files if p.stat().st_size > 200 and "ocdbt" not in p.name.lower()]
    for path in data or files:
        path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="checkpoint of step 16 cannot be read"):
        regression_fit(tmp_path / "run", total_steps=16)


def test_second_run_on_one_folder_is_refused(tmp_path):
    with RunDir(tmp_path, "toy", {"a": 1}):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunDir(tmp_path, "toy", {"a": 1})
    with RunDir(tmp_path, "toy", {"a": 1}):  # released
        pass


def test_concurrent_run_is_refused_and_the_first_run_is_intact(tmp_path):
    out, steps = tmp_path / "run", dict(total_steps=3000, eval_every=300)
    script = [
        str(TESTS / "tiny.py"),
        "regression",
        str(out),
        *(f"{k}={v}" for k, v in steps.items()),
    ]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    first = subprocess.Popen([sys.executable, *script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        while not (out / "checkpoints" / "latest").is_dir() or not any(
            p.name.isdigit() for p in (out / "checkpoints" / "latest").iterdir()
        ):
            assert first.poll() is None, "the first run ended before the second started"
            time.sleep(0.05)
        with pytest.raises(RunLockedError, match=f"another run \\(pid {first.pid}\\) is writing"):
            regression_fit(out, **steps)
    finally:
        stdout, _ = first.communicate(timeout=600)
    assert first.returncode == 0
    result = json.loads(stdout.splitlines()[-1])
    assert result["steps"] == 3000 and result == json.loads((out / "result.json").read_text())
    assert [r["step"] for r in read_records(out) if r["split"] == "valid"] == list(
        range(300, 3001, 300)
    )


def test_other_flags_are_refused_by_name_and_overwrite_starts_over(tmp_path):
    regression_fit(tmp_path / "run", total_steps=8)
    with pytest.raises(RunMismatchError, match=r"learning_rate: 0.2 -> 0.1.*--overwrite"):
        regression_fit(tmp_path / "run", total_steps=8, learning_rate=0.1)
    result, state = regression_fit(
        tmp_path / "run", total_steps=8, learning_rate=0.1, overwrite=True
    )
    assert state is not None and result["steps"] == 8
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["learning_rate"] == 0.1


def test_the_same_input_reached_another_way_is_the_same_run(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    RunDir(tmp_path / "run", "pkg", {"data_dir": input_path(tmp_path / "data")}).close()
    for spelling in (tmp_path / "run" / ".." / "data", tmp_path / "link"):
        RunDir(tmp_path / "run", "pkg", {"data_dir": input_path(spelling)}).close()
    with pytest.raises(RunMismatchError, match="data_dir"):
        RunDir(tmp_path / "run", "pkg", {"data_dir": input_path(tmp_path / "run")})


@pytest.mark.parametrize("weighted", [False, True])
def test_gradient_accumulation_equals_one_large_batch(weighted):
    # Equal-size micro-batches: the mean of micro-batch means equals the batch mean.
    one, s1 = regression_fit(total_steps=6, eval_every=3, batch_size=8, weighted=weighted)
    two, s2 = regression_fit(
        total_steps=6, eval_every=3, batch_size=8, accumulation=2, weighted=weighted
    )
    a = np.asarray(s1.params["kernel"][...])
    b = np.asarray(s2.params["kernel"][...])
    del one, two
    # The micro-batches draw other noise keys; the noise is 0.01 * N(0, 1) on 8 targets.
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_selection_tie_keeps_the_earlier_state_and_ignores_nan():
    s = Selection("m", "max", patience=2)
    assert s.update({"m": 0.5}, 1)
    assert not s.update({"m": 0.5}, 2)  # a tie is no improvement
    assert not s.update({"m": float("nan")}, 3)
    assert s.best_step == 1 and s.should_stop
    low = Selection("loss", "min")
    assert (
        low.update({"loss": 2.0}, 1)
        and low.update({"loss": 1.0}, 2)
        and not low.update({"loss": 1.5}, 3)
    )
    with pytest.raises(KeyError, match="no 'x' to select on"):
        Selection("x").update({"m": 1.0}, 1)


def test_schedule_warms_up_then_decays_to_the_final_ratio():
    from eval.training.optim import OptimizerConfig, lr_schedule

    for kind in ("cosine", "linear"):
        config = OptimizerConfig(2e-5, kind, warmup_steps=3, final_lr_ratio=0.2)
        lr = lr_schedule(config, 103)
        assert float(lr(0)) == 0.0 and float(lr(3)) == pytest.approx(2e-5)
        assert float(lr(53)) == pytest.approx(1.2e-5)  # halfway: (1 + 0.2) / 2 of the peak
        assert float(lr(103)) == pytest.approx(0.4e-5)
