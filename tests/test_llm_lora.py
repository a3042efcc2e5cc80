"""LoRA: HF peft interop (export -> PeftModel logits), merging, and which params train."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tiny import TINY_QWEN, random_hf_qwen  # noqa: E402

from llm_sft.lora import (  # noqa: E402
    LoRAConfig,
    LoRALinear,
    LoRAParam,
    apply_lora,
    export_peft,
    merge_lora,
    select_targets,
)
from llm_sft.params import load_hf  # noqa: E402


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random Qwen2 saved by HF ``save_pretrained``; returns its folder."""
    path = tmp_path_factory.mktemp("qwen2")
    random_hf_qwen("Qwen2", tie_word_embeddings=True).save_pretrained(path, safe_serialization=True)
    return path


def _batch():
    """Left-padded rows of different lengths."""
    rng = np.random.default_rng(0)
    lengths = np.array([9, 5, 2])
    mask = (np.arange(9)[None] >= 9 - lengths[:, None]).astype(np.int64)
    return np.where(mask > 0, rng.integers(1, TINY_QWEN["vocab_size"], (3, 9)), 0), mask


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, attention_mask=mask)[0]


def _lora_model(path, config, seed=1):
    model, _ = load_hf(path)
    return apply_lora(model, config, rngs=nnx.Rngs(seed), random_b=True)


@pytest.mark.parametrize(
    "targets",
    [("q", "k", "v", "o", "gate", "up", "down"), r"model\.layers\.1\.(self_attn\.v|mlp\.up)_proj"],
    ids=["all_names", "regex"],
)
def test_export_peft_matches_hf_peft(hf_checkpoint, tmp_path, targets):
    path = hf_checkpoint
    # PeftModel injects adapters into the model it wraps: use a fresh copy.
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    config = LoRAConfig(r=4, alpha=8.0, target_modules=targets)
    model = _lora_model(path, config)
    export_peft(model, config, tmp_path, base_model_name_or_path=str(path))
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    loaded = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    expected = {f"base_model.model.model.layers.{i}.{'self_attn' if p in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{p}" for i, p in select_targets(2, config.target_modules)}  # fmt: skip
    assert loaded == expected
    ids, mask = _batch()
    with torch.no_grad():
        ref = peft_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(np.maximum(mask.cumsum(-1) - 1, 0)),
        ).logits.numpy()
        with peft_model.disable_adapter():
            base = peft_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()  # fmt: skip
    ours = np.asarray(_logits(model, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask > 0
    assert np.abs(ref - base)[real].max() > 1e-2  # The adapter changes the logits.
    assert np.abs(ours - ref)[real].max() <= 1e-4
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8.0


def test_merge_equals_unmerged(hf_checkpoint):
    path = hf_checkpoint
    config = LoRAConfig(r=4, alpha=16.0, target_modules=("q_proj", "v_proj", "down_proj"))
    model = _lora_model(path, config)
    ids, mask = _batch()
    before = np.asarray(_logits(model, jnp.asarray(ids), jnp.asarray(mask)))
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(merged))
    assert not jax.tree.leaves(nnx.state(merged, LoRAParam))
    after = np.asarray(_logits(merged, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(after, before, atol=1e-5)


def _one_step(model, wrt):
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=wrt)
    ids, mask = _batch()

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0]
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)

    step(model, optimizer)


def _flat(model, kind):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, kind))}


@pytest.mark.parametrize("mode", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_only_trainable_params_change(hf_checkpoint, mode):
    """LoRA mode: a step moves every adapter weight and no base weight (full mode: all)."""
    path = hf_checkpoint
    config = LoRAConfig(r=2, alpha=4.0, target_modules=("q", "up"))
    model = _lora_model(path, config)
    wrt = LoRAParam if mode == "lora" else nnx.Param
    base_before = _flat(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    lora_before = _flat(model, LoRAParam)
    model.train()
    _one_step(model, wrt)
    base_after = _flat(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    lora_after = _flat(model, LoRAParam)
    assert len(lora_before) == 2 * 2 * 2  # (A, B) x (q, up) x 2 layers
    assert all(not np.array_equal(lora_before[k], lora_after[k]) for k in lora_before)
    changed = [k for k in base_before if not np.array_equal(base_before[k], base_after[k])]
    if mode == "lora":
        assert changed == []
    else:
        assert len(changed) == len(base_before)


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="unknown"):
        LoRAConfig(target_modules=("q", "attn"))
    with pytest.raises(ValueError, match="match no projection"):
        select_targets(2, r"model\.layers\.7\..*")
