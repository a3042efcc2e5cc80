"""Trains an RQ-VAE on an item-embedding matrix and exports semantic IDs.

  python -m rqvae.train --embeddings=items.npy --out=runs/rqvae

Writes to --out: `model/` (orbax checkpoint of nnx.state), `model_config.json`,
`history.json`, `semantic_ids.json` (raw L-level codes, collisions kept) and, with
--dedup=extra|reassign, `semantic_ids_<dedup>.json` (collision-free, see rqvae.ids).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx

from eval.allocator import reexec_with_tcmalloc
from rqvae import ids
from rqvae.model import RQVAE, RQVAEConfig, config_from_dict
from rqvae.stats import code_stats


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training options; `model` holds the architecture."""

    model: RQVAEConfig = RQVAEConfig()
    epochs: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    eval_every: int = 1000  # steps; also the window for dead-code restarts
    kmeans_init: bool = True
    kmeans_init_method: str = "kmeans++"  # kmeans++ | random
    kmeans_iters: int = 25
    kmeans_max_items: int = 65536  # k-means runs on a random subset this large
    restart_dead_codes: bool = True
    gumbel_tau_start: float = 1.0  # exponential anneal to tau_end over training
    gumbel_tau_end: float = 0.1
    eval_chunk: int = 8192  # items per forward pass at evaluation


def gumbel_tau(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Exponential temperature schedule tau_start -> tau_end over total_steps."""
    frac = min(step / max(total_steps - 1, 1), 1.0)
    return cfg.gumbel_tau_start * (cfg.gumbel_tau_end / cfg.gumbel_tau_start) ** frac


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def train_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    x_all: jax.Array,
    idx: jax.Array,
    step: jax.Array,
    key: jax.Array,
    tau: jax.Array,
) -> tuple[nnx.State, dict[str, jax.Array]]:
    """One AdamW step on the batch x_all[idx] (plus EMA / usage updates).

    step seeds the Gumbel noise (fold_in(key, step)); tau is its temperature.

    Works on the split (model, optimizer) state, donated: plain jax.jit over
    nnx.split/merge avoids nnx.jit's per-call graph traversal (~25 ms per step here).
    """
    model, optimizer = nnx.merge(graphdef, state)
    x = x_all[idx]
    step_key = jax.random.fold_in(key, step)

    def loss_fn(model: RQVAE):
        return model.loss(x, tau=tau, key=step_key)

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    model.update_usage_and_ema(aux["codes"], aux["residuals"])
    return nnx.state((model, optimizer)), dict(
        loss=loss, recon_loss=aux["recon_loss"], vq_loss=aux["vq_loss"]
    )


def batch_indices(n: int, batch_size: int, epochs: int, seed: int) -> grain.MapDataset:
    """Deterministic batches of item indices: a fresh seeded permutation per epoch, the
    last n % batch_size items of each permutation dropped (static batch shape).

    One grain record per batch: per-item records (MapDataset.shuffle().batch()) cost
    ~0.1 ms each in Python, which dominated the step time.
    """
    steps_per_epoch = n // batch_size

    @functools.lru_cache(maxsize=2)
    def permutation(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)

    def batch(step: int) -> np.ndarray:
        epoch, i = divmod(int(step), steps_per_epoch)
        return permutation(epoch)[i * batch_size : (i + 1) * batch_size]

    return grain.MapDataset.range(epochs * steps_per_epoch).map(batch)


@functools.cache
def _adamw(lr: float, weight_decay: float) -> optax.GradientTransformation:
    """One transform object per setting: it is static in the optimizer's graphdef, so
    reusing it lets repeated train_rqvae calls hit the jit cache."""
    return optax.adamw(lr, weight_decay=weight_decay)


_restart = nnx.jit(RQVAE.restart_dead_codes)


@nnx.jit
def _eval_chunk(model: RQVAE, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(codes [B, L], residuals [B, L, D], per-item reconstruction error [B])."""
    x_hat, q = model(x)
    err = (x_hat - model.normalize(x)) ** 2
    recon = jnp.sum(err, -1) if model.config.recon == "sum" else jnp.mean(err, -1)
    return q["codes"], q["residuals"], recon


def encode_items(
    model: RQVAE, x: np.ndarray, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray, float]:
    """Codes [N, L], residuals [N, L, D] and mean reconstruction loss of all items.

    Runs fixed-size chunks (the last one padded) so only one shape is compiled.
    """
    n = x.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    xp = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]) if pad else x
    outs = [_eval_chunk(model, jnp.asarray(xp[i : i + chunk])) for i in range(0, len(xp), chunk)]
    codes, res, recon = (np.concatenate([np.asarray(o[j]) for o in outs])[:n] for j in range(3))
    return codes, res, float(recon.mean())


