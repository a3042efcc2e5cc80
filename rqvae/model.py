"""RQ-VAE (residual-quantised autoencoder) for semantic item IDs, in Flax NNX.

MLP encoder -> L levels of residual vector quantisation (K codes each) -> mirrored
MLP decoder, as in TIGER (Rajput et al. 2023). Gradient estimators through the
quantiser: straight-through (default), the rotation trick (Fifty et al. 2024) or
straight-through Gumbel-softmax; codebooks are learned by the codebook loss or by
EMA updates. Also: seeded k-means (k-means++ or random init, jitted Lloyd
iterations) codebook initialisation per level, and dead-code restarts.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

sg = jax.lax.stop_gradient

QUANTIZERS = ("ste", "rotation", "gumbel")
ACTIVATIONS = {"relu": jax.nn.relu, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
    """Architecture and loss options of the RQ-VAE."""

    hidden_dims: tuple[int, ...] = (512, 256, 128)
    code_dim: int = 32
    num_levels: int = 3
    codebook_size: int = 256
    activation: str = "relu"  # relu | silu
    quantizer: str = "ste"  # ste | rotation | gumbel
    ema: bool = False  # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    beta: float = 0.25  # commitment weight
    recon: str = "sum"  # sum | mean over input dims (always mean over items)
    standardize: bool = False  # per-dimension standardisation of the inputs

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise ValueError(
                f"RQVAEConfig.quantizer={self.quantizer!r}: expected one of {QUANTIZERS}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"RQVAEConfig.activation={self.activation!r}: expected one of {tuple(ACTIVATIONS)}"
            )
        if self.recon not in ("sum", "mean"):
            raise ValueError(f"RQVAEConfig.recon={self.recon!r}: expected 'sum' or 'mean'")
        if self.num_levels < 1 or self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError(
                f"RQVAEConfig: need num_levels>=1, codebook_size>=2, code_dim>=1, got {self}"
            )


class Codebook(nnx.Variable):
    """A codebook updated by EMA, not by the optimiser."""


class Stat(nnx.Variable):
    """Non-trainable state: standardisation moments, code usage, EMA statistics."""


def sq_dists(x: jax.Array, c: jax.Array) -> jax.Array:
    """Squared Euclidean distances [N, K] between rows of x [N, D] and c [K, D]."""
    return jnp.sum(x * x, -1, keepdims=True) - 2.0 * x @ c.T + jnp.sum(c * c, -1)


def rotation_trick(z: jax.Array, zq: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Returns zq in the forward pass; gradients reach z through a fixed rotation+scale.

    Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick":
    zq = s R z with R the rotation taking z/|z| onto zq/|zq| and s = |zq|/|z|, both
    treated as constants. R z = z - 2 w (w.z) + 2 q (u.z), u = z/|z|, q = zq/|zq|,
    w = (u + q)/|u + q|.
    """
    z_norm = jnp.linalg.norm(z, axis=-1, keepdims=True) + eps
    q_norm = jnp.linalg.norm(zq, axis=-1, keepdims=True) + eps
    u = sg(z / z_norm)
    q = sg(zq / q_norm)
    w = u + q
    w = sg(w / (jnp.linalg.norm(w, axis=-1, keepdims=True) + eps))
    rz = (
        z
        - 2.0 * w * jnp.sum(w * z, -1, keepdims=True)
        + 2.0 * q * jnp.sum(u * z, -1, keepdims=True)
    )
    return sg(q_norm / z_norm) * rz


