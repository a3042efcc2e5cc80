"""Tiny models, data and configs the tests share (one place; tests never import each other).

Also runnable: `python tiny.py regression OUT [KEY=VALUE ...]` trains the toy regression
task into OUT (the crash tests kill it with `LLM4REC_KILL_AT`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent


# -- data -----------------------------------------------------------------------------------
# Three users; user "2" has a tie in timestamps (file order kept) and a low rating.
U_DATA = "1\t10\t5\t300\n1\t11\t4\t100\n2\t10\t3\t50\n2\t12\t1\t50\n1\t12\t5\t200\n3\t11\t4\t10\n"
U_ITEM = "10|Alpha (1995)|01-Jan-1995||url|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n11|B\xe9ta (1996)|x||u|0\n12|Gamma|x||u|0\n13|Unseen|x||u|0\n"


def write(folder: pathlib.Path, files: dict[str, str], encoding="utf-8"):
    """Text files into `folder` (`u.item` in latin-1, as GroupLens ships it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="latin-1" if name == "u.item" else encoding)
    return folder


CSV_HEADER = "user_id,item_asins,item_asin,history_item_id,item_id,history_item_title,item_title,history_rating,rating,history_timestamp,timestamp\n"


def csv_row(user: str, hist: list[int], target: int, ts: int) -> str:
    """One BIGRec CSV row (history -> target) with made-up ASINs, titles and ratings."""
    asins = [f"A{h}" for h in hist]
    titles = [f"t{h}" for h in hist]
    return (
        f'{user},"{asins}",A{target},"{hist}",{target},"{titles}",t{target},'
        f'"{[5.0] * len(hist)}",5.0,"{[ts - 10 + i for i in range(len(hist))]}",{ts}\n'
    )


def amazon_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """A BIGRec CSV folder: two users, valid/test rows, an info.txt with an HTML title."""
    valid = CSV_HEADER + csv_row("u1", [0, 1], 2, 100) + csv_row("u1", [0, 1, 2], 3, 110)
    test = CSV_HEADER + csv_row("u1", [1, 2, 3], 4, 200) + csv_row("u2", [4], 0, 210)
    info = "".join(f"title {i}\t{i}\n" for i in range(6)).replace("title 5", "<span class=x")
    return write(tmp_path / "a", {"valid.csv": valid, "test.csv": test, "info.txt": info})


