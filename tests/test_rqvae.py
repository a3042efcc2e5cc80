"""Tests of rqvae: model pieces (known answers), training, collision-free IDs, stats."""

import dataclasses
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from eval.data.formats import read_index
from rqvae import ids, train
from rqvae.model import RQVAE, RQVAEConfig, kmeans, rotation_trick
from rqvae.stats import code_stats, summary_line
from rqvae.train import TrainConfig, collision_free_codes, train_rqvae

SHARED_INDEXES = Path(__file__).resolve().parents[2] / "shared/data/amazon-scientific-2018/indexes"
# One set of shapes for every model in this file: eager init ops compile once.
TINY = RQVAEConfig(hidden_dims=(32,), code_dim=8, num_levels=3, codebook_size=16)
DIM = 32
TRAIN = TrainConfig(
    model=TINY, num_epochs=50, batch_size=128, learning_rate=1e-2, eval_every=100, seed=3
)


def clustered(n=512, dim=DIM, clusters=64, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    return (centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def trained():
    x = clustered()
    model, codes, history = train_rqvae(x, TRAIN)
    return x, model, codes, history


def test_training_reduces_loss_and_uses_codebooks(trained):
    x, _, codes, history = trained
    total_variance = float(np.sum(x.var(0)))  # recon loss of predicting the mean
    assert [h["step"] for h in history] == [100, 200]
    assert history[0]["recon_loss"] > history[-1]["recon_loss"]
    assert history[-1]["recon_loss"] < 0.5 * total_variance
    assert min(history[-1]["usage"]) >= 0.7, history[-1]["usage"]
    assert codes.shape == (512, 3) and codes.min() >= 0 and codes.max() < 16


def test_training_is_deterministic(trained):
    x, _, codes, history = trained
    _, codes2, history2 = train_rqvae(x, TRAIN)
    np.testing.assert_array_equal(codes, codes2)
    assert history[-1]["recon_loss"] == history2[-1]["recon_loss"]


def test_run_folder_round_trip_and_evaluate_cli(trained, tmp_path):
    from rqvae import evaluate

    x, model, codes, _ = trained
    np.save(tmp_path / "x.npy", x)
    result = train.train_run(str(tmp_path / "x.npy"), str(tmp_path / "run"), TRAIN, dedup="extra")
    assert read_index(tmp_path / "run" / "semantic_ids.json").tolist() == codes.tolist()
    assert len(np.unique(read_index(tmp_path / "run" / "semantic_ids_extra.json"), axis=0)) == len(
        x
    )
    restored, x2, step = train.load_run(tmp_path / "run")
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(
        np.asarray(restored.codebooks[...]), np.asarray(model.codebooks[...])
    )
    _, q = restored(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(q["codes"]), codes)
    metrics, lines = evaluate.evaluate_run(str(tmp_path / "run"))
    assert metrics["step"] == step and metrics["recon_loss"] == pytest.approx(result["recon_loss"])
    assert lines[-1].splitlines()[-1].startswith("items=512 unique_ids=")


@pytest.mark.parametrize(
    "quantizer,ema,standardize",
    [("ste", True, True), ("rotation", False, False), ("gumbel", False, False)],
)
def test_each_quantizer_takes_a_step(quantizer, ema, standardize):
    cfg = dataclasses.replace(
        TINY, quantizer=quantizer, ema=ema, standardize=standardize, recon="mean"
    )
    x = jnp.asarray(clustered(n=64, clusters=8))
    model = RQVAE(DIM, cfg, rngs=nnx.Rngs(0))
    if standardize:
        model.set_standardization(x)
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    before = jax.tree.map(np.array, nnx.state(model))

    @nnx.jit
    def step(model, opt, x, key):
        (loss, aux), grads = nnx.value_and_grad(
            lambda m: m.loss(x, tau=0.5, key=key), has_aux=True
        )(model)
        opt.update(model, grads)
        model.update_usage_and_ema(aux["codes"], aux["residuals"])
        return loss

    assert np.isfinite(float(step(model, opt, x, jax.random.key(2))))
    assert int(model.usage[...].sum()) == 64 * 3
    enc_moved = not np.allclose(
        before["encoder"][0]["kernel"], np.asarray(model.encoder[0].kernel[...])
    )
    cb_moved = not np.allclose(before["codebooks"], np.asarray(model.codebooks[...]))
    assert enc_moved and cb_moved  # EMA moves codebooks too


def test_rotation_trick_value_and_gradient():
    z = jnp.array([[3.0, 0.0, 0.0], [1.0, 2.0, -1.0]])
    zq = jnp.array([[0.0, 2.0, 0.0], [-1.0, 0.5, 2.0]])
    np.testing.assert_allclose(rotation_trick(z, zq), zq, atol=1e-6)
    # d(out)/dz = (|zq|/|z|) R with R a rotation mapping z/|z| to zq/|zq|.
    jac = jax.jit(jax.jacobian(lambda v: rotation_trick(v[None], zq[1:])[0]))(z[1])
    scale = float(jnp.linalg.norm(zq[1]) / jnp.linalg.norm(z[1]))
    rot = np.asarray(jac) / scale
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        rot @ (z[1] / jnp.linalg.norm(z[1])), zq[1] / jnp.linalg.norm(zq[1]), atol=1e-5
    )


def test_ema_update_with_zero_decay_gives_cluster_means():
    model = RQVAE(DIM, dataclasses.replace(TINY, ema=True, ema_decay=0.0), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    res = rng.normal(size=(20, 3, 8)).astype(np.float32)
    codes = rng.integers(0, 4, size=(20, 3))  # codes 4..15 unused
    nnx.jit(RQVAE.update_usage_and_ema)(model, jnp.asarray(codes), jnp.asarray(res))
    cb, usage = np.asarray(model.codebooks[...]), np.asarray(model.usage[...])
    for level in range(3):
        for code in range(4):
            members = codes[:, level] == code
            assert usage[level, code] == members.sum()
            if members.any():
                np.testing.assert_allclose(
                    cb[level, code], res[members, level].mean(0), rtol=1e-3, atol=1e-4
                )
    assert not usage[:, 4:].any()


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_recovers_separated_clusters(init):
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    labels = np.repeat(np.arange(4), 25)
    x = jnp.asarray(centers[labels] + rng.normal(size=(100, 2)))
    found, assign = kmeans(x, 4, jax.random.key(0), iters=10, init=init)
    assign = np.asarray(assign)
    # Same partition as the true labels (up to renaming), and centres near the truth.
    assert len({(a, b) for a, b in zip(labels, assign, strict=True)}) == 4
    dist = np.linalg.norm(np.asarray(found)[:, None] - centers[None], axis=-1)
    assert np.all(dist.min(1) < 1.0)
    same, _ = kmeans(x, 4, jax.random.key(0), iters=10, init=init)
    np.testing.assert_array_equal(np.asarray(found), np.asarray(same))


def test_dead_codes_are_restarted_from_residuals(trained):
    x, trained_model, _, _ = trained
    model = nnx.clone(trained_model)
    x = jnp.asarray(x)
    residuals = np.asarray(model(x)[1]["residuals"])
    old = np.asarray(model.codebooks[...])
    usage = np.ones((3, 16), np.int32)
    usage[0, [1, 4]] = 0
    usage[2, 0] = 0
    model.usage[...] = jnp.asarray(usage)
    restarted = np.asarray(train._restart(model, x, jax.random.key(0)))  # jit cached by training
    new = np.asarray(model.codebooks[...])
    np.testing.assert_array_equal(restarted, [2, 0, 1])
    keep = usage > 0
    np.testing.assert_array_equal(new[keep], old[keep])
    for level, code in [(0, 1), (0, 4), (2, 0)]:  # re-seeded from that level's residuals
        assert np.min(np.abs(residuals[:, level] - new[level, code]).sum(-1)) < 1e-4
    assert not np.any(np.asarray(model.usage[...]))


COLLIDING = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 3], [1, 0, 0], [1, 0, 0], [2, 2, 2]])


