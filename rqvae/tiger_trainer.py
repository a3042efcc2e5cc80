"""TIGER training and ranking (library; the CLI is `rqvae.tiger_train`).

  model = fit_tiger(ds, split, load_index(path, ds), TigerTrainConfig())
  lists = rank_items(model, split.test, index, k=20)      # [E, 20] item ids, 0 = empty

Training examples are every prefix of every training sequence, or of its last
`max_targets` positions (history = the last `max_items` items before the target,
left-padded), teacher-forced cross-entropy on the target's L codes, AdamW with linear
warm-up, on the shared loop (`eval.training.fit`: checkpoints, resume, early stopping).
The state with the best validation Recall@10 (trie-constrained beam search, item level)
is returned. Ranking excludes each example's history items while decoding (`filter_history`,
the generative counterpart of full ranking's history filter): an ID none of whose items is
unseen is pruned from that example's trie, so the beams hold only recommendable items.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from eval.data.dataset import Dataset, EvalExamples
from eval.data.examples import batches, pad, prefix_source
from eval.data.formats import largest_code, read_item_codes
from eval.data.splits import Split
from eval.decoding.trie import live_nodes
from eval.distributed import global_array, replicate, to_host
from eval.metrics import DEFAULT_KS, history_mask, metrics_from_ranks, ranks_from_lists
from eval.training import LoopConfig, RunDir, Task, TrainState, fit
from eval.training.flags import eval_every_steps, total_steps
from eval.training.optim import OptimizerConfig, make_optimizer
from rqvae.tiger import (
    PAD,
    SemanticIndex,
    Tiger,
    TigerConfig,
    beam_search,
    code_tokens,
    encoder_tokens,
    leaves_to_items,
    user_buckets,
)

Index = SemanticIndex | Mapping[int, np.ndarray] | np.ndarray


@dataclasses.dataclass(frozen=True)
class TigerTrainConfig:
    """Training options; `model.num_levels` / `codebook_size` are taken from the index."""

    model: TigerConfig = TigerConfig()
    codebook_size: int | None = None  # codes per level; None: the index's largest code + 1
    num_epochs: int = 200
    max_steps: int | None = None  # when set, overrides num_epochs
    min_steps: int = 0  # more epochs than num_epochs when they give fewer steps (small data)
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.035
    warmup_steps: int = 1000
    beam_size: int = 20
    eval_every: int | None = None  # steps; default once per epoch
    patience: int | None = 10  # evaluations without a better validation Recall@10
    max_valid: int | None = None  # validation examples used for selection (fixed seeded subset)
    max_targets: int | None = None  # train on each user's last max_targets positions only
    eval_batch_size: int = 256
    filter_history: bool = True  # decoding excludes each example's history items
    seed: int = 0


def load_index(
    path: str | Path, ds: Dataset, codebook_size: int | None = None
) -> dict[int, np.ndarray]:
    """{dense item id: codes [L]} from an index json whose key k is the data set's item k
    (dense id k + 1): `rqvae.train`'s row order, and the original item id for LC-Rec data.
    Every code must be < `codebook_size` when it is given; otherwise the size inferred from
    the largest code is logged."""
    codes = read_item_codes(path, ds, codebook_size)
    if codebook_size is None and ds.num_items:
        logging.info(
            "%s: codebook size %d inferred from the largest code %s; --codebook_size checks it",
            path, codes.max() + 1, largest_code(codes[1:]),
        )  # fmt: skip
    return {dense: codes[dense] for dense in range(1, ds.num_items + 1)}


def as_semantic_index(index: Index, codebook_size: int | None = None) -> SemanticIndex:
    """A `SemanticIndex` from {dense item id: codes} (items 1..len), an [N + 1, L] array or itself."""
    if isinstance(index, SemanticIndex):
        return index
    num_items = len(index) - 1 if isinstance(index, np.ndarray) else len(index)
    return SemanticIndex.from_mapping(index, num_items, codebook_size)


def _item_tokens(si: SemanticIndex) -> jax.Array:
    tokens = code_tokens(si.item_codes, si.codebook_size)
    tokens[0] = PAD
    return jnp.asarray(tokens, jnp.int32)


def tiger_loss(model: Tiger, batch: dict[str, jax.Array], rng: jax.Array):
    """Teacher-forced cross-entropy of a batch of (user, history, target) on the target's
    codes; `batch` also holds the index tables `item_tokens` and `item_codes`."""
    enc = encoder_tokens(batch["item_tokens"], batch["user"], batch["history"], model.cfg)
    target = batch["item_codes"][batch["target"]]
    logits = model(enc, target, rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean(), {}


@functools.partial(jax.jit, static_argnames=("max_fanout", "beam_size", "k"))
def _rank_batch(
    model, item_tokens, users, history, trie, max_fanout, id_items, paths, seen,
    beam_size: int, k: int,
):  # fmt: skip
    enc = encoder_tokens(item_tokens, users, history, model.cfg)
    live = None
    if seen is not None:  # an ID stays reachable while one of its items is unseen
        keep = jnp.any((id_items > 0) & ~seen[:, id_items], -1)
        live = live_nodes(paths, keep, trie.leaf_index.shape[0])
    _, leaves, _ = beam_search(model, enc, trie, beam_size, max_fanout, live)
    return leaves_to_items(leaves, id_items, k, seen)


def rank_items(
    model: Tiger, examples: EvalExamples, index: Index, k: int, *, beam_size: int = 20, batch_size: int = 256,
    rows: np.ndarray | None = None, mesh: Mesh | None = None, filter_history: bool = True,
) -> np.ndarray:  # fmt: skip
    """Top-k distinct items [E, k] (0 = empty slot) for examples `rows` (default all).

    Beam search over the valid IDs (beam_size >= k recommended); items sharing an ID are
    listed at that ID's position in ascending item id order. `filter_history`: the items
    of each example's whole history are excluded while decoding (IDs none of whose items
    are unseen are pruned from the trie per example), as full ranking filters them
    (`eval.protocols.full_ranking`), so no beam is spent on them. With `mesh` (the model
    replicated over it) each batch's rows are split over its 'data' axis, across the
    processes of a multi-process run, and the lists gathered.
    """
    cfg = model.cfg
    rows = np.arange(len(examples)) if rows is None else np.asarray(rows)
    si = as_semantic_index(index, cfg.codebook_size)
    if si.num_levels != cfg.num_levels:
        raise ValueError(f"index has {si.num_levels} levels, the model {cfg.num_levels}")
    tables = (
        _item_tokens(si),
        si.trie.arrays(),
        jnp.asarray(si.id_items),
        jnp.asarray(si.trie.paths),
    )
    history = pad(examples.history, cfg.max_items, "left")
    users = user_buckets(examples.users, cfg.num_user_buckets)
    batch_size = min(batch_size, max(len(rows), 1))
    put = jnp.asarray
    if mesh is not None:
        batch_size = -(-batch_size // mesh.shape["data"]) * mesh.shape["data"]
        tables = replicate(tables, mesh)
        rows_sharding = jax.NamedSharding(mesh, jax.P("data"))
        put = functools.partial(global_array, sharding=rows_sharding)
    item_tokens, trie, id_items, paths = tables
    num_items = si.item_codes.shape[0] - 1
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        padded = np.pad(chunk, (0, batch_size - len(chunk)), mode="edge")  # one compiled shape
        seen = history_mask(examples.history, num_items, rows=padded) if filter_history else None
        lists = _rank_batch(
            model, item_tokens, put(users[padded]), put(history[padded]), trie, si.trie.max_fanout,
            id_items, paths, None if seen is None else put(seen), beam_size, k,
        )  # fmt: skip
        out.append(to_host(lists)[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, k), np.int32)


def evaluate_tiger(
    model: Tiger, examples: EvalExamples, index: Index, ks=DEFAULT_KS, *, beam_size: int = 20, batch_size: int = 256,
    rows: np.ndarray | None = None, mesh: Mesh | None = None, filter_history: bool = True,
) -> dict[str, float]:  # fmt: skip
    """Item-level HR(=Recall)/NDCG/MRR@ks over the full item set, from beam-search lists
    (`rank_items`; `mesh`, `filter_history`: as there)."""
    rows = np.arange(len(examples)) if rows is None else np.asarray(rows)
    lists = rank_items(
        model, examples, index, max(ks), beam_size=beam_size, batch_size=batch_size, rows=rows,
        mesh=mesh, filter_history=filter_history,
    )  # fmt: skip
    return {
        **metrics_from_ranks(ranks_from_lists(lists, examples.targets[rows]), ks),
        "num_examples": len(rows),
    }


def model_config(config: TigerTrainConfig, index: SemanticIndex) -> TigerConfig:
    """The architecture with the index's number of levels and codebook size."""
    return dataclasses.replace(
        config.model, num_levels=index.num_levels, codebook_size=index.codebook_size
    )


