"""TIGER: relative positions, trie, constrained beam search, collision expansion, training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiger_config, tiger_run_args

from rqvae import tiger

LEVELS, K, BEAM, BATCH = 3, 4, 16, 3
TINY = tiger.TigerConfig(
    num_levels=LEVELS, codebook_size=K, d_model=16, num_heads=2, head_dim=8, d_ff=32,
    encoder_layers=1, decoder_layers=2, num_user_buckets=3, max_items=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> tiger.Tiger:
    model = tiger.Tiger(TINY, rngs=nnx.Rngs(1))
    # Sharpen the output distribution so the scores differ clearly between IDs.
    model.head[...] = model.head[...] * 8.0
    return model


def random_inputs(cfg: tiger.TigerConfig, batch: int, seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, cfg.num_user_buckets, batch)
    codes = rng.integers(0, cfg.codebook_size, (batch, cfg.max_items, cfg.num_levels))
    item_tokens = tiger.code_tokens(codes, cfg.codebook_size).reshape(batch, -1)
    item_tokens[0, : cfg.num_levels] = tiger.PAD  # one left-padded history
    user = tiger.NUM_SPECIAL + cfg.num_levels * cfg.codebook_size + users
    return jnp.asarray(np.concatenate([user[:, None], item_tokens], 1), jnp.int32)


def index_of(codes: np.ndarray) -> tiger.SemanticIndex:
    """A SemanticIndex whose items 1..M carry `codes` (one compiled trie shape: padded)."""
    return tiger.SemanticIndex.from_mapping(np.concatenate([codes[:1], codes]), len(codes), K)


def search(model, enc, si: tiger.SemanticIndex):
    return map(
        np.asarray, tiger.beam_search(model, enc, si.trie.arrays(), BEAM, si.trie.max_fanout)
    )


def test_relative_buckets_known_answer():
    # Bidirectional, 32 buckets (16 per direction, 8 exact), max distance 128; n = query - key.
    ours = tiger.relative_buckets(1, 400, True, 32, 128)[0]  # query 0: n = -key
    # key after the query: 16 + bucket(|n|): |n| = 3 exact; 20 -> 8 + int(8 * ln(2.5) / ln(16)) = 10; 300 -> capped 15.
    assert (ours[3], ours[20], ours[300]) == (16 + 3, 16 + 10, 16 + 15)
    causal = tiger.relative_buckets(30, 1, False, 32, 128)[:, 0]  # key 0: n = query
    # causal: 32 buckets, 16 exact; n = 20 -> 16 + int(16 * ln(20 / 16) / ln(8)) = 17.
    assert (causal[0], causal[5], causal[20]) == (0, 5, 17)


def test_relative_buckets_match_t5():
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    for bidirectional in (True, False):
        ours = tiger.relative_buckets(40, 200, bidirectional, 32, 128)
        rel = torch.arange(200)[None, :] - torch.arange(40)[:, None]
        ref = T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=32, max_distance=128
        )
        np.testing.assert_array_equal(ours, ref.numpy())


def test_semantic_id_trie_known_answer():
    codes = np.array([[1, 0], [0, 2], [1, 2], [0, 2]])  # [0, 2] twice (a collision)
    si = tiger.SemanticIndex.from_mapping({i + 1: c for i, c in enumerate(codes)}, 4)
    np.testing.assert_array_equal(si.ids, [[0, 2], [1, 0], [1, 2]])
    trie = si.trie  # breadth first: root 0; level-0 codes 0 -> 1, 1 -> 2; then the leaves
    np.testing.assert_array_equal(trie.child_tokens[: trie.node_offsets[6]], [0, 1, 2, 0, 2])
    np.testing.assert_array_equal(trie.leaf_index[3:6], [0, 1, 2])
    assert trie.depth == 2 and trie.eos_token_id is None
    np.testing.assert_array_equal(trie.paths, [[1, 3], [2, 4], [2, 5]])  # each ID's nodes
    with pytest.raises(ValueError, match="one length"):
        tiger.Trie.build([[0, 1], [0]], None)


def test_cached_decode_steps_equal_teacher_forcing(model):
    cfg = model.cfg
    enc = random_inputs(cfg, BATCH, seed=5)
    codes = jnp.asarray(np.random.default_rng(5).integers(0, K, (BATCH, LEVELS)))
    memory, valid = model.encode(enc)
    forced = model.decode(memory, valid, codes[:, :-1])  # [B, L, K]
    caches, memory_kvs = model.start_decoding(memory, 1)
    token = jnp.full((BATCH,), tiger.BOS, jnp.int32)
    for level in range(LEVELS):
        logits, caches = model.decode_step(token, level, caches, memory_kvs, valid)
        np.testing.assert_allclose(logits, forced[:, level], rtol=1e-5, atol=1e-5)
        token = tiger.NUM_SPECIAL + level * K + codes[:, level]


def test_semantic_index_expands_collisions_in_item_order():
    index = {1: [1, 0], 2: [0, 2], 3: [1, 2], 4: [0, 2], 5: [0, 2]}
    si = tiger.SemanticIndex.from_mapping(index, num_items=5)
    np.testing.assert_array_equal(si.id_items, [[2, 4, 5], [1, 0, 0], [3, 0, 0]])
    assert si.num_collisions == 2 and si.codebook_size == 3
    leaves = jnp.array([[2, 0, 1], [1, -1, -1]])
    items = tiger.leaves_to_items(leaves, jnp.asarray(si.id_items), k=4)
    np.testing.assert_array_equal(items, [[3, 2, 4, 5], [1, 0, 0, 0]])
    seen = np.zeros((2, 6), bool)
    seen[0, [3, 4]] = True  # item 3's ID goes; its collision partner 2 stays, 4 does not
    items = tiger.leaves_to_items(leaves, jnp.asarray(si.id_items), 4, jnp.asarray(seen))
    np.testing.assert_array_equal(items, [[2, 5, 1, 0], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match="lacks 1 of 6"):
        tiger.SemanticIndex.from_mapping(index, num_items=6)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), num_ids=st.integers(1, 40))
def test_beam_search_returns_only_valid_ids(model, seed, num_ids):
    rng = np.random.default_rng(seed)
    si = index_of(rng.integers(0, K, (num_ids, LEVELS)))
    enc = random_inputs(model.cfg, BATCH, seed)
    codes, leaves, scores = search(model, enc, si)
    alive = min(BEAM, len(si.ids))
    assert (leaves[:, :alive] >= 0).all() and (leaves[:, alive:] == -1).all()
    assert np.isfinite(scores[:, :alive]).all() and np.isneginf(scores[:, alive:]).all()
    assert (np.diff(scores[:, :alive], axis=1) <= 0).all()
    np.testing.assert_array_equal(codes[:, :alive], si.ids[leaves[:, :alive]])
    for row in leaves:  # distinct IDs
        assert len(set(row[:alive])) == alive


def test_beam_search_equals_exhaustive_scoring(model):
    si = index_of(np.random.default_rng(0).integers(0, K, (BEAM - 2, LEVELS)))
    enc = random_inputs(model.cfg, BATCH, seed=2)
    m = len(si.ids)
    _, leaves, scores = search(model, enc, si)
    candidates = jnp.broadcast_to(jnp.asarray(si.ids), (BATCH, m, LEVELS))
    exhaustive = np.asarray(tiger.sequence_log_probs(model, enc, candidates))
    order = np.argsort(-exhaustive, axis=1, kind="stable")
    np.testing.assert_array_equal(leaves[:, :m], order)
    np.testing.assert_allclose(
        scores[:, :m], np.take_along_axis(exhaustive, order, 1), rtol=1e-5, atol=1e-5
    )


def test_beam_search_over_live_nodes_equals_exhaustive_scoring_of_the_kept_ids(model):
    from eval.decoding.trie import live_nodes

    si = index_of(np.random.default_rng(3).integers(0, K, (BEAM + 8, LEVELS)))
    enc = random_inputs(model.cfg, BATCH, seed=4)
    m = len(si.ids)
    keep = np.random.default_rng(4).random((BATCH, m)) < 0.5
    keep[0] = False  # nothing left to recommend: every slot empty
    live = live_nodes(jnp.asarray(si.trie.paths), jnp.asarray(keep), len(si.trie.leaf_index))
    _, leaves, scores = map(
        np.asarray,
        tiger.beam_search(model, enc, si.trie.arrays(), BEAM, si.trie.max_fanout, live),
    )
    candidates = jnp.broadcast_to(jnp.asarray(si.ids), (BATCH, m, LEVELS))
    exhaustive = np.asarray(tiger.sequence_log_probs(model, enc, candidates))
    for row in range(BATCH):
        kept = np.flatnonzero(keep[row])
        order = kept[np.argsort(-exhaustive[row, kept], kind="stable")][:BEAM]
        np.testing.assert_array_equal(leaves[row, : len(order)], order)
        assert (leaves[row, len(order) :] == -1).all()
        np.testing.assert_allclose(
            scores[row, : len(order)], exhaustive[row, order], rtol=1e-5, atol=1e-5
        )


def _cyclic_dataset(num_items: int = 12, num_users: int = 48, length: int = 6):
    """Every user walks the items in order (item i is always followed by i % N + 1)."""
    from eval.data.dataset import Dataset, ItemTable, Ragged

    starts = np.random.default_rng(0).integers(0, num_items, num_users)
    rows = [(s + np.arange(length)) % num_items + 1 for s in starts]
    items = ItemTable([""] + [str(i) for i in range(num_items)], [""] * (num_items + 1))
    return Dataset("cyclic", items, [str(u) for u in range(num_users)], Ragged.from_rows(rows))


@pytest.mark.slow  # ~60 s on a loaded 2-core machine (two compiles + 30 epochs)
def test_fit_tiger_learns_deterministic_transitions_and_ranks_collisions():
    from eval.data import split as split_fn
    from rqvae import tiger_trainer

    ds = _cyclic_dataset()
    sp = split_fn(ds)
    codes = np.stack([np.arange(12) // 4, np.arange(12) % 4], 1)
    codes[11] = codes[10]  # items 11 and 12 share an ID
    index = {i + 1: codes[i] for i in range(12)}
    cfg = tiger_trainer.TigerTrainConfig(
        model=dataclasses.replace(TINY, dropout=0.0), num_epochs=40, batch_size=32, learning_rate=1e-2,
        warmup_steps=1, beam_size=4, eval_every=50, patience=None, eval_batch_size=64,
    )  # fmt: skip
    model = tiger_trainer.fit_tiger(ds, sp, index, cfg)
    metrics = tiger_trainer.evaluate_tiger(
        model, sp.test, index, (1, 5), beam_size=4, batch_size=64
    )
    lists = tiger_trainer.rank_items(model, sp.test, index, 5, beam_size=4, batch_size=64)
    assert lists.shape == (len(sp.test), 5)
    for row in lists:  # distinct items, empty slots only at the end
        nonzero = row[row > 0]
        assert len(set(nonzero)) == len(nonzero) and (row[: len(nonzero)] > 0).all()
    # Targets 1..10 have unique IDs; 11 and 12 share one, so the top-1 item for both is 11.
    unique = sp.test.targets <= 10
    assert (lists[unique, 0] == sp.test.targets[unique]).mean() > 0.75  # chance: 1/12
    assert metrics["HR@5"] > 0.75


def test_training_steps_are_whole_epochs_up_to_min_steps():
    from rqvae.tiger_trainer import TigerTrainConfig, training_steps

    demo = TigerTrainConfig(num_epochs=3, min_steps=450)
    assert training_steps(demo, 151) == 453  # ml-100k: 3 epochs are enough
    assert training_steps(demo, 41) == 451  # amazon-cds-vinyl-2018: 11 epochs
    assert training_steps(TigerTrainConfig(num_epochs=3), 41) == 123
    assert training_steps(TigerTrainConfig(max_steps=7, min_steps=450), 41) == 7


def test_load_index_keys_are_item_rows(tmp_path):
    from rqvae import ids, tiger_trainer

    ds = _cyclic_dataset(num_items=3, num_users=2, length=3)
    ids.write_index(tmp_path / "s.json", np.array([[0, 1], [1, 0], [1, 1]]))
    index = tiger_trainer.load_index(tmp_path / "s.json", ds)
    assert {k: v.tolist() for k, v in index.items()} == {1: [0, 1], 2: [1, 0], 3: [1, 1]}
    ids.write_index(tmp_path / "short.json", np.array([[0, 1]]))
    with pytest.raises(ValueError, match="short.json: 1 items, but cyclic has 3"):
        tiger_trainer.load_index(tmp_path / "short.json", ds)


def test_kill_9_after_second_checkpoint_then_rerun_matches(tmp_path):
    from tiny import kill_and_resume, train_losses

    from rqvae import evaluate, tiger_train

    folder, index, flags, args = tiger_run_args(tmp_path, tmp_path / "killed")
    full = tiger_train.run(
        "ml-100k", str(folder), str(index), str(tmp_path / "full"), tiger_config(flags)
    )
    config = tiger_config(flags)
    resumed = kill_and_resume(
        args, tmp_path / "killed",
        lambda out: tiger_train.run("ml-100k", str(folder), str(index), str(out), config),
    )  # fmt: skip
    for split in ("valid", "test"):
        assert resumed[split] == full[split], split
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "full")
    metrics, _ = evaluate.evaluate_run(str(tmp_path / "killed"))  # reloads and re-evaluates
    assert metrics["test"] == pytest.approx(full["test"], abs=1e-9)


def test_absurd_learning_rate_stops_with_an_error(tmp_path):
    from eval.training import NonFiniteError
    from rqvae import tiger_train

    folder, index, flags, _ = tiger_run_args(tmp_path, tmp_path / "run")
    config = dataclasses.replace(tiger_config(flags), learning_rate=1e38, eval_every=1)
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite .*Last good checkpoint"):
        tiger_train.run("ml-100k", str(folder), str(index), str(tmp_path / "run"), config)
    assert not (tmp_path / "run" / "result.json").exists()