def write_tiny_ml100k(
    folder: pathlib.Path, num_users: int = 20, num_items: int = 30, per_user: int = 8
) -> pathlib.Path:
    """A random ml-100k-format folder (`u.data`, `u.item`) under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = [
        f"{u}\t{rng.integers(1, num_items)}\t4\t{t}"
        for u in range(1, num_users + 1)
        for t in range(per_user)
    ]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    items = "".join(f"{i}|Movie {i}|d||u|0\n" for i in range(1, num_items + 1))
    (folder / "u.item").write_text(items, encoding="latin-1")
    return folder


def ring_split(num_users: int = 32, num_items: int = 40, seed: int = 0):
    """(Dataset, Split) where users walk a ring of items (next = current + 1): learnable."""
    from eval import data
    from eval.data.dataset import ItemTable, Ragged

    rng = np.random.default_rng(seed)
    seqs = [
        (rng.integers(num_items) + np.arange(rng.integers(5, 14))) % num_items + 1
        for _ in range(num_users)
    ]
    ts = [1_000_000 + 3600 * np.arange(len(s)) for s in seqs]
    ds = data.Dataset("tiny", ItemTable([""] * (num_items + 1), [""] * (num_items + 1)),
                      [str(u) for u in range(num_users)], Ragged.from_rows(seqs),
                      timestamps=Ragged.from_rows(ts, dtype=np.int64))  # fmt: skip
    return ds, data.split(ds)


# -- tiny model configs ---------------------------------------------------------------------
# A tiny Qwen (HF config fields); the parity tests vary the family and a few fields.
TINY_QWEN = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0)  # fmt: skip


def random_hf_qwen(family: str = "Qwen2", seed: int = 0, **config):
    """A random fp32 HF `<family>ForCausalLM` (eager attention) of `TINY_QWEN` + `config`,
    every weight perturbed (norm scales 1 + 0.2 N, biases and embeddings 0.1 N, matrices
    0.08 N) so that a wrong bias, norm or transpose shows up in the logits."""
    import torch
    import transformers

    hf_config = getattr(transformers, f"{family}Config")(**{**TINY_QWEN, **config})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1 if "bias" in name or "embed" in name else 0.08)
    return model


# hstu.trainer.make_trainer overrides (architecture + optimisation) of any HSTU/SASRec preset.
TINY_HSTU = dict(max_seq_len=12, embedding_dim=16, num_blocks=1, num_heads=2, dropout_rate=0.1,
                 num_negatives=8, batch_size=8, learning_rate=5e-3)  # fmt: skip


def tiny_tiger_budget() -> dict:
    """A `rqvae.recommender.BUDGETS` entry that runs in seconds (RQ-VAE + TIGER)."""
    from rqvae.model import RQVAEConfig
    from rqvae.tiger import TigerConfig
    from rqvae.tiger_trainer import TigerTrainConfig
    from rqvae.train import TrainConfig

    return dict(
        rqvae=TrainConfig(
            model=RQVAEConfig(hidden_dims=(16,), code_dim=4, num_levels=2, codebook_size=4),
            num_epochs=3, batch_size=8,
        ),
        tiger=TigerTrainConfig(
            model=TigerConfig(d_model=8, num_heads=2, head_dim=4, d_ff=16, encoder_layers=1,
                              decoder_layers=1, max_items=4),
            num_epochs=2, batch_size=16, beam_size=20,
        ),
    )  # fmt: skip


def tiny_bigrec_budget():
    """A `llm_sft.recommender.BUDGETS` entry that runs in seconds on `write_tiny_ml100k`."""
    from llm_sft.recommender import BigRecConfig
    from llm_sft.trainer import TrainConfig

    return BigRecConfig(
        model=dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8),
        vocab_size=384, tokenizer_prompts=20, template="chat", max_examples=12,
        train=TrainConfig(learning_rate=1e-2, per_device_train_batch_size=4, max_steps=3,
                          group_by_length=True),
    )  # fmt: skip


def tiny_sid_budget():
    """A `llm_sft.recommender.SID_BUDGETS` entry that runs in seconds on `write_tiny_ml100k`."""
    from llm_sft.recommender import SidLLMConfig
    from llm_sft.trainer import TrainConfig

    step = TrainConfig(learning_rate=1e-2, per_device_train_batch_size=2, max_steps=2)
    return SidLLMConfig(
        model=dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8),
        stage1=step, stage2=step, vocab_size=384, tokenizer_prompts=20, max_length=192,
    )  # fmt: skip


# -- a toy regression task for the loop ---------------------------------------------------
def regression_data(n: int = 64, dim: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w = np.arange(1, dim + 1, dtype=np.float32)
    return {"x": x, "y": (x @ w + 0.01 * rng.standard_normal(n)).astype(np.float32)}


def regression_fit(out=None, *, learning_rate=0.2, total_steps=40, eval_every=8, patience=None,
                   batch_size=8, accumulation=1, weighted=False, seed=0, overwrite=False,
                   crash_at_eval=None):  # fmt: skip
    """Trains a linear model on `regression_data` with the shared loop; returns (result, state)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from eval.data.examples import ArraySource, batches
    from eval.training import LoopConfig, OptimizerConfig, RunDir, Task, TrainState, fit
    from eval.training.optim import make_optimizer

    data = regression_data()
    valid = {k: v[:16] for k, v in data.items()}

    def loss(model, batch, rng):
        noise = 0.01 * jax.random.normal(rng, batch["y"].shape)  # uses the step's rng
        err = (model(batch["x"])[:, 0] - batch["y"] + noise) ** 2
        if weighted:
            return err.sum(), {"weight": jnp.asarray(err.shape[0], jnp.float32)}
        return err.mean(), {"mse": err.mean()}

    evals = []

    def validate(model):
        evals.append(1)
        if len(evals) == crash_at_eval:
            raise RuntimeError("crash_at_eval")
        return {"mse": float(jnp.mean((model(valid["x"])[:, 0] - valid["y"]) ** 2))}

    config = dict(learning_rate=learning_rate, total_steps=total_steps, eval_every=eval_every,
                  patience=patience, batch_size=batch_size, accumulation=accumulation,
                  weighted=weighted, seed=seed)  # fmt: skip
    run = RunDir(out, "toy", config, overwrite=overwrite) if out else None
    try:
        if run is not None and run.result is not None:
            return run.result, None
        model = nnx.Linear(4, 1, rngs=nnx.Rngs(seed))
        tx = make_optimizer(OptimizerConfig(learning_rate=learning_rate), total_steps)
        state = TrainState(model, tx)
        task = Task(
            loss=loss,
            batches=lambda start: batches(ArraySource(data), batch_size, seed=seed, num_epochs=None, start_batch=start),
            validate=validate,
        )  # fmt: skip
        cfg = LoopConfig(total_steps, eval_every, patience, "mse", "min",
                         gradient_accumulation_steps=accumulation, seed=seed, progress=False)  # fmt: skip
        info = fit(state, task, cfg, run)
        result = {"steps": info.steps, "best_step": info.best_step, "valid": info.valid,
                  "final": validate(state.model())}  # fmt: skip
        if run is not None:
            run.write_result(result)
        return result, state
    finally:
        if run is not None:
            run.close()


