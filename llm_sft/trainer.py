"""SFT trainer for ``llm_sft.model.Qwen``: one jitted, sharded step with gradient accumulation.

The model is split into trainable params (``LoRAParam`` in LoRA mode, every ``Param``
otherwise), frozen params and the remaining state (dropout RNG counters). The step takes a
batch [accumulation, batch, length], runs ``lax.scan`` over the micro-batches summing
gradients of the token cross-entropy divided by the batch's total label-token count (so the
loss is the mean over all label tokens of the step), then applies optax. Params and
optimizer state carry their NamedSharding over the ('data', 'fsdp', 'tensor') mesh (from
the model's partition metadata); the batch is sharded over ('data', 'fsdp').

``fit`` evaluates (token loss on the validation arrays) every ``eval_every`` steps, saves
an orbax checkpoint of the trainable params, optimizer and RNG state each time (frozen
base weights are rebuilt from their source, not saved) and resumes from the latest one;
the data loader resumes at the same batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from eval.data.examples import ArraySource, batches
from eval.training import Checkpoints, RunLogger
from llm_sft.data import IGNORE, trim_to_bucket
from llm_sft.lora import LoRAParam
from llm_sft.model import ModelConfig, Qwen

SCHEDULES = ("cosine", "linear", "constant")
BATCH_SPEC = PartitionSpec(None, ("data", "fsdp"), None)  # [accumulation, batch, length]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loop settings (HF ``TrainingArguments`` names where they exist)."""

    learning_rate: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    weight_decay: float = 0.0  # AdamW, on matrices only (not biases / norm scales)
    max_grad_norm: float = 1.0  # 0 disables clipping
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_epochs: int = 1
    max_steps: int = -1  # > 0 overrides num_epochs
    eval_every: int = 0  # 0: once per epoch (and always at the last step)
    log_every: int = 10
    seed: int = 0
    # > 0: apply the LM head only at the first `max_label_tokens` scored positions of each
    # row (response-only SFT with short responses: the [B, T, vocab] logits are never
    # built). A batch with a row holding more scored tokens raises ValueError.
    max_label_tokens: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule={self.schedule!r}: choose one of {SCHEDULES}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch size and gradient_accumulation_steps must be >= 1")


def lr_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine / linear decay to 0 or constant."""
    warmup = config.warmup_steps or int(math.ceil(config.warmup_ratio * total_steps))
    peak, rest = config.learning_rate, max(total_steps - warmup, 1)
    decay = {
        "cosine": optax.cosine_decay_schedule(peak, rest),
        "linear": optax.linear_schedule(peak, 0.0, rest),
        "constant": optax.constant_schedule(peak),
    }[config.schedule]
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


@functools.cache  # One object per setting, so equal Trainers share compiled steps.
def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decay on matrices only) after global-norm clipping, on ``lr_schedule``."""
    adamw = optax.adamw(
        lr_schedule(config, total_steps),
        weight_decay=config.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
    )
    if config.max_grad_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


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


def _check_label_tokens(labels: np.ndarray, max_label_tokens: int) -> None:
    if max_label_tokens:
        most = int((np.asarray(labels)[..., 1:] != IGNORE).sum(-1).max(initial=0))
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


def _keys_to_data(tree):
    """Typed PRNG keys -> raw uint32 data (orbax stores plain arrays)."""
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def init_model(config: ModelConfig, seed: int, mesh: Mesh) -> Qwen:
    """A randomly initialised model, created in one jitted call with its mesh shardings."""
    with jax.set_mesh(mesh):
        return nnx.jit(lambda: Qwen(config, rngs=nnx.Rngs(seed)))()


def _fresh(tree):
    """New Variable objects at the current trace level (NNX refuses to mutate Variables
    created at an outer one, e.g. inside ``lax.scan``)."""
    return jax.tree.map(lambda x: x, tree)


def _constrain_like(state):
    """Pins a State to its variables' partition specs (under the active mesh)."""
    return jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 3, 4))
