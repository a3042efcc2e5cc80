"""SFT of ``llm_sft.model.Qwen`` on the shared loop (``eval.training``): loss, data, validation.

The package supplies the loss (``SFTLoss``: summed next-token cross-entropy of the label
tokens, with their count as ``aux["weight"]``, so the loop's gradient accumulation
averages over every label token of the step), the batches (seeded order, trimmed to a
length bucket) and validation (mean token loss). ``eval.training.TrainState`` splits the
model into trainable params (``trainable``: every ``Param``, ``LoRAParam`` for adapters,
``RowParam`` for the new token rows of semantic-ID stage 1, or a filter of several),
frozen params (the other weights: rebuilt from their source, not checkpointed) and the
rest; params and optimizer state carry their NamedSharding over the ('data', 'fsdp',
'tensor') mesh (the model's partition metadata), the batch is split over ('data', 'fsdp').
Dropout is keyed by the loop's per-step rng (``fold_in(key(seed), step)``), so a resumed
run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from eval.data.examples import ArraySource, batches
from eval.distributed import data_parallelism
from eval.errors import FlagError
from eval.training import FitResult, LoopConfig, RunDir, Task, TrainState, fit, step_key
from eval.training.flags import eval_every_steps, total_steps
from eval.training.optim import SCHEDULES, OptimizerConfig, lr_schedule, make_optimizer
from llm_sft.data import IGNORE, token_extent, trim_to_bucket
from llm_sft.model import ModelConfig, Qwen

DATA_AXES = ("data", "fsdp")
LENGTH = "_length"  # the loader's length key under `group_by_length` (not a model input)
# A validation function: the model (eval mode) -> metrics, one of which selection reads;
# a recommender's ranking of validation examples is selected on NDCG@10.
Validate = Callable[[Qwen], Mapping[str, float]]
RANKING_SELECT = ("NDCG@10", "max")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loop settings (HF ``TrainingArguments`` names where they exist)."""

    learning_rate: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    final_lr_ratio: float = 0.0  # the cosine / linear decay ends at this fraction of the peak
    weight_decay: float = 0.0  # AdamW, on matrices only (not biases / norm scales)
    max_grad_norm: float = 1.0  # 0 disables clipping
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_epochs: int = 1
    max_steps: int | None = None  # when set, overrides num_epochs
    eval_every: int | None = None  # steps; default once per epoch (and always at the last step)
    patience: int | None = None  # evaluations without a lower validation loss
    log_every: int = 10
    seed: int = 0
    # Batches drawn within length buckets (the `buckets` widths given to `fit`), their order
    # shuffled: few padding columns (right padding only; HF's `group_by_length`).
    group_by_length: bool = False
    # > 0: apply the LM head only at the first `max_label_tokens` scored positions of each
    # row (response-only SFT with short responses: the [B, T, vocab] logits are never
    # built). A batch with a row holding more scored tokens raises ValueError.
    max_label_tokens: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise FlagError(f"--schedule={self.schedule!r}: choose one of {SCHEDULES}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch size and gradient_accumulation_steps must be >= 1")


def optimizer_config(config: TrainConfig, total_steps: int) -> OptimizerConfig:
    """AdamW (decay on matrices only) after clipping, warm-up steps or ratio, then decay."""
    warmup = config.warmup_steps or int(math.ceil(config.warmup_ratio * total_steps))
    return OptimizerConfig(
        learning_rate=config.learning_rate, schedule=config.schedule, warmup_steps=warmup,
        final_lr_ratio=config.final_lr_ratio,
        weight_decay=config.weight_decay, decay_matrices_only=True, max_grad_norm=config.max_grad_norm,
    )  # fmt: skip


def _shifted(labels: jax.Array) -> jax.Array:
    """Targets of each position: ``labels[t + 1]`` (IGNORE at the last position)."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)


def token_loss_sums(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token cross-entropies, number of label tokens); HF label convention."""
    return _target_loss_sums(logits, _shifted(labels))


