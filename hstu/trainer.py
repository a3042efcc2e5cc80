"""Training and evaluation of HSTU / SASRec on `eval` data (used by `hstu.train`).

One jitted train step over the whole model+optimizer state (donated); losses stay on device
between evaluations. Orbax checkpoints: `latest` every evaluation (exact resume: the
data order, dropout and negatives depend only on the seed and the step) and `best` by
validation NDCG@10. Metrics go to `metrics.jsonl` and TensorBoard under `--out`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from eval import data, protocols
from eval.data import examples as ex_lib
from eval.data.dataset import EvalExamples
from eval.metrics import DEFAULT_KS
from eval.training import Checkpoints, EarlyStopping, RunLogger
from hstu.model import HSTU, config_from_preset, scatter_target_timestamps
from hstu.sasrec import SASRec

# Optimisation settings per preset (the architecture lives in `hstu.model.PRESETS`).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "sasrec-paper": dict(
        learning_rate=1e-3, b2=0.98, weight_decay=0.0, batch_size=128, num_epochs=200
    ),
    "sasrec-ml": dict(
        learning_rate=1e-3, b2=0.98, weight_decay=0.0, batch_size=128, num_epochs=100
    ),
    "hstu-ml": dict(learning_rate=1e-3, b2=0.98, weight_decay=0.0, batch_size=128, num_epochs=100),
    "hstu-large-ml": dict(
        learning_rate=1e-3, b2=0.98, weight_decay=0.0, batch_size=128, num_epochs=100
    ),
}


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and schedule of one run."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.0
    batch_size: int = 128
    num_epochs: int = 100
    max_steps: int | None = None
    eval_every: int | None = None  # steps; default once per epoch
    patience: int | None = 10  # evaluations without validation improvement
    eval_batch_size: int = 256
    seed: int = 0
    # HSTU's stochastic length (SL): alpha in (0, 2]; None = off (see `stochastic_length`).
    stochastic_length_alpha: float | None = None


def build_model(kind: str, cfg, seed: int) -> nnx.Module:
    return (HSTU if kind == "hstu" else SASRec)(cfg, rngs=nnx.Rngs(seed))


def training_source(split: data.Split, max_len: int) -> ex_lib.ArraySource:
    """One row per user: the last `max_len` training items, right-padded (t predicts t+1)."""
    rows = np.flatnonzero(split.train.lengths >= 2)
    train = split.train.take(rows)
    ts = split.train_timestamps.take(rows) if split.train_timestamps is not None else None
    return ex_lib.ArraySource(
        {
            "ids": ex_lib.pad(train, max_len, "right"),
            "timestamps": ex_lib.pad(ts, max_len, "right").astype(np.int64)
            if ts is not None
            else np.zeros((len(rows), max_len), np.int64),
            "lengths": np.minimum(train.lengths, max_len).astype(np.int32),
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
    return {"ids": ids, "timestamps": ts, "lengths": lengths, "target_ts": target_ts}


def stochastic_length(
    batch: dict[str, np.ndarray], alpha: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """HSTU's stochastic length (Zhai et al. 2024, Sec. 3.3) on a right-padded batch.

    With N the padded length and L = floor(N ** (alpha / 2)), a row of length n > L is
    replaced, with probability 1 - N**alpha / n**2, by a uniformly random ordered
    subsequence of L of its items (timestamps follow); shorter rows are kept whole.
    Shapes stay static (the row is re-padded to N).
    """
    ids, lengths = batch["ids"], batch["lengths"]
    b, n = ids.shape
    keep = int(n ** (alpha / 2))
    if not 0 < alpha <= 2 or keep < 1:
        raise ValueError(
            f"stochastic_length: alpha must be in (0, 2] with N**(alpha/2) >= 1, got alpha={alpha}, N={n}"
        )
    prob = 1.0 - n**alpha / np.maximum(lengths, 1).astype(np.float64) ** 2
    rows = np.flatnonzero((lengths > keep) & (rng.random(b) < prob))
    if not len(rows):
        return batch
    keys = rng.random((len(rows), n))
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


class Trainer:
    """Holds a model, its optimizer and the jitted train/score functions."""

    def __init__(
        self,
        kind: str,
        model_cfg,
        train_cfg: TrainConfig,
        mesh: Mesh | None = None,
        shard_items: bool = False,
    ):
        """`mesh` (axes 'data', 'model'): batches are split over 'data'; parameters are
        replicated, except the item table, split over 'model' rows when `shard_items`."""
        self.kind, self.model_cfg, self.cfg = kind, model_cfg, train_cfg
        model = build_model(kind, model_cfg, train_cfg.seed)
        tx = optax.adamw(
            train_cfg.learning_rate,
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            weight_decay=train_cfg.weight_decay,
        )
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.graphdef, self.state = nnx.split((model, optimizer))
        self.mesh = mesh
        if mesh is not None:
            self.state = jax.device_put(self.state, self._state_shardings(mesh, shard_items))
        self.key = jax.random.key(train_cfg.seed)
        self._step = jax.jit(self._train_step, donate_argnums=0)
        self._scores = jax.jit(self._query_scores)

    def _state_shardings(self, mesh: Mesh, shard_items: bool):
        def spec(path, leaf):
            is_table = shard_items and any(getattr(p, "key", None) == "item_emb" for p in path)
            rows_split = is_table and leaf.ndim == 2 and leaf.shape[0] % mesh.shape["model"] == 0
            return NamedSharding(mesh, P("model", None) if rows_split else P())

        return jax.tree.map_with_path(spec, self.state)

    def _put_batch(self, batch: dict[str, np.ndarray]):
        if self.mesh is None:
            return batch
        return jax.device_put(batch, NamedSharding(self.mesh, P("data")))

    def _train_step(self, state, batch, key):
        model, optimizer = nnx.merge(self.graphdef, state)
        (loss, _), grads = nnx.value_and_grad(lambda m: m.loss(batch, key), has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    def train_step(self, batch: dict[str, np.ndarray], step: int) -> jax.Array:
        """One optimizer step; the dropout/negative key depends only on (seed, step)."""
        self.state, loss = self._step(
            self.state, self._put_batch(batch), jax.random.fold_in(self.key, step)
        )
        return loss

    def _query_scores(self, state, inputs):
        model, _ = nnx.merge(self.graphdef, state)
        ts = inputs["timestamps"]
        if self.kind == "hstu":
            ts = scatter_target_timestamps(ts, inputs["lengths"], inputs["target_ts"])
        out = model(inputs["ids"], ts, inputs["lengths"], True)
        last = jnp.maximum(inputs["lengths"] - 1, 0)
        query = out[jnp.arange(out.shape[0]), last]
        return model.item_scores(query)

    def scores(self, examples: EvalExamples, index: np.ndarray) -> np.ndarray:
        """Scores [len(index), N+1] over all items for examples `index` (eval mode)."""
        return self._scores(self.state, query_inputs(examples, index, self.model_cfg.max_seq_len))

    def evaluate(
        self,
        ds: data.Dataset,
        examples: EvalExamples,
        protocol: str = "full",
        filter_history: bool = True,
        ks=DEFAULT_KS,
        seed: int = 0,
    ) -> dict[str, float]:
        """Metrics on `examples`: full ranking (history filtered or not) or 100 sampled negatives."""
        bs = self.cfg.eval_batch_size
        if protocol == "full":
            return protocols.full_ranking(
                lambda idx: self.scores(examples, idx),
                examples,
                ds.num_items,
                ks,
                bs,
                filter_history,
            )

        def sampled(idx, candidates):
            return np.take_along_axis(np.asarray(self.scores(examples, idx)), candidates, axis=1)

        return protocols.sampled_ranking(
            sampled, examples, ds.num_items, seed=seed, ks=ks, batch_size=bs
        )

    def fit(
        self,
        ds: data.Dataset,
        split: data.Split,
        out: pathlib.Path | None = None,
        protocol: str = "full",
        progress: bool = True,
    ) -> dict:
        """Train with validation-based selection; returns the best validation metrics."""
        source = training_source(split, self.model_cfg.max_seq_len)
        per_epoch = max(1, len(source) // self.cfg.batch_size)
        total = min(self.cfg.max_steps or 1 << 62, per_epoch * self.cfg.num_epochs)
        eval_every = self.cfg.eval_every or per_epoch
        ckpt = Checkpoints(out / "checkpoints") if out else None
        logger = RunLogger(out) if out else None
        stopper = EarlyStopping(self.cfg.patience)
        step = 0
        if ckpt and (restored := ckpt.restore(self.state, "latest")):
            self.state, meta, step = restored
            stopper.load(meta["early_stopping"])
            logging.info("resumed from step %d", step)
        loader = ex_lib.batches(
            source, min(self.cfg.batch_size, len(source)), seed=self.cfg.seed,
            num_epochs=None, start_batch=step,
        )  # fmt: skip
        bar = tqdm(total=total, initial=step, disable=not progress, desc=f"train {self.kind}")
        loss_sum, loss_n, best = jnp.zeros(()), 0, None
        while step < total:
            batch = next(loader)
            if self.cfg.stochastic_length_alpha is not None:
                rng = np.random.default_rng(
                    [self.cfg.seed, step]
                )  # depends on (seed, step): exact resume
                batch = stochastic_length(batch, self.cfg.stochastic_length_alpha, rng)
            loss_sum += self.train_step(batch, step)
            loss_n += 1
            step += 1
            bar.update(1)
            if step % eval_every == 0 or step == total:
                train_loss = float(loss_sum) / loss_n
                valid = (
                    self.evaluate(ds, split.valid, protocol)
                    if len(split.valid)
                    else {"NDCG@10": -train_loss}
                )
                bar.set_postfix(loss=f"{train_loss:.4f}", valid_ndcg10=f"{valid['NDCG@10']:.4f}")
                if logger:
                    logger.log(step, "train", {"loss": train_loss})
                    logger.log(step, "valid", valid)
                stop = stopper.update(valid["NDCG@10"])
                if valid["NDCG@10"] >= stopper.best:
                    best = (valid, jax.tree.map(jnp.copy, self.state))
                if ckpt:
                    meta = {"step": step, "early_stopping": stopper.state()}
                    ckpt.save(step, self.state, meta, valid)
                loss_sum, loss_n = jnp.zeros(()), 0
                if stop:
                    logging.info("early stop at step %d", step)
                    break
        bar.close()
        if best is not None:
            self.state = best[1]
        if logger:
            logger.close()
        if ckpt:
            ckpt.close()
        return {"steps": step, "valid": best[0] if best else {}}


def make_trainer(
    model: str,
    preset: str,
    num_items: int,
    overrides: dict[str, Any],
    mesh: Mesh | None = None,
    shard_items: bool = False,
) -> Trainer:
    """A Trainer for `preset` with architecture/optimisation `overrides` (None = keep)."""
    kind, model_cfg = config_from_preset(preset, num_items=num_items, **{
        k: v for k, v in overrides.items() if k in _model_fields(preset)
    })  # fmt: skip
    if kind != model:
        raise ValueError(f"--preset={preset} is a {kind} preset, but --model={model}")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {
        **TRAIN_PRESETS.get(preset, {}),
        **{k: v for k, v in overrides.items() if k in train_fields and v is not None},
    }
    return Trainer(kind, model_cfg, TrainConfig(**train), mesh, shard_items)


def _model_fields(preset: str) -> set[str]:
    kind, cfg = config_from_preset(preset, num_items=1)
    return {f.name for f in dataclasses.fields(cfg)}