# -- subprocess helpers for the crash tests -----------------------------------------------
def run_module(args: list[str], *, kill_at: str | None = None, timeout: float = 600, cwd=REPO):
    """Runs `python <args>` with this interpreter (optionally under LLM4REC_KILL_AT)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLM4REC_ALLOCATOR": "system"}
    env.pop("LLM4REC_KILL_AT", None)
    if kill_at:
        env["LLM4REC_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def assert_killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


def truncate_latest_checkpoint(out: pathlib.Path) -> None:
    """Cuts every data file of the run folder's latest checkpoint to 10 bytes (disk damage)."""
    steps = sorted((out / "checkpoints" / "latest").iterdir(), key=lambda p: int(p.name))
    files = [p for p in (steps[-1] / "state").rglob("*") if p.is_file() and p.stat().st_size > 100]
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[:10])


def kill_and_resume(args: list[str], out: pathlib.Path, resume, kill_at: str = "after:2") -> dict:
    """Runs `python <args>` (a training CLI writing the run folder `out`), killed by SIGKILL
    at `kill_at`; checks that a copy with a truncated checkpoint is refused with a clear
    error; then `resume(out)`, the same run through the Python API in this process (its
    compiled programs are warm). Returns the run's result.json."""
    import pytest

    from eval.training import CheckpointError

    assert_killed(run_module(args, kill_at=kill_at))
    assert not (out / "result.json").exists()
    damaged = out.with_name(out.name + "_damaged")
    shutil.copytree(out, damaged)
    truncate_latest_checkpoint(damaged)
    with pytest.raises(
        CheckpointError, match=r"checkpoints/latest/\d+: the checkpoint of step \d+ cannot be read"
    ):
        resume(damaged)
    resume(out)
    assert not list((out / "checkpoints").rglob("*orbax-checkpoint-tmp*"))
    return json.loads((out / "result.json").read_text())