def init_state(
    config: TigerTrainConfig, index: SemanticIndex, total: int = 1, mesh: Mesh | None = None
) -> TrainState:
    """A fresh TIGER model (seeded) and AdamW with linear warm-up, split for the loop;
    with `mesh`, replicated over it and each batch split over its 'data' axis."""
    model = Tiger(
        model_config(config, index), rngs=nnx.Rngs(jax.random.split(jax.random.key(config.seed))[0])
    )
    opt = OptimizerConfig(
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
    )
    return TrainState(model, make_optimizer(opt, total), mesh=mesh)


def training_steps(config: TigerTrainConfig, steps_per_epoch: int) -> int:
    """`max_steps`, else whole epochs: `num_epochs`, or more to reach `min_steps`."""
    epochs = max(config.num_epochs, -(-config.min_steps // steps_per_epoch))
    return total_steps(steps_per_epoch, epochs, config.max_steps)


def fit_tiger(
    ds: Dataset, split: Split, index: Index, config: TigerTrainConfig = TigerTrainConfig(),
    run: RunDir | None = None, progress: bool = False, mesh: Mesh | None = None,
) -> Tiger:  # fmt: skip
    """Trains TIGER on `split.train`; returns the model with the best validation Recall@10.
    `mesh` (axis 'data'): data parallel over its devices, every process's of the run."""
    si = as_semantic_index(index)
    if si.item_codes.shape[0] != ds.num_items + 1:
        raise ValueError(
            f"fit_tiger: the index covers {si.item_codes.shape[0] - 1} items, {ds.name} has {ds.num_items}"
        )
    cfg = model_config(config, si)
    source = prefix_source(split.train, cfg.max_items, "left", max_targets=config.max_targets)
    source.arrays["user"] = user_buckets(source.arrays["user"], cfg.num_user_buckets)
    if len(source) == 0:
        raise ValueError("fit_tiger: the training split has no (history, next item) example")
    batch_size = min(config.batch_size, len(source))
    steps_per_epoch = len(source) // batch_size
    total = training_steps(config, steps_per_epoch)
    state = init_state(config, si, total, mesh)
    valid_rows = split.valid.sample_rows(config.max_valid, config.seed)
    logging.info(
        "TIGER: %d training examples, %d steps/epoch, %s", len(source), steps_per_epoch, cfg
    )

    def validate(model: Tiger) -> dict:
        return evaluate_tiger(
            model, split.valid, si, (1, 5, 10, 20), beam_size=config.beam_size,
            batch_size=config.eval_batch_size, rows=valid_rows, mesh=mesh,
            filter_history=config.filter_history,
        )  # fmt: skip

    held = state.shard_rows(batch_size)  # this process's rows of each batch
    task = Task(
        loss=tiger_loss,
        batches=lambda start: batches(
            source, batch_size, seed=config.seed, num_epochs=None, start_batch=start, rows=held
        ),
        validate=validate if len(valid_rows) else None,
        constants={"item_tokens": _item_tokens(si), "item_codes": jnp.asarray(si.item_codes, jnp.int32)},
    )  # fmt: skip
    loop = LoopConfig(
        total, eval_every_steps(config.eval_every, steps_per_epoch), config.patience, "HR@10",
        seed=config.seed, progress=progress, desc="tiger", steps_per_epoch=steps_per_epoch,
    )  # fmt: skip
    fit(state, task, loop, run)
    return state.model()
