"""HSTU (Hierarchical Sequential Transduction Unit) sequential recommender in Flax NNX.

Follows the research model of facebookresearch/generative-recommenders
(`generative_recommenders/research/modeling/sequential/hstu.py`, arXiv:2402.17152) on
dense right-padded batches:

* input: `item_emb[ids] * sqrt(D) + pos_emb[0..N)`, dropout, zeroed at padding (id 0);
* each layer: `u, v, q, k = split(SiLU(LN(x) @ W_uvqk))`, pointwise causal attention with a
  per-layer relative position + bucketed time bias shared across heads, then
  `x + o(Dropout(LN(attn) * u))` (LayerNorms without parameters, eps 1e-6);
* output: zero at padding, L2-normalised; scores are cosines with L2-normalised items;
* loss: sampled softmax (uniform negatives, temperature 0.05), every position predicting
  the next item.

Timestamps follow the reference layout: `timestamps[b, lengths[b]]` holds the request
(target) timestamp when `lengths[b] < N` (see `scatter_target_timestamps`).
"""

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from hstu.attention import Impl, NNorm, hstu_attention
from hstu.dropout import Dropout

L2_EPS = 1e-6
LN_EPS = 1e-6
TIME_BUCKET_DIVISOR = 0.301
NegativeSharing = Literal["position", "sequence", "batch"]

# Architecture presets. `model` selects the class, the rest are config fields.
PRESETS: dict[str, dict[str, Any]] = {
    "hstu-ml": dict(
        model="hstu",
        max_seq_len=200,
        embedding_dim=50,
        num_blocks=2,
        num_heads=1,
        attention_dim=50,
        linear_dim=50,
        dropout_rate=0.2,
    ),
    "hstu-large-ml": dict(
        model="hstu",
        max_seq_len=200,
        embedding_dim=50,
        num_blocks=8,
        num_heads=2,
        attention_dim=25,
        linear_dim=25,
        dropout_rate=0.2,
    ),
    # SASRec paper (Kang & McAuley 2018), Amazon setting: BCE with one negative.
    "sasrec-paper": dict(
        model="sasrec",
        max_seq_len=50,
        embedding_dim=50,
        num_blocks=2,
        num_heads=1,
        dropout_rate=0.5,
        loss="bce",
        l2_norm_output=False,
    ),
    # SASRec as the HSTU paper's baseline: L2-normalised, sampled softmax (128 negatives).
    "sasrec-ml": dict(
        model="sasrec",
        max_seq_len=200,
        embedding_dim=50,
        num_blocks=2,
        num_heads=1,
        dropout_rate=0.2,
        loss="sampled_softmax",
        l2_norm_output=True,
    ),
}


@dataclasses.dataclass(frozen=True)
class HSTUConfig:
    """HSTU hyper-parameters (names follow the reference `HSTU.__init__`)."""

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
    num_negatives: int = 128
    negatives_shared: NegativeSharing = "position"
    temperature: float = 0.05


def config_from_preset(name: str, **overrides: Any) -> tuple[str, Any]:
    """Returns (model kind, config) for preset `name` with non-None `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    fields = {k: v for k, v in PRESETS[name].items() if k != "model"}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    kind = PRESETS[name]["model"]
    if kind == "hstu":
        return kind, HSTUConfig(**fields)
    from hstu.sasrec import SASRecConfig

    return kind, SASRecConfig(**fields)


def l2_normalize(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
    """x / max(||x||, eps) along the last axis (reference `L2NormEmbeddingPostprocessor`).

    Written as x * rsqrt(max(|x|^2, eps^2)) so that zero rows (padding) get zero, not NaN,
    gradients.
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


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


