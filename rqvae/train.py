r"""Trains an RQ-VAE on an item-embedding matrix and exports semantic IDs.

  python -m rqvae.train --embeddings=items.npy --out=runs/rqvae [--dedup=reassign]

Runs on the shared loop (`eval.training.fit`): every `eval_every` steps the whole
catalogue is encoded (reconstruction loss, codebook usage, perplexity, collisions are
logged), the state with the lowest reconstruction loss is kept as `best`, and codes unused
since the previous evaluation are re-seeded (dead-code restarts; their state is what
`latest` holds). `--out` is a run folder (`run.json`, `metrics.jsonl`,
`checkpoints/{latest,best}`, `result.json`) plus `semantic_ids.json` (the best model's raw
L-level codes, collisions kept) and, with --dedup=extra|reassign,
`semantic_ids_<dedup>.json` (collision-free, see rqvae.ids). A rerun resumes; a finished
run is left alone. `python -m rqvae.evaluate --run=<out>` reloads and re-encodes.

`--mesh=data:8` trains data parallel over the devices of the run (in a multi-process run,
by default, over all of them): each process reads its devices' rows of every batch, and
the catalogue's encodings are split over `data` and gathered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx
from jax.sharding import Mesh

from eval import cli
from eval.allocator import reexec_with_tcmalloc
from eval.data.examples import ArraySource, batches
from eval.distributed import define_mesh_flag, global_array, replicate, run_mesh, to_host
from eval.errors import FlagError
from eval.training import (
    LoopConfig,
    RunDir,
    Task,
    TrainState,
    fit,
    input_path,
    load_run_checkpoint,
    read_run,
)
from eval.training.flags import (
    config_defaults,
    config_flag_values,
    define_training_flags,
    total_steps,
    training_flag_values,
)
from eval.training.optim import OptimizerConfig, make_optimizer
from rqvae import ids
from rqvae.model import RQVAE, RQVAEConfig, config_from_dict
from rqvae.stats import code_stats


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training options; `model` holds the architecture."""

    model: RQVAEConfig = RQVAEConfig()
    num_epochs: int = 1000
    max_steps: int | None = None  # when set, overrides num_epochs
    batch_size: int = 1024
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    eval_every: int = 1000  # steps; also the window for dead-code restarts
    patience: int | None = None  # evaluations without a lower reconstruction loss
    kmeans_init: bool = True
    kmeans_init_method: str = "kmeans++"  # kmeans++ | random
    kmeans_iters: int = 25
    kmeans_max_items: int = 65536  # k-means runs on a random subset this large
    restart_dead_codes: bool = True
    gumbel_tau_start: float = 1.0  # exponential anneal to tau_end over training
    gumbel_tau_end: float = 0.1
    eval_chunk: int = 8192  # items per forward pass at evaluation

    def __post_init__(self):
        if self.num_epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError(
                f"TrainConfig: num_epochs, batch_size, eval_every must be >= 1, got {self}"
            )


