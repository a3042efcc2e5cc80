"""SFT data (prompts, masking, truncation, packing) and the sharded trainer (parity, resume)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax
import numpy as np
import pytest
from flax import nnx
from tiny import sft_args

from eval.data import Ragged
from eval.data.examples import ArraySource
from llm_sft import data as sft
from llm_sft.lora import LoRAConfig, LoRAParam, apply_lora
from llm_sft.model import ModelConfig
from llm_sft.sharding import make_mesh
from llm_sft.trainer import TrainConfig, Trainer, init_model

TITLES = [""] + [f"Film number {i} ({1980 + i})" for i in range(1, 41)]
MAX_LEN = 192


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    instruction, input_text = sft.instruction_and_input(TITLES[1:], "movies")
    corpus = [sft.ALPACA_TEMPLATE, instruction, input_text] * 20 + TITLES[1:]
    return sft.train_bpe_tokenizer(corpus, 512, tmp_path_factory.mktemp("bpe"))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_train_on_inputs_masks_the_prompt(tokenizer):
    ex = sft.tokenize_examples(Ragged.from_rows([[4, 7]]), np.array([9]), TITLES, "movies", tokenizer)  # fmt: skip
    instruction, input_text = sft.instruction_and_input([TITLES[4], TITLES[7]], "movies")
    assert input_text == 'The user has watched the following movies before: "Film number 4 (1984)", "Film number 7 (1987)"'  # fmt: skip
    prompt = _ids(tokenizer, sft.ALPACA_TEMPLATE.format(instruction=instruction, input=input_text))
    response = _ids(tokenizer, '"Film number 9 (1989)"') + [tokenizer.eos_token_id]
    np.testing.assert_array_equal(ex.input_ids[0], prompt + response)
    assert ex.prompt_lengths[0] == len(prompt)
    n = len(prompt) + len(response)
    for train_on_inputs, first_label in ((False, len(prompt)), (True, 1)):
        arrays = sft.padded_arrays(ex, 256, tokenizer.pad_token_id, "left", train_on_inputs)
        labels, ids = arrays["labels"][0, 256 - n :], arrays["input_ids"][0, 256 - n :]
        assert (arrays["labels"][0, : 256 - n] == sft.IGNORE).all()
        assert (arrays["attention_mask"][0] == (np.arange(256) >= 256 - n)).all()
        assert (labels[:first_label] == sft.IGNORE).all()
        np.testing.assert_array_equal(labels[first_label:], ids[first_label:])


def test_max_length_drops_oldest_history_first(tokenizer):
    history = [1, 2, 3, 4, 5]
    full = sft.tokenize_examples(Ragged.from_rows([history]), np.array([6]), TITLES, "movies", tokenizer)  # fmt: skip
    with_three = sft.tokenize_examples(Ragged.from_rows([history[2:]]), np.array([6]), TITLES, "movies", tokenizer)  # fmt: skip
    limit = len(with_three.input_ids[0])
    assert limit < len(full.input_ids[0])
    ex = sft.tokenize_examples(
        Ragged.from_rows([history, history, [3]]), np.array([6, 6, 6]), TITLES, "movies",
        tokenizer, max_length=limit,
    )  # fmt: skip
    np.testing.assert_array_equal(ex.history_kept, [3, 3, 1])
    np.testing.assert_array_equal(ex.input_ids[0], with_three.input_ids[0])
    text = tokenizer.decode(ex.input_ids[0])
    assert TITLES[3] in text and TITLES[5] in text and TITLES[2] not in text
    # A single history item longer than the limit: the example is dropped and counted.
    long_titles = TITLES[:3] + ["x " * 400]
    dropped = sft.tokenize_examples(
        Ragged.from_rows([[3], [1]]), np.array([2, 2]), long_titles, "movies", tokenizer,
        max_length=limit,
    )  # fmt: skip
    assert dropped.dropped == 1 and list(dropped.source_index) == [1]
    # Generation prompts never drop an example: an over-long newest item is kept alone.
    prompts, kept = sft.tokenize_prompts(
        Ragged.from_rows([[1, 2, 3], [1, 2]]), long_titles, "movies", tokenizer, max_length=limit
    )  # fmt: skip
    np.testing.assert_array_equal(kept, [1, 2])
    assert len(prompts[0]) > limit and "x x x" in tokenizer.decode(prompts[0]) and TITLES[2] not in tokenizer.decode(prompts[0])  # fmt: skip
    with pytest.raises(ValueError, match="empty history"):
        sft.tokenize_prompts(Ragged.from_rows([[1], []]), long_titles, "movies", tokenizer)


def test_first_fit_decreasing_fills_rows_longest_first():
    row, col = sft.first_fit_decreasing(np.array([1, 3, 5, 2, 4, 3]), 6)
    # 5 -> row 0, 4 -> row 1, 3 -> row 2, 3 -> row 2, 2 -> row 1, 1 -> row 0: all full
    assert row.tolist() == [0, 2, 0, 1, 1, 2] and col.tolist() == [5, 0, 0, 4, 0, 3]
    lengths = np.random.default_rng(0).integers(1, 60, 500)
    row, col = sft.first_fit_decreasing(lengths, 64)
    used = np.bincount(row, weights=lengths)
    assert used.max() <= 64 and len(used) <= np.ceil(lengths.sum() / 64) * 1.25


def test_packing_restarts_positions_and_masks_segment_starts(tokenizer):
    ex = sft.tokenize_examples(
        Ragged.from_rows([[1], [2, 3], [4]]), np.array([2, 4, 5]), TITLES, "movies", tokenizer
    )
    lengths = ex.input_ids.lengths
    width = int(lengths.sum()) + 5
    arrays = sft.packed_arrays(ex, width, tokenizer.pad_token_id, train_on_inputs=True)
    assert arrays["input_ids"].shape == (1, width)
    seg, pos, labels = arrays["attention_mask"][0], arrays["positions"][0], arrays["labels"][0]
    assert sorted(np.bincount(seg)[1:]) == sorted(lengths) and (seg[-5:] == 0).all()
    starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)[:3]
    assert (pos[starts] == 0).all() and (labels[starts] == sft.IGNORE).all()
    real = seg > 0
    assert (labels[real & (pos > 0)] == arrays["input_ids"][0][real & (pos > 0)]).all()
    trimmed = sft.trim_to_bucket(arrays, (16, 64, width), "right")
    assert trimmed["input_ids"].shape[1] == min(b for b in (16, 64, width) if b >= width - 5)


def test_chat_template_prompt(tokenizer):
    text = sft.prompt_text("Recommend.", "History.", "chat", tokenizer)
    assert text == "<|im_start|>user\nRecommend.\n\nHistory.<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="prompt_template"):
        sft.prompt_text("a", "b", "vicuna", tokenizer)


# -- trainer ------------------------------------------------------------------------------

MODEL = ModelConfig(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
    num_kv_heads=2, head_dim=8, rope_theta=10_000.0, initializer_range=0.3,
)  # fmt: skip
TRAIN = TrainConfig(
    learning_rate=3e-2, schedule="cosine", warmup_steps=2, per_device_train_batch_size=8,
    gradient_accumulation_steps=2, max_steps=20, eval_every=5, log_every=5, seed=0,
)  # fmt: skip
LORA = LoRAConfig(
    r=8, alpha=16.0, dropout=0.1, target_modules=("q", "k", "v", "o", "gate", "up", "down")
)


@pytest.fixture(scope="module")
def arrays(tokenizer):
    """Users walk through the catalogue in order (learnable), from random start items."""
    starts = np.random.default_rng(0).integers(1, 41, 24)
    rows = [[(s + j - 1) % 40 + 1 for j in range(8)] for s in starts]
    histories, targets = sft.train_histories(Ragged.from_rows(rows), max_history=4)
    ex = sft.tokenize_examples(histories, targets, TITLES, "movies", tokenizer, max_length=MAX_LEN)
    assert ex.dropped == 0 and len(tokenizer) <= MODEL.vocab_size
    return sft.padded_arrays(ex, MAX_LEN, tokenizer.pad_token_id, "right")


def _trainer(mesh, arrays, lora=LORA):
    model = apply_lora(init_model(MODEL, 0, mesh), lora, rngs=nnx.Rngs(params=1, dropout=2))
    per_device = TRAIN.per_device_train_batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
    config = TrainConfig(**{**TRAIN.__dict__, "per_device_train_batch_size": per_device})
    return Trainer(model, mesh, config, len(arrays["input_ids"]), trainable=LoRAParam)


def _losses(trainer, arrays, steps=3):
    return [float(trainer.train_step({k: v[: trainer.rows_per_step] for k, v in arrays.items()}, step)["loss"])
            for step in range(steps)]  # fmt: skip


def test_one_device_and_eight_device_mesh_losses_agree(arrays):
    lora = LoRAConfig(r=8, alpha=16.0, target_modules=("q", "v"))  # No dropout: compiles faster.
    one = _trainer(make_mesh(1, 1, 1, devices=jax.devices()[:1]), arrays, lora)
    eight = _trainer(make_mesh(data=2, fsdp=2, tensor=2), arrays, lora)
    kernel = eight.state.params["layers"][0]["self_attn"]["q_proj"]["lora_a"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    np.testing.assert_allclose(_losses(eight, arrays), _losses(one, arrays), atol=1e-5, rtol=0)


def test_group_by_length_draws_each_batch_from_one_length_bucket():
    lengths = np.random.default_rng(0).integers(1, 97, 64)
    cols = np.arange(96)
    arrays = {
        "input_ids": np.where(cols < lengths[:, None], 7, 0).astype(np.int32),
        "labels": np.where(cols == lengths[:, None] - 1, 7, sft.IGNORE).astype(np.int32),
        "attention_mask": (cols < lengths[:, None]).astype(np.int32),
    }
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    config = TrainConfig(per_device_train_batch_size=4, max_steps=40, group_by_length=True)
    trainer = Trainer(init_model(MODEL, 0, mesh), mesh, config, 64)
    buckets = (32, 64, 96)
    seen = []
    loader = trainer.batches(ArraySource(arrays), buckets, "right", 0)
    for step, batch in enumerate(itertools.islice(loader, 30)):
        width = batch["input_ids"].shape[1]
        rows = batch["attention_mask"].sum(1)
        lower = ([0, *buckets])[buckets.index(width)]
        assert set(batch) == set(arrays) and ((rows > lower) & (rows <= width)).all(), (step, rows)
        seen.append(width)
    assert set(seen) == set(buckets)  # every bucket drawn, in a shuffled order
    # A resumed loader repeats the same batches from its step on.
    again = next(trainer.batches(ArraySource(arrays), buckets, "right", 5))
    first = next(itertools.islice(trainer.batches(ArraySource(arrays), buckets, "right", 0), 5, 6))
    np.testing.assert_array_equal(again["attention_mask"], first["attention_mask"])


@pytest.mark.slow  # ~30 s of CPU: one more compiled step + eval and orbax round trips.
def test_loss_decreases_and_best_state_is_kept(arrays, tmp_path):
    from eval.training import RunDir

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    valid = {k: v[:10] for k, v in arrays.items()}
    trainer = _trainer(mesh, arrays)
    with RunDir(tmp_path, "llm_sft", {"test": 1}) as run:
        info = trainer.fit(ArraySource(arrays), valid, buckets=(MAX_LEN,), run=run, progress=False)
    assert info.steps == 20 and len(info.losses) == 20
    assert np.mean(info.losses[-5:]) < 0.7 * np.mean(info.losses[:3]), info.losses
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid_records = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid_records] == [5, 10, 15, 20]
    assert info.valid["loss"] == min(r["loss"] for r in valid_records)
    assert trainer.evaluate(valid, (MAX_LEN,), "right") == pytest.approx(
        info.valid["loss"], rel=1e-5
    )


@pytest.mark.slow
def test_parity_one_vs_eight_devices_full_finetuning(arrays):
    """Full fine-tuning: fsdp/tensor-sharded params and optimizer state, same losses."""
    losses = []
    for mesh in (
        make_mesh(1, 1, 1, devices=jax.devices()[:1]),
        make_mesh(data=2, fsdp=2, tensor=2),
    ):
        per_device = TRAIN.per_device_train_batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
        config = TrainConfig(**{**TRAIN.__dict__, "per_device_train_batch_size": per_device})
        trainer = Trainer(init_model(MODEL, 0, mesh), mesh, config, len(arrays["input_ids"]))  # fmt: skip
        losses.append(_losses(trainer, arrays))
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_run_end_to_end_on_tiny_movielens(tmp_path):
    from llm_sft.train import run

    rng = np.random.default_rng(0)
    data_dir = tmp_path / "ml-100k"
    data_dir.mkdir()
    lines = [f"{u}\t{rng.integers(1, 31)}\t4\t{1000 + 10 * u + t}" for u in range(1, 13) for t in range(10)]  # fmt: skip
    (data_dir / "u.data").write_text("\n".join(lines) + "\n")
    (data_dir / "u.item").write_text("".join(f"{i}|Movie {i} (19{60 + i})|01-Jan-1990||x|0\n" for i in range(1, 31)))  # fmt: skip
    hf_config = dict(
        model_type="qwen2", vocab_size=512, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    summary = run(
        dataset="ml-100k", data_dir=str(data_dir), out=str(tmp_path / "run"),
        train=TrainConfig(max_steps=4, per_device_train_batch_size=1, eval_every=2),
        lora=LoRAConfig(r=4), model_config=str(tmp_path / "config.json"),
        mesh="data:2,fsdp:2,tensor:2", max_length=256, pack=True, max_eval_examples=8,
        progress=False,
    )  # fmt: skip
    assert summary["steps"] == 4 and summary["eval_loss"] is not None
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert sft.load_tokenizer(adapter).eos_token == "<|im_end|>"


def test_kill_9_after_second_checkpoint_then_rerun_matches(tmp_path):
    from tiny import kill_and_resume, train_losses

    from llm_sft.train import run

    args, kwargs, train = sft_args(tmp_path, tmp_path / "killed")
    full = run(out=str(tmp_path / "full"), train=train, **kwargs)
    resumed = kill_and_resume(
        args, tmp_path / "killed", lambda out: run(out=str(out), train=train, **kwargs)
    )
    assert {k: v for k, v in resumed.items() if k != "export"} == {
        k: v for k, v in full.items() if k != "export"
    }
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "full")
    exported = [sft.load_tokenizer(tmp_path / d / "hf") for d in ("full", "killed")]
    assert exported[0].get_vocab() == exported[1].get_vocab()


def test_absurd_learning_rate_stops_with_an_error_and_exports_nothing(tmp_path):
    from eval.training import NonFiniteError
    from llm_sft.train import run

    _, kwargs, train = sft_args(tmp_path, tmp_path / "run")
    bad = dataclasses.replace(train, learning_rate=1e38, max_grad_norm=0.0)
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite .*Last good checkpoint"):
        run(out=str(tmp_path / "run"), train=bad, **kwargs)
    assert (
        not (tmp_path / "run" / "hf").exists() and not (tmp_path / "run" / "result.json").exists()
    )


def test_max_length_that_drops_every_example_is_a_flag_error(tmp_path):
    from eval.errors import FlagError
    from llm_sft.train import run

    _, kwargs, train = sft_args(tmp_path, tmp_path / "run")
    with pytest.raises(FlagError, match=r"--max_length=8: no training example fits \(\d+ dropped"):
        run(out=str(tmp_path / "run"), train=train, **{**kwargs, "max_length": 8})