def _log_eval(step: int, recon: float, s: dict[str, Any], restarted: list[int]) -> None:
    usage = " ".join(f"{u:.3f}" for u in s["usage"])
    ppl = " ".join(f"{p:.1f}" for p in s["perplexity"])
    logging.info(
        "step %d recon=%.5f usage=[%s] perplexity=[%s] unique_items=%.4f "
        "collision_groups=%d max_group=%d restarted=%s",
        step,
        recon,
        usage,
        ppl,
        s["unique_item_share"],
        s["collision_groups"],
        s["max_group"],
        restarted,
    )


def train_rqvae(
    embeddings: np.ndarray, config: TrainConfig = TrainConfig()
) -> tuple[RQVAE, np.ndarray, list[dict[str, Any]]]:
    """Trains an RQ-VAE on embeddings [N, D]; returns (model, codes [N, L], history).

    history holds one dict per evaluation (every `eval_every` steps and at the end):
    step, loss, recon_loss, usage, perplexity, unique_item_share, collision_groups,
    max_group, unique_ids, restarted (dead codes re-seeded per level), elapsed_s.
    """
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"embeddings must be a finite [N, D] matrix, got shape {x.shape}")
    n = x.shape[0]
    if config.epochs < 1 or config.batch_size < 1 or config.eval_every < 1:
        raise ValueError(f"TrainConfig: epochs, batch_size, eval_every must be >= 1, got {config}")
    mcfg = config.model
    batch_size = min(config.batch_size, n)
    total_steps = config.epochs * (n // batch_size)
    key = jax.random.key(config.seed)
    init_key, kmeans_key, train_key, restart_key, sample_key = jax.random.split(key, 5)

    model = RQVAE(x.shape[1], mcfg, rngs=nnx.Rngs(params=init_key))
    x_dev = jnp.asarray(x)
    if mcfg.standardize:
        model.set_standardization(x_dev)
    if config.kmeans_init:
        sub = jax.random.permutation(sample_key, n)[: config.kmeans_max_items]
        model.init_codebooks_kmeans(
            x_dev[sub], kmeans_key, iters=config.kmeans_iters, init=config.kmeans_init_method
        )
    optimizer = nnx.Optimizer(model, _adamw(config.lr, config.weight_decay), wrt=nnx.Param)

    batches = batch_indices(n, batch_size, config.epochs, config.seed)
    history: list[dict[str, Any]] = []
    start = time.time()
    graphdef, state = nnx.split((model, optimizer))
    for step in range(1, total_steps + 1):
        tau = np.float32(gumbel_tau(step - 1, total_steps, config))
        state, metrics = train_step(
            graphdef, state, x_dev, batches[step - 1], np.int32(step - 1), train_key, tau
        )
        if step % config.eval_every == 0 or step == total_steps:
            nnx.update((model, optimizer), state)
            codes, _, recon = encode_items(model, x, config.eval_chunk)
            s = code_stats(codes, mcfg.codebook_size)
            restarted = [0] * mcfg.num_levels
            if config.restart_dead_codes and step < total_steps:
                restarted = np.asarray(
                    _restart(model, x_dev, jax.random.fold_in(restart_key, step))
                ).tolist()
                state = nnx.state((model, optimizer))
            history.append(
                dict(
                    step=step,
                    loss=float(metrics["loss"]),
                    recon_loss=recon,
                    restarted=restarted,
                    elapsed_s=time.time() - start,
                    **s,
                )
            )
            _log_eval(step, recon, s, restarted)
    return model, codes, history


def save_model(model: RQVAE, out_dir: str | Path, input_dim: int) -> None:
    """Orbax checkpoint of nnx.state(model) in out_dir/model plus out_dir/model_config.json."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model_config.json").write_text(
        json.dumps(dict(input_dim=input_dim, **dataclasses.asdict(model.config)), indent=1)
    )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / "model", nnx.state(model), force=True)
    checkpointer.wait_until_finished()


def load_model(out_dir: str | Path) -> RQVAE:
    """Restores a model written by save_model."""
    out_dir = Path(out_dir).absolute()
    cfg = json.loads((out_dir / "model_config.json").read_text())
    input_dim = cfg.pop("input_dim")
    abstract = nnx.eval_shape(lambda: RQVAE(input_dim, config_from_dict(cfg), rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    state = ocp.StandardCheckpointer().restore(out_dir / "model", abstract_state)
    return nnx.merge(graphdef, state)


def collision_free_codes(
    model: RQVAE, embeddings: np.ndarray, codes: np.ndarray, method: str
) -> np.ndarray:
    """Collision-free IDs: method "extra" (TIGER extra level) or "reassign" (last level)."""
    if method == "extra":
        return ids.append_collision_level(codes)
    if method == "reassign":
        _, residuals, _ = encode_items(model, np.asarray(embeddings, np.float32))
        return ids.reassign_last_level(
            codes, residuals[:, -1], np.asarray(model.codebooks[...][-1])
        )
    raise ValueError(f"collision-free method {method!r}: expected 'extra' or 'reassign'")


def _define_flags() -> None:
    flags.DEFINE_string("embeddings", None, "Item embeddings, .npy float matrix [num_items, dim].")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_integer("num_levels", 3, "Quantisation levels L.")
    flags.DEFINE_integer("codebook_size", 256, "Codes per level K.")
    flags.DEFINE_integer("code_dim", 32, "Latent / code dimension.")
    flags.DEFINE_list(
        "hidden_dims", ["512", "256", "128"], "Encoder hidden sizes (decoder mirrors)."
    )
    flags.DEFINE_enum("activation", "relu", ["relu", "silu"], "MLP activation.")
    flags.DEFINE_integer("epochs", 1000, "Training epochs.")
    flags.DEFINE_integer("batch_size", 1024, "Batch size (capped at the number of items).")
    flags.DEFINE_float("lr", 1e-3, "AdamW learning rate.")
    flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
    flags.DEFINE_float("beta", 0.25, "Commitment weight.")
    flags.DEFINE_integer("seed", 0, "Random seed (init, k-means, shuffling, Gumbel noise).")
    flags.DEFINE_enum("quantizer", "ste", ["ste", "rotation", "gumbel"], "Gradient estimator.")
    flags.DEFINE_bool("ema", False, "EMA codebook updates instead of the codebook loss.")
    flags.DEFINE_bool("standardize", False, "Standardise each input dimension.")
    flags.DEFINE_enum(
        "recon", "sum", ["sum", "mean"], "Reconstruction loss: sum or mean over dims."
    )
    flags.DEFINE_integer("eval_every", 1000, "Steps between evaluations / dead-code restarts.")
    flags.DEFINE_bool("kmeans_init", True, "Initialise codebooks by k-means on residuals.")
    flags.DEFINE_enum("kmeans_init_method", "kmeans++", ["kmeans++", "random"], "k-means seeding.")
    flags.DEFINE_bool("restart_dead_codes", True, "Re-seed codes unused over an eval window.")
    flags.DEFINE_enum(
        "dedup",
        "none",
        ["none", "extra", "reassign"],
        "Also write collision-free IDs to semantic_ids_<dedup>.json.",
    )


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    del argv
    if not f.embeddings or not f.out:
        raise app.UsageError("--embeddings=FILE.npy and --out=DIR are required")
    emb = np.load(f.embeddings)
    if emb.ndim != 2:
        raise app.UsageError(f"--embeddings={f.embeddings}: expected a 2-D array, got {emb.shape}")
    config = TrainConfig(
        model=RQVAEConfig(
            hidden_dims=tuple(int(h) for h in f.hidden_dims),
            code_dim=f.code_dim,
            num_levels=f.num_levels,
            codebook_size=f.codebook_size,
            activation=f.activation,
            quantizer=f.quantizer,
            ema=f.ema,
            beta=f.beta,
            recon=f.recon,
            standardize=f.standardize,
        ),
        epochs=f.epochs,
        batch_size=f.batch_size,
        lr=f.lr,
        weight_decay=f.weight_decay,
        seed=f.seed,
        eval_every=f.eval_every,
        kmeans_init=f.kmeans_init,
        kmeans_init_method=f.kmeans_init_method,
        restart_dead_codes=f.restart_dead_codes,
    )
    model, codes, history = train_rqvae(emb, config)
    out = Path(f.out)
    save_model(model, out, emb.shape[1])
    (out / "history.json").write_text(json.dumps(history, indent=1))
    ids.write_index(out / "semantic_ids.json", codes)
    if f.dedup != "none":
        ids.write_index(
            out / f"semantic_ids_{f.dedup}.json",
            collision_free_codes(model, emb, codes, f.dedup),
        )
    last = history[-1]
    logging.info(
        "wrote %s: %d items, %.1f steps/s",
        out,
        len(codes),
        last["step"] / max(last["elapsed_s"], 1e-9),
    )


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    app.run(main)
