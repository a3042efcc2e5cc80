"""The optimizer every trainer uses: AdamW on a warm-up + decay schedule, optional clipping."""

from __future__ import annotations

import dataclasses
import functools

import jax
import optax

from eval.errors import FlagError

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings; `decay_matrices_only` exempts biases and norm scales (HF Trainer)."""

    learning_rate: float = 1e-3
    schedule: str = "constant"  # after warm-up: constant, cosine or linear decay
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0  # cosine / linear decay to this fraction of the peak
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    decay_matrices_only: bool = False
    max_grad_norm: float = 0.0  # global-norm clipping; 0: off

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise FlagError(f"--schedule={self.schedule!r}: choose one of {SCHEDULES}")
        if not self.learning_rate > 0:
            raise FlagError(f"--learning_rate={self.learning_rate}: must be > 0")


def lr_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then the configured decay."""
    peak, warmup = config.learning_rate, config.warmup_steps
    rest = max(total_steps - warmup, 1)
    decay = {
        "constant": optax.constant_schedule(peak),
        "cosine": optax.cosine_decay_schedule(peak, rest, alpha=config.final_lr_ratio),
        "linear": optax.linear_schedule(peak, peak * config.final_lr_ratio, rest),
    }[config.schedule]
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


@functools.cache  # One transform per setting: it is static in the jitted step.
def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, after global-norm clipping when `max_grad_norm` > 0."""
    mask = (
        (lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
        if config.decay_matrices_only
        else None
    )
    adamw = optax.adamw(
        lr_schedule(config, total_steps),
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        mask=mask,
    )
    if config.max_grad_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