def gumbel_tau(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Exponential temperature schedule tau_start -> tau_end over total_steps."""
    frac = min(step / max(total_steps - 1, 1), 1.0)
    return cfg.gumbel_tau_start * (cfg.gumbel_tau_end / cfg.gumbel_tau_start) ** frac


def rqvae_loss(model: RQVAE, batch: dict[str, jax.Array], rng: jax.Array):
    """`(loss, aux)` of a batch `x` [B, D] at Gumbel temperature `tau` (the step's rng)."""
    loss, aux = model.loss(batch["x"], tau=batch["tau"], key=rng)
    keep = ("recon_loss", "vq_loss", "codes", "residuals")
    return loss, {k: aux[k] for k in keep}


def update_usage_and_ema(model: RQVAE, aux: dict[str, jax.Array]) -> None:
    """After the optimizer update: code usage counts and EMA codebooks."""
    model.update_usage_and_ema(aux["codes"], aux["residuals"])


_restart = nnx.jit(RQVAE.restart_dead_codes)


@nnx.jit
def _eval_chunk(model: RQVAE, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(codes [B, L], residuals [B, L, D], per-item reconstruction error [B])."""
    x_hat, q = model(x)
    err = (x_hat - model.normalize(x)) ** 2
    recon = jnp.sum(err, -1) if model.config.recon == "sum" else jnp.mean(err, -1)
    return q["codes"], q["residuals"], recon


def encode_items(
    model: RQVAE, x: np.ndarray, chunk: int = 8192, mesh: Mesh | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Codes [N, L], residuals [N, L, D] and mean reconstruction loss of all items.

    Runs fixed-size chunks (the last one padded) so only one shape is compiled; with `mesh`
    (the model replicated over it) each chunk's rows are split over its 'data' axis and
    the results gathered.
    """
    n = x.shape[0]
    chunk = min(chunk, n)
    if mesh is not None:
        chunk = -(-chunk // mesh.shape["data"]) * mesh.shape["data"]
    pad = -n % chunk
    xp = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]) if pad else x

    def put(rows: np.ndarray) -> jax.Array:
        if mesh is None:
            return jnp.asarray(rows)
        return global_array(rows, jax.NamedSharding(mesh, jax.P("data")))

    outs = [to_host(_eval_chunk(model, put(xp[i : i + chunk]))) for i in range(0, len(xp), chunk)]
    codes, res, recon = (np.concatenate([o[j] for o in outs])[:n] for j in range(3))
    return codes, res, float(recon.mean())


def evaluate_codes(
    model: RQVAE, x: np.ndarray, chunk: int = 8192, mesh: Mesh | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """(codes [N, L], {"recon_loss", usage, perplexity, collisions, ...}) of every item
    (`mesh`: as in `encode_items`)."""
    codes, _, recon = encode_items(model, x, chunk, mesh)
    return codes, {"recon_loss": recon, **code_stats(codes, model.config.codebook_size)}


def _checked(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"embeddings must be a finite [N, D] matrix, got shape {x.shape}")
    return x


def _keys(seed: int) -> dict[str, jax.Array]:
    """The seed's streams (the step stream is the loop's `fold_in(key(seed), step)`; its old
    slot "steps" is kept so that the other streams, hence init and restarts, are unchanged)."""
    names = ("init", "kmeans", "steps", "restart", "sample")
    return dict(zip(names, jax.random.split(jax.random.key(seed), len(names)), strict=True))


def init_model(x: np.ndarray, config: TrainConfig) -> RQVAE:
    """A fresh RQ-VAE for inputs x: standardisation moments and k-means codebooks (seeded)."""
    keys = _keys(config.seed)
    init_key, kmeans_key, sample_key = keys["init"], keys["kmeans"], keys["sample"]
    model = RQVAE(x.shape[1], config.model, rngs=nnx.Rngs(params=init_key))
    x_dev = jnp.asarray(x)
    if config.model.standardize:
        model.set_standardization(x_dev)
    if config.kmeans_init:
        sub = jax.random.permutation(sample_key, len(x))[: config.kmeans_max_items]
        model.init_codebooks_kmeans(
            x_dev[sub], kmeans_key, iters=config.kmeans_iters, init=config.kmeans_init_method
        )
    return model


def _state(model: RQVAE, config: TrainConfig, steps: int, mesh: Mesh | None = None) -> TrainState:
    opt = OptimizerConfig(learning_rate=config.learning_rate, weight_decay=config.weight_decay)
    return TrainState(model, make_optimizer(opt, steps), mesh=mesh)


def train_rqvae(
    embeddings: np.ndarray, config: TrainConfig = TrainConfig(), run: RunDir | None = None,
    progress: bool = False, mesh: Mesh | None = None,
) -> tuple[RQVAE, np.ndarray, list[dict[str, Any]]]:  # fmt: skip
    """Trains an RQ-VAE on embeddings [N, D]; returns (best model, its codes [N, L], history).
    `mesh` (axis 'data'): data parallel over its devices, every process's of the run.

    history: the evaluations of this call (step, recon_loss, usage, perplexity,
    unique_item_share, collision_groups, max_group, unique_ids, restarted per level).
    """
    x = _checked(embeddings)
    batch_size = min(config.batch_size, len(x))
    total = total_steps(len(x) // batch_size, config.num_epochs, config.max_steps)
    state = _state(init_model(x, config), config, total, mesh)
    x_dev = jnp.asarray(x) if mesh is None else replicate(x, mesh)
    restart_key = _keys(config.seed)["restart"]
    history: list[dict[str, Any]] = []

    def source(start: int):
        loader = batches(
            ArraySource({"x": x}), batch_size, seed=config.seed, num_epochs=None,
            start_batch=start, rows=state.shard_rows(batch_size),
        )  # fmt: skip
        for step, batch in enumerate(loader, start):
            yield {**batch, "tau": np.float32(gumbel_tau(step, total, config))}

    def validate(model: RQVAE) -> dict[str, Any]:
        history.append(evaluate_codes(model, x, config.eval_chunk, mesh)[1])
        return history[-1]

    def restart(model: RQVAE, step: int) -> dict[str, Any]:
        restarted = [0] * config.model.num_levels
        if config.restart_dead_codes and step < total:
            restarted = np.asarray(
                _restart(model, x_dev, jax.random.fold_in(restart_key, step))
            ).tolist()
        history[-1] |= {"step": step, "restarted": restarted}
        logging.info("step %d recon=%.5f usage=%s unique_items=%.4f collision_groups=%d restarted=%s",
                     step, history[-1]["recon_loss"], [round(u, 3) for u in history[-1]["usage"]],
                     history[-1]["unique_item_share"], history[-1]["collision_groups"], restarted)  # fmt: skip
        return {"restarted": restarted}

    task = Task(loss=rqvae_loss, batches=source, validate=validate, after_update=update_usage_and_ema,
                after_eval=restart)  # fmt: skip
    loop = LoopConfig(total, config.eval_every, config.patience, "recon_loss", "min", seed=config.seed,
                      progress=progress, desc="rqvae")  # fmt: skip
    fit(state, task, loop, run)
    model = state.model()
    codes, _ = evaluate_codes(model, x, config.eval_chunk, mesh)
    return model, codes, history


def collision_free_codes(
    model: RQVAE, embeddings: np.ndarray, codes: np.ndarray, method: str,
    mesh: Mesh | None = None,
) -> np.ndarray:  # fmt: skip
    """Collision-free IDs: method "extra" (TIGER extra level) or "reassign" (last level)."""
    if method == "extra":
        return ids.append_collision_level(codes)
    if method == "reassign":
        _, residuals, _ = encode_items(model, np.asarray(embeddings, np.float32), mesh=mesh)
        return ids.reassign_last_level(codes, residuals[:, -1], to_host(model.codebooks[...])[-1])
    raise ValueError(f"collision-free method {method!r}: expected 'extra' or 'reassign'")


def run_config(embeddings: str, config: TrainConfig, dedup: str) -> dict[str, Any]:
    """run.json `config` of an `rqvae.train` run (the embeddings file is named by its hash too)."""
    digest = hashlib.sha256(pathlib.Path(embeddings).read_bytes()).hexdigest()[:16]
    return {"embeddings": input_path(embeddings), "embeddings_sha256": digest,
            "train": dataclasses.asdict(config), "dedup": dedup}  # fmt: skip


def config_of_run(config: dict[str, Any]) -> TrainConfig:
    """The TrainConfig recorded in a run's run.json `config`."""
    train = dict(config["train"])
    return TrainConfig(**{**train, "model": config_from_dict(train["model"])})


def load_run(run_dir: str | pathlib.Path, which: str = "best") -> tuple[RQVAE, np.ndarray, int]:
    """(model, embeddings, step) of an `rqvae.train` run folder's checkpoint `which`."""
    config = read_run(run_dir)["config"]
    x = _checked(np.load(config["embeddings"]))
    cfg = config_of_run(config)
    state = _state(RQVAE(x.shape[1], cfg.model, rngs=nnx.Rngs(0)), cfg, 1)
    step = load_run_checkpoint(run_dir, state, which)
    return state.model(), x, step


def train_run(embeddings: str, out: str, config: TrainConfig, dedup: str = "none",
              overwrite: bool = False, progress: bool = True,
              mesh: str | None = None) -> dict[str, Any]:  # fmt: skip
    """`python -m rqvae.train`: trains into the run folder `out`, writes the index files
    (process 0). `mesh`: `--mesh` (not part of the run's config: N processes resume on M)."""
    emb = np.load(embeddings)
    if emb.ndim != 2:
        raise FlagError(f"--embeddings={embeddings}: expected a 2-D array, got {emb.shape}")
    device_mesh = run_mesh(mesh, ("data",))
    info = {"mesh": dict(device_mesh.shape) if device_mesh else None,
            "processes": jax.process_count()}  # fmt: skip
    outputs = ("semantic_ids.json", f"semantic_ids_{dedup}.json")
    with RunDir(
        out, "rqvae", run_config(embeddings, config, dedup), info=info, overwrite=overwrite,
        outputs=outputs,
    ) as run:  # fmt: skip
        if run.result is not None:
            logging.info("--out=%s is a finished run; its result.json is kept", run.path)
            return run.result
        model, codes, _ = train_rqvae(emb, config, run, progress, device_mesh)
        indexes = {"semantic_ids.json": codes}
        if dedup != "none":
            indexes[f"semantic_ids_{dedup}.json"] = collision_free_codes(
                model, emb, codes, dedup, device_mesh
            )
        if run.primary:
            for name, index in indexes.items():
                ids.write_index(run.path / name, index)
        result = {
            "items": len(codes),
            **evaluate_codes(model, emb, config.eval_chunk, device_mesh)[1],
        }
        run.write_result(result)
        return result


def _define_flags() -> None:
    t, m = TrainConfig(), RQVAEConfig()
    define_training_flags(config_defaults(t), skip=("dataset", "data_dir"), required=("out",))
    flags.DEFINE_string(
        "embeddings", None, "Item embeddings, .npy float matrix [num_items, dim].", required=True
    )
    flags.DEFINE_integer("num_levels", m.num_levels, "Quantisation levels L.")
    flags.DEFINE_integer("codebook_size", m.codebook_size, "Codes per level K.")
    flags.DEFINE_integer("code_dim", m.code_dim, "Latent / code dimension.")
    flags.DEFINE_list(
        "hidden_dims", [str(h) for h in m.hidden_dims], "Encoder hidden sizes (decoder mirrors)."
    )
    flags.DEFINE_enum("activation", m.activation, ["relu", "silu"], "MLP activation.")
    flags.DEFINE_float("weight_decay", t.weight_decay, "AdamW weight decay.")
    flags.DEFINE_float("beta", m.beta, "Commitment weight.")
    flags.DEFINE_enum(
        "quantizer", m.quantizer, ["ste", "rotation", "gumbel"], "Gradient estimator."
    )
    flags.DEFINE_bool("ema", m.ema, "EMA codebook updates instead of the codebook loss.")
    flags.DEFINE_bool("standardize", m.standardize, "Standardise each input dimension.")
    flags.DEFINE_enum(
        "recon", m.recon, ["sum", "mean"], "Reconstruction loss: sum or mean over dims."
    )
    flags.DEFINE_bool("kmeans_init", t.kmeans_init, "Initialise codebooks by k-means on residuals.")
    flags.DEFINE_enum(
        "kmeans_init_method", t.kmeans_init_method, ["kmeans++", "random"], "k-means seeding."
    )
    flags.DEFINE_bool(
        "restart_dead_codes", t.restart_dead_codes, "Re-seed codes unused over an eval window."
    )
    flags.DEFINE_enum("dedup", "none", ["none", "extra", "reassign"],
                      "Also write collision-free IDs to semantic_ids_<dedup>.json.")  # fmt: skip
    define_mesh_flag(("data",), "data:8")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    shared = training_flag_values(skip=("dataset", "data_dir"))
    model = RQVAEConfig(
        hidden_dims=tuple(int(h) for h in f.hidden_dims), code_dim=f.code_dim, num_levels=f.num_levels,
        codebook_size=f.codebook_size, activation=f.activation, quantizer=f.quantizer, ema=f.ema,
        beta=f.beta, recon=f.recon, standardize=f.standardize,
    )  # fmt: skip
    config = TrainConfig(
        model=model, weight_decay=f.weight_decay, kmeans_init=f.kmeans_init,
        kmeans_init_method=f.kmeans_init_method, restart_dead_codes=f.restart_dead_codes,
        **config_flag_values(),
    )  # fmt: skip
    result = train_run(
        f.embeddings, shared["out"], config, f.dedup, shared["overwrite"], mesh=f.mesh
    )
    print(
        " ".join(
            f"{k}={result[k]}" for k in ("items", "recon_loss", "unique_ids", "max_group", "usage")
        )
    )


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
