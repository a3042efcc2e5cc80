"""RecGPT (Zhang et al. 2024, arXiv 2404.08675): a GPT over item IDs, prompt-tuned on its
own predictions, recalling in two stages. Flax NNX, after the authors' code (RecGPT/RecGPT,
`GPT4Rec.py`); where the paper is silent the code decides, and the docstrings say so.

Input `E_item[ids] + E_pos[positions] + E_user[user mod user_buckets] + E_seg[segments]`
(segment 1 marks a generated item; no scaling, no embedding dropout, as the code), then
post-norm GPT blocks

    a = LN(x + Dropout(Attn(x)));  x = LN(a + Dropout(W2 GELU(W1 a)))      # LN eps 1e-5

with causal softmax attention, or the code's causal Flow-Attention (`flow_attention`).
Rows are right-padded, so (both attentions being causal) a real position never sees
padding; the code left-pads without a mask, and its outputs move with the padding.
Two output paths, as the code has: dot products with the item table (`item_scores`:
pre-training's BCE and ranking) and a softmax head over the catalogue (`head_logits`:
prompt-tuning's cross-entropy and the items a prompt-tuned model generates).

Stages (`prompt_items` K of the config): K = 0 pre-trains with `hstu.losses.next_item_loss`
(the code's BCE with one uniform negative per position not in the user's sequence); K >= 1
prompt-tunes (`prompt_loss`): the model being tuned generates K items (greedy top-1 of the
head, no gradient, on every batch) that replace the last K input slots or follow every
real item (`prompt_placement`), marked by segment 1; full-catalogue cross-entropy of the
head, labels always real items. Two-stage recall (`query_scores(..., recall_n=N)`): the
top N of the history, then one generated item appended and the rest of the list from
that second query.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from hstu.dropout import Dropout
from hstu.items import ItemScores, Positions, last_position, position_ids
from hstu.losses import LossConfig, LossName, chunked_softmax_loss, next_item_loss

Attention = Literal["softmax", "flow"]
Placement = Literal["replace", "insert"]
RankWith = Literal["items", "head"]
HeadInit = Literal["random", "items"]

LN_EPS = 1e-5
FLOW_EPS = 1e-6
NORMAL = nnx.initializers.normal(0.02)  # the code's init of embeddings, FFN and head
RECALL_BONUS = 1e6  # stage-1 items rank above every stage-2 score

# The authors' settings (run_pretrain.py / run_finetune_full.py defaults; README where it
# differs in brackets): hidden 128 [256], FFN 256 [512], 2 [1] layers, 2 heads, residual
# dropout 0.1, history 50, Adam lr 1e-3 betas (0.9, 0.999), batch 256, no weight decay.
_ARCH = dict(
    max_seq_len=50,
    embedding_dim=128,
    num_blocks=2,
    num_heads=2,
    ffn_dim=256,
    dropout_rate=0.1,
    loss="bce",
    negatives_not_in_sequence=True,
)
_TRAIN = dict(
    learning_rate=1e-3, b2=0.999, weight_decay=0.0, batch_size=256, num_epochs=200, patience=20
)
PRESETS = {
    # The code's model and training, with the head started from the item table and ranking
    # by it after prompt-tuning (see `RecGPTConfig.rank_with`).
    "recgpt": dict(model="recgpt", arch=dict(_ARCH, head_init="items", rank_with="head"),
                   train=_TRAIN),
    # The code's choices throughout: an untrained head at prompt-tuning, ranking by E_item.
    "recgpt-code": dict(model="recgpt", arch=_ARCH, train=_TRAIN),
    # `recgpt` without the user module: on the Amazon splits (7-10 items per user) the
    # users' rows memorise. Validation NDCG@10 of pre-training (docs/results.md): Sports
    # 0.0323 vs 0.0250, Scientific 0.0858 vs 0.0791; on ml-100k (~100 items per user) and
    # Yelp the rows help (ml-100k demo: 0.1141 vs 0.1115; Yelp 0.0426 vs 0.0390).
    "recgpt-nouser": dict(model="recgpt", arch=dict(_ARCH, head_init="items", rank_with="head",
                                                    user_buckets=0), train=_TRAIN),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RecGPTConfig(LossConfig):
    """RecGPT hyper-parameters, its pre-training loss (`LossConfig`) and its stage."""

    num_items: int
    max_seq_len: int = 50
    embedding_dim: int = 128
    num_blocks: int = 2
    num_heads: int = 2
    ffn_dim: int = 256
    dropout_rate: float = 0.1  # residual dropout (the code's only active one)
    attention: Attention = "softmax"
    # Users hashed into this many rows (user id mod user_buckets: ids beyond wrap, so an
    # unseen user still gets a row); 0 = no user module.
    user_buckets: int = 65536
    positions: Positions = "end"  # the code left-pads: the newest item at max_seq_len - 1
    loss: LossName = dataclasses.field(default="bce", kw_only=True)
    negatives_not_in_sequence: bool = dataclasses.field(default=True, kw_only=True)
    prompt_items: int = 0  # K generated items per sequence; 0 = pre-training
    prompt_placement: Placement = "replace"
    # Prompt-tuning trains only the head (cross-entropy), so the code, which still ranks by
    # the item table and starts the head untrained, loses to its own pre-trained model
    # (ml-100k demo: test NDCG@10 0.065 vs 0.099). Our preset starts the head from the item
    # table and ranks by it (0.100); `recgpt-code` keeps the code's choices.
    rank_with: RankWith = "items"  # a prompt-tuned model ranks by the item table or the head
    head_init: HeadInit = "random"  # the head when prompt-tuning starts: untrained, or E_item^T


def causal_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """[B, H, L, d] -> [B, H, L, d]: softmax(q k^T / sqrt(d)) v over keys j <= i."""
    n = q.shape[2]
    logits = jnp.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -jnp.inf)
    return jnp.einsum("bhij,bhjd->bhid", jax.nn.softmax(logits, axis=-1), v)


def flow_attention(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = FLOW_EPS) -> jax.Array:
    """Causal Flow-Attention (Wu et al. 2022) as `Flow_Attention_Causal` computes it.

    [B, H, L, d] -> [B, H, L, d]. With sigmoid features and n_i = i + 1: incoming and
    outgoing flows, their conservation refinement, sink allocation (sigmoid) and source
    competition (a causal softmax times n_i). The code's cumulative [L, d, d] products are
    written as one masked [L, L] matrix here.
    """
    q, k = jax.nn.sigmoid(q), jax.nn.sigmoid(k)
    n = jnp.arange(1, q.shape[2] + 1, dtype=q.dtype)[None, None, :]

    def dot(a, b):  # sum over features: [B, H, L]
        return jnp.sum((a + eps) * (b + eps), axis=-1)

    incoming = n / dot(q, jnp.cumsum(k, axis=2))
    outgoing = n / dot(k, jnp.cumsum(q, axis=2))
    sink = dot(q, jnp.cumsum(k * outgoing[..., None], axis=2)) / n
    source = jnp.clip(dot(k, jnp.cumsum(q * incoming[..., None], axis=2)) / n, -1.0, 1.0)
    allocation = jax.nn.sigmoid(sink)
    source = jnp.exp(source)
    competition = source / jnp.cumsum(source, axis=-1) * n
    weights = jnp.einsum("bhid,bhjd->bhij", q * (incoming / n)[..., None], k)
    weights = jnp.where(jnp.tril(jnp.ones(weights.shape[-2:], bool)), weights, 0.0)
    out = jnp.einsum("bhij,bhjd->bhid", weights, v * competition[..., None])
    return out * allocation[..., None]


ATTENTION = {"softmax": causal_softmax_attention, "flow": flow_attention}


class GPTBlock(nnx.Module):
    """The code's post-norm decoder layer: attention, then a GELU feed-forward."""

    def __init__(self, cfg: RecGPTConfig, *, rngs: nnx.Rngs):
        d = cfg.embedding_dim
        if d % cfg.num_heads:
            raise ValueError(f"embedding_dim {d} not divisible by num_heads {cfg.num_heads}")
        if cfg.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {cfg.attention!r}")
        self.num_heads, self.attention = cfg.num_heads, cfg.attention
        self.query, self.key = nnx.Linear(d, d, rngs=rngs), nnx.Linear(d, d, rngs=rngs)
        self.value, self.out = nnx.Linear(d, d, rngs=rngs), nnx.Linear(d, d, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.ffn1 = nnx.Linear(d, cfg.ffn_dim, kernel_init=NORMAL, rngs=rngs)
        self.ffn2 = nnx.Linear(cfg.ffn_dim, d, kernel_init=NORMAL, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
        b, n, d = x.shape
        h = self.num_heads
        # Linears and norms on [B*N, d] token matrices (2-D matmuls: XLA:CPU computes their
        # weight gradients without transposes, as in `hstu.sasrec.SASRecBlock`).
        x = x.reshape(b * n, d)

        def heads(y):
            return y.reshape(b, n, h, d // h).transpose(0, 2, 1, 3)

        attn = ATTENTION[self.attention](
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        )
        attn = self.out(attn.transpose(0, 2, 1, 3).reshape(b * n, d))
        x = self.attn_norm(x + self.dropout(attn, deterministic=deterministic, rngs=rngs))
        ffn = self.ffn2(jax.nn.gelu(self.ffn1(x), approximate=False))
        x = self.ffn_norm(x + self.dropout(ffn, deterministic=deterministic, rngs=rngs))
        return x.reshape(b, n, d)


class RecGPT(nnx.Module, ItemScores):
    """`__call__(ids, timestamps, lengths, users=, segments=) -> [B, N, D]` (timestamps
    unused); `item_scores` (dot products) and `head_logits` (the softmax head)."""

    normalize_items = False

    def __init__(self, cfg: RecGPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.embedding_dim
        self.item_emb = nnx.Embed(cfg.num_items + 1, d, embedding_init=NORMAL, rngs=rngs)
        self.pos_emb = nnx.Embed(cfg.max_seq_len, d, embedding_init=NORMAL, rngs=rngs)
        self.user_emb = (
            nnx.Embed(cfg.user_buckets, d, embedding_init=NORMAL, rngs=rngs)
            if cfg.user_buckets
            else None
        )
        self.segment_emb = nnx.Embed(2, d, embedding_init=NORMAL, rngs=rngs)
        self.blocks = nnx.List([GPTBlock(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
        self.head = nnx.Linear(d, cfg.num_items + 1, kernel_init=NORMAL, rngs=rngs)

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
        segments: jax.Array | None = None,
    ) -> jax.Array:
        """ids [B, N] right-padded (0 = padding), users [B], segments [B, N] -> [B, N, D];
        inputs are rows of `item_table` when given (training's dropped table)."""
        del timestamps, lengths
        cfg = self.cfg
        if ids.shape[1] > cfg.max_seq_len:
            raise ValueError(
                f"RecGPT: input length {ids.shape[1]} exceeds max_seq_len {cfg.max_seq_len}"
            )
        x = self.item_rows(ids, item_table)
        x = x + self.pos_emb(position_ids(ids, cfg.max_seq_len, cfg.positions))
        x = x + self.segment_emb(jnp.zeros_like(ids) if segments is None else segments)
        if self.user_emb is not None:
            if users is None:
                raise ValueError("RecGPT with user_buckets > 0 needs `users`")
            x = x + self.user_emb(users % cfg.user_buckets)[:, None]
        for block in self.blocks:
            x = block(x, deterministic=deterministic, rngs=rngs)
        return x

    def head_logits(self, h: jax.Array) -> jax.Array:
        """Softmax-head logits [..., num_items + 1] (padding item 0 at -inf)."""
        return self.head(h).at[..., 0].set(-jnp.inf)

    def head_table(self) -> jax.Array:
        """The head as rows [num_items + 1, D + 1] = [W^T, b]: its logits are
        `with_bias_feature(h) @ head_table().T` (the bias rides along as a feature)."""
        return jnp.concatenate([self.head.kernel[...].T, self.head.bias[...][:, None]], axis=1)

    def _ranks_by_head(self) -> bool:
        return bool(self.cfg.prompt_items) and self.cfg.rank_with == "head"

    def generation_logits(self, h: jax.Array) -> jax.Array:
        """What generated items are the argmax of: the head once prompt-tuning trains it
        (K > 0), else (a pre-trained model, whose head is untrained) the item table."""
        return self.head_logits(h) if self.cfg.prompt_items else self.item_scores(h)

    def ranking_scores(self, h: jax.Array) -> jax.Array:
        """Scores [B, num_items + 1] of queries h [B, D]: by the item table, or by the head
        for a prompt-tuned model with `rank_with="head"`."""
        return self.head_logits(h) if self._ranks_by_head() else self.item_scores(h)

    def ranking_table(self) -> jax.Array:
        return self.head_table() if self._ranks_by_head() else self.item_table()

    def ranking_queries(self, h: jax.Array) -> jax.Array:
        return with_bias_feature(h) if self._ranks_by_head() else h

    def generation_table(self) -> jax.Array:
        return self.head_table() if self.cfg.prompt_items else self.item_table()

    def generation_queries(self, h: jax.Array) -> jax.Array:
        return with_bias_feature(h) if self.cfg.prompt_items else h

    def query_embeddings(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """The output [B, D] at each `query_inputs` row's last item (eval mode)."""
        return last_position(self(inputs["ids"], users=inputs["users"]), inputs["lengths"])

    def second_query(self, inputs: dict[str, jax.Array], generated: jax.Array) -> jax.Array:
        """Two-stage recall's second query [B, D]: the output at the generated item
        `generated` [B], appended to each row (segment 1; the oldest item dropped from a
        full window)."""
        ids, lengths = inputs["ids"], inputs["lengths"]
        n = ids.shape[1]
        generated = generated.astype(ids.dtype)
        shifted = jnp.concatenate([ids[:, 1:], generated[:, None]], axis=1)
        appended = ids.at[jnp.arange(len(ids)), jnp.minimum(lengths, n - 1)].set(generated)
        ids2 = jnp.where((lengths >= n)[:, None], shifted, appended)
        lengths2 = jnp.minimum(lengths + 1, n)
        segments = (jnp.arange(n)[None, :] == (lengths2 - 1)[:, None]).astype(ids.dtype)
        return last_position(self(ids2, users=inputs["users"], segments=segments), lengths2)

    def query_scores(self, inputs: dict[str, jax.Array], recall_n: int | None = None) -> jax.Array:
        """Scores [B, num_items + 1] of `hstu.trainer.query_inputs` rows (eval mode).

        With `recall_n` = N (static: a top-N, where ranking the whole catalogue would cost
        a sort per row), two-stage recall (the code's `infer_GPT_recall_2`): stage 1 ranks
        the history's query; its top N (history items excluded by `inputs["mask"]`, when
        given) come first, in order. The greedy generated item is then appended (`second_query`) and
        the second query's scores order every other item. Returned as scores: stage-1
        items get RECALL_BONUS + (N - rank).
        """
        h1 = self.query_embeddings(inputs)
        s1 = self.ranking_scores(h1)
        if recall_n is None:
            return s1
        generated = jnp.argmax(self.generation_logits(h1), axis=-1)
        s2 = self.ranking_scores(self.second_query(inputs, generated))
        if "mask" in inputs:
            s1 = jnp.where(inputs["mask"], -jnp.inf, s1)
        _, top = jax.lax.top_k(s1, recall_n)
        rows = jnp.arange(len(h1))[:, None]
        bonus = (
            jnp.zeros_like(s2)
            .at[rows, top]
            .set(RECALL_BONUS + jnp.arange(recall_n, 0, -1, dtype=s2.dtype))
        )
        return jnp.where(bonus > 0, bonus, s2)


def with_bias_feature(h: jax.Array) -> jax.Array:
    """h [..., D] -> [..., D + 1] with a last feature of 1 (`RecGPT.head_table`'s bias)."""
    return jnp.concatenate([h, jnp.ones((*h.shape[:-1], 1), h.dtype)], axis=-1)


def head_from_items(model: RecGPT) -> None:
    """Sets the softmax head to the item table (kernel = E_item^T, bias 0), in place."""
    model.head.kernel[...] = model.item_emb.embedding[...].T
    model.head.bias[...] = jnp.zeros_like(model.head.bias[...])


def generate_prompts(
    model: RecGPT, ids: jax.Array, lengths: jax.Array, users: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(ids, segments, targets) [B, N] of a right-padded training batch with K generated
    items (eval mode, no gradient): position t of the result predicts targets[:, t]
    (0 = no loss). Targets are always real items.

    * `replace` (the code's default, `GPT_rec_next_item_train_n_1`): the last K input slots
      (at most all but the first) hold g_1..g_K, g_j the head's top-1 after the slots
      before it; each slot keeps its real target. (The code rotates its buffer, so its g_1
      is generated from a context holding the very items it stands in for; this is the
      evident intent: the prefix before the slot.)
    * `insert` (`GPT_rec_next_item_train_all`): K items after every real item, with no
      target; a real item keeps its next real item as target; the newest max_seq_len
      tokens are kept. The K items after x_i are the head's top K at x_i from one forward
      of the real sequence (the code generates them one by one, conditioned on earlier
      prompts: (n - 1) K forwards per batch); for K = 1 the greedy item itself.
    """
    cfg = model.cfg
    k = cfg.prompt_items
    b, n = ids.shape
    inputs = jnp.where(jnp.arange(n)[None, :] < (lengths - 1)[:, None], ids, 0)
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), ids.dtype)], axis=1)
    rows = jnp.arange(b)
    if cfg.prompt_placement == "replace":
        num_inputs = lengths - 1
        first = jnp.maximum(num_inputs - k, 1)
        segments = jnp.zeros_like(ids)
        for j in range(k):
            slot = first + j
            live = slot < num_inputs
            h = model(inputs, users=users, segments=segments)[rows, slot - 1]
            g = jnp.argmax(model.head_logits(h), axis=-1).astype(ids.dtype)
            inputs = inputs.at[rows, slot].set(jnp.where(live, g, inputs[rows, slot]))
            segments = segments.at[rows, slot].set(jnp.where(live, 1, 0))
        return jax.lax.stop_gradient(inputs), segments, targets
    if cfg.prompt_placement != "insert":
        raise ValueError(
            f"prompt_placement must be 'replace' or 'insert', got {cfg.prompt_placement!r}"
        )
    h = model(inputs, users=users)
    _, top = jax.lax.top_k(model.head_logits(h), k)  # [B, N, K]
    # Interleaved token t: real item t // (1 + K) at t % (1 + K) == 0, else its prompt.
    num_inputs = lengths - 1
    total = num_inputs + jnp.maximum(num_inputs - 1, 0) * k
    src = jnp.maximum(total - n, 0)[:, None] + jnp.arange(n)[None, :]
    item, slot = src // (1 + k), src % (1 + k)
    valid = src < total[:, None]
    real = jnp.take_along_axis(inputs, jnp.minimum(item, n - 1), axis=1)
    gen = top[rows[:, None], jnp.minimum(item, n - 1), jnp.maximum(slot - 1, 0)]
    new_ids = jnp.where(valid, jnp.where(slot == 0, real, gen), 0).astype(ids.dtype)
    segments = (valid & (slot > 0)).astype(ids.dtype)
    label = jnp.take_along_axis(targets, jnp.minimum(item, n - 1), axis=1)
    new_targets = jnp.where(valid & (slot == 0), label, 0)
    return jax.lax.stop_gradient(new_ids), segments, new_targets


def prompt_loss(model: RecGPT, batch: dict[str, jax.Array], rng: jax.Array):
    """`(loss, aux)` of prompt-tuning: mean full-catalogue cross-entropy of the softmax head
    at every position with a (real) target, on the batch with generated prompts."""
    ids, segments, targets = generate_prompts(model, batch["ids"], batch["lengths"], batch["users"])
    out = model(ids, users=batch["users"], segments=segments, deterministic=False,
                rngs=nnx.Rngs(dropout=rng))  # fmt: skip
    weights = (targets != 0).astype(out.dtype)
    loss = chunked_softmax_loss(
        with_bias_feature(out), model.head_table(), targets, weights, 1.0, model.cfg.softmax_chunk
    )
    return loss, {}


def loss(model: RecGPT, batch: dict[str, jax.Array], rng: jax.Array):
    """The loop's loss: pre-training (`next_item_loss`) at K = 0, else `prompt_loss`."""
    if model.cfg.prompt_items == 0:
        return next_item_loss(model, batch, rng)
    return prompt_loss(model, batch, rng)
