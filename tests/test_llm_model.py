"""Parity of llm_sft.model.Qwen with HF transformers Qwen2/Qwen3 (fp32, eager attention)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny import TINY_QWEN, random_hf_qwen  # noqa: E402

from llm_sft.generate import greedy_generate  # noqa: E402
from llm_sft.model import Cache, ModelConfig  # noqa: E402
from llm_sft.params import checkpoint_files, load_hf, read_safetensors, save_hf  # noqa: E402
from llm_sft.sharding import make_mesh  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QWEN25_CONFIG = (
    Path(__file__).resolve().parents[2] / "shared/assets/qwen2.5-0.5b-instruct/config.json"
)
VARIANTS = {
    # Qwen2: q/k/v bias, tied embeddings.
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True)),
    # Qwen3: q/k norm, head_dim != hidden / heads, separate lm_head, no bias.
    "qwen3_untied": ("Qwen3", dict(tie_word_embeddings=False, head_dim=32)),
    # Qwen3 with attention_bias (q/k/v and o biases).
    "qwen3_bias": ("Qwen3", dict(tie_word_embeddings=True, head_dim=16, attention_bias=True)),
}


def _hf_model(variant: str, seed: int = 0):
    family, config = VARIANTS[variant]
    return random_hf_qwen(family, seed, **config)


def _batch(batch: int = 3, length: int = 11, vocab: int = 256, seed: int = 0):
    """Left-padded ids/mask with different lengths per row."""
    rng = np.random.default_rng(seed)
    lengths = np.array([length, length - 4, 3][:batch])
    mask = (np.arange(length)[None] >= length - lengths[:, None]).astype(np.int64)
    ids = np.where(mask > 0, rng.integers(1, vocab, (batch, length)), 0)
    return ids, mask


def _hf_logits(hf, ids, mask, hidden: bool = False):
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            output_hidden_states=hidden,
        )
    return (out.logits.numpy(), out.hidden_states[-1].numpy()) if hidden else out.logits.numpy()


@nnx.jit(static_argnames="return_hidden")
def _forward(model, ids, positions=None, attention_mask=None, cache=None, return_hidden=False):
    return model(ids, positions, attention_mask, cache, return_hidden)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (hf_model, flax_model, config, folder), built once per module on demand."""
    built = {}

    def get(variant):
        if variant not in built:
            hf = _hf_model(variant)
            path = tmp_path_factory.mktemp(variant)
            hf.save_pretrained(path, safe_serialization=True)
            built[variant] = (hf, *load_hf(path), path)
        return built[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_hidden_match_hf(checkpoints, variant):
    hf, model, _, _ = checkpoints(variant)
    ids, mask = _batch()
    ref_logits, ref_hidden = _hf_logits(hf, ids, mask, hidden=True)
    logits, cache, hidden = _forward(
        model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), return_hidden=True
    )
    assert cache is None
    real = mask > 0
    assert np.abs(ref_logits).max() > 1.0  # Logits are not trivially small.
    assert np.abs(np.asarray(logits) - ref_logits)[real].max() <= 1e-4
    assert np.abs(np.asarray(hidden) - ref_hidden)[real].max() <= 1e-4
    last, _ = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), logits_to_keep=1)
    np.testing.assert_allclose(last, np.asarray(logits)[:, -1:], atol=1e-5)
    none, _ = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), logits_to_keep=0)
    assert none.shape == (len(ids), 0, logits.shape[-1])


@pytest.mark.parametrize("variant", ["qwen2_tied", "qwen3_untied"])
def test_greedy_matches_hf_generate(checkpoints, variant):
    hf, model, _, _ = checkpoints(variant)
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=32,
            pad_token_id=0,
        ).numpy()
    ours = np.asarray(greedy_generate(model, ids, mask, max_new_tokens=32))
    assert ref.shape[1] == ids.shape[1] + 32
    np.testing.assert_array_equal(ours, ref[:, ids.shape[1] :])


