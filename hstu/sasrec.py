"""SASRec (Kang & McAuley, ICDM 2018) in Flax NNX, faithful to kang205/SASRec.

Input `item_emb[ids] * sqrt(d) + pos_emb[0..N)`, dropout, zeroed at padding; each block:

    q_in = LN(x);  x = q_in + MHA(query=q_in, key=x, value=x, causal)
    x = LN(x);     x = x + FFN(x)          # ReLU, two d->d position-wise linears
    x = x * not_padding

then a final LayerNorm (all LayerNorms eps 1e-8). As in the original code, the residuals add
the normalised input (`queries` / FFN `inputs`). Scores are dot products with the item table
(with optional L2 normalisation, as in the HSTU paper's SASRec baseline). Losses: BCE with
one uniform negative per position, or HSTU's sampled softmax.
"""

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from hstu.attention import causal_blocks
from hstu.dropout import Dropout
from hstu.model import NegativeSharing, l2_normalize, sample_negatives, sampled_softmax_loss

LN_EPS = 1e-8
# Xavier-normal for every matrix, as the reference implementations initialise SASRec; the
# default fan-in scaling of the embeddings leaves BCE training stuck near popularity.
XAVIER = nnx.initializers.xavier_normal()


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """SASRec hyper-parameters (paper / pmixer names)."""

    num_items: int
    max_seq_len: int = 200
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout_rate: float = 0.2
    loss: Literal["bce", "sampled_softmax"] = "bce"
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


class SASRec(nnx.Module):
    """SASRec encoder: `__call__(ids, timestamps, lengths) -> [B, N, D]` (timestamps unused)."""

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

    def item_embeddings(self, item_ids: jax.Array) -> jax.Array:
        """Item embeddings [..., D] (L2-normalised when `l2_norm_output`)."""
        emb = self.item_emb(item_ids)
        return l2_normalize(emb) if self.cfg.l2_norm_output else emb

    def item_scores(self, query: jax.Array, item_ids: jax.Array | None = None) -> jax.Array:
        """Dot-product scores against `item_ids` [..., C], or all items (item 0 = -inf)."""
        if item_ids is None:
            table = self.item_emb.embedding[...]
            table = l2_normalize(table) if self.cfg.l2_norm_output else table
            return (query @ table.T).at[..., 0].set(-jnp.inf)
        return jnp.einsum("...d,...cd->...c", query, self.item_embeddings(item_ids))

    def loss(self, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Next-item loss (`cfg.loss`) on a training batch (dropout on)."""
        drop_rng, neg_rng = jax.random.split(rng)
        out = self(batch["ids"], deterministic=False, rngs=nnx.Rngs(dropout=drop_rng))[:, :-1]
        targets = batch["ids"][:, 1:]
        weights = (targets != 0).astype(out.dtype)
        if self.cfg.loss == "bce":
            negatives = sample_negatives(neg_rng, targets.shape, self.cfg.num_items, 1)[..., 0]
            loss = bce_loss(
                out,
                self.item_embeddings(targets),
                self.item_embeddings(negatives),
                weights,
                weights * (negatives != targets),
            )
        elif self.cfg.loss == "sampled_softmax":
            negatives = sample_negatives(
                neg_rng,
                targets.shape,
                self.cfg.num_items,
                self.cfg.num_negatives,
                self.cfg.negatives_shared,
            )
            loss = sampled_softmax_loss(
                out,
                self.item_embeddings(targets),
                self.item_embeddings(negatives),
                targets,
                negatives,
                weights,
                self.cfg.temperature,
            )
        else:
            raise ValueError(
                f"SASRecConfig.loss must be 'bce' or 'sampled_softmax', got {self.cfg.loss!r}"
            )
        return loss, {"loss": loss}


def bce_loss(
    query: jax.Array,
    positive_emb: jax.Array,
    negative_emb: jax.Array,
    pos_weights: jax.Array,
    neg_weights: jax.Array,
) -> jax.Array:
    """SASRec loss: mean BCE(pos logit, 1) + mean BCE(neg logit, 0) over weighted positions."""
    pos = jnp.sum(query * positive_emb, axis=-1)
    neg = jnp.sum(query * negative_emb, axis=-1)
    pos_loss = jnp.sum(jax.nn.softplus(-pos) * pos_weights) / jnp.maximum(jnp.sum(pos_weights), 1.0)
    neg_loss = jnp.sum(jax.nn.softplus(neg) * neg_weights) / jnp.maximum(jnp.sum(neg_weights), 1.0)
    return pos_loss + neg_loss