def test_extra_level_makes_ids_unique():
    out = ids.append_collision_level(COLLIDING)
    np.testing.assert_array_equal(out[:, :3], COLLIDING)
    np.testing.assert_array_equal(out[:, 3], [0, 1, 2, 0, 0, 1, 0])
    assert len(np.unique(out, axis=0)) == len(out)


def test_reassign_last_level_is_unique_and_minimum_cost():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(4, 2))
    residuals = rng.normal(size=(7, 2))
    out = ids.reassign_last_level(COLLIDING, residuals, codebook)
    assert out.shape == COLLIDING.shape
    assert len(np.unique(out, axis=0)) == len(out)
    np.testing.assert_array_equal(out[:, :2], COLLIDING[:, :2])
    np.testing.assert_array_equal(out[6], COLLIDING[6])  # no collision: untouched

    def cost(rows, codes):
        return sum(
            np.sum((residuals[r] - codebook[c]) ** 2) for r, c in zip(rows, codes, strict=True)
        )

    for rows in ([0, 1, 2, 3], [4, 5]):  # brute force over distinct code choices
        best = min(cost(rows, p) for p in itertools.permutations(range(4), len(rows)))
        assert cost(rows, out[rows, 2]) == pytest.approx(best)


def test_reassign_overflow_is_reported():
    codes = np.zeros((5, 2), np.int64)  # 5 items share a prefix, only 4 codes
    with pytest.raises(ids.PrefixOverflowError, match="more items than the 4"):
        ids.reassign_last_level(codes, np.zeros((5, 3)), np.zeros((4, 3)))


def test_collision_free_codes_from_trained_model(trained):
    x, model, codes, _ = trained
    for method, levels in [("extra", 4), ("reassign", 3)]:
        out = collision_free_codes(model, x, codes, method)
        assert out.shape == (512, levels)
        assert len(np.unique(out, axis=0)) == 512


