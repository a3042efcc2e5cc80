"""HSTU (Hierarchical Sequential Transduction Unit) sequential recommender in Flax NNX.

Follows the research model of facebookresearch/generative-recommenders
(`generative_recommenders/research/modeling/sequential/hstu.py`, arXiv:2402.17152) on
dense right-padded batches:

* input: `item_emb[ids] * sqrt(D) + pos_emb[0..N)` (or aligned on the newest item:
  `positions`), dropout, zeroed at padding (id 0);
* each layer: `u, v, q, k = split(SiLU(LN(x) @ W_uvqk))`, pointwise causal attention with a
  per-layer relative position + bucketed time bias shared across heads, then
  `x + o(Dropout(LN(attn) * u))` (LayerNorms without parameters, eps 1e-6);
* output: zero at padding, L2-normalised; scores are cosines with L2-normalised items;
* loss (`hstu.losses`): sampled softmax (uniform negatives, temperature 0.05), every
  position predicting the next item.

Timestamps follow the reference layout: `timestamps[b, lengths[b]]` holds the request
(target) timestamp when `lengths[b] < N` (see `scatter_target_timestamps`).
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hstu.attention import Impl, NNorm, hstu_attention
from hstu.dropout import Dropout
from hstu.items import ItemScores, Positions, l2_normalize, position_ids
from hstu.losses import LossConfig

LN_EPS = 1e-6
TIME_BUCKET_DIVISOR = 0.301

# Published settings: the architecture (`HSTUConfig` fields) and the optimisation
# (`hstu.trainer.TrainConfig` fields); `hstu.models.PRESETS` gathers every model's.
_TRAIN_ML = dict(learning_rate=1e-3, b2=0.98, weight_decay=0.0, batch_size=128, num_epochs=100)
PRESETS: dict[str, dict[str, Any]] = {
    "hstu-ml": dict(
        model="hstu",
        arch=dict(max_seq_len=200, embedding_dim=50, num_blocks=2, num_heads=1, attention_dim=50,
                  linear_dim=50, dropout_rate=0.2),
        train=_TRAIN_ML,
    ),
    "hstu-large-ml": dict(
        model="hstu",
        arch=dict(max_seq_len=200, embedding_dim=50, num_blocks=8, num_heads=2, attention_dim=25,
                  linear_dim=25, dropout_rate=0.2),
        train=_TRAIN_ML,
    ),
    # Amazon: the reference amzn-books settings (generative-recommenders configs: D 64,
    # history 50, dropout 0.5, 512 negatives, temperature 0.05, lr 1e-3) on the `hstu-ml`
    # block shape (2 blocks, 1 head, attention/linear 64); negatives per row, not per
    # position (a CPU-sized gather), patience 50 epochs as the eSASRec benchmark's models.
    "hstu-amazon": dict(
        model="hstu",
        arch=dict(max_seq_len=50, embedding_dim=64, num_blocks=2, num_heads=1, attention_dim=64,
                  linear_dim=64, dropout_rate=0.5, num_negatives=512, negatives_shared="sequence"),
        train=dict(learning_rate=1e-3, b2=0.98, weight_decay=0.0, batch_size=128, num_epochs=200,
                   patience=50),
    ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class HSTUConfig(LossConfig):
    """HSTU hyper-parameters (names follow the reference `HSTU.__init__`); the loss fields
    (`LossConfig`) default to the reference: sampled softmax, 128 uniform negatives, T 0.05."""

    num_items: int
    max_seq_len: int = 200
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    attention_dim: int = 50  # dqk
    linear_dim: int = 50  # dv
    dropout_rate: float = 0.2
    num_buckets: int = 128
    n_norm: NNorm = "padded"
    attention_impl: Impl = "xla"
    # True: the reference's L2-normalised outputs and items (cosine at `temperature`);
    # False: a learned LayerNorm on the outputs and raw item rows (SASRec's dot product).
    l2_norm_output: bool = True
    # Position embeddings from the oldest item ("start", the reference) or aligned on the
    # newest ("end"), as `SASRecConfig.positions`.
    positions: Positions = "start"


def _layer_norm(x: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm without learned scale / bias."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def time_buckets(
    timestamps: jax.Array,
    num_buckets: int,
    rows: tuple[int, int] | None = None,
    col_end: int | None = None,
) -> jax.Array:
    """[B, N] timestamps -> [B, N, N] int buckets of |ts[i+1] - ts[j]| (log base ~2).

    Follows the reference: timestamps are extended with a copy of the last one, and query
    i uses the *next* timestamp, so the last real item is compared at request time.
    `rows` = (start, end) and `col_end` select the block [start:end, :col_end].
    """
    n = timestamps.shape[1]
    r0, r1 = rows or (0, n)
    ext = jnp.concatenate([timestamps, timestamps[:, -1:]], axis=1)
    delta = jnp.abs(ext[:, r0 + 1 : r1 + 1, None] - timestamps[:, None, :col_end]).astype(
        jnp.float32
    )
    bucket = jnp.floor(jnp.log(jnp.maximum(delta, 1.0)) / TIME_BUCKET_DIVISOR).astype(jnp.int32)
    return jnp.clip(bucket, 0, num_buckets)


def scatter_target_timestamps(
    timestamps: jax.Array, lengths: jax.Array, target_timestamps: jax.Array
) -> jax.Array:
    """Writes each row's request timestamp at position `lengths[b]` (dropped if == N)."""
    rows = jnp.arange(timestamps.shape[0])
    return timestamps.at[rows, lengths].set(target_timestamps.astype(timestamps.dtype), mode="drop")