def flat(tree, prefix: str = "") -> dict:
    """A nested dict as {"a/b/...": leaf} (for `pytest.approx`, which compares flat ones)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}/").items()}
    return {prefix: tree}


def train_losses(out: pathlib.Path) -> list[float]:
    """The train-loss records of a run folder, in order."""
    from eval.training import read_records

    return [r["loss"] for r in read_records(out) if r["split"] == "train"]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    kind, out, *pairs = sys.argv[1:]
    assert kind == "regression", kind
    kwargs = {k: json.loads(v) for k, v in (p.split("=", 1) for p in pairs)}
    print(json.dumps(regression_fit(out, **kwargs)[0]))


def sft_args(tmp_path, out, **extra):
    """(CLI args, `llm_sft.train.run` kwargs, TrainConfig) of a 6-step full fine-tune of a
    random tiny Qwen on `write_tiny_ml100k` over mesh data:2,fsdp:2,tensor:2."""
    from llm_sft.trainer import TrainConfig

    folder = write_tiny_ml100k(tmp_path / "ml-100k")
    config = tmp_path / "config.json"
    hf_config = dict(model_type="qwen2", vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    config.write_text(json.dumps(hf_config))
    flags = dict(max_steps=6, eval_every=2, log_every=1, per_device_train_batch_size=1, learning_rate=1e-2,
                 max_length=256, max_eval_examples=4, mesh="data:2,fsdp:2,tensor:2", **extra)  # fmt: skip
    args = ["-m", "llm_sft.train", "--dataset=ml-100k", f"--data_dir={folder}", f"--out={out}", "--init=random",
            f"--model_config={config}", "--nolora", *(f"--{k}={v}" for k, v in flags.items())]  # fmt: skip
    kwargs = dict(dataset="ml-100k", data_dir=str(folder), lora=None, model_config=str(config),
                  max_length=256, max_eval_examples=4, mesh=flags["mesh"], progress=False)  # fmt: skip
    train = TrainConfig(
        max_steps=6, eval_every=2, log_every=1, per_device_train_batch_size=1, learning_rate=1e-2
    )
    return args, kwargs, train


def sid_args(tmp_path, out, **extra):
    """(CLI args, `llm_sft.train_sid.run` kwargs) of a two-stage, 4 + 4-step semantic-ID
    LLM run: a random tiny Qwen3 on a 12-user `write_tiny_ml100k` with a 2-level index,
    mesh data:2,fsdp:2,tensor:2."""
    from llm_sft.trainer import TrainConfig

    folder = write_tiny_ml100k(tmp_path / "ml-100k", num_users=12, num_items=16, per_user=6)
    index = tmp_path / "ids.json"
    index.write_text(json.dumps({str(k): [f"<a_{k % 4}>", f"<b_{k // 4}>"] for k in range(16)}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(
        model_type="qwen3", vocab_size=384, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        tie_word_embeddings=True)))  # fmt: skip
    stage = TrainConfig(
        learning_rate=1e-2, per_device_train_batch_size=1, max_steps=4, eval_every=2
    )
    kwargs = dict(
        dataset="ml-100k", data_dir=str(folder), semantic_ids=str(index), out=str(out),
        stage1=stage, stage2=stage, model_config=str(config), max_length=160,
        max_eval_examples=6, num_beams=20, mesh="data:2,fsdp:2,tensor:2", progress=False, **extra,
    )  # fmt: skip
    args = ["-m", "llm_sft.train_sid", "--dataset=ml-100k", f"--data_dir={folder}",
            f"--semantic_ids={index}", f"--out={out}", "--init=random", f"--model_config={config}",
            "--learning_rate=1e-2", "--per_device_train_batch_size=1", "--max_steps=4",
            "--eval_every=2", "--stage1_steps=4", "--stage1_learning_rate=1e-2",
            "--stage1_batch_size=1", "--max_length=160", "--max_eval_examples=6",
            "--num_beams=20", f"--mesh={kwargs['mesh']}"]  # fmt: skip
    return args, kwargs


def tiger_run_args(tmp_path, out, **extra):
    """(data folder, index file, flags, CLI args) of a 4-epoch tiny `rqvae.tiger_train` run
    on `write_tiny_ml100k` with a random 3-level index."""
    from rqvae import ids

    folder = write_tiny_ml100k(tmp_path / "ml-100k")
    index = tmp_path / "ids.json"
    if not index.exists():
        ids.write_index(index, np.random.default_rng(0).integers(0, 4, (30, 3)))
    flags = dict(d_model=8, num_layers=1, num_heads=2, head_dim=4, d_ff=16, max_items=4, num_user_buckets=3,
                 num_epochs=4, batch_size=16, beam_size=5, warmup_steps=2, learning_rate=1e-2, **extra)  # fmt: skip
    args = ["-m", "rqvae.tiger_train", "--dataset=ml-100k", f"--data_dir={folder}", f"--semantic_ids={index}",
            f"--out={out}", *(f"--{k}={v}" for k, v in flags.items())]  # fmt: skip
    return folder, index, flags, args


def tiger_config(flags):
    """The `TigerTrainConfig` of `tiger_run_args` flags."""
    from rqvae import tiger
    from rqvae.tiger_trainer import TigerTrainConfig

    model = tiger.TigerConfig(
        d_model=flags["d_model"], encoder_layers=flags["num_layers"], decoder_layers=flags["num_layers"],
        num_heads=flags["num_heads"], head_dim=flags["head_dim"], d_ff=flags["d_ff"], max_items=flags["max_items"],
        num_user_buckets=flags["num_user_buckets"],
    )  # fmt: skip
    keys = ("num_epochs", "batch_size", "beam_size", "warmup_steps", "learning_rate")
    return TigerTrainConfig(model=model, **{k: flags[k] for k in keys})
