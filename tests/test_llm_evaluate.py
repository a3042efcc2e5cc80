"""llm_sft.evaluate: beams -> items (shared titles), constrained validity, hand-computed
metrics of both protocols, run folders (run.json, LoRA adapters) end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from tiny import write_tiny_ml100k

from eval import data
from eval.data.dataset import EvalExamples, ItemTable, Ragged
from llm_sft import data as sft
from llm_sft import evaluate as ev
from llm_sft.generate import GenerateOutput
from llm_sft.lora import LoRAConfig, apply_lora, export_peft, load_peft, merge_lora
from llm_sft.model import ModelConfig, Qwen
from llm_sft.params import save_hf
from llm_sft.trainer import TrainConfig

# Items 1..7; "Alpha" (1, 3) and "Beta" (2, 5) are shared titles.
TITLES = ["", "Alpha", "Beta", "Alpha", "Gamma", "Beta", "Delta", "Epsilon Film"]
MODEL = ModelConfig(
    vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
    num_kv_heads=1, head_dim=16, rope_theta=10_000.0, tie_word_embeddings=True, initializer_range=0.3,
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    instruction, input_text = sft.instruction_and_input(TITLES[1:], "movies")
    corpus = [sft.ALPACA_TEMPLATE, instruction, input_text] * 5 + [
        sft.response_text(t) for t in TITLES[1:]
    ]
    return sft.train_bpe_tokenizer(corpus, MODEL.vocab_size, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def model():
    return Qwen(MODEL, rngs=nnx.Rngs(0))


def tiny_dataset() -> data.Dataset:
    seqs = [[4, 6, 1, 2], [1, 7, 3, 5], [6, 2, 4, 7]]
    items = ItemTable([str(i) for i in range(len(TITLES))], TITLES)
    return data.Dataset("tiny", items, ["u", "v", "w"], Ragged.from_rows(seqs))


def test_items_of_beams_lists_shared_titles_at_the_beam_position(tokenizer):
    trie = ev.title_trie(TITLES, tokenizer)
    groups = ev.title_items(trie)
    assert groups == {0: [1, 3], 1: [2, 5], 3: [4], 5: [6], 6: [7]}
    # With popularity [N + 1]: the most popular item of a shared title first, ties ascending.
    popularity = np.array([0, 1, 4, 2, 0, 4, 0, 0])
    assert ev.title_items(trie, popularity) == {0: [3, 1], 1: [2, 5], 3: [4], 5: [6], 6: [7]}
    beams = np.array([[1, 0, 3, -1], [5, -1, -1, -1]])  # canonical title indices, -1 = empty
    np.testing.assert_array_equal(ev.items_of_beams(beams, groups, 6), [[2, 5, 1, 3, 4, 0], [6, 0, 0, 0, 0, 0]])  # fmt: skip
    np.testing.assert_array_equal(ev.items_of_beams(beams, groups, 3), [[2, 5, 1], [6, 0, 0]])
    # Excluded items (e.g. the history) leave the list; later ones move up.
    np.testing.assert_array_equal(
        ev.items_of_beams(beams, groups, 4, exclude=[[5, 1], []]), [[2, 3, 4, 0], [6, 0, 0, 0]]
    )


def test_constrained_beams_are_catalogue_titles(model, tokenizer):
    ds = tiny_dataset()
    sp = data.split(ds)
    pop = np.bincount(sp.train.values, minlength=ds.num_items + 1)
    out = ev.evaluate_model(
        model, tokenizer, ds, sp.test, pop, num_beams=4, ks=(1, 3), unconstrained=True
    )
    tm = out["title_match"]
    # 5 distinct titles >= 4 beams: every slot is a finished title, none invalid.
    assert out["empty_slots"] == 0 and tm["invalid"] == 0 and tm["num_generated"] == 3 * 4
    # Item lists = the beams' titles expanded to all their items, ascending, in beam order.
    prompts = ev.prompts_for(sp.test, TITLES, "items", tokenizer, template="alpaca", max_length=512, max_history=10, reserve=0)  # fmt: skip
    trie = ev.title_trie(TITLES, tokenizer)
    beams = ev.decode_batched(
        model, prompts, batch_size=16, pad_id=tokenizer.pad_token_id, method="beam", num_beams=4,
        num_return_sequences=4, trie=trie,
    )  # fmt: skip
    texts = ev.decode_responses(tokenizer, beams.sequences)
    for row, (strings, items) in enumerate(zip(texts, out["items"], strict=True)):
        assert len(set(strings)) == 4 and all(s in TITLES[1:] for s in strings)
        expected = [i for s in strings for i in range(1, len(TITLES)) if TITLES[i] == s][:4]
        np.testing.assert_array_equal(items, expected)
        assert out["top1"][row] == strings[0]
        # Each beam's canonical title is the decoded one.
        assert [TITLES[int(t) + 1] for t in beams.titles[row]] == strings
    greedy = out["unconstrained_greedy"]["title_match"]
    assert greedy["num_generated"] == 3 and 0 <= greedy["invalid_rate"] <= 1


def test_metrics_equal_a_hand_computation(model, tokenizer, monkeypatch):
    """Two examples with fixed beams and 1-d embeddings; both protocols by hand."""
    ds = tiny_dataset()
    examples = EvalExamples(np.array([0, 1]), Ragged.from_rows([[6], [1]]), np.array([4, 6]))
    beams = [["Alpha", "Gamma", "Beta"], ["Gamma", "Alpha", "Beta"]]
    canonical = {"Alpha": 0, "Beta": 1, "Gamma": 3}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def fake_decode(model, prompts, **kwargs):
        assert kwargs["method"] == "beam" and len(prompts) == 2
        rows = [[tokenizer(sft.response_text(t), add_special_tokens=False)["input_ids"] + [eos] for t in b] for b in beams]  # fmt: skip
        seqs = np.full((2, 3, 12), pad, np.int32)
        for i, b in enumerate(rows):
            for j, s in enumerate(b):
                seqs[i, j, : len(s)] = s
        titles = np.array([[canonical[t] for t in b] for b in beams])
        return GenerateOutput(seqs, np.zeros((2, 3), np.float32), titles)

    position = {"Alpha": 0.0, "Gamma": 1.0, "Beta": 3.0, "Delta": 7.0, "Epsilon Film": 20.0}
    monkeypatch.setattr(ev, "decode_batched", fake_decode)
    monkeypatch.setattr(
        ev, "embed_texts", lambda m, tok, texts, **kw: np.array([[position[t]] for t in texts])
    )
    out = ev.evaluate_model(
        model, tokenizer, ds, examples, np.ones(8), num_beams=3, ks=(1, 3), gamma_grid=(0.0, 2.0)
    )
    assert out["best_gamma"] == {
        1: 0.0,
        3: 0.0,
    }  # uniform popularity: every gamma ties, the first wins
    # Title match: "Gamma" (target 4) at rank 2; "Delta" (target 6) not generated.
    tm = out["title_match"]
    assert tm["HR@1"] == 0 and tm["HR@3"] == 0.5 and tm["invalid"] == 0
    assert tm["NDCG@3"] == pytest.approx(0.5 / np.log2(3))
    # Item ids: "Alpha" -> 1, 3 at the first position, then "Gamma" -> 4 (cut at 3 slots).
    np.testing.assert_array_equal(out["items"], [[1, 3, 4], [4, 1, 3]])
    # Grounding on the top-1 titles: "Alpha" (0) -> item 4 (distance 1) behind items 1 and 3
    # (distance 0): rank 3. "Gamma" (1) -> item 6 (distance 6) behind items 1-5: rank 6.
    gr = out["grounding"]
    assert gr["HR@1"] == 0 and gr["HR@3"] == 0.5
    assert gr["NDCG@3"] == pytest.approx(0.5 / np.log2(4))


def test_load_peft_round_trips_export_peft_and_lora_runs_load(tmp_path, tokenizer):
    base = Qwen(MODEL, rngs=nnx.Rngs(0))
    lora = LoRAConfig(r=2, alpha=4.0, target_modules=("q", "down"))
    tuned = apply_lora(nnx.clone(base), lora, rngs=nnx.Rngs(1), random_b=True)
    export_peft(tuned, lora, tmp_path / "run" / "adapter")
    loaded = load_peft(nnx.clone(base), tmp_path / "run" / "adapter")
    ids = np.arange(12, dtype=np.int32)[None] % MODEL.vocab_size
    np.testing.assert_allclose(loaded(ids)[0], tuned(ids)[0], atol=1e-5)
    np.testing.assert_allclose(merge_lora(loaded)(ids)[0], tuned(ids)[0], atol=1e-4)
    assert not np.allclose(base(ids)[0], tuned(ids)[0], atol=1e-3)
    # A LoRA run folder: base from run.json (or --hf_checkpoint), adapter merged into a copy.
    save_hf(base, MODEL, tmp_path / "base")
    tokenizer.save_pretrained(str(tmp_path / "run" / "adapter"))
    config = {"dataset": "tiny", "lora": {"r": 2}, "hf_checkpoint": str(tmp_path / "base")}
    info = {"package": "llm_sft", "config": config, "info": {"export": "/moved/adapter"}}
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    _, model, base_model, tok = ev.load_run(tmp_path / "run")
    np.testing.assert_allclose(model(ids)[0], tuned(ids)[0], atol=1e-4)
    np.testing.assert_allclose(base_model(ids)[0], base(ids)[0], atol=1e-6)
    assert tok.eos_token == tokenizer.eos_token
    info["config"]["hf_checkpoint"] = None
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="hf_checkpoint"):
        ev.load_run(tmp_path / "run")


def test_evaluate_run_reads_the_train_run_folder(tmp_path):
    from llm_sft.train import run

    folder = write_tiny_ml100k(tmp_path / "ml-100k")
    hf_config = dict(
        model_type="qwen2", vocab_size=384, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    run(
        dataset="ml-100k", data_dir=str(folder), out=str(tmp_path / "run"),
        train=TrainConfig(max_steps=1, per_device_train_batch_size=1), lora=None,
        model_config=str(tmp_path / "config.json"), max_length=256, max_eval_examples=0,
        progress=False,
    )  # fmt: skip
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    config, info = recorded["config"], recorded["info"]
    assert config["dataset"] == "ml-100k" and config["max_history"] == 10
    assert info["export"].endswith("hf")
    summary = ev.evaluate_run(
        tmp_path / "run", split="valid", num_beams=5, max_examples=6, ks=(1, 3, 5),
        gamma_grid=(0.0, 1.0), max_valid_examples=4, out=tmp_path / "eval.json",
    )  # fmt: skip
    assert summary["num_examples"] == 6 and summary["title_match"]["invalid"] == 0
    assert summary["gamma_selection"]["valid_examples"] == 4 and set(summary["gamma"]) == {1, 3, 5}
    assert {summary["grounding"][f"gamma@{k}"] for k in (1, 3, 5)} <= {0.0, 1.0}
    assert summary["grounding_model"] == "finetuned"
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["predictions"]["items"]) == 6 and len(saved["predictions"]["items"][0]) == 5
    table = ev.format_summary(summary)
    assert "| NDCG |" in table and "| HR |" in table and "invalid generations: 0/30" in table
    assert "selected on 4 validation examples" in table
