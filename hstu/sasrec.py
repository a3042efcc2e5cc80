"""SASRec (Kang & McAuley, ICDM 2018) in Flax NNX, faithful to kang205/SASRec.

Input `item_emb[ids] * sqrt(d) + pos_emb[0..N)`, dropout, zeroed at padding; each block:

    q_in = LN(x);  x = q_in + MHA(query=q_in, key=x, value=x, causal)
    x = LN(x);     x = x + FFN(x)          # ReLU, two d->d position-wise linears
    x = x * not_padding

then a final LayerNorm (all LayerNorms eps 1e-8). As in the original code, the residuals add
the normalised input (`queries` / FFN `inputs`). Scores are dot products with the item table
(with optional L2 normalisation, as in the HSTU paper's SASRec baseline). Losses: BCE with
one uniform negative per position, or HSTU's sampled softmax (`hstu.losses`).
"""

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from hstu.attention import causal_blocks
from hstu.dropout import Dropout
from hstu.items import ItemScores, Positions, l2_normalize, position_ids
from hstu.losses import LossConfig, LossName

LayerType = Literal["sasrec", "ligr"]

LN_EPS = 1e-8
# Xavier-normal for every matrix, as the reference implementations initialise SASRec; the
# default fan-in scaling of the embeddings leaves BCE training stuck near popularity.
XAVIER = nnx.initializers.xavier_normal()