def test_stats_line_on_hand_made_index():
    s = code_stats(COLLIDING, codebook_size=4)
    # ids: 012 x3, 013, 100 x2, 222 -> 4 unique; prefixes 01, 10, 22 -> 3.
    assert summary_line(s) == "items=7 unique_ids=4 unique_prefixes=3 max_group=3"
    assert s["collision_groups"] == 2
    assert s["unique_item_share"] == pytest.approx(2 / 7)
    assert s["usage"] == [0.75, 0.75, 0.75]
    np.testing.assert_allclose(
        s["perplexity"][2],
        np.exp(-(4 / 7 * np.log(4 / 7) + 1 / 7 * np.log(1 / 7) + 2 / 7 * np.log(2 / 7))),
    )


def test_index_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "x.index.json"
    ids.write_index(path, COLLIDING)
    raw = json.loads(path.read_text())
    assert raw["0"] == ["<a_0>", "<b_1>", "<c_2>"] and list(raw) == [str(i) for i in range(7)]
    np.testing.assert_array_equal(read_index(path), COLLIDING)
    path.write_text(json.dumps({"0": ["<a_0>", "<c_1>"]}))
    with pytest.raises(ValueError, match="expected '<b_N>'"):
        read_index(path)
    path.write_text(json.dumps({"1": ["<a_0>"]}))
    with pytest.raises(ValueError, match="keys must be"):
        read_index(path)


def test_shared_reference_index_stats():
    path = SHARED_INDEXES / "rqvae_native.index.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    s = code_stats(read_index(path), codebook_size=256)
    assert s["items"] == 4344 and s["unique_ids"] == 3790 and s["unique_prefixes"] == 3350


def test_torch_baseline_matches_loss_codes_and_gradients():
    torch = pytest.importorskip("torch")
    from tools.baselines.torch_rqvae import RQVAE as TorchRQVAE
    from tools.baselines.torch_rqvae import load_flax_state

    cfg = RQVAEConfig(hidden_dims=(24, 16), code_dim=8, num_levels=3, codebook_size=16)
    model = RQVAE(12, cfg, rngs=nnx.Rngs(0))
    net = TorchRQVAE(12, cfg.hidden_dims, cfg.code_dim, cfg.num_levels, cfg.codebook_size, cfg.beta)
    load_flax_state(net, nnx.state(model))
    x = np.random.default_rng(0).normal(size=(32, 12)).astype(np.float32)
    (loss, aux), grads = nnx.value_and_grad(lambda m: m.loss(jnp.asarray(x)), has_aux=True)(model)
    t_loss, t_codes = net(torch.from_numpy(x))
    t_loss.backward()
    np.testing.assert_array_equal(np.asarray(aux["codes"]), t_codes.numpy())
    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grads["encoder"][0]["kernel"][...]).T,
        net.encoder[0].weight.grad.numpy(),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(grads["codebooks"][...]), net.codebooks.grad.numpy(), atol=1e-5
    )


def _cli(embeddings, out, **extra):
    flags = dict(num_levels=3, codebook_size=16, hidden_dims=32, code_dim=8, num_epochs=10, batch_size=128,
                 learning_rate=1e-2, eval_every=10, seed=3, **extra)  # fmt: skip
    return [
        "-m",
        "rqvae.train",
        f"--embeddings={embeddings}",
        f"--out={out}",
        *(f"--{k}={v}" for k, v in flags.items()),
    ]


def test_kill_9_after_second_checkpoint_then_rerun_matches(tmp_path):
    from tiny import kill_and_resume, train_losses

    np.save(tmp_path / "x.npy", clustered())
    config = dataclasses.replace(TRAIN, num_epochs=10, eval_every=10)
    full = train.train_run(str(tmp_path / "x.npy"), str(tmp_path / "full"), config)
    resumed = kill_and_resume(
        _cli(tmp_path / "x.npy", tmp_path / "killed"), tmp_path / "killed",
        lambda out: train.train_run(str(tmp_path / "x.npy"), str(out), config),
    )  # fmt: skip
    assert resumed == full
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "full")
    assert (
        read_index(tmp_path / "killed" / "semantic_ids.json").tolist()
        == read_index(tmp_path / "full" / "semantic_ids.json").tolist()
    )


def test_absurd_learning_rate_stops_with_an_error_and_writes_no_ids(tmp_path):
    from eval.training import NonFiniteError

    np.save(tmp_path / "x.npy", clustered())
    config = dataclasses.replace(TRAIN, learning_rate=1e38, num_epochs=10, eval_every=1)
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite .*Last good checkpoint"):
        train.train_run(str(tmp_path / "x.npy"), str(tmp_path / "run"), config)
    assert not (tmp_path / "run" / "semantic_ids.json").exists()
    assert not (tmp_path / "run" / "result.json").exists()
