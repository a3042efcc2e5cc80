"""HSTU / SASRec Flax models: reference math, torch parity (both ways), losses, convert CLI."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hstu import attention, convert
from hstu.losses import bce_loss, next_item_loss, sampled_softmax_loss
from hstu.model import HSTU, HSTUConfig, RelativeBucketedTimeAndPositionBias
from hstu.sasrec import SASRec, SASRecConfig

NUM_ITEMS, N = 30, 12
HSTU_KW = dict(
    num_items=NUM_ITEMS,
    max_seq_len=16,
    embedding_dim=8,
    num_blocks=2,
    num_heads=2,
    attention_dim=4,
    linear_dim=6,
)
SASREC_KW = dict(num_items=NUM_ITEMS, max_seq_len=16, embedding_dim=8, num_blocks=2, num_heads=2)


def _batch(seed=0, lengths=(12, 5, 1)):
    """Right-padded ids / timestamps with the request timestamp at position `length`."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids, ts = np.zeros((b, N), np.int32), np.zeros((b, N), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, NUM_ITEMS + 1, n)
        t = np.sort(rng.integers(1_000_000_000, 1_003_000_000, n + 1))
        ts[i, : min(n + 1, N)] = t[: min(n + 1, N)]
    return ids, ts, np.asarray(lengths, np.int32)


def _random_model(cls, cfg, seed=0):
    """Model with N(0, 0.1) params, built without per-initializer compilations."""
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    nnx.update(
        model,
        jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), state),
    )
    return model


def _flax_from_torch(torch_model, cls, cfg):
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    return convert.torch_state_dict_to_flax(torch_model.state_dict(), model)


def test_rel_bias_matches_reference_construction():
    """Position bias via the reference's pad/repeat/reshape trick; buckets via math.log."""
    n, nb = 6, 128
    bias = nnx.eval_shape(lambda: RelativeBucketedTimeAndPositionBias(n, nb, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    pos_w, ts_w = (
        rng.standard_normal(2 * n - 1, np.float32),
        rng.standard_normal(nb + 1, np.float32),
    )
    bias.pos_w.set_value(jnp.asarray(pos_w))
    bias.ts_w.set_value(jnp.asarray(ts_w))
    ts = np.array([[10, 11, 50, 50, 4000, 10**6]], np.int32)
    t = np.tile(np.pad(pos_w, (0, n)), n)[:-n].reshape(n, 3 * n - 2)[:, n - 1 : -(n - 1)]
    ext = np.r_[ts[0], ts[0, -1]]
    expected = np.empty((n, n), np.float32)
    for i in range(n):
        for j in range(n):
            bucket = int(math.log(max(abs(int(ext[i + 1]) - int(ts[0, j])), 1)) / 0.301)
            expected[i, j] = t[i, j] + ts_w[min(max(bucket, 0), nb)]
    np.testing.assert_allclose(bias(jnp.asarray(ts))[0], expected, atol=1e-7)


def test_rel_bias_blocks_are_slices_of_the_full_bias():
    bias = _random_model(
        lambda cfg, rngs: RelativeBucketedTimeAndPositionBias(N, 128, rngs=rngs), None
    )
    _, ts, _ = _batch()
    full = np.asarray(bias(jnp.asarray(ts)))
    for r0, r1 in attention.causal_blocks(N, 5):
        np.testing.assert_array_equal(bias(jnp.asarray(ts), r0, r1, r1), full[:, r0:r1, :r1])


@pytest.mark.parametrize("n_norm,block", [("padded", None), ("length", None), ("padded", 5)])
def test_hstu_torch_parity_both_ways(n_norm, block, monkeypatch):
    """Dense torch reference vs ours; block=5 splits N=12 into causal blocks of 4."""
    torch = pytest.importorskip("torch")
    if block:
        monkeypatch.setattr(attention, "XLA_BLOCK", block)
    from tools.baselines.torch_hstu import HSTU as TorchHSTU

    torch.manual_seed(0)
    kw = {k: v for k, v in HSTU_KW.items() if k != "num_items"}
    t_model = TorchHSTU(NUM_ITEMS, n_norm=n_norm, **kw).eval()
    ids, ts, lengths = _batch()
    t_in = [torch.from_numpy(x.astype(np.int64)) for x in (ids, ts, lengths)]
    with torch.no_grad():
        expected = t_model(*t_in).numpy()
    model = _flax_from_torch(t_model, HSTU, HSTUConfig(n_norm=n_norm, **HSTU_KW))
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(ts), jnp.asarray(lengths)))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    assert not out[2, 1:].any() and np.allclose(np.linalg.norm(out[0], axis=-1), 1, atol=1e-5)

    back = TorchHSTU(NUM_ITEMS, n_norm=n_norm, **kw).eval()
    back.load_state_dict(convert.flax_to_torch_state_dict(model))
    with torch.no_grad():
        np.testing.assert_allclose(back(*t_in).numpy(), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("l2_norm_output,block", [(False, None), (True, None), (False, 5)])
def test_sasrec_torch_parity_both_ways(l2_norm_output, block, monkeypatch):
    torch = pytest.importorskip("torch")
    if block:
        monkeypatch.setattr(attention, "XLA_BLOCK", block)
    from tools.baselines.torch_sasrec import SASRec as TorchSASRec

    torch.manual_seed(0)
    kw = {k: v for k, v in SASREC_KW.items() if k != "num_items"}
    t_model = TorchSASRec(NUM_ITEMS, l2_norm_output=l2_norm_output, **kw).eval()
    ids, _, _ = _batch()
    with torch.no_grad():
        expected = t_model(torch.from_numpy(ids.astype(np.int64))).numpy()
    model = _flax_from_torch(
        t_model, SASRec, SASRecConfig(l2_norm_output=l2_norm_output, **SASREC_KW)
    )
    out = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)

    back = TorchSASRec(NUM_ITEMS, l2_norm_output=l2_norm_output, **kw).eval()
    back.load_state_dict(convert.flax_to_torch_state_dict(model))
    with torch.no_grad():
        np.testing.assert_allclose(
            back(torch.from_numpy(ids.astype(np.int64))).numpy(), out, atol=1e-5
        )


