"""Semantic-ID vocabulary expansion: tokens, grown rows, HF round trip."""

import json
import shutil

import numpy as np
import pytest
from conftest import SHARED

from eval.data.formats import read_index
from llm_sft.add_sid_tokens import run
from llm_sft.data import load_tokenizer, train_bpe_tokenizer
from llm_sft.params import load_hf
from llm_sft.sid_tokens import SID_END, SID_START, sid_text, sid_vocabulary

QWEN_TOKENIZER = SHARED / "assets" / "qwen2.5-0.5b-instruct"
NATIVE_INDEX = SHARED / "data" / "amazon-scientific-2018" / "indexes" / "rqvae_native.index.json"


def test_sid_vocabulary_lists_every_code_of_every_level():
    codes = np.array([[1, 2], [3, 0]])
    tokens = sid_vocabulary(codes)
    assert tokens[:2] == [SID_START, SID_END] and len(tokens) == 2 + 2 * 4
    assert tokens[2:6] == ["<a_0>", "<a_1>", "<a_2>", "<a_3>"] and tokens[-1] == "<b_3>"
    assert len(sid_vocabulary(codes, codebook_size=256)) == 2 + 2 * 256
    with pytest.raises(ValueError, match="outside --codebook_size=2"):
        sid_vocabulary(codes, codebook_size=2)
    assert sid_text([12, 201]) == "<|sid_start|><a_12><b_201><|sid_end|>"


