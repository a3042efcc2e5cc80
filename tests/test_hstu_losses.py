"""hstu.losses options: chunked full softmax vs dense, gBCE, popularity sampling with logQ,
LiGR layers, and every trainer setting reachable from `hstu.train` flags."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hstu import losses
from hstu.dropout import Dropout
from hstu.items import position_ids
from hstu.model import HSTUConfig
from hstu.models import MODELS, build_model
from hstu.sasrec import SASRecConfig
from hstu.trainer import TrainConfig

NUM_ITEMS, D = 37, 6


def _dense_softmax(q, table, targets, weights, temperature):
    logits = (q @ table.T / temperature).at[..., 0].set(-jnp.inf)
    nll = -jax.nn.log_softmax(logits, axis=-1)
    nll = jnp.take_along_axis(nll, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights)


@pytest.mark.parametrize("chunk", [5, 16, 38, 1000])
def test_chunked_softmax_equals_dense_loss_and_gradients(chunk):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((3, 4, D)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((NUM_ITEMS + 1, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(1, NUM_ITEMS + 1, (3, 4)))
    weights = jnp.asarray(rng.random((3, 4)) > 0.3, jnp.float32)

    def chunked(q, table):
        return losses.chunked_softmax_loss(q, table, targets, weights, 0.5, chunk)

    def dense(q, table):
        return _dense_softmax(q, table, targets, weights, 0.5)

    (got, got_grads), (want, want_grads) = (
        jax.value_and_grad(f, argnums=(0, 1))(q, table) for f in (chunked, dense)
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    assert float(jnp.abs(got_grads[1][0]).max()) == 0.0  # the padding row is no class


def test_gbce_known_answer_and_its_limits():
    rng = np.random.default_rng(1)
    q, pos = rng.standard_normal((2, 3, D)), rng.standard_normal((2, 3, D))
    neg = rng.standard_normal((2, 3, 4, D))
    pos_ids = np.array([[1, 2, 3], [4, 5, 0]])
    neg_ids = rng.integers(6, 9, (2, 3, 4))
    neg_ids[0, 1, 3] = 2  # an accidental hit: left out
    weights = (pos_ids != 0).astype(np.float64)
    beta = losses.gbce_beta(4, NUM_ITEMS, 0.75)
    alpha = 4 / (NUM_ITEMS - 1)
    assert beta == pytest.approx(alpha * (0.75 * (1 - 1 / alpha) + 1 / alpha))
    sp = lambda x: np.log1p(np.exp(x))  # noqa: E731
    total = 0.0
    for b in range(2):
        for t in range(3):
            terms = beta * sp(-(q[b, t] @ pos[b, t]))
            terms += sum(
                sp(q[b, t] @ neg[b, t, r]) for r in range(4) if neg_ids[b, t, r] != pos_ids[b, t]
            )
            total += weights[b, t] * terms / 5
    args = map(jnp.asarray, (q, pos, neg, pos_ids, neg_ids, weights))
    np.testing.assert_allclose(losses.gbce_loss(*args, beta), total / weights.sum(), rtol=1e-5)
    assert losses.gbce_beta(4, NUM_ITEMS, 0.0) == pytest.approx(1.0)  # t=0: plain BCE
    assert losses.gbce_beta(4, NUM_ITEMS, 1.0) == pytest.approx(alpha)


def test_popularity_sampling_follows_training_counts_and_logq_corrects():
    ids = np.array([[1, 1, 1, 2, 0], [1, 3, 3, 3, 3]])  # counts: 1 -> 4, 2 -> 1, 3 -> 4; 4 -> 0
    const = losses.popularity_constants(ids, 4)
    np.testing.assert_allclose(np.exp(const["item_log_q"][1:4]), [4 / 9, 1 / 9, 4 / 9], rtol=1e-6)
    np.testing.assert_allclose(
        np.diff(const["item_cdf"], prepend=0), [4 / 9, 1 / 9, 4 / 9, 0], atol=1e-6
    )
    draws = losses.sample_negatives(
        jax.random.key(0), (1, 1), 4, 90_000, "batch", jnp.asarray(const["item_cdf"])
    )
    share = np.bincount(np.asarray(draws).ravel(), minlength=5)[1:] / draws.size
    np.testing.assert_allclose(share, [4 / 9, 1 / 9, 4 / 9, 0], atol=0.01)  # item 4: never

    rng = np.random.default_rng(2)
    q, pos, neg = (
        rng.standard_normal((1, 2, D)),
        rng.standard_normal((1, 2, D)),
        rng.standard_normal((1, 2, 3, D)),
    )
    pos_ids, neg_ids = np.array([[1, 2]]), np.array([[[2, 3, 3], [1, 1, 3]]])
    log_q = const["item_log_q"]
    want = []
    for t in range(2):
        logits = [q[0, t] @ pos[0, t] - log_q[pos_ids[0, t]]]
        logits += [q[0, t] @ neg[0, t, r] - log_q[neg_ids[0, t, r]] for r in range(3)]
        want.append(-(logits[0] - np.log(np.sum(np.exp(logits)))))
    got = losses.sampled_softmax_loss(
        *map(jnp.asarray, (q, pos, neg, pos_ids, neg_ids, np.ones((1, 2)))), 1.0, jnp.asarray(log_q)
    )
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def _batch(b=4, n=10):
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, n + 1, b)
    ids = np.zeros((b, n), np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(1, NUM_ITEMS + 1, length)
    return {
        "ids": ids,
        "timestamps": np.zeros((b, n), np.int64),
        "lengths": lengths.astype(np.int32),
    }


LOSS_CASES = [
    dict(loss="full_softmax", temperature=1.0, softmax_chunk=16),
    dict(loss="gbce", num_negatives=8),
    dict(
        loss="sampled_softmax",
        num_negatives=8,
        negatives_shared="sequence",
        negative_sampling="popularity",
    ),
    dict(loss="bce", negative_sampling="popularity"),
]


@pytest.mark.parametrize("kind", ["sasrec", "hstu"])
@pytest.mark.parametrize(
    "loss", LOSS_CASES, ids=lambda c: f"{c['loss']}-{c.get('negative_sampling', 'uniform')}"
)
def test_every_loss_trains_both_models(kind, loss):
    cfg = MODELS[kind].config(
        num_items=NUM_ITEMS, max_seq_len=10, embedding_dim=D, num_blocks=1, dropout_rate=0.0, **loss
    )
    model = build_model(cfg, 0)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    if cfg.negative_sampling == "popularity":
        batch |= {
            k: jnp.asarray(v)
            for k, v in losses.popularity_constants(np.asarray(batch["ids"]), NUM_ITEMS).items()
        }
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, key):
        (loss, _), grads = nnx.value_and_grad(losses.next_item_loss, has_aux=True)(
            model, batch, key
        )
        opt.update(model, grads)
        return loss

    values = [float(step(model, opt, jax.random.key(i))) for i in range(30)]
    assert np.all(np.isfinite(values)) and np.mean(values[-5:]) < np.mean(values[:5]), values


@pytest.mark.parametrize("kind", ["sasrec", "hstu", "recgpt"])
def test_item_dropout_drops_one_table_that_inputs_and_scores_both_read(kind):
    """The loss with `item_dropout` equals the undropped loss of a model whose item table is
    the dropped one (same step key): one mask per step, shared by inputs and scores."""
    extra = dict(user_buckets=0) if kind == "recgpt" else {}
    cfg = MODELS[kind].config(
        num_items=NUM_ITEMS, max_seq_len=10, embedding_dim=D, num_blocks=1, dropout_rate=0.0,
        loss="bce", item_dropout=0.5, **extra,
    )  # fmt: skip
    model = build_model(cfg, 0)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    key = jax.random.key(7)
    dropped, _ = losses.next_item_loss(model, batch, key)
    dropped_table = Dropout(0.5)(
        model.item_emb.embedding[...], deterministic=False,
        rngs=nnx.Rngs(dropout=jax.random.fold_in(key, losses.ITEM_DROPOUT_STREAM)),
    )  # fmt: skip
    assert 0.4 < float(jnp.mean(dropped_table == 0)) < 0.6
    again, _ = losses.next_item_loss(model, batch, key)
    assert float(again) == float(dropped)  # the mask is a function of the key only
    undropped = build_model(dataclasses.replace(cfg, item_dropout=0.0), 0)
    full, _ = losses.next_item_loss(undropped, batch, key)
    undropped.item_emb.embedding[...] = dropped_table
    same, _ = losses.next_item_loss(undropped, batch, key)
    np.testing.assert_allclose(float(same), float(dropped), rtol=1e-6)
    assert abs(float(full) - float(dropped)) > 1e-3


def test_popularity_sampling_without_its_constants_is_refused():
    cfg = SASRecConfig(
        num_items=NUM_ITEMS,
        max_seq_len=10,
        embedding_dim=D,
        loss="sampled_softmax",
        negative_sampling="popularity",
    )
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    with pytest.raises(ValueError, match="popularity_constants"):
        losses.next_item_loss(build_model(cfg), batch, jax.random.key(0))


def test_ligr_sasrec_is_causal_and_differs_from_the_paper_block():
    kw = dict(
        num_items=NUM_ITEMS,
        max_seq_len=10,
        embedding_dim=D,
        num_blocks=2,
        num_heads=2,
        dropout_rate=0.0,
    )
    ligr = build_model(SASRecConfig(layer_type="ligr", **kw))
    assert {"attn_gate", "ffn_res_gate", "ffn_up"} <= set(vars(ligr.blocks[0]))
    ids = jnp.asarray(_batch()["ids"])
    out = ligr(ids)
    changed = ids.at[:, 5:].set(jnp.where(ids[:, 5:] > 0, 1 + ids[:, 5:] % NUM_ITEMS, 0))
    np.testing.assert_allclose(ligr(changed)[:, :5], out[:, :5], atol=1e-6)  # no look-ahead
    assert not np.allclose(build_model(SASRecConfig(**kw))(ids), out)
    with pytest.raises(ValueError, match="layer_type"):
        build_model(SASRecConfig(layer_type="nope", **kw))


@pytest.mark.parametrize("config", [SASRecConfig, HSTUConfig])
def test_end_aligned_positions_put_every_last_item_at_the_same_position(config):
    kw = dict(num_items=NUM_ITEMS, max_seq_len=5, embedding_dim=D, num_blocks=0, dropout_rate=0.0)
    ids = jnp.asarray([[5, 6, 7, 0, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(position_ids(ids, 5, "end"), [[2, 3, 4, 4, 4], [4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(position_ids(ids, 5, "start"), range(5))

    def newest(model, row):  # the newest item's output, before any attention
        ids = jnp.asarray([row])
        n = int((ids != 0).sum())
        args = () if config is SASRecConfig else (jnp.zeros_like(ids), jnp.asarray([n]))
        return model(ids, *args)[0, n - 1]

    # The newest item's input does not depend on how many items precede it; from the start, it does.
    end, start = (build_model(config(positions=p, **kw)) for p in ("end", "start"))
    np.testing.assert_allclose(newest(end, [7, 0]), newest(end, [3, 7]), atol=1e-6)
    assert not np.allclose(newest(start, [7, 0]), newest(start, [3, 7]), atol=1e-3)


def test_every_trainer_setting_has_a_train_flag():
    code = (
        "import json; from absl import flags; from hstu import train; train._define_flags(); "
        "print(json.dumps({n: getattr(flags.FLAGS[n].parser, 'enum_values', None) for n in flags.FLAGS}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    defined = json.loads(out.stdout)
    fields = {
        f.name for c in (HSTUConfig, SASRecConfig, TrainConfig) for f in dataclasses.fields(c)
    }
    assert fields - {"num_items"} <= set(defined), fields - set(defined)
    assert set(defined["negatives_shared"]) == {"position", "sequence", "batch"}
    assert set(defined["loss"]) == set(losses.LOSSES)