# Published settings: the architecture (`SASRecConfig` fields) and the optimisation
# (`hstu.trainer.TrainConfig` fields).
# RecTools' Adam (betas 0.9, 0.98), which the eSASRec benchmark trains with.
_TRAIN_SS = dict(learning_rate=1e-3, b2=0.98, weight_decay=0.0, batch_size=128, num_epochs=200,
                 patience=50)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    # SASRec paper (Kang & McAuley 2018), Amazon setting: BCE with one negative.
    "sasrec-paper": dict(
        model="sasrec",
        arch=dict(max_seq_len=50, embedding_dim=50, num_blocks=2, num_heads=1, dropout_rate=0.5,
                  loss="bce", l2_norm_output=False),
        train=dict(learning_rate=1e-3, b2=0.98, weight_decay=0.0, batch_size=128, num_epochs=200),
    ),
    # SASRec as the HSTU paper's baseline: L2-normalised, sampled softmax (128 negatives).
    "sasrec-ml": dict(
        model="sasrec",
        arch=dict(max_seq_len=200, embedding_dim=50, num_blocks=2, num_heads=1, dropout_rate=0.2,
                  loss="sampled_softmax", l2_norm_output=True),
        train=dict(learning_rate=1e-3, b2=0.98, weight_decay=0.0, batch_size=128, num_epochs=100),
    ),
    # The RecSys 2025 eSASRec benchmark's recipe (github blondered/transformer_benchmark,
    # Tikhonov et al.): plain dot products, sampled softmax over 256 negatives, up to 200
    # epochs with patience 50, 256 negatives per row, dropout 0.2 on the item table as
    # RecTools 0.13's item net has; the benchmark reports Sports Recall@10 0.0569 /
    # NDCG@10 0.0314.
    "sasrec-ss": dict(
        model="sasrec",
        arch=dict(max_seq_len=50, embedding_dim=64, num_blocks=1, num_heads=1, dropout_rate=0.2,
                  loss="sampled_softmax", num_negatives=256, negatives_shared="sequence",
                  temperature=1.0, l2_norm_output=False, positions="end", item_dropout=0.2),
        train=_TRAIN_SS,
    ),
    # eSASRec (same benchmark): sasrec-ss with LiGR layers, SwiGLU width 2d on Sports
    # (Sports 0.0560 / 0.0323).
    "esasrec": dict(
        model="sasrec",
        arch=dict(max_seq_len=50, embedding_dim=64, num_blocks=1, num_heads=1, dropout_rate=0.2,
                  loss="sampled_softmax", num_negatives=256, negatives_shared="sequence",
                  temperature=1.0, l2_norm_output=False, layer_type="ligr",
                  positions="end", ffn_multiplier=2, item_dropout=0.2),
        train=_TRAIN_SS,
    ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SASRecConfig(LossConfig):
    """SASRec hyper-parameters (paper / pmixer names) and its loss (`LossConfig`)."""

    num_items: int
    max_seq_len: int = 200
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout_rate: float = 0.2
    loss: LossName = dataclasses.field(default="bce", kw_only=True)
    l2_norm_output: bool = False
    # "sasrec": the paper's block; "ligr": pre-norm with sigmoid-gated residuals (eSASRec).
    layer_type: LayerType = "sasrec"
    # Position embeddings counted from the oldest item ("start", pmixer on right padding)
    # or aligned on the newest ("end": the last item always at max_seq_len - 1, as kang205's
    # left-padded inputs; a query's position then says how recent, not how long, it is).
    positions: Positions = "start"
    ffn_multiplier: int = 1  # LiGR's SwiGLU hidden width, in multiples of embedding_dim


def _linear(d: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d, d, kernel_init=XAVIER, rngs=rngs)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal attention on [B*N, d] token matrices (dropout on the weights)."""

    def __init__(self, cfg: SASRecConfig, *, rngs: nnx.Rngs):
        d = cfg.embedding_dim
        if d % cfg.num_heads:
            raise ValueError(f"embedding_dim {d} not divisible by num_heads {cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.query, self.key = _linear(d, rngs), _linear(d, rngs)
        self.value, self.out = _linear(d, rngs), _linear(d, rngs)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, queries, keys, shape, *, deterministic: bool, rngs: nnx.Rngs | None):
        b, n, d = shape
        h = self.num_heads
        # Head-major [B, H, N, d/H] with the keys transposed once: XLA:CPU's batched
        # matmuls then need no per-block transposes (see `hstu_attention_blocked`).
        q = self.query(queries).reshape(b, n, h, d // h).transpose(0, 2, 1, 3)
        kt = self.key(keys).reshape(b, n, h, d // h).transpose(0, 2, 3, 1)
        v = self.value(keys).reshape(b, n, h, d // h).transpose(0, 2, 1, 3)
        attn = []
        for r0, r1 in causal_blocks(n):  # blocks above the causal diagonal are skipped
            logits = jnp.matmul(q[:, :, r0:r1], kt[..., :r1]) / math.sqrt(d // h)
            causal = jnp.arange(r1)[None, :] <= jnp.arange(r0, r1)[:, None]
            logits = jnp.where(causal, logits, -jnp.inf)
            weights = self.dropout(
                jax.nn.softmax(logits, axis=-1), deterministic=deterministic, rngs=rngs
            )
            attn.append(jnp.matmul(weights, v[:, :, :r1]))
        attn = jnp.concatenate(attn, axis=2).transpose(0, 2, 1, 3).reshape(b * n, d)
        return self.out(attn)


class SASRecBlock(nnx.Module):
    """The paper's block: causal self-attention + point-wise ReLU feed-forward."""

    def __init__(self, cfg: SASRecConfig, *, rngs: nnx.Rngs):
        d = cfg.embedding_dim
        self.attn_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.ffn1, self.ffn2 = _linear(d, rngs), _linear(d, rngs)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x, valid, *, deterministic: bool, rngs: nnx.Rngs | None):
        b, n, d = x.shape
        # Linears and norms run on [B*N, d] token matrices (2-D matmuls: XLA:CPU computes
        # their weight gradients without transposes); attention on [B, H, N, d/H].
        x = x.reshape(b * n, d)
        q_in = self.attn_norm(x)
        attn = self.attn(q_in, x, (b, n, d), deterministic=deterministic, rngs=rngs)
        x = self.ffn_norm(q_in + attn)
        hidden = self.dropout(jax.nn.relu(self.ffn1(x)), deterministic=deterministic, rngs=rngs)
        x = x + self.dropout(self.ffn2(hidden), deterministic=deterministic, rngs=rngs)
        return x.reshape(b, n, d) * valid


