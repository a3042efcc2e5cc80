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
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hstu.attention import causal_blocks
from hstu.dropout import Dropout
from hstu.items import ItemScores, l2_normalize
from hstu.losses import LossName, NegativeSharing

LN_EPS = 1e-8
# Xavier-normal for every matrix, as the reference implementations initialise SASRec; the
# default fan-in scaling of the embeddings leaves BCE training stuck near popularity.
XAVIER = nnx.initializers.xavier_normal()

# Published settings: the architecture (`SASRecConfig` fields) and the optimisation
# (`hstu.trainer.TrainConfig` fields).
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
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """SASRec hyper-parameters (paper / pmixer names)."""

    num_items: int
    max_seq_len: int = 200
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout_rate: float = 0.2
    loss: LossName = "bce"
    l2_norm_output: bool = False
    num_negatives: int = 128
    negatives_shared: NegativeSharing = "position"
    temperature: float = 0.05


class SASRecBlock(nnx.Module):
    """Causal self-attention block + point-wise feed-forward."""

    def __init__(self, cfg: SASRecConfig, *, rngs: nnx.Rngs):
        d = cfg.embedding_dim
        if d % cfg.num_heads:
            raise ValueError(f"embedding_dim {d} not divisible by num_heads {cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.attn_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.query = nnx.Linear(d, d, kernel_init=XAVIER, rngs=rngs)
        self.key = nnx.Linear(d, d, kernel_init=XAVIER, rngs=rngs)
        self.value = nnx.Linear(d, d, kernel_init=XAVIER, rngs=rngs)
        self.out = nnx.Linear(d, d, kernel_init=XAVIER, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.ffn1 = nnx.Linear(d, d, kernel_init=XAVIER, rngs=rngs)
        self.ffn2 = nnx.Linear(d, d, kernel_init=XAVIER, rngs=rngs)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x, valid, *, deterministic: bool, rngs: nnx.Rngs | None):
        b, n, d = x.shape
        h = self.num_heads
        # Linears and norms run on [B*N, d] token matrices (2-D matmuls: XLA:CPU computes
        # their weight gradients without transposes); attention on [B, N, H, d/H].
        x = x.reshape(b * n, d)
        q_in = self.attn_norm(x)
        # Head-major [B, H, N, d/H] with the keys transposed once: XLA:CPU's batched
        # matmuls then need no per-block transposes (see `hstu_attention_blocked`).
        q = self.query(q_in).reshape(b, n, h, d // h).transpose(0, 2, 1, 3)
        kt = self.key(x).reshape(b, n, h, d // h).transpose(0, 2, 3, 1)
        v = self.value(x).reshape(b, n, h, d // h).transpose(0, 2, 1, 3)
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
        x = self.ffn_norm(q_in + self.out(attn))
        hidden = self.dropout(jax.nn.relu(self.ffn1(x)), deterministic=deterministic, rngs=rngs)
        x = x + self.dropout(self.ffn2(hidden), deterministic=deterministic, rngs=rngs)
        return x.reshape(b, n, d) * valid


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
        self.blocks = nnx.List([SASRecBlock(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
        self.last_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)

    def __call__(
        self,
        ids: jax.Array,
        timestamps: jax.Array | None = None,
        lengths: jax.Array | None = None,
        deterministic: bool = True,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """ids [B, N] right-padded (0 = padding) -> [B, N, D]; padding is taken from ids."""
        del timestamps, lengths
        n = ids.shape[1]
        if n > self.cfg.max_seq_len:
            raise ValueError(f"SASRec: input length {n} exceeds max_seq_len {self.cfg.max_seq_len}")
        valid = (ids != 0)[..., None].astype(jnp.float32)
        x = self.item_emb(ids) * math.sqrt(self.cfg.embedding_dim) + self.pos_emb(jnp.arange(n))
        x = self.emb_dropout(x, deterministic=deterministic, rngs=rngs) * valid
        for block in self.blocks:
            x = block(x, valid, deterministic=deterministic, rngs=rngs)
        x = self.last_norm(x)
        return l2_normalize(x) if self.cfg.l2_norm_output else x