def test_greedy_eos_pads_finished_rows(checkpoints):
    hf, model, _, _ = checkpoints("qwen2_tied")
    ids, mask = _batch()
    free = np.asarray(greedy_generate(model, ids, mask, max_new_tokens=32))
    step = 4
    eos = int(free[1, step])
    step = int(np.argmax(free[1] == eos))  # First occurrence in row 1.
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=32,
            eos_token_id=eos,
            pad_token_id=255,
        ).numpy()[:, ids.shape[1] :]
    ours = np.asarray(greedy_generate(model, ids, mask, 32, eos_token_id=[eos], pad_token_id=255))
    ref = np.pad(ref, ((0, 0), (0, 32 - ref.shape[1])), constant_values=255)
    np.testing.assert_array_equal(ours, ref)
    assert ours[1, step] == eos and (ours[1, step + 1 :] == 255).all()


def test_chunked_cache_prefill_equals_full_forward(checkpoints):
    _, model, config, _ = checkpoints("qwen3_bias")
    ids, mask = _batch()
    full, _ = _forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    cache = Cache.init(config, ids.shape[0], ids.shape[1] + 5)
    first, cache = _forward(
        model, jnp.asarray(ids[:, :6]), attention_mask=jnp.asarray(mask[:, :6]), cache=cache
    )
    second, cache = _forward(
        model, jnp.asarray(ids[:, 6:]), attention_mask=jnp.asarray(mask[:, 6:]), cache=cache
    )
    assert int(cache.index) == ids.shape[1]
    chunked = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
    np.testing.assert_allclose(chunked[mask > 0], np.asarray(full)[mask > 0], atol=1e-5)


def test_packed_segments_equal_separate_sequences(checkpoints):
    _, model, _, _ = checkpoints("qwen3_bias")
    rng = np.random.default_rng(1)
    a, b = rng.integers(1, 256, 5), rng.integers(1, 256, 5)
    packed = jnp.asarray(np.stack([np.concatenate([a, b, [0]]), np.concatenate([b, a, [0]])]))
    segments = jnp.asarray([[1] * 5 + [2] * 5 + [0]] * 2)
    positions = jnp.asarray([list(range(5)) * 2 + [0]] * 2)
    logits, _ = _forward(model, packed, positions=positions, attention_mask=segments)
    alone, _ = _forward(model, jnp.asarray(np.stack([a, b])))
    np.testing.assert_allclose(np.asarray(logits[0, :5]), np.asarray(alone[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[0, 5:10]), np.asarray(alone[1]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[1, 5:10]), np.asarray(alone[0]), atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_hf_round_trip(checkpoints, variant, tmp_path):
    hf, model, config, _ = checkpoints(variant)
    ids, mask = _batch()
    save_hf(model, config, tmp_path, max_shard_bytes=50_000)  # Force several shards.
    assert len(checkpoint_files(tmp_path)) > 1
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert type(reloaded_hf) is type(hf)
    np.testing.assert_array_equal(_hf_logits(reloaded_hf, ids, mask), _hf_logits(hf, ids, mask))
    reloaded, reloaded_config = load_hf(tmp_path)
    assert reloaded_config == config
    for before, after in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reloaded)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


def test_load_onto_mesh_sets_param_shardings(checkpoints):
    _, model, _, path = checkpoints("qwen2_tied")
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    sharded, _ = load_hf(path, mesh=mesh)
    spec = jax.sharding.PartitionSpec
    assert sharded.layers[0].self_attn.q_proj.kernel[...].sharding.spec == spec("fsdp", "tensor")
    assert sharded.layers[1].mlp.down_proj.kernel[...].sharding.spec == spec("tensor", "fsdp")
    assert sharded.embed_tokens.embedding[...].sharding.spec == spec("tensor", "fsdp")
    ids, mask = _batch()
    with jax.set_mesh(mesh):
        logits, _ = _forward(sharded, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    expected, _ = _forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)


def test_bf16_checkpoint_reads_exactly(tmp_path):
    hf = _hf_model("qwen2_tied").to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tensors = dict(read_safetensors(tmp_path / "model.safetensors"))
    ref = hf.state_dict()["model.layers.1.self_attn.k_proj.weight"].float().numpy()
    np.testing.assert_array_equal(
        tensors["model.layers.1.self_attn.k_proj.weight"].astype(np.float32), ref
    )
    model, config = load_hf(tmp_path, dtype=jnp.bfloat16)
    kernel = model.layers[1].self_attn.k_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16 and config.param_dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), ref.T)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(model_type="llama"), "model_type"),
    ],
)
def test_unsupported_configs_raise(bad, message):
    hf = {**TINY_QWEN, "model_type": "qwen2", **bad}
    with pytest.raises((ValueError, NotImplementedError), match=message):
        ModelConfig.from_hf_config(hf)