class RelativeBucketedTimeAndPositionBias(nnx.Module):
    """rab[b, i, j] = pos_w[j - i + N_max - 1] + ts_w[bucket(ts[i+1] - ts[j])]."""

    def __init__(self, max_seq_len: int, num_buckets: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.max_seq_len = max_seq_len
        self.num_buckets = num_buckets
        self.pos_w = nnx.Param(init(rngs.params(), (2 * max_seq_len - 1,)))
        self.ts_w = nnx.Param(init(rngs.params(), (num_buckets + 1,)))

    def __call__(
        self,
        timestamps: jax.Array,
        row_start: int = 0,
        row_end: int | None = None,
        col_end: int | None = None,
    ) -> jax.Array:
        """[B, N] timestamps -> rab [B, N, N], or its block [row_start:row_end, :col_end]."""
        n = timestamps.shape[1]
        if n > self.max_seq_len:
            raise ValueError(f"sequence length {n} exceeds max_seq_len {self.max_seq_len}")
        row_end = n if row_end is None else row_end
        col_end = n if col_end is None else col_end
        offsets = (
            jnp.arange(col_end)[None, :]
            - jnp.arange(row_start, row_end)[:, None]
            + self.max_seq_len
            - 1
        )
        pos_bias = self.pos_w[...][offsets]  # [rows, cols]
        buckets = time_buckets(timestamps, self.num_buckets, (row_start, row_end), col_end)
        return pos_bias[None] + self.ts_w[...][buckets]  # [B, rows, cols]


class HSTULayer(nnx.Module):
    """One sequential transduction unit (reference `SequentialTransductionUnitJagged`)."""

    def __init__(self, cfg: HSTUConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, dv, dqk = cfg.num_heads, cfg.linear_dim, cfg.attention_dim
        self.uvqk = nnx.Param(
            nnx.initializers.normal(0.02)(
                rngs.params(), (cfg.embedding_dim, 2 * h * dv + 2 * h * dqk)
            )
        )
        self.o = nnx.Linear(
            h * dv, cfg.embedding_dim, kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs
        )
        self.rel_attn_bias = RelativeBucketedTimeAndPositionBias(
            cfg.max_seq_len, cfg.num_buckets, rngs=rngs
        )
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(
        self,
        x: jax.Array,
        timestamps: jax.Array,
        lengths: jax.Array,
        *,
        deterministic: bool,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        b, n, d = x.shape
        h, dv, dqk = self.cfg.num_heads, self.cfg.linear_dim, self.cfg.attention_dim
        # Position-wise parts run on [B*N, D] token matrices: 2-D matmuls keep XLA:CPU's
        # weight gradients free of the transposes a 3-D dot_general gets (2x faster).
        tokens = x.reshape(b * n, d)
        uvqk = jax.nn.silu(_layer_norm(tokens) @ self.uvqk[...])
        u, v, q, k = jnp.split(uvqk, [h * dv, 2 * h * dv, 2 * h * dv + h * dqk], axis=-1)
        attn = hstu_attention(
            q.reshape(b, n, h, dqk),
            k.reshape(b, n, h, dqk),
            v.reshape(b, n, h, dv),
            functools.partial(self.rel_attn_bias, timestamps),  # blocks computed on demand
            lengths,
            n_norm=self.cfg.n_norm,
            impl=self.cfg.attention_impl,
        ).reshape(b * n, h * dv)
        y = self.dropout(u * _layer_norm(attn), deterministic=deterministic, rngs=rngs)
        return (self.o(y) + tokens).reshape(b, n, d)


class HSTU(nnx.Module, ItemScores):
    """HSTU encoder: `__call__(ids, timestamps, lengths) -> [B, N, D]`; items are scored by
    cosine (`ItemScores`), or by dot product against a LayerNorm-ed output when not
    `l2_norm_output`."""

    @property
    def normalize_items(self) -> bool:
        return self.cfg.l2_norm_output

    def __init__(self, cfg: HSTUConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.embedding_dim
        self.item_emb = nnx.Embed(
            cfg.num_items + 1,
            d,
            embedding_init=nnx.initializers.truncated_normal(0.02, lower=-2.0, upper=2.0),
            rngs=rngs,
        )
        pos_std = math.sqrt(1.0 / d)
        self.pos_emb = nnx.Embed(
            cfg.max_seq_len,
            d,
            embedding_init=nnx.initializers.truncated_normal(pos_std, lower=-2.0, upper=2.0),
            rngs=rngs,
        )
        self.emb_dropout = Dropout(cfg.dropout_rate)
        self.layers = nnx.List([HSTULayer(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
        self.last_norm = None if cfg.l2_norm_output else nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)

    def __call__(
        self,
        ids: jax.Array,
        timestamps: jax.Array,
        lengths: jax.Array,
        deterministic: bool = True,
        *,
        rngs: nnx.Rngs | None = None,
        users: jax.Array | None = None,
        item_table: jax.Array | None = None,
    ) -> jax.Array:
        """ids, timestamps [B, N] right-padded (0 = padding), lengths [B] -> [B, N, D];
        inputs are rows of `item_table` when given (training's dropped table)."""
        del users  # no user features
        n = ids.shape[1]
        if n > self.cfg.max_seq_len:
            raise ValueError(f"HSTU: input length {n} exceeds max_seq_len {self.cfg.max_seq_len}")
        valid = (ids != 0)[..., None]
        x = self.item_rows(ids, item_table) * math.sqrt(self.cfg.embedding_dim)
        x = x + self.pos_emb(position_ids(ids, self.cfg.max_seq_len, self.cfg.positions))
        x = self.emb_dropout(x, deterministic=deterministic, rngs=rngs) * valid
        for layer in self.layers:
            x = layer(x, timestamps, lengths, deterministic=deterministic, rngs=rngs)
        row_valid = (jnp.arange(n)[None, :] < lengths[:, None])[..., None]
        if self.last_norm is not None:
            return jnp.where(row_valid, self.last_norm(x), 0.0)
        return l2_normalize(jnp.where(row_valid, x, 0.0))