def test_hstu_causal_padding_and_pallas():
    """Outputs at t ignore later items (and timestamps after t+1); pallas == xla."""
    model = _random_model(HSTU, HSTUConfig(**HSTU_KW))
    ids, ts, lengths = _batch(lengths=(12, 9))
    ids2, ts2 = ids.copy(), ts.copy()
    t = 5
    ids2[:, t + 1 :] = np.where(ids[:, t + 1 :] > 0, NUM_ITEMS + 1 - ids[:, t + 1 :], 0)
    ts2[:, t + 2 :] += 777_777
    forward = nnx.jit(lambda m, *a: m(*a))
    out = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(ts), jnp.asarray(lengths)))
    out2 = np.asarray(forward(model, jnp.asarray(ids2), jnp.asarray(ts2), jnp.asarray(lengths)))
    np.testing.assert_allclose(out[:, : t + 1], out2[:, : t + 1], atol=1e-6)
    assert np.abs(out[0, t + 1 :] - out2[0, t + 1 :]).max() > 1e-3
    assert not out[1, 9:].any()

    pallas_model = nnx.merge(*nnx.split(model))
    pallas_model.cfg = HSTUConfig(attention_impl="pallas", **HSTU_KW)
    for layer in pallas_model.layers:
        layer.cfg = pallas_model.cfg
    fused = forward(pallas_model, jnp.asarray(ids), jnp.asarray(ts), jnp.asarray(lengths))
    np.testing.assert_allclose(fused, out, atol=1e-5, rtol=0)