def _hf_checkpoint(folder, tokenizer_dir, vocab_size: int, tie: bool):
    """A random-init Qwen3 checkpoint written by `transformers`, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        if "token" in file.name or file.name in ("vocab.json", "merges.txt"):
            shutil.copy(file, folder / file.name)
    return folder


def _check_expanded(src, out, summary, codes):
    from tools.compare_torch import compare

    old_tok, new_tok = load_tokenizer(src), load_tokenizer(out)
    assert len(new_tok) - len(old_tok) == summary["tokens_added"]
    text = sid_text(codes[0])
    ids = new_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 + codes.shape[1] and min(ids) >= len(old_tok)  # single new tokens
    assert new_tok.decode(ids) == text
    old, _ = load_hf(src)
    new, config = load_hf(out)
    assert config.vocab_size >= len(new_tok)
    known = len(old_tok)
    emb_old, emb_new = old.embed_tokens.embedding[...], new.embed_tokens.embedding[...]
    np.testing.assert_array_equal(emb_new[:known], emb_old[:known])  # bit-identical
    fresh = np.asarray(emb_new)[np.asarray(ids)]
    np.testing.assert_allclose(fresh, np.asarray(emb_old[:known]).mean(0)[None].repeat(len(ids), 0),
                               atol=1e-5)  # fmt: skip
    if old.lm_head is not None:
        np.testing.assert_array_equal(
            new.lm_head.kernel[...][:, :known], old.lm_head.kernel[...][:, :known]
        )
    diff, agree, total = compare(out, prompt=f"{text} is next, then {sid_text(codes[1])}",
                                 max_new_tokens=4)  # fmt: skip
    assert diff <= 1e-4 and agree == total


def test_add_sid_tokens_to_qwen3_with_the_qwen25_tokenizer(tmp_path):
    if not QWEN_TOKENIZER.is_dir() or not NATIVE_INDEX.exists():
        pytest.skip("../shared Qwen2.5 tokenizer or amazon-scientific-2018 index not available")
    vocab = json.loads((QWEN_TOKENIZER / "config.json").read_text())["vocab_size"]
    src = _hf_checkpoint(tmp_path / "qwen3", QWEN_TOKENIZER, vocab, tie=True)
    summary = run(str(src), str(NATIVE_INDEX), str(tmp_path / "sid"))
    assert summary["tokens_added"] == 2 + 4 * 256  # the model card's 3 + 4 x 256 less one
    assert summary["codebook_size"] == 256 and summary["levels"] == 4
    _check_expanded(src, tmp_path / "sid", summary, read_index(NATIVE_INDEX))


def test_add_sid_tokens_untied_head_grows_past_the_vocabulary(tmp_path):
    texts = [f"item {i} title words {i * 7}" for i in range(200)]
    tok_dir = tmp_path / "tok"
    tokenizer = train_bpe_tokenizer(texts, 300, tok_dir)
    src = _hf_checkpoint(tmp_path / "qwen3", tok_dir, len(tokenizer), tie=False)
    index = tmp_path / "ids.json"
    index.write_text(json.dumps({str(i): [f"<a_{i % 8}>", f"<b_{i // 8}>"] for i in range(16)}))
    summary = run(str(src), str(index), str(tmp_path / "sid"), codebook_size=8)
    assert summary["tokens_added"] == 2 + 2 * 8
    assert summary["vocab_size"] == [len(tokenizer), len(tokenizer) + 18]
    _check_expanded(src, tmp_path / "sid", summary, read_index(index))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_stage1_trains_only_the_sid_rows(tie):
    import jax
    from flax import nnx

    from llm_sft.model import ModelConfig
    from llm_sft.rows import RowParam, apply_rows, merge_rows
    from llm_sft.sharding import make_mesh
    from llm_sft.sid_tokens import grow_vocab
    from llm_sft.trainer import TrainConfig, Trainer, init_model

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    config = ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=8, tie_word_embeddings=tie,
    )  # fmt: skip
    new_ids = np.arange(64, 72)
    model = grow_vocab(init_model(config, 0, mesh), new_ids, known=64)
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 72, (16, 12)).astype(np.int32)
    arrays = {"input_ids": tokens, "labels": tokens, "attention_mask": np.ones_like(tokens)}
    train = TrainConfig(learning_rate=1e-1, per_device_train_batch_size=8, max_steps=3, seed=0)
    trainer = Trainer(apply_rows(model, new_ids), mesh, train, 16, trainable=RowParam)
    opt_shapes = {x.shape for x in jax.tree.leaves(trainer.state.opt_state) if np.ndim(x) > 1}
    assert opt_shapes == {(8, 16)}  # optimizer state covers the new rows only, not [72, 16]
    for step in range(3):
        trainer.train_step({k: v[:8] for k, v in arrays.items()}, step)
    after = merge_rows(trainer.model())
    changed = set()
    for path, var in nnx.to_flat_state(nnx.state(after, nnx.Param)):
        old, new = before[path], np.asarray(var[...])
        if path in (("embed_tokens", "embedding"), ("lm_head", "kernel")):
            rows = (slice(None), new_ids) if path[0] == "lm_head" else (new_ids,)
            keep = np.ones(old.shape, bool)
            keep[rows] = False
            np.testing.assert_array_equal(new[keep], old[keep])  # every other row bit-identical
            if not np.array_equal(new[rows], old[rows]):
                changed.add(path)
        else:
            np.testing.assert_array_equal(new, old, err_msg=str(path))
    assert changed == (
        {("embed_tokens", "embedding")} | (set() if tie else {("lm_head", "kernel")})
    )


def _toy_split():
    """Six users over shared items; each user's valid and test targets are items no one
    else ever takes (so any leak into training data is visible)."""
    from eval.data import split
    from eval.data.formats import RawData, build_dataset

    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(6):
        seq = [str(i) for i in rng.permutation(8)[:5] + 1] + [str(100 + 2 * u), str(101 + 2 * u)]
        users += [f"u{u}"] * len(seq)
        items += seq
    meta = {i: {"title": f"thing {i}", "brand": f"b{int(i) % 3}"} for i in set(items)}
    ds = build_dataset("toy", RawData(users, items, item_meta=meta))
    return ds, split(ds)


def test_sid_tasks_never_train_on_evaluation_targets(tmp_path):
    from llm_sft.sid_data import TASKS, SIDTasks, task_examples, tokenize_tasks
    from llm_sft.sid_tokens import add_tokens

    ds, sp = _toy_split()
    codes = np.random.default_rng(1).integers(0, 4, (ds.num_items + 1, 3))
    codes[1:, 2] = np.arange(ds.num_items)  # distinct IDs
    ex = task_examples(ds, sp, codes, SIDTasks(history_titles=True), "items")
    counts = {t: ex.task.count(t) for t in TASKS}
    assert counts["text_to_sid"] == counts["sid_to_text"] == ds.num_items
    assert counts["sequential"] == int(np.maximum(sp.train.lengths - 1, 0).sum())
    held_out = set(sp.valid.targets.tolist()) | set(sp.test.targets.tolist())
    assert len(held_out) == 12
    for r, task in enumerate(ex.task):
        if task in ("sequential", "copurchase"):
            assert ex.item[r] not in held_out
            for t in held_out:
                assert sid_text(codes[t]) not in ex.input[r] + ex.response[r]
                assert ds.items.titles[t] not in ex.input[r]
    assert "Title: thing" in ex.input[0] and "Brand: b" in ex.input[0]  # item text fields
    mixed = task_examples(
        ds, sp, codes, SIDTasks(weights={"sequential": 2.5, "text_to_sid": 0.5}), "items"
    )
    assert mixed.task.count("sequential") == round(2.5 * counts["sequential"])
    assert mixed.task.count("text_to_sid") == round(0.5 * ds.num_items)
    assert set(mixed.task) == {"sequential", "text_to_sid"}

    tokenizer = train_bpe_tokenizer(ex.instruction + ex.input, 400, tmp_path / "tok")
    add_tokens(tokenizer, sid_vocabulary(codes[1:]))
    tok = tokenize_tasks(ex, tokenizer, template="chat", max_length=256)
    assert tok.dropped == 0 and len(tok) == len(ex)
    r = ex.task.index("sequential")
    row = tok.input_ids[r]
    response = row[tok.prompt_lengths[r] :]
    assert len(response) == 2 + 3 + 1  # <|sid_start|> a b c <|sid_end|> EOS
    assert tokenizer.decode(response[:-1]) == ex.response[r]


def test_code_scores_hand_computed():
    from llm_sft.sid_decode import code_scores

    expected = [[1, 5, 6, 2], [1, 7, 8, 2], [1, 5, 8, 2]]
    valid = {(1, 5, 6, 2), (1, 7, 8, 2), (1, 5, 8, 2)}
    generated = np.array([[1, 5, 6, 2, 0], [1, 7, 6, 2, 0], [1, 9, 9, 2, 0]])
    # row 0 exact; row 1 first code right, ID (1,7,6) invalid; row 2 wrong and invalid
    assert code_scores(generated, expected, valid) == {
        "first_code_accuracy": 2 / 3, "exact_match": 1 / 3, "invalid_share": 2 / 3,
    }  # fmt: skip


def test_constrained_beams_only_name_catalogue_items(tmp_path):
    import jax

    from llm_sft.model import ModelConfig
    from llm_sft.sharding import make_mesh
    from llm_sft.sid_data import SIDTasks, sequential_examples, task_examples
    from llm_sft.sid_decode import greedy_scores, rank_items
    from llm_sft.sid_tokens import expand_vocabulary
    from llm_sft.trainer import init_model

    ds, sp = _toy_split()
    codes = np.random.default_rng(1).integers(0, 3, (ds.num_items + 1, 2))
    codes[1:4] = codes[4]  # items 1..4 share one ID: listed together, ascending
    train = task_examples(ds, sp, codes, SIDTasks(), "items")
    tokenizer = train_bpe_tokenizer(train.instruction + train.input, 300, tmp_path / "tok")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    config = ModelConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True,
    )  # fmt: skip
    model, _ = expand_vocabulary(init_model(config, 0, mesh), tokenizer, codes[1:])
    test = sequential_examples(ds, codes, sp.test.history, sp.test.targets, SIDTasks(), "items")
    out = rank_items(model, tokenizer, test, codes, num_beams=20, batch_size=4)
    assert out["invalid"] == 0 and out["items"].shape == (len(test), 20)
    distinct = len(np.unique(codes[1:], axis=0))
    assert out["empty_slots"] == len(test) * (20 - distinct)  # every ID once per row
    for row in out["items"].tolist():
        i = row.index(1)
        assert row[i : i + 4] == [1, 2, 3, 4]  # one shared ID -> its items, ascending
    assert 0.0 <= out["NDCG@10"] <= out["HR@10"] <= 1.0
    scores = greedy_scores(model, tokenizer, test, codes, batch_size=4)
    assert set(scores) == {"sequential"} and 0 <= scores["sequential"]["invalid_share"] <= 1


@pytest.mark.parametrize("lora_r", [0, 2])
def test_train_sid_end_to_end_both_stages(tmp_path, lora_r):
    from tiny import sid_args

    from llm_sft.train_sid import run
    from tools.compare_torch import compare

    _, kwargs = sid_args(tmp_path, tmp_path / "run", lora_r=lora_r)
    result = run(**kwargs)
    assert result["sid_tokens"] == 2 + 2 * 4 and result["stage1"]["steps"] == 4
    assert result["stage2"]["steps"] == 4 and result["sequential"]["invalid"] == 0
    assert set(result["greedy"]) == {"text_to_sid", "sequential"}
    assert 0 <= result["sequential"]["NDCG@10"] <= 1
    exported = load_tokenizer(tmp_path / "run" / "hf")
    assert len(exported.tokenize(sid_text([1, 2]))) == 4  # the SID tokens ship with it
    for name in ("stage1", "stage2"):
        assert (tmp_path / "run" / name / "result.json").exists()
    # The export (LoRA merged, with the new rows) is what HF transformers computes.
    diff, agree, total = compare(tmp_path / "run" / "hf", prompt=sid_text([1, 2]), max_new_tokens=4)
    assert diff <= 1e-4 and agree == total
    assert run(**kwargs) == result  # a finished run is left alone