def _train_step(defs, params, frozen, rest, opt_state, batch):
    """One optimizer step; ``batch`` arrays are [accumulation, batch, length]."""
    graphdef, opt_def, wrt, max_label_tokens = defs
    count = jnp.maximum(jnp.sum(batch["labels"][..., 1:] != IGNORE), 1)

    def micro(carry, mb):
        grads, loss, rest = carry
        model = nnx.merge(graphdef, *_fresh((params, frozen, rest)))

        def loss_fn(model):
            return _forward_sums(model, mb, max_label_tokens)[0] / count

        value, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        rest = nnx.state(model, nnx.Not(nnx.Param))  # advanced dropout RNG counters
        return (jax.tree.map(jnp.add, grads, g), loss + value, rest), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss, rest), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), rest), batch)
    model = nnx.merge(graphdef, params, frozen, rest)
    optimizer = nnx.merge(opt_def, opt_state)
    optimizer.update(model, grads)
    metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads)}
    new = (nnx.state(model, wrt), rest, nnx.state(optimizer))
    return (*map(_constrain_like, new), metrics)


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(defs, params, frozen, rest, batch):
    """(loss sum, label tokens) of a [1, batch, length] batch; defs = (graphdef, max_label_tokens)."""
    graphdef, max_label_tokens = defs
    model = nnx.merge(graphdef, params, frozen, rest)
    return _forward_sums(model, jax.tree.map(lambda x: x[0], batch), max_label_tokens)