def test_hstu_without_l2_norm_scores_layer_normed_outputs_by_dot_product():
    """`l2_norm_output=False`: outputs LayerNorm-ed (zero at padding), raw item rows."""
    model = _random_model(HSTU, HSTUConfig(l2_norm_output=False, **HSTU_KW))
    ids, ts, lengths = _batch(lengths=(12, 5))
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(ts), jnp.asarray(lengths)))
    x = out[0]  # every position valid; the norm's scale and bias are N(0, 0.1) here
    norm = model.last_norm
    raw = (x - np.asarray(norm.bias[...])) / np.asarray(norm.scale[...])
    np.testing.assert_allclose(raw.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(raw.var(-1), 1.0, rtol=1e-3)
    assert not out[1, 5:].any()
    table = np.asarray(model.item_emb.embedding[...])
    np.testing.assert_allclose(np.asarray(model.item_table()), table)
    scores = np.asarray(model.item_scores(jnp.asarray(out[0, -1])))
    np.testing.assert_allclose(scores[1:], table[1:] @ out[0, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reference HSTU has L2-normalised outputs"):
        convert.torch_state_dict_to_flax({}, model)  # no reference weights for `last_norm`


def test_sampled_softmax_known_answer():
    rng = np.random.default_rng(0)
    q, pos = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    neg = rng.standard_normal((2, 3, 5, 4))
    pos_ids = np.array([[1, 2, 0], [3, 4, 5]])
    neg_ids = rng.integers(6, 9, (2, 3, 5))
    neg_ids[1, 0, 2] = 3  # collides with the positive: must be ignored
    weights = (pos_ids != 0).astype(np.float64)
    expected, total = 0.0, 0.0
    for b in range(2):
        for t in range(3):
            logits = [q[b, t] @ pos[b, t] / 0.05] + [
                q[b, t] @ neg[b, t, r] / 0.05 for r in range(5) if neg_ids[b, t, r] != pos_ids[b, t]
            ]
            expected += weights[b, t] * -(logits[0] - np.log(np.sum(np.exp(logits))))
            total += weights[b, t]
    got = sampled_softmax_loss(*map(jnp.asarray, (q, pos, neg, pos_ids, neg_ids, weights)), 0.05)
    np.testing.assert_allclose(got, expected / total, rtol=1e-5)


def test_bce_loss_known_answer():
    rng = np.random.default_rng(0)
    q, pos, neg = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    pos_w = np.array([[1, 1, 0], [1, 1, 1]], np.float64)
    neg_w = pos_w * np.array([[1, 0, 1], [1, 1, 1]])  # one negative collided with its positive
    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
    expected = (
        np.sum(softplus(-np.sum(q * pos, -1)) * pos_w) / pos_w.sum()
        + np.sum(softplus(np.sum(q * neg, -1)) * neg_w) / neg_w.sum()
    )
    np.testing.assert_allclose(
        bce_loss(*map(jnp.asarray, (q, pos, neg, pos_w, neg_w))), expected, rtol=1e-5
    )


@pytest.mark.parametrize(
    "cls,cfg",
    [
        (HSTU, HSTUConfig(num_negatives=16, dropout_rate=0.0, **{**HSTU_KW, "num_blocks": 1})),
        (
            HSTU,
            HSTUConfig(
                **{**HSTU_KW, "num_blocks": 1},
                num_negatives=16,
                dropout_rate=0.0,
                l2_norm_output=False,
                temperature=1.0,
                item_dropout=0.2,
            ),  # fmt: skip
        ),
        pytest.param(
            SASRec, SASRecConfig(loss="bce", dropout_rate=0.0, **SASREC_KW), marks=pytest.mark.slow
        ),
        pytest.param(
            SASRec,
            SASRecConfig(
                loss="sampled_softmax",
                l2_norm_output=True,
                num_negatives=16,
                dropout_rate=0.0,
                **SASREC_KW,
            ),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_next_item_loss_trains_under_nnx_jit(cls, cfg):
    model = nnx.jit(lambda: cls(cfg, rngs=nnx.Rngs(0)))()  # default init, compiled once
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ids, ts, lengths = _batch(lengths=(12, 8, 10, 12))
    batch = {
        "ids": jnp.asarray(ids),
        "timestamps": jnp.asarray(ts),
        "lengths": jnp.asarray(lengths),
    }

    @nnx.jit
    def step(model, optimizer, batch, rng):
        (loss, aux), grads = nnx.value_and_grad(next_item_loss, has_aux=True)(model, batch, rng)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, batch, jax.random.key(i))) for i in range(40)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
    scores = model.item_scores(model(batch["ids"], batch["timestamps"], batch["lengths"]))
    assert scores.shape == (4, N, NUM_ITEMS + 1) and bool(jnp.all(scores[..., 0] == -jnp.inf))


def test_convert_cli_end_to_end(tmp_path):
    torch = pytest.importorskip("torch")
    from tools.baselines.torch_hstu import HSTU as TorchHSTU

    torch.manual_seed(1)
    t_model = TorchHSTU(
        NUM_ITEMS,
        max_seq_len=16,
        embedding_dim=8,
        num_blocks=1,
        num_heads=2,
        attention_dim=4,
        linear_dim=6,
    ).eval()
    torch.save({"model_state_dict": t_model.state_dict()}, tmp_path / "model.pt")
    ids, ts, lengths = _batch()
    np.savez(tmp_path / "in.npz", ids=ids, timestamps=ts, lengths=lengths)
    convert.run(
        str(tmp_path / "model.pt"),
        "hstu-ml",
        out=str(tmp_path / "ckpt"),
        check_inputs=str(tmp_path / "in.npz"),
        check_outputs=str(tmp_path / "out.npy"),
        num_heads=2,
    )
    with torch.no_grad():
        expected = t_model(
            *[torch.from_numpy(x.astype(np.int64)) for x in (ids, ts, lengths)]
        ).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5, rtol=0)
    restored = convert.load_checkpoint(str(tmp_path / "ckpt"))
    assert restored.cfg.num_blocks == 1 and restored.cfg.attention_dim == 4
    np.testing.assert_allclose(
        restored(jnp.asarray(ids), jnp.asarray(ts), jnp.asarray(lengths)),
        expected,
        atol=1e-5,
        rtol=0,
    )


def test_torch_sasrec_trainer_runs_on_the_jax_batches(tmp_path):
    pytest.importorskip("torch")
    from tiny import write_tiny_ml100k

    from tools.baselines.train_torch_sasrec import train

    folder = write_tiny_ml100k(tmp_path / "ml-100k", num_users=40)
    curve = train("ml-100k", str(folder), epochs=3, eval_every=None, max_seq_len=8, batch_size=8)
    assert [round(c["epoch"]) for c in curve] == [1, 2, 3]
    assert all(np.isfinite(c["loss"]) and 0 <= c["NDCG@10"] <= c["HR@10"] <= 1 for c in curve)
    again = train("ml-100k", str(folder), epochs=3, eval_every=None, max_seq_len=8, batch_size=8)
    assert [c["loss"] for c in again] == [
        c["loss"] for c in curve
    ]  # seeded: same batches, init, negatives