class HSTU(nnx.Module):
    """HSTU encoder: `__call__(ids, timestamps, lengths) -> [B, N, D]` L2-normalised."""

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

    def __call__(
        self,
        ids: jax.Array,
        timestamps: jax.Array,
        lengths: jax.Array,
        deterministic: bool = True,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """ids, timestamps [B, N] right-padded (0 = padding), lengths [B] -> [B, N, D]."""
        n = ids.shape[1]
        if n > self.cfg.max_seq_len:
            raise ValueError(f"HSTU: input length {n} exceeds max_seq_len {self.cfg.max_seq_len}")
        valid = (ids != 0)[..., None]
        x = self.item_emb(ids) * math.sqrt(self.cfg.embedding_dim) + self.pos_emb(jnp.arange(n))
        x = self.emb_dropout(x, deterministic=deterministic, rngs=rngs) * valid
        for layer in self.layers:
            x = layer(x, timestamps, lengths, deterministic=deterministic, rngs=rngs)
        row_valid = (jnp.arange(n)[None, :] < lengths[:, None])[..., None]
        return l2_normalize(jnp.where(row_valid, x, 0.0))

    def item_embeddings(self, item_ids: jax.Array) -> jax.Array:
        """L2-normalised item embeddings [..., D]."""
        return l2_normalize(self.item_emb(item_ids))

    def item_scores(self, query: jax.Array, item_ids: jax.Array | None = None) -> jax.Array:
        """Cosine scores of query [..., D] against `item_ids` [..., C] or all items.

        With `item_ids=None` returns [..., num_items + 1] with padding item 0 set to -inf.
        """
        if item_ids is None:
            scores = query @ l2_normalize(self.item_emb.embedding[...]).T
            return scores.at[..., 0].set(-jnp.inf)
        return jnp.einsum("...d,...cd->...c", query, self.item_embeddings(item_ids))

    def loss(self, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Next-item sampled softmax loss on a training batch (dropout on)."""
        drop_rng, neg_rng = jax.random.split(rng)
        out = self(
            batch["ids"],
            batch["timestamps"],
            batch["lengths"],
            False,
            rngs=nnx.Rngs(dropout=drop_rng),
        )
        targets = batch["ids"][:, 1:]
        negatives = sample_negatives(
            neg_rng,
            targets.shape,
            self.cfg.num_items,
            self.cfg.num_negatives,
            self.cfg.negatives_shared,
        )
        loss = sampled_softmax_loss(
            out[:, :-1],
            self.item_embeddings(targets),
            self.item_embeddings(negatives),
            targets,
            negatives,
            (targets != 0).astype(out.dtype),
            self.cfg.temperature,
        )
        return loss, {"loss": loss}


def sample_negatives(
    rng: jax.Array,
    shape: tuple[int, ...],
    num_items: int,
    num_negatives: int,
    shared: NegativeSharing = "position",
) -> jax.Array:
    """Uniform negative item ids in [1, num_items] for targets of `shape` [B, N].

    `shared="position"` draws R negatives per position, as the reference does
    ([B, N, R]); "sequence" shares them along each row ([B, 1, R]) and "batch" across the
    batch ([1, 1, R]). All are uniform over the catalogue; sharing makes the loss's
    negative-embedding gather and its gradient R*B*N times cheaper, which dominates a step
    on CPU. Shapes broadcast against [B, N, R] in `sampled_softmax_loss`.
    """
    sizes = {"position": shape, "sequence": (*shape[:-1], 1), "batch": (1,) * len(shape)}
    return jax.random.randint(rng, (*sizes[shared], num_negatives), 1, num_items + 1)


def sampled_softmax_loss(
    query: jax.Array,
    positive_emb: jax.Array,
    negative_emb: jax.Array,
    positive_ids: jax.Array,
    negative_ids: jax.Array,
    weights: jax.Array,
    temperature: float,
) -> jax.Array:
    """Weighted mean of -log softmax([pos, negs] / T)[0] (reference `SampledSoftmaxLoss`).

    Args:
      query: [..., D]; positive_emb: [..., D]; negative_emb: [..., R, D].
      positive_ids: [...]; negative_ids: [..., R] (a negative equal to the positive is masked).
      weights: [...] (0 on padding targets).
      temperature: softmax temperature.
    """
    pos = jnp.sum(query * positive_emb, axis=-1, keepdims=True) / temperature
    if all(s == 1 for s in negative_emb.shape[:-2]):  # shared by the batch: one 2-D matmul
        d = query.shape[-1]
        neg = (query.reshape(-1, d) @ negative_emb.reshape(-1, d).T).reshape(*query.shape[:-1], -1)
    else:
        neg = jnp.einsum("...d,...rd->...r", query, negative_emb)
    neg = neg / temperature
    neg = jnp.where(negative_ids == positive_ids[..., None], -5e4, neg)
    nll = -jax.nn.log_softmax(jnp.concatenate([pos, neg], axis=-1), axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array):
    """Pure training loss `(loss, aux)` for HSTU or SASRec; use under `nnx.value_and_grad`.

    `batch` holds `ids` [B, N] (right-padded, target included), `timestamps` [B, N] and
    `lengths` [B]; position t predicts `ids[:, t + 1]`.
    """
    return model.loss(batch, rng)
