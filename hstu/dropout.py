"""Dropout with a counter-based hash for its mask (fast on CPU).

`jax.random.bernoulli` draws threefry bits, which on XLA:CPU cost ~10 ns per element; for
SASRec's dropout on [B, H, N, N] attention weights that was a third of the training step.
Here the mask comes from a SplitMix-style hash of the element index, keyed by two 32-bit
seeds drawn from the JAX key: a handful of fused integer ops per element. Masks are
deterministic in the key (exact resume holds) and pass the uniformity checks in
`tests/test_hstu_models.py`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 pseudo-random bits of `shape` (< 2**32 elements), a function of `key` only."""
    size = math.prod(shape)
    if size >= 1 << 32:
        raise ValueError(f"hash_bits: {size} elements exceed 2**32")
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    counter = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return _mix32(_mix32(counter * jnp.uint32(0x9E3779B9) + seeds[0]) ^ seeds[1])


class Dropout(nnx.Module):
    """Inverted dropout like `nnx.Dropout` (same call signature), with `hash_bits` masks."""

    def __init__(self, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = rate

    def __call__(
        self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if rngs is None:
            raise ValueError(
                "Dropout: `rngs` with a 'dropout' stream is required when not deterministic"
            )
        threshold = jnp.uint32(min(round(self.rate * 2.0**32), 2**32 - 1))
        keep = hash_bits(rngs.dropout(), x.shape) >= threshold
        return jnp.where(keep, x * (1.0 / (1.0 - self.rate)), jnp.zeros_like(x))