@pytest.mark.slow  # A fresh interpreter importing torch + jax costs ~15 s of CPU.
def test_compare_torch_cli(tmp_path):
    hf = _hf_model("qwen3_untied")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    # A tolerance below any real fp32 difference: the tool must print and exit 1.
    cmd = [
        sys.executable,
        "-m",
        "tools.compare_torch",
        f"--hf_checkpoint={tmp_path}",
        "--max_new_tokens=4",
        "--tolerance=1e-12",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    fields = dict(part.split("=") for part in last.split())
    assert set(fields) == {"max_abs_logit_diff", "greedy_match"}, last
    assert 1e-12 < float(fields["max_abs_logit_diff"]) <= 1e-4, last
    assert fields["greedy_match"] == "12/12", last


@pytest.mark.slow
def test_qwen25_05b_config_parity(tmp_path):
    if not QWEN25_CONFIG.exists():
        pytest.skip(f"{QWEN25_CONFIG} not present")
    hf_config = json.loads(QWEN25_CONFIG.read_text())
    config = transformers.Qwen2Config(**hf_config)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_hf(tmp_path)
    ids, mask = _batch(length=24, vocab=hf_config["vocab_size"])
    logits, _ = _forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    diff = np.abs(np.asarray(logits) - _hf_logits(hf, ids, mask))[mask > 0].max()
    print(f"qwen2.5-0.5b random-weight max_abs_logit_diff={diff:.3g}")
    assert diff <= 1e-4


_MESH_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from llm_sft.generate import greedy_generate
from llm_sft.params import load_hf
from llm_sft.sharding import make_mesh
reference, _ = load_hf(sys.argv[1])
mesh = make_mesh(data=1, fsdp=2, tensor=2)
model, _ = load_hf(sys.argv[1], mesh=mesh)
assert len(model.layers[0].self_attn.q_proj.kernel[...].addressable_shards[0].data.shape) == 2
assert model.layers[0].self_attn.q_proj.kernel[...].addressable_shards[0].data.shape[0] * 2 == 32  # hidden 32 over fsdp 2
ids = jnp.asarray(np.random.default_rng(0).integers(1, 256, (4, 9)))
mask = jnp.ones_like(ids).at[0, :3].set(0)
forward = nnx.jit(lambda m, i, a: m(i, attention_mask=a)[0])
with jax.set_mesh(mesh):
    logits = forward(model, ids, mask)
    tokens = greedy_generate(model, ids, mask, 8)
assert float(jnp.abs(logits - forward(reference, ids, mask)).max()) < 1e-5
np.testing.assert_array_equal(np.asarray(tokens), np.asarray(greedy_generate(reference, ids, mask, 8)))
print("ok")
"""


@pytest.mark.slow
def test_fsdp_tensor_mesh_on_four_cpu_devices(checkpoints):
    """Real 2x2 (fsdp, tensor) sharding on forced host devices matches the unsharded model."""
    _, _, _, path = checkpoints("qwen3_untied")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT, str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
