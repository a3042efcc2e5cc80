"""HSTU / SASRec training data, scoring and the trainer on the shared loop (`eval.training`).

The package supplies the model (`hstu.models`), the loss (`hstu.losses.next_item_loss`)
and the data: one right-padded row per user (`training_source`), batches indexed by step
(seeded order; HSTU's stochastic length seeded by (seed, step)), validation by the data
set's protocol. `eval.training.fit` runs the jitted donated step, selection on validation
NDCG@10, `latest` / `best` checkpoints and exact resume.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eval import data, protocols
from eval.data import examples as ex_lib
from eval.data.dataset import EvalExamples
from eval.distributed import data_parallelism, to_host
from eval.errors import FlagError
from eval.metrics import DEFAULT_KS, history_mask
from eval.sharded_ranking import ranks_and_top_k
from eval.training import FitResult, LoopConfig, RunDir, Task, TrainState, fit, step_key
from eval.training.flags import eval_every_steps, total_steps
from eval.training.optim import OptimizerConfig, make_optimizer
from hstu.losses import popularity_constants
from hstu.model import scatter_target_timestamps
from hstu.models import MODELS, build_model, config_fields, config_from_preset, model_kind, preset


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and schedule of one run (presets set these beside the architecture)."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.0
    batch_size: int = 128
    num_epochs: int = 100
    max_steps: int | None = None  # when set, overrides num_epochs
    eval_every: int | None = None  # steps; default once per epoch
    patience: int | None = 10  # evaluations without validation improvement
    eval_batch_size: int = 256
    seed: int = 0
    # HSTU's stochastic length (SL): alpha in (0, 2]; None = off (see `stochastic_length`).
    stochastic_length_alpha: float | None = None
    # Training rows: None = one per user (the last max_seq_len items, as SASRec and HSTU
    # train); k = windows of max_seq_len items ending every k items back from each user's
    # last training item (k = max_seq_len - 1 makes every training target count once).
    window_stride: int | None = None
    # Length-bucketed batches: rows of <= 8, 16, 32, ... items batched together and cut to
    # that width (`eval.data.examples.BatchSource`); on short-sequence data most compute
    # otherwise goes to padding.
    length_buckets: bool = False


def training_source(
    split: data.Split, max_len: int, window_stride: int | None = None
) -> ex_lib.ArraySource:
    """Right-padded training rows (position t predicts t + 1): the last `max_len` training
    items of each user, or with `window_stride` every window of `max_len` items ending
    0, k, 2k, ... items before the user's last (windows of >= 2 items)."""
    train = split.train
    lengths = train.lengths
    if window_stride is None:
        users = np.flatnonzero(lengths >= 2)
        ends = lengths[users]
    else:
        if window_stride < 1:
            raise ValueError(f"window_stride must be >= 1, got {window_stride}")
        per_user = np.where(lengths >= 2, (lengths - 2) // window_stride + 1, 0)
        users = np.repeat(np.arange(len(lengths)), per_user)
        back = np.arange(len(users)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
        ends = lengths[users] - back * window_stride
    starts = np.maximum(ends - max_len, 0)
    first = train.offsets[users]
    ts = split.train_timestamps
    return ex_lib.ArraySource(
        {
            "users": users.astype(np.int32),
            "ids": ex_lib.pad_windows(train.values, first + starts, first + ends, max_len, "right"),
            "timestamps": ex_lib.pad_windows(
                ts.values, first + starts, first + ends, max_len, "right"
            ).astype(np.int64)
            if ts is not None
            else np.zeros((len(users), max_len), np.int64),
            "lengths": (ends - starts).astype(np.int32),
        }
    )


def query_inputs(examples: EvalExamples, index: np.ndarray, max_len: int) -> dict[str, np.ndarray]:
    """Right-padded last `max_len` history items of examples `index` (+ request timestamps)."""
    hist = examples.history
    starts, ends = hist.offsets[index], hist.offsets[np.asarray(index) + 1]
    ids = ex_lib.pad_windows(hist.values, starts, ends, max_len, "right")
    lengths = np.minimum(ends - starts, max_len).astype(np.int32)
    if examples.history_timestamps is not None:
        ts = ex_lib.pad_windows(examples.history_timestamps.values, starts, ends, max_len, "right")
        target_ts = examples.target_timestamps[index]
    else:
        ts, target_ts = np.zeros_like(ids, np.int64), np.zeros(len(index), np.int64)
    users = examples.users[index].astype(np.int32)
    return {
        "ids": ids,
        "timestamps": ts,
        "lengths": lengths,
        "target_ts": target_ts,
        "users": users,
    }


def stochastic_length(
    batch: dict[str, np.ndarray], alpha: float, rng: np.random.Generator,
    rows_of: tuple[np.ndarray, int] | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """HSTU's stochastic length (Zhai et al. 2024, Sec. 3.3) on a right-padded batch.

    With N the padded length and L = floor(N ** (alpha / 2)), a row of length n > L is
    replaced, with probability 1 - N**alpha / n**2, by a uniformly random ordered
    subsequence of L of its items (timestamps follow); shorter rows are kept whole.
    Shapes stay static (the row is re-padded to N). The draws are made for every row of
    the global batch; `rows_of` = (the batch's positions in it, its row count) when the
    batch is one process's part (`eval.distributed.process_rows`), which then gets the
    rows the whole batch would.
    """
    ids, lengths = batch["ids"], batch["lengths"]
    b, n = ids.shape
    keep = int(n ** (alpha / 2))
    if not 0 < alpha <= 2 or keep < 1:
        raise ValueError(
            f"stochastic_length: alpha must be in (0, 2] with N**(alpha/2) >= 1, got alpha={alpha}, N={n}"
        )
    held, total = rows_of if rows_of is not None else (np.arange(b), b)
    draws, keys = rng.random(total)[held], rng.random((total, n))[held]
    prob = 1.0 - n**alpha / np.maximum(lengths, 1).astype(np.float64) ** 2
    rows = np.flatnonzero((lengths > keep) & (draws < prob))
    if not len(rows):
        return batch
    keys = keys[rows]
    keys[np.arange(n)[None, :] >= lengths[rows, None]] = 2.0  # padding is never picked
    chosen = np.sort(np.argsort(keys, axis=1)[:, :keep], axis=1)
    out = dict(batch)
    for name in ("ids", "timestamps"):
        new = batch[name].copy()
        new[rows] = 0
        new[rows, :keep] = np.take_along_axis(batch[name][rows], chosen, axis=1)
        out[name] = new
    out["lengths"] = lengths.copy()
    out["lengths"][rows] = keep
    return out


def item_table_shardings(mesh: Mesh, shard_items: bool):
    """Sharding rule: with `shard_items`, the item table split over 'model' rows and a
    softmax head over the catalogue (RecGPT's `head`: kernel [D, N + 1], bias [N + 1])
    over its item axis, with their optimizer moments, where they divide evenly;
    everything else replicated."""
    parts = mesh.shape["model"]

    def spec(path, leaf):
        keys = {getattr(p, "key", None) for p in path}
        if shard_items and "item_emb" in keys and leaf.ndim == 2 and leaf.shape[0] % parts == 0:
            return NamedSharding(mesh, P("model", None))
        if shard_items and "head" in keys and leaf.ndim and leaf.shape[-1] % parts == 0:
            return NamedSharding(mesh, P(*[None] * (leaf.ndim - 1), "model"))
        return NamedSharding(mesh, P())

    return lambda tree: jax.tree.map_with_path(spec, tree)


def _at_target_time(inputs: dict) -> dict:
    ts = scatter_target_timestamps(inputs["timestamps"], inputs["lengths"], inputs["target_ts"])
    return {**inputs, "timestamps": ts}


@functools.partial(jax.jit, static_argnums=(0, 5))
def _query_scores(graphdef, params, frozen, rest, inputs, recall_n):
    model = nnx.merge(graphdef, params, frozen, rest)
    return model.query_scores(_at_target_time(inputs), recall_n)


@functools.partial(jax.jit, static_argnums=0)
def _queries(graphdef, params, frozen, rest, inputs):
    """Queries against the ranking and the generation table (`hstu.items.ItemScores`)."""
    model = nnx.merge(graphdef, params, frozen, rest)
    h = model.query_embeddings(_at_target_time(inputs))
    return model.ranking_queries(h), model.generation_queries(h)


@functools.partial(jax.jit, static_argnums=0)
def _second_queries(graphdef, params, frozen, rest, inputs, generated):
    """Two-stage recall's second queries against the ranking table (RecGPT)."""
    model = nnx.merge(graphdef, params, frozen, rest)
    return model.ranking_queries(model.second_query(_at_target_time(inputs), generated))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _tables(graphdef, params, frozen, rest, generation: bool):
    """The ranking table (and, with `generation`, the generation table)."""
    model = nnx.merge(graphdef, params, frozen, rest)
    return model.ranking_table(), model.generation_table() if generation else None


def padded_history(examples: EvalExamples, index: np.ndarray, width: int) -> np.ndarray:
    """History item ids [len(index), width] of examples `index`, 0-padded (`width`: the
    longest history of the example set, one static shape for all its batches)."""
    rows = examples.history.take(index)
    out = np.zeros((len(index), width), np.int32)
    out[np.arange(width)[None, :] < rows.lengths[:, None]] = rows.values
    return out


class Trainer:
    """One HSTU / SASRec model, its optimizer state, scoring and `fit` (the shared loop)."""

    def __init__(self, model_cfg, train_cfg: TrainConfig, mesh: Mesh | None = None,
                 shard_items: bool = False):  # fmt: skip
        """`mesh` (axes 'data', 'model'): batches are split over 'data'; parameters are
        replicated, except the item table, split over 'model' rows when `shard_items`."""
        self.kind, self.model_cfg, self.cfg = model_kind(model_cfg), model_cfg, train_cfg
        self.loss = MODELS[self.kind].loss
        # Two-stage recall's stage-1 share N (RecGPT); None = one query per example.
        self.recall_n: int | None = None
        opt = OptimizerConfig(
            learning_rate=train_cfg.learning_rate, b1=train_cfg.b1, b2=train_cfg.b2,
            weight_decay=train_cfg.weight_decay,
        )  # fmt: skip
        self.state = TrainState(
            build_model(model_cfg, train_cfg.seed), make_optimizer(opt, 1), mesh=mesh,
            shardings=item_table_shardings(mesh, shard_items) if mesh is not None else None,
        )  # fmt: skip
        # Full ranking per shard of the item table (`eval.sharded_ranking`) when it is split.
        self.sharded_table = (
            shard_items
            and mesh is not None
            and (model_cfg.num_items + 1) % mesh.shape["model"] == 0
        )
        if shard_items and not self.sharded_table:
            logging.warning(
                "--shard_items: %d item-table rows do not split evenly over the mesh's %s "
                "'model' devices; the table stays whole on every device",
                model_cfg.num_items + 1, mesh.shape["model"] if mesh is not None else "(no mesh)",
            )  # fmt: skip

    def train_step(self, batch: dict[str, np.ndarray], step: int) -> jax.Array:
        """One optimizer step (as `fit` takes it: rng `fold_in(key(seed), step)`); the loss."""
        key = step_key(self.cfg.seed, step)
        return self.state.train_step(self.loss, batch, key)["loss"]

    def loss_constants(self, source: ex_lib.ArraySource) -> dict[str, jax.Array]:
        """What the loss reads beside the batch: training popularity for popularity-sampled
        negatives (`hstu.losses.popularity_constants`), else nothing."""
        cfg = self.model_cfg
        if cfg.negative_sampling != "popularity" or cfg.loss == "full_softmax":
            return {}
        counts = popularity_constants(source.arrays["ids"][:, 1:], cfg.num_items)
        return {k: jnp.asarray(v) for k, v in counts.items()}

    def query_scores(self, inputs: dict[str, np.ndarray]) -> jax.Array:
        """Scores [B, N+1] over all items of `query_inputs` rows (eval mode). On a mesh the
        rows are split over its data axis (across the processes of a run) when they divide."""
        s = self.state
        if s.mesh is not None and len(inputs["ids"]) % data_parallelism(s.mesh, s.data_axes) == 0:
            inputs = s.put_batch(inputs)
        return _query_scores(s.eval_def, s.params, s.frozen, s.rest, inputs, self.recall_n)

    def scores(
        self, examples: EvalExamples, index: np.ndarray, filter_history: bool = True
    ) -> jax.Array:
        """Scores [len(index), N+1] over all items for examples `index` (eval mode); with
        `recall_n`, the history (not the target) is left out of stage 1 when `filter_history`."""
        inputs = query_inputs(examples, index, self.model_cfg.max_seq_len)
        if self.recall_n is not None and filter_history:
            # Stage 1 draws from what the protocol ranks: the history out, the target in
            # (`eval.protocols.full_ranking` never excludes a target seen before).
            mask = history_mask(examples.history, self.model_cfg.num_items, rows=index)
            mask[np.arange(len(index)), examples.targets[index]] = False
            inputs["mask"] = mask
        return self.query_scores(inputs)

    def sharded_ranking(self, examples: EvalExamples, ks=DEFAULT_KS,
                        filter_history: bool = True) -> dict[str, float]:  # fmt: skip
        """Full-ranking metrics computed per shard of the split item table
        (`eval.sharded_ranking`): no [batch, num_items] array on one device. With
        `recall_n` = N, two-stage recall as `query_scores` ranks: stage 1's top N (history
        out) and the generated item come from per-shard top-k lists; the second query's
        rank among the items outside stage 1's list follows them."""
        s = self.state
        model = (s.eval_def, s.params, s.frozen, s.rest)
        n = self.recall_n
        table, generation = _tables(*model, n is not None)  # once per evaluation
        # One static width per power of two: validation and test share their compilations.
        longest = int(examples.history.lengths.max(initial=0)) if filter_history else 1
        width = 1 << max(longest - 1, 0).bit_length()

        def ranks(index: np.ndarray) -> jax.Array:
            inputs = query_inputs(examples, index, self.model_cfg.max_seq_len)
            queries, generating = _queries(*model, inputs)
            history = (
                padded_history(examples, index, width)
                if filter_history
                else np.zeros((len(index), 1), np.int32)
            )
            targets = examples.targets[index].astype(np.int32)
            if n is None:
                return ranks_and_top_k(queries, table, targets, history, k=1, mesh=s.mesh)[0]
            first = ranks_and_top_k(queries, table, targets, history, k=n, mesh=s.mesh)[1]
            nothing = np.zeros((len(index), 1), np.int32)
            generated = ranks_and_top_k(generating, generation, targets, nothing, k=1,
                                        mesh=s.mesh)[1][:, 0]  # fmt: skip
            second = _second_queries(*model, inputs, generated)
            rest = ranks_and_top_k(second, table, targets, jnp.concatenate([history, first], 1),
                                   k=1, mesh=s.mesh)[0]  # fmt: skip
            hit = first == targets[:, None]
            return jnp.where(hit.any(1), jnp.argmax(hit, 1) + 1, n + rest)

        return protocols.full_ranking_by_ranks(ranks, examples, ks, self.cfg.eval_batch_size)

    def evaluate(self, ds: data.Dataset, examples: EvalExamples, protocol: str = "full",
                 filter_history: bool = True, ks=DEFAULT_KS, seed: int = 0) -> dict[str, float]:  # fmt: skip
        """Metrics on `examples`: full ranking (history filtered or not) or 100 sampled negatives."""
        bs = self.cfg.eval_batch_size
        if protocol == "full" and self.sharded_table:
            return self.sharded_ranking(examples, ks, filter_history)
        if protocol == "full":
            return protocols.full_ranking(
                lambda idx: self.scores(examples, idx, filter_history),
                examples,
                ds.num_items,
                ks,
                bs,
                filter_history,
            )

        def sampled(idx, candidates):
            return np.take_along_axis(to_host(self.scores(examples, idx)), candidates, axis=1)

        return protocols.sampled_ranking(
            sampled, examples, ds.num_items, seed=seed, ks=ks, batch_size=bs
        )

    def batches(
        self, source: ex_lib.ArraySource, start: int, rows: np.ndarray | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Training batches from step `start` on: seeded order, stochastic length by (seed,
        step); `rows`: this process's rows of each (`TrainState.shard_rows`)."""
        cfg = self.cfg
        size = min(cfg.batch_size, len(source))
        loader = ex_lib.batches(
            source, size, seed=cfg.seed, num_epochs=None, start_batch=start,
            buckets=self.buckets(), rows=rows,
        )  # fmt: skip
        for step, batch in enumerate(loader, start):
            if cfg.stochastic_length_alpha is not None:
                rng = np.random.default_rng([cfg.seed, step])
                rows_of = None if rows is None else (rows, size)
                batch = stochastic_length(batch, cfg.stochastic_length_alpha, rng, rows_of)
            yield batch

    def buckets(self) -> tuple[list[int], str, tuple[str, ...]] | None:
        """`length_buckets`' widths 8, 16, 32, ... below max_seq_len, and max_seq_len."""
        if not self.cfg.length_buckets:
            return None
        n = self.model_cfg.max_seq_len
        widths = [w for w in (2**k for k in range(3, 16)) if w < n] + [n]
        return widths, "lengths", ("ids", "timestamps")

    def fit(self, ds: data.Dataset, split: data.Split, run: RunDir | None = None,
            protocol: str = "full", progress: bool = True) -> FitResult:  # fmt: skip
        """Trains with selection on validation NDCG@10 (`eval.training.fit`); the best state
        is loaded at the end. `run`: the run folder (checkpoints, metrics, resume)."""
        cfg = self.cfg
        source = training_source(split, self.model_cfg.max_seq_len, cfg.window_stride)
        size = min(cfg.batch_size, len(source))
        per_epoch = ex_lib.batches_per_epoch(source, size, buckets=self.buckets())
        task = Task(
            loss=self.loss,
            batches=functools.partial(self.batches, source, rows=self.state.shard_rows(size)),
            validate=(lambda _: self.evaluate(ds, split.valid, protocol)) if len(split.valid) else None,
            constants=self.loss_constants(source),
        )  # fmt: skip
        loop = LoopConfig(
            total_steps=total_steps(per_epoch, cfg.num_epochs, cfg.max_steps),
            eval_every=eval_every_steps(cfg.eval_every, per_epoch),
            patience=cfg.patience, select="NDCG@10", seed=cfg.seed, progress=progress,
            desc=f"train {self.kind}", steps_per_epoch=per_epoch,
        )  # fmt: skip
        return fit(self.state, task, loop, run)


def make_trainer(preset_name: str, num_items: int, overrides: dict[str, Any],
                 mesh: Mesh | None = None, shard_items: bool = False) -> Trainer:  # fmt: skip
    """A Trainer for `preset_name` with architecture/optimisation `overrides` (None = keep)."""
    kind = preset(preset_name)["model"]
    arch = {k: v for k, v in overrides.items() if k in config_fields(kind)}
    _, model_cfg = config_from_preset(preset_name, num_items=num_items, **arch)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = (
        {k for k, v in overrides.items() if v is not None} - train_fields - config_fields(kind)
    )
    if unknown:
        raise FlagError(f"--preset={preset_name} ({kind}) has no setting {sorted(unknown)}")
    train = {
        **preset(preset_name)["train"],
        **{k: v for k, v in overrides.items() if k in train_fields and v is not None},
    }
    return Trainer(model_cfg, TrainConfig(**train), mesh, shard_items)