def _kmeanspp_init(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k-means++ seeding: each new centre drawn with probability ~ squared distance."""
    n = x.shape[0]
    keys = jax.random.split(key, k)
    first = x[jax.random.randint(keys[0], (), 0, n)]
    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    d2 = jnp.sum((x - first) ** 2, -1)

    def body(i, carry):
        centers, d2 = carry
        total = jnp.sum(d2)
        p = jnp.where(total > 0, d2 / jnp.maximum(total, 1e-30), 1.0 / n)
        c = x[jax.random.choice(keys[i], n, p=p)]
        return centers.at[i].set(c), jnp.minimum(d2, jnp.sum((x - c) ** 2, -1))

    centers, _ = jax.lax.fori_loop(1, k, body, (centers, d2))
    return centers


@partial(jax.jit, static_argnames=("k", "iters", "init"))
def kmeans(
    x: jax.Array, k: int, key: jax.Array, *, iters: int = 25, init: str = "kmeans++"
) -> tuple[jax.Array, jax.Array]:
    """Seeded Lloyd k-means. Returns (centers [k, D], assignment [N]).

    init: "kmeans++" or "random" (k distinct rows, with replacement when N < k).
    Empty clusters keep their previous centre.
    """
    n = x.shape[0]
    if init == "kmeans++":
        centers = _kmeanspp_init(x, k, key)
    elif init == "random":
        centers = x[jax.random.choice(key, n, (k,), replace=n < k)]
    else:
        raise ValueError(f"kmeans init={init!r}: expected 'kmeans++' or 'random'")

    def lloyd(_, centers):
        assign = jnp.argmin(sq_dists(x, centers), -1)
        sums = jax.ops.segment_sum(x, assign, k)
        counts = jax.ops.segment_sum(jnp.ones((n,), x.dtype), assign, k)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)

    centers = jax.lax.fori_loop(0, iters, lloyd, centers)
    return centers, jnp.argmin(sq_dists(x, centers), -1)


def _mlp(dims: tuple[int, ...], rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)])


class RQVAE(nnx.Module):
    """MLP autoencoder with an L-level residual vector quantiser in the bottleneck."""

    def __init__(self, input_dim: int, config: RQVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        dims = (input_dim, *config.hidden_dims, config.code_dim)
        self.encoder = _mlp(dims, rngs)
        self.decoder = _mlp(dims[::-1], rngs)
        shape = (config.num_levels, config.codebook_size, config.code_dim)
        init = jax.random.normal(rngs.params(), shape) / jnp.sqrt(config.code_dim)
        self.codebooks = Codebook(init) if config.ema else nnx.Param(init)
        if config.ema:
            self.ema_count = Stat(jnp.ones(shape[:2]))
            self.ema_sum = Stat(jnp.array(init, copy=True))  # own buffer (donation)
        self.mean = Stat(jnp.zeros((input_dim,)))
        self.std = Stat(jnp.ones((input_dim,)))
        self.usage = Stat(jnp.zeros(shape[:2], jnp.int32))  # assignments since last restart

    def _act(self, h: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.config.activation](h)

    def set_standardization(self, x: jax.Array) -> None:
        """Stores per-dimension mean/std of x (constant dims get std 1)."""
        self.mean[...] = jnp.mean(x, 0)
        std = jnp.std(x, 0)
        self.std[...] = jnp.where(std < 1e-6, 1.0, std)

    def normalize(self, x: jax.Array) -> jax.Array:
        return (x - self.mean[...]) / self.std[...]

    def encode(self, x: jax.Array) -> jax.Array:
        """Normalised inputs [B, input_dim] -> latents [B, code_dim]."""
        for i, layer in enumerate(self.encoder):
            x = layer(x if i == 0 else self._act(x))
        return x

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents [B, code_dim] -> reconstruction in normalised input space."""
        for i, layer in enumerate(self.decoder):
            z = layer(z if i == 0 else self._act(z))
        return z

    def quantize(
        self, z: jax.Array, *, tau: float | jax.Array = 1.0, key: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """Residual quantisation of z [B, D].

        Returns dict with z_q (estimator output, forward value = sum of chosen codes),
        codes [B, L] int32, residuals [B, L, D] (input of each level),
        codebook_loss, commit_loss (summed over levels, mean over items).
        With quantizer="gumbel" and a key, codes are drawn by the Gumbel-max trick and
        gradients follow the tempered softmax (straight-through Gumbel-softmax).
        """
        cfg = self.config
        codebooks = self.codebooks[...]
        gumbel = cfg.quantizer == "gumbel" and key is not None
        r = z
        codes, residuals, gumbel_out = [], [], []
        codebook_loss = commit_loss = 0.0
        for level in range(cfg.num_levels):
            e = codebooks[level]
            logits = -sq_dists(r, e)
            if gumbel:
                logits = logits + jax.random.gumbel(jax.random.fold_in(key, level), logits.shape)
            idx = jnp.argmax(logits, -1)
            q = e[idx]
            if gumbel:
                soft = jax.nn.softmax(logits / tau, -1)
                hard = jax.nn.one_hot(idx, e.shape[0], dtype=soft.dtype)
                gumbel_out.append((hard + soft - sg(soft)) @ e)
            codebook_loss += jnp.mean(jnp.sum((sg(r) - q) ** 2, -1))
            commit_loss += jnp.mean(jnp.sum((r - sg(q)) ** 2, -1))
            codes.append(idx)
            residuals.append(r)
            r = r - sg(q)
        zq = sg(z - r)  # sum of the chosen codes
        if gumbel:
            z_q = sum(gumbel_out)
        elif cfg.quantizer == "rotation":
            z_q = rotation_trick(z, zq)
        else:  # straight-through (also gumbel at evaluation)
            z_q = z + sg(zq - z)
        return dict(
            z_q=z_q,
            codes=jnp.stack(codes, -1).astype(jnp.int32),
            residuals=jnp.stack(residuals, 1),
            codebook_loss=codebook_loss,
            commit_loss=commit_loss,
        )

    def __call__(
        self, x: jax.Array, *, tau: float | jax.Array = 1.0, key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Raw inputs [B, input_dim] -> (reconstruction in normalised space, quantiser outputs)."""
        q = self.quantize(self.encode(self.normalize(x)), tau=tau, key=key)
        return self.decode(q["z_q"]), q

    def loss(
        self, x: jax.Array, *, tau: float | jax.Array = 1.0, key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Total loss = recon + codebook (unless EMA) + beta * commitment; and aux outputs."""
        cfg = self.config
        x_hat, q = self(x, tau=tau, key=key)
        err = (x_hat - self.normalize(x)) ** 2
        recon = jnp.mean(jnp.sum(err, -1)) if cfg.recon == "sum" else jnp.mean(err)
        vq = cfg.beta * q["commit_loss"] + (0.0 if cfg.ema else q["codebook_loss"])
        return recon + vq, dict(q, recon_loss=recon, vq_loss=vq)

    def update_usage_and_ema(self, codes: jax.Array, residuals: jax.Array) -> None:
        """Counts code usage; with EMA, moves each code to the EMA mean of its residuals."""
        cfg = self.config
        onehot = jax.nn.one_hot(codes, cfg.codebook_size)  # [B, L, K]
        counts = jnp.sum(onehot, 0)
        self.usage[...] += counts.astype(jnp.int32)
        if cfg.ema:
            d = cfg.ema_decay
            sums = jnp.einsum("blk,bld->lkd", onehot, sg(residuals))
            self.ema_count[...] = d * self.ema_count[...] + (1 - d) * counts
            self.ema_sum[...] = d * self.ema_sum[...] + (1 - d) * sums
            n = jnp.sum(self.ema_count[...], -1, keepdims=True)
            eps = 1e-5  # Laplace smoothing keeps unused codes finite
            smoothed = (self.ema_count[...] + eps) / (n + cfg.codebook_size * eps) * n
            self.codebooks[...] = self.ema_sum[...] / smoothed[..., None]

    def set_codebooks(self, codebooks: jax.Array) -> None:
        self.codebooks[...] = codebooks
        if self.config.ema:
            self.ema_sum[...] = jnp.array(codebooks, copy=True)
            self.ema_count[...] = jnp.ones_like(self.ema_count[...])

    def init_codebooks_kmeans(
        self, x: jax.Array, key: jax.Array, *, iters: int = 25, init: str = "kmeans++"
    ) -> None:
        """k-means on the residuals of x (raw inputs) at each level, in order."""
        r = self.encode(self.normalize(x))
        centers = []
        for level in range(self.config.num_levels):
            c, assign = kmeans(
                r, self.config.codebook_size, jax.random.fold_in(key, level), iters=iters, init=init
            )
            centers.append(c)
            r = r - c[assign]
        self.set_codebooks(jnp.stack(centers))

    def restart_dead_codes(self, x: jax.Array, key: jax.Array) -> jax.Array:
        """Re-seeds codes unused since the last call with random residuals of x; resets usage.

        Returns the number of restarted codes per level [L].
        """
        cfg = self.config
        res = self.quantize(self.encode(self.normalize(x)))["residuals"]  # [N, L, D]
        pick = jax.random.randint(key, (cfg.num_levels, cfg.codebook_size), 0, x.shape[0])
        fresh = res[pick, jnp.arange(cfg.num_levels)[:, None]]  # [L, K, D]
        dead = self.usage[...] == 0
        new = jnp.where(dead[..., None], fresh, self.codebooks[...])
        self.codebooks[...] = new
        if cfg.ema:
            self.ema_sum[...] = jnp.where(dead[..., None], fresh, self.ema_sum[...])
            self.ema_count[...] = jnp.where(dead, 1.0, self.ema_count[...])
        self.usage[...] = jnp.zeros_like(self.usage[...])
        return jnp.sum(dead, -1)


def config_from_dict(d: dict[str, Any]) -> RQVAEConfig:
    return RQVAEConfig(**{**d, "hidden_dims": tuple(d["hidden_dims"])})