class LiGRBlock(nnx.Module):
    """eSASRec's LiGR layer (after LinkedIn's LiGR): pre-norm sublayers whose outputs join
    the residual stream through sigmoid gates computed from it,

        x = x + sigmoid(G1 x) * Dropout(MHA(LN(x)))
        x = x + sigmoid(G2 x) * Dropout(SwiGLU(LN(x)))
    """

    def __init__(self, cfg: SASRecConfig, *, rngs: nnx.Rngs):
        d = cfg.embedding_dim
        self.attn_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.attn_gate = _linear(d, rngs)
        self.ffn_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        h = d * cfg.ffn_multiplier
        self.ffn_gate = nnx.Linear(d, h, use_bias=False, kernel_init=XAVIER, rngs=rngs)
        self.ffn_up = nnx.Linear(d, h, use_bias=False, kernel_init=XAVIER, rngs=rngs)
        self.ffn_down = nnx.Linear(h, d, use_bias=False, kernel_init=XAVIER, rngs=rngs)
        self.ffn_res_gate = _linear(d, rngs)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x, valid, *, deterministic: bool, rngs: nnx.Rngs | None):
        b, n, d = x.shape
        x = x.reshape(b * n, d)
        y = self.attn_norm(x)
        attn = self.attn(y, y, (b, n, d), deterministic=deterministic, rngs=rngs)
        drop = self.dropout
        x = x + jax.nn.sigmoid(self.attn_gate(x)) * drop(
            attn, deterministic=deterministic, rngs=rngs
        )
        y = self.ffn_norm(x)
        ffn = self.ffn_down(jax.nn.silu(self.ffn_gate(y)) * self.ffn_up(y))
        x = x + jax.nn.sigmoid(self.ffn_res_gate(x)) * drop(
            ffn, deterministic=deterministic, rngs=rngs
        )
        return x.reshape(b, n, d) * valid


BLOCKS: dict[str, type[nnx.Module]] = {"sasrec": SASRecBlock, "ligr": LiGRBlock}


class SASRec(nnx.Module, ItemScores):
    """SASRec encoder: `__call__(ids, timestamps, lengths) -> [B, N, D]` (timestamps unused);
    items are scored by dot product (`ItemScores`, L2-normalised with `l2_norm_output`)."""

    @property
    def normalize_items(self) -> bool:
        return self.cfg.l2_norm_output

    def __init__(self, cfg: SASRecConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.embedding_dim
        self.item_emb = nnx.Embed(cfg.num_items + 1, d, embedding_init=XAVIER, rngs=rngs)
        self.pos_emb = nnx.Embed(cfg.max_seq_len, d, embedding_init=XAVIER, rngs=rngs)
        self.emb_dropout = Dropout(cfg.dropout_rate)
        if cfg.layer_type not in BLOCKS:
            raise ValueError(f"layer_type must be one of {sorted(BLOCKS)}, got {cfg.layer_type!r}")
        block = BLOCKS[cfg.layer_type]
        self.blocks = nnx.List([block(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
        self.last_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)

    def __call__(
        self,
        ids: jax.Array,
        timestamps: jax.Array | None = None,
        lengths: jax.Array | None = None,
        deterministic: bool = True,
        *,
        rngs: nnx.Rngs | None = None,
        users: jax.Array | None = None,
        item_table: jax.Array | None = None,
    ) -> jax.Array:
        """ids [B, N] right-padded (0 = padding) -> [B, N, D]; padding is taken from ids.
        Inputs are rows of `item_table` when given (training's dropped table)."""
        del timestamps, lengths, users  # no user or time features
        n = ids.shape[1]
        if n > self.cfg.max_seq_len:
            raise ValueError(f"SASRec: input length {n} exceeds max_seq_len {self.cfg.max_seq_len}")
        valid = (ids != 0)[..., None].astype(jnp.float32)
        x = self.item_rows(ids, item_table) * math.sqrt(self.cfg.embedding_dim) + self.pos_emb(
            position_ids(ids, self.cfg.max_seq_len, self.cfg.positions)
        )
        x = self.emb_dropout(x, deterministic=deterministic, rngs=rngs) * valid
        for block in self.blocks:
            x = block(x, valid, deterministic=deterministic, rngs=rngs)
        x = self.last_norm(x)
        return l2_normalize(x) if self.cfg.l2_norm_output else x