class Trainer:
    """Holds the sharded train state of one model and runs steps, evaluation and ``fit``."""

    def __init__(
        self, model: Qwen, mesh: Mesh, config: TrainConfig, num_train_rows: int, lora: bool
    ):
        self.mesh, self.config = mesh, config
        self.wrt = LoRAParam if lora else nnx.Param
        self.dp = mesh.shape["data"] * mesh.shape["fsdp"]
        self.micro_batch = config.per_device_train_batch_size * self.dp
        self.rows_per_step = self.micro_batch * config.gradient_accumulation_steps
        self.steps_per_epoch = num_train_rows // self.rows_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_train_rows} training rows < one step of {self.rows_per_step} "
                f"(per_device_train_batch_size x {self.dp} data-parallel devices x "
                f"gradient_accumulation_steps)"
            )
        self.total_steps = (
            config.max_steps if config.max_steps > 0 else config.num_epochs * self.steps_per_epoch
        )
        model.eval()
        self.eval_def = nnx.graphdef(model)
        model.train()
        self.graphdef, params, frozen, rest = nnx.split(model, self.wrt, nnx.Param, ...)
        state = (params, frozen, rest)
        model_sh = nnx.get_named_sharding(state, mesh)
        self.params, self.frozen, self.rest = jax.device_put(state, model_sh)
        self.p_sh, self.f_sh, self.r_sh = model_sh
        tx = make_optimizer(config, self.total_steps)
        graphdef, wrt = self.graphdef, self.wrt

        def init_optimizer(params, frozen, rest):
            return nnx.split(nnx.Optimizer(nnx.merge(graphdef, params, frozen, rest), tx, wrt=wrt))

        with jax.set_mesh(mesh):  # optimizer variables inherit the params' sharding metadata
            self.opt_def, abstract = jax.eval_shape(init_optimizer, *state)
            self.o_sh = nnx.get_named_sharding(abstract, mesh)
            self.opt_state = jax.jit(lambda *s: init_optimizer(*s)[1], out_shardings=self.o_sh)(
                self.params, self.frozen, self.rest
            )
        self.batch_sh = NamedSharding(mesh, BATCH_SPEC)
        self.step = 0

    # -- public API -------------------------------------------------------------------
    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One optimizer step on ``rows_per_step`` rows ([rows, length] numpy arrays)."""
        a = self.config.gradient_accumulation_steps
        _check_label_tokens(batch["labels"], self.config.max_label_tokens)
        batch = {k: v.reshape(a, -1, *v.shape[1:]) for k, v in batch.items()}
        with jax.set_mesh(self.mesh):
            self.params, self.rest, self.opt_state, metrics = _train_step(
                (self.graphdef, self.opt_def, self.wrt, self.config.max_label_tokens),
                self.params, self.frozen, self.rest, self.opt_state,
                jax.device_put(batch, self.batch_sh),
            )  # fmt: skip
        self.step += 1
        return metrics

    def evaluate(
        self, arrays: dict[str, np.ndarray], buckets: tuple[int, ...], padding_side: str
    ) -> float:
        """Mean token loss over every row of ``arrays`` (eval mode, no dropout)."""
        n, b = len(arrays["input_ids"]), self.micro_batch
        _check_label_tokens(arrays["labels"], self.config.max_label_tokens)
        sums = []
        for start in range(0, n, b):
            chunk = trim_to_bucket(
                _pad_rows({k: v[start : start + b] for k, v in arrays.items()}, b),
                buckets, padding_side,
            )  # fmt: skip
            with jax.set_mesh(self.mesh):
                sums.append(_eval_sums(
                    (self.eval_def, self.config.max_label_tokens), self.params, self.frozen, self.rest,
                    jax.device_put({k: v[None] for k, v in chunk.items()}, self.batch_sh),
                ))  # fmt: skip
        total, count = np.sum(jax.device_get(sums), axis=0)
        return float(total / max(count, 1))

    def model(self) -> Qwen:
        """The current model (eval mode), sharing the trainer's arrays."""
        return nnx.merge(self.eval_def, self.params, self.frozen, self.rest)

    def _ckpt_state(self) -> dict[str, Any]:
        return _keys_to_data(
            {k: nnx.to_pure_dict(getattr(self, k)) for k in ("params", "rest", "opt_state")}
        )

    def save(self, ckpt: Checkpoints, meta: dict, eval_loss: float | None) -> None:
        """Saves the latest checkpoint (and the best one by ``eval_loss`` when given)."""
        metrics = None if eval_loss is None else {"neg_eval_loss": -eval_loss}
        ckpt.save(self.step, self._ckpt_state(), {**meta, "step": self.step}, metrics=metrics)

    def restore(self, ckpt: Checkpoints) -> bool:
        """Loads the latest checkpoint (if any) into the trainer; True when one was found."""
        shardings = {"params": self.p_sh, "rest": self.r_sh, "opt_state": self.o_sh}
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self._ckpt_state(), {k: nnx.to_pure_dict(v) for k, v in shardings.items()},
        )  # fmt: skip
        restored = ckpt.restore(abstract)
        if restored is None:
            return False
        state, _, self.step = restored
        for k in shardings:
            current = getattr(self, k)
            keys = jax.tree.map(
                lambda old, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
                if jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key) else new,
                nnx.to_pure_dict(current), state[k],
            )  # fmt: skip
            nnx.replace_by_pure_dict(current, keys)
        return True

    def fit(
        self,
        train: ArraySource,
        valid: dict[str, np.ndarray] | None,
        *,
        buckets: tuple[int, ...],
        padding_side: str = "right",
        out: str | Path | None = None,
        stop_at: int | None = None,
        progress: bool = True,
        meta: dict | None = None,
    ) -> dict[str, Any]:
        """Trains to ``total_steps`` (or ``stop_at``, for time-boxed runs), resuming from
        ``<out>/checkpoints``; returns {"losses": per-step train loss of this call,
        "eval": [(step, eval_loss)], "steps": final step}."""
        cfg = self.config
        ckpt = Checkpoints(Path(out) / "checkpoints", best_metric="neg_eval_loss") if out else None
        logger = RunLogger(out) if out else None
        if ckpt is not None:
            self.restore(ckpt)
        eval_every = cfg.eval_every or self.steps_per_epoch
        end = min(self.total_steps, stop_at or self.total_steps)
        loader = batches(
            train, self.rows_per_step, seed=cfg.seed, shuffle=True, num_epochs=None,
            start_batch=self.step,
        )  # fmt: skip
        losses, evals, pending = [], [], []
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not progress, desc="sft")
        try:
            while self.step < end:
                batch = trim_to_bucket(next(loader), buckets, padding_side)
                metrics = self.train_step(batch)
                pending.append(metrics)
                bar.update(1)
                last = self.step == end
                if self.step % cfg.log_every == 0 or last or self.step % eval_every == 0:
                    fetched = jax.device_get(pending)
                    losses += [float(m["loss"]) for m in fetched]
                    record = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    record["learning_rate"] = float(
                        lr_schedule(cfg, self.total_steps)(self.step - 1)
                    )
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    if logger:
                        logger.log(self.step, "train", record)
                    pending = []
                if self.step % eval_every == 0 or last:
                    eval_loss = None
                    if valid is not None:
                        eval_loss = self.evaluate(valid, buckets, padding_side)
                        evals.append((self.step, eval_loss))
                        if logger:
                            logger.log(self.step, "valid", {"loss": eval_loss})
                    if ckpt:
                        self.save(
                            ckpt, {**(meta or {}), "config": dataclasses.asdict(cfg)}, eval_loss
                        )
        finally:
            bar.close()
            if logger:
                logger.close()
            if ckpt:
                ckpt.close()
        return {"losses": losses, "eval": evals, "steps": self.step}