def _target_loss_sums(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Like ``token_loss_sums`` for already shifted ``targets`` (IGNORE = not scored)."""
    valid = targets != IGNORE
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - picked[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def _forward_sums(
    model: Qwen, batch: dict[str, jax.Array], max_label_tokens: int = 0
) -> tuple[jax.Array, jax.Array]:
    kwargs = dict(positions=batch.get("positions"), attention_mask=batch["attention_mask"])
    if not max_label_tokens:
        logits, _ = model(batch["input_ids"], **kwargs)
        return token_loss_sums(logits, batch["labels"])
    # Only the gathered hidden states reach the loss: no full logits.
    _, _, hidden = model(batch["input_ids"], return_hidden=True, logits_to_keep=0, **kwargs)
    targets = _shifted(batch["labels"])
    # Scored positions first (stable: in position order), then unscored ones as filler.
    order = jnp.argsort(targets == IGNORE, axis=1, stable=True)[:, :max_label_tokens]
    picked = jnp.take_along_axis(hidden, order[..., None], axis=1)
    return _target_loss_sums(model.head(picked), jnp.take_along_axis(targets, order, axis=1))


def scored_tokens(labels: np.ndarray) -> int:
    """The most label tokens any row of ``labels`` holds."""
    return int((np.asarray(labels)[..., 1:] != IGNORE).sum(-1).max(initial=0))


def label_budget(*labels: np.ndarray) -> int:
    """A ``max_label_tokens`` that fits every row of these label arrays: the most scored
    tokens of a row, rounded up to a multiple of 8."""
    return -(-max(1, *(scored_tokens(x) for x in labels)) // 8) * 8


def _check_label_tokens(labels: np.ndarray, max_label_tokens: int) -> None:
    if max_label_tokens:
        most = scored_tokens(labels)
        if most > max_label_tokens:
            raise ValueError(
                f"a row has {most} scored tokens > max_label_tokens={max_label_tokens}"
            )


def _pad_rows(arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads to ``rows`` rows (static shapes) with padding rows that hold no label token."""
    short = rows - len(arrays["labels"])
    fill = lambda k: IGNORE if k == "labels" else 0  # noqa: E731
    return {
        k: np.concatenate([v, np.full((short, *v.shape[1:]), fill(k), v.dtype)]) if short else v
        for k, v in arrays.items()
    }


def _dropout_key(path, key: jax.Array, shape) -> jax.Array:
    """Each RNG stream's key for this step: the step's rng folded with the stream's path."""
    del shape
    return jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class SFTLoss:
    """The loop's loss: (sum of label-token cross-entropies, {"weight": their count})."""

    max_label_tokens: int = 0

    def __call__(self, model: Qwen, batch: dict[str, jax.Array], rng: jax.Array):
        nnx.reseed(model, dropout=rng, policy=_dropout_key)
        total, count = _forward_sums(model, batch, self.max_label_tokens)
        return total, {"weight": count.astype(jnp.float32)}


def init_model(config: ModelConfig, seed: int, mesh: Mesh) -> Qwen:
    """A randomly initialised model, created in one jitted call with its mesh shardings."""
    with jax.set_mesh(mesh):
        return nnx.jit(lambda: Qwen(config, rngs=nnx.Rngs(seed)))()


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(defs, params, frozen, rest, batch):
    """(loss sum, label tokens) of a batch; defs = (graphdef, max_label_tokens)."""
    graphdef, max_label_tokens = defs
    return _forward_sums(nnx.merge(graphdef, params, frozen, rest), batch, max_label_tokens)


class Trainer:
    """The sharded train state of one model: steps, validation loss and ``fit`` (the loop)."""

    def __init__(
        self, model: Qwen, mesh: Mesh, config: TrainConfig, num_train_rows: int,
        trainable: Any = nnx.Param,
    ):  # fmt: skip
        self.mesh, self.config = mesh, config
        self.dp = data_parallelism(mesh, DATA_AXES)
        self.micro_batch = config.per_device_train_batch_size * self.dp
        self.rows_per_step = self.micro_batch * config.gradient_accumulation_steps
        self.steps_per_epoch = num_train_rows // self.rows_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_train_rows} training rows < one step of {self.rows_per_step} "
                f"(per_device_train_batch_size x {self.dp} data-parallel devices x "
                f"gradient_accumulation_steps)"
            )
        self.total_steps = total_steps(self.steps_per_epoch, config.num_epochs, config.max_steps)
        self.optimizer = optimizer_config(config, self.total_steps)
        self.state = TrainState(
            model, make_optimizer(self.optimizer, self.total_steps), wrt=trainable,
            frozen=nnx.Nothing if trainable is nnx.Param else nnx.Param, mesh=mesh, data_axes=DATA_AXES,
        )  # fmt: skip
        self.loss = SFTLoss(config.max_label_tokens)

    def train_step(self, batch: dict[str, np.ndarray], step: int) -> dict[str, jax.Array]:
        """One optimizer step on ``rows_per_step`` rows (as ``fit`` takes step ``step``)."""
        _check_label_tokens(batch["labels"], self.config.max_label_tokens)
        key = step_key(self.config.seed, step)
        return self.state.train_step(
            self.loss, batch, key, accumulation=self.config.gradient_accumulation_steps
        )

    def evaluate(
        self, arrays: dict[str, np.ndarray], buckets: tuple[int, ...], padding_side: str
    ) -> float:
        """Mean token loss over every row of ``arrays`` (eval mode, no dropout)."""
        n, b = len(arrays["input_ids"]), self.micro_batch
        _check_label_tokens(arrays["labels"], self.config.max_label_tokens)
        s, defs = self.state, (self.state.eval_def, self.config.max_label_tokens)
        sums = []
        for start in range(0, n, b):
            chunk = _pad_rows({k: v[start : start + b] for k, v in arrays.items()}, b)
            chunk = trim_to_bucket(chunk, buckets, padding_side)
            with jax.set_mesh(self.mesh):
                sums.append(_eval_sums(defs, s.params, s.frozen, s.rest, s.put_batch(chunk)))
        total, count = np.sum(jax.device_get(sums), axis=0)
        return float(total / max(count, 1))

    def model(self) -> Qwen:
        """The current model (eval mode), sharing the trainer's arrays."""
        return self.state.model()

    def batches(
        self, train: ArraySource, buckets, padding_side: str, start: int,
        rows: np.ndarray | None = None,
    ) -> Iterator[dict]:  # fmt: skip
        """Training batches from step `start` on (seeded order), trimmed to the length bucket
        of the whole batch (with `group_by_length`, drawn from one); `rows`: this process's
        rows of each (`TrainState.shard_rows`), cut to the width the whole batch needs."""
        extent = token_extent(train.arrays["attention_mask"], padding_side)
        grouped = None
        if self.config.group_by_length:
            if padding_side != "right":
                raise ValueError("group_by_length needs right-padded rows")
            keys = tuple(k for k, v in train.arrays.items() if v.ndim == 2)
            train, grouped = ArraySource({**train.arrays, LENGTH: extent}), (buckets, LENGTH, keys)
        plan = dict(seed=self.config.seed, num_epochs=None, start_batch=start)
        loader = batches(train, self.rows_per_step, buckets=grouped, rows=rows, **plan)
        # A process's part of a batch: the same batches' extents, every row (a few ints),
        # give the width the whole batch needs.
        extents = None if rows is None else batches(
            ArraySource({LENGTH: extent}), self.rows_per_step, **plan,
            buckets=None if grouped is None else (buckets, LENGTH, ()),
        )  # fmt: skip
        for batch in loader:
            batch.pop(LENGTH, None)
            need = None if extents is None else int(next(extents)[LENGTH].max())
            _check_label_tokens(batch["labels"], self.config.max_label_tokens)
            yield trim_to_bucket(batch, buckets, padding_side, need)

    def fit(
        self, train: ArraySource, valid: dict[str, np.ndarray] | Validate | None, *,
        buckets: tuple[int, ...], padding_side: str = "right", run: RunDir | None = None,
        progress: bool = True, select: tuple[str, str] = ("loss", "min"), desc: str = "sft",
    ) -> FitResult:  # fmt: skip
        """Trains to ``total_steps`` with selection on validation (the best state is loaded
        at the end): ``valid`` is rows whose token loss is selected on, or a function of the
        model returning metrics (a recommender's ranking metrics), of which ``select`` =
        (name, "max" | "min") names the one; ``run``: the run folder (checkpoints, metrics,
        resume); ``desc`` opens the progress lines."""
        cfg = self.config
        rows = self.state.shard_rows(self.rows_per_step, cfg.gradient_accumulation_steps)
        validate = valid
        if isinstance(valid, dict):
            validate = lambda _: {"loss": self.evaluate(valid, buckets, padding_side)}  # noqa: E731
        task = Task(
            loss=self.loss,
            batches=functools.partial(self.batches, train, buckets, padding_side, rows=rows),
            validate=validate, schedule=lr_schedule(self.optimizer, self.total_steps),
        )  # fmt: skip
        loop = LoopConfig(
            self.total_steps, eval_every_steps(cfg.eval_every, self.steps_per_epoch), cfg.patience, *select,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, log_every=cfg.log_every,
            seed=cfg.seed, progress=progress, desc=desc, steps_per_epoch=self.steps_per_epoch,
        )  # fmt: skip
        return fit(self.state, task, loop, run)
