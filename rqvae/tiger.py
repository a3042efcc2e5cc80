"""TIGER (Rajput et al. 2023): generative retrieval over semantic IDs, in Flax NNX.

A T5-style encoder-decoder (pre-RMSNorm, ReLU MLP, no biases, T5 relative position
buckets in every self-attention layer: bidirectional in the encoder, causal in the
decoder; no absolute positions) reads a user's history as semantic-ID tokens and
writes the next item's L codes.

Tokens: 0 = PAD, 1 = BOS (the decoder's start token; the target has a fixed length L,
so no EOS is needed), `2 + l * K + c` = code c at level l, `2 + L * K + u` = user
bucket u. Encoder input: `[user token, codes of the last M items, flattened]`, the
history left-padded with PAD. The output head is per level: decoder position l
predicts a distribution over the K codes of level l only.

Decoding is the shared beam search (`eval.decoding.beam_search`) constrained by a trie
of the valid IDs (`eval.decoding.Trie`, L codes per ID), driven by `Tiger.decode_step`:
one decoder position per step over a self-attention KV cache, the encoder memory's
cross-attention keys computed once per example. Items that share an ID (collisions) are
expanded in ascending dense-id order at the ID's position in the ranking (`SemanticIndex`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.decoding import Trie, TrieArrays
from eval.decoding import beam_search as shared_beam_search

PAD, BOS, NUM_SPECIAL = 0, 1, 2
KV = tuple[jax.Array, jax.Array]  # keys, values [B, T, H, head_dim]


@dataclasses.dataclass(frozen=True)
class TigerConfig:
    """Architecture; `num_levels` and `codebook_size` come from the semantic-ID index."""

    num_levels: int = 4
    codebook_size: int = 256
    num_user_buckets: int = 2000
    max_items: int = 20  # history items read by the encoder
    d_model: int = 128
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    dropout: float = 0.1
    rel_buckets: int = 32
    rel_max_distance: int = 128

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + self.num_levels * self.codebook_size + self.num_user_buckets


def code_tokens(codes: jax.Array | np.ndarray, codebook_size: int) -> jax.Array | np.ndarray:
    """Token ids of codes [..., L] (level l of the last axis at offset 2 + l * K)."""
    levels = codes.shape[-1]
    xp = jnp if isinstance(codes, jax.Array) else np
    return NUM_SPECIAL + xp.arange(levels) * codebook_size + codes


def user_buckets(users: np.ndarray, num_buckets: int) -> np.ndarray:
    """Deterministic hash of dense user indices into `num_buckets` buckets (Knuth's multiplicative hash)."""
    h = (np.asarray(users, np.uint64) * np.uint64(2654435761)) % np.uint64(1 << 32)
    return (h % np.uint64(num_buckets)).astype(np.int32)


def relative_buckets(
    q_len: int, k_len: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's relative position buckets [q_len, k_len] (exact below num_buckets/2, log-spaced up to max_distance)."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]  # key - query
    n = -rel
    out = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        out += (n < 0) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    exact = num_buckets // 2
    log_ratio = np.log(np.maximum(n, 1) / exact) / np.log(max_distance / exact)
    large = np.minimum(
        exact + (log_ratio * (num_buckets - exact)).astype(np.int64), num_buckets - 1
    )
    return out + np.where(n < exact, n, large)


class Attention(nnx.Module):
    """Multi-head attention; `bias` [H, Q, K] is added to the logits (relative positions)."""

    def __init__(self, cfg: TigerConfig, *, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.head_dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v = (
            nnx.Linear(cfg.d_model, inner, use_bias=False, rngs=rngs) for _ in range(3)
        )
        self.o = nnx.Linear(inner, cfg.d_model, use_bias=False, rngs=rngs)

    def _heads(self, t: jax.Array) -> jax.Array:
        return t.reshape(*t.shape[:2], self.num_heads, self.head_dim)

    def keys_values(self, kv: jax.Array) -> KV:
        """Projected keys and values [B, K, H, head_dim] of kv [B, K, D]."""
        return self._heads(self.k(kv)), self._heads(self.v(kv))

    def __call__(
        self, x: jax.Array, kv: jax.Array, mask: jax.Array, bias: jax.Array | None = None
    ) -> jax.Array:
        """x [B, Q, D], kv [B, K, D], mask [B, Q, K] (True = attend) -> [B, Q, D]."""
        return self.attend(x, self.keys_values(kv), mask, bias)

    def attend(
        self, x: jax.Array, kv: KV, mask: jax.Array, bias: jax.Array | None = None
    ) -> jax.Array:
        """Attention of queries from x [B, Q, D] over projected (keys, values) [B, K, H, hd]."""
        q, (k, v) = self._heads(self.q(x)), kv
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim)
        if bias is not None:
            logits = logits + bias
        logits = jnp.where(mask[:, None], logits, jnp.finfo(logits.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
        return self.o(out.reshape(*x.shape[:2], -1))


class Mlp(nnx.Module):
    def __init__(self, cfg: TigerConfig, *, rngs: nnx.Rngs):
        self.wi = nnx.Linear(cfg.d_model, cfg.d_ff, use_bias=False, rngs=rngs)
        self.wo = nnx.Linear(cfg.d_ff, cfg.d_model, use_bias=False, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        return self.wo(_dropout(self.drop, jax.nn.relu(self.wi(x)), key))


def _dropout(drop: nnx.Dropout, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """Dropout with an explicit key; `key=None` means evaluation (identity)."""
    return x if key is None else drop(x, deterministic=False, rngs=key)


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class Block(nnx.Module):
    """Pre-norm self-attention (+ cross-attention in the decoder) and MLP, each residual."""

    def __init__(self, cfg: TigerConfig, cross: bool, *, rngs: nnx.Rngs):
        self.norm_self = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.norm_cross = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs) if cross else None
        self.cross_attn = Attention(cfg, rngs=rngs) if cross else None
        self.norm_mlp = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)

    def __call__(self, x, mask, bias, key, memory=None, memory_mask=None):
        k = _keys(key, 4)
        h = self.norm_self(x)
        x = x + _dropout(self.drop, self.self_attn(h, h, mask, bias), k[0])
        if self.cross_attn is not None:
            memory_kv = self.cross_attn.keys_values(memory)
            x = x + _dropout(self.drop, self._cross(x, memory_kv, memory_mask), k[1])
        return x + _dropout(self.drop, self.mlp(self.norm_mlp(x), k[2]), k[3])

    def _cross(self, x: jax.Array, memory_kv: KV, memory_mask: jax.Array) -> jax.Array:
        """Cross-attention of x [B * C, T, D] over an example's memory [B, S, ...]. The C
        candidate sequences of an example share its memory: they are folded into the query
        axis ([B * C, T] -> [B, C * T]) instead of repeating the memory C times."""
        b = memory_kv[0].shape[0]
        h = self.norm_cross(x).reshape(b, -1, x.shape[-1])
        mask = jnp.broadcast_to(memory_mask, (b, h.shape[1], memory_mask.shape[-1]))
        return self.cross_attn.attend(h, memory_kv, mask).reshape(x.shape)

    def step(
        self,
        x: jax.Array,
        t: jax.Array,
        cache: KV,
        bias: jax.Array,
        memory_kv: KV,
        memory_mask: jax.Array,
    ) -> tuple[jax.Array, KV]:
        """Decoder position t (eval mode): x [R, 1, D], cache (keys, values) [R, L, H, hd]
        of positions < t, bias [H, 1, L] -> (x [R, 1, D], cache with position t)."""
        h = self.norm_self(x)
        k_t, v_t = self.self_attn.keys_values(h)
        cache = tuple(
            jax.lax.dynamic_update_slice_in_dim(c, new, t, 1)
            for c, new in ((cache[0], k_t), (cache[1], v_t))
        )
        mask = jnp.broadcast_to(
            jnp.arange(cache[0].shape[1]) <= t, (x.shape[0], 1, cache[0].shape[1])
        )
        x = x + self.self_attn.attend(h, cache, mask, bias)
        x = x + self._cross(x, memory_kv, memory_mask)
        return x + self.mlp(self.norm_mlp(x), None), cache


class Stack(nnx.Module):
    """Embedded tokens -> layers -> final norm, with one relative-position table per stack."""

    def __init__(self, cfg: TigerConfig, num_layers: int, causal: bool, *, rngs: nnx.Rngs):
        self.cfg, self.causal = cfg, causal
        self.rel_bias = nnx.Embed(cfg.rel_buckets, cfg.num_heads, rngs=rngs)
        self.layers = nnx.List([Block(cfg, cross=causal, rngs=rngs) for _ in range(num_layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)

    def position_bias(self, t: int) -> jax.Array:
        """Relative position bias [H, T, T] of a length-T sequence."""
        buckets = relative_buckets(
            t, t, not self.causal, self.cfg.rel_buckets, self.cfg.rel_max_distance
        )
        return jnp.transpose(self.rel_bias(jnp.asarray(buckets)), (2, 0, 1))

    def __call__(self, x, mask, key, memory=None, memory_mask=None):
        """x [B, T, D] embedded, mask [B, T, T] -> [B, T, D]."""
        bias = self.position_bias(x.shape[1])
        keys = _keys(key, len(self.layers) + 2)
        x = _dropout(self.drop, x, keys[-2])
        for layer, k in zip(self.layers, keys, strict=False):
            x = layer(x, mask, bias, k, memory, memory_mask)
        return _dropout(self.drop, self.norm(x), keys[-1])

    def step(self, x, t, caches: list[KV], memory_kvs: list[KV], memory_mask):
        """Decoder position t of x [R, 1, D] over per-layer caches (see `Block.step`)."""
        bias = jax.lax.dynamic_slice_in_dim(self.position_bias(caches[0][0].shape[1]), t, 1, axis=1)
        new = []
        for layer, cache, memory_kv in zip(self.layers, caches, memory_kvs, strict=True):
            x, cache = layer.step(x, t, cache, bias, memory_kv, memory_mask)
            new.append(cache)
        return self.norm(x), new


class Tiger(nnx.Module):
    """Encoder-decoder over semantic-ID tokens (see module doc)."""

    def __init__(self, cfg: TigerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.encoder = Stack(cfg, cfg.encoder_layers, causal=False, rngs=rngs)
        self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, rngs=rngs)
        init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2)
        self.head = nnx.Param(init(rngs.params(), (cfg.num_levels, cfg.d_model, cfg.codebook_size)))

    def encode(
        self, tokens: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """tokens [B, S] -> (memory [B, S, D], valid [B, S])."""
        valid = tokens != PAD
        return self.encoder(self.embed(tokens), valid[:, None, :] & valid[:, :, None], key), valid

    def decode(
        self, memory: jax.Array, valid: jax.Array, codes: jax.Array, key: jax.Array | None = None
    ) -> jax.Array:
        """Logits of levels 0..T-1 given the first T-1 codes (teacher forcing).

        memory [B, S, D], valid [B, S]; codes [B * C, T - 1]: C candidate prefixes per
        example (rows b * C .. b * C + C - 1 belong to example b) -> logits [B * C, T, K].
        """
        n, t = codes.shape[0], codes.shape[1] + 1
        tokens = jnp.concatenate(
            [jnp.full((n, 1), BOS, jnp.int32), code_tokens(codes, self.cfg.codebook_size)], 1
        )
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (n, t, t))
        h = self.decoder(self.embed(tokens), causal, key, memory, valid[:, None, :])
        return jnp.einsum("btd,tdk->btk", h, self.head[...][:t])

    def __call__(
        self, enc_tokens: jax.Array, codes: jax.Array, key: jax.Array | None = None
    ) -> jax.Array:
        """Logits [B, L, K] of the target codes [B, L] under teacher forcing."""
        k_enc, k_dec = _keys(key, 2)
        memory, valid = self.encode(enc_tokens, k_enc)
        return self.decode(memory, valid, codes[:, :-1], k_dec)

    def start_decoding(self, memory: jax.Array, rows_per_example: int) -> tuple[list[KV], list[KV]]:
        """(empty self-attention caches [B * C, L, H, hd] per decoder layer, the memory's
        cross-attention keys / values [B, S, H, hd] per layer) for C rows per example."""
        cfg = self.cfg
        shape = (memory.shape[0] * rows_per_example, cfg.num_levels, cfg.num_heads, cfg.head_dim)
        caches = [
            (jnp.zeros(shape, memory.dtype), jnp.zeros(shape, memory.dtype))
            for _ in self.decoder.layers
        ]
        return caches, [layer.cross_attn.keys_values(memory) for layer in self.decoder.layers]

    def decode_step(self, tokens, t, caches: list[KV], memory_kvs: list[KV], valid: jax.Array):
        """Logits [R, K] of level t given the decoder input token [R] at position t (BOS at
        0, then the code tokens of levels < t) and caches of positions < t; eval mode."""
        h, caches = self.decoder.step(
            self.embed(tokens)[:, None], t, caches, memory_kvs, valid[:, None, :]
        )
        head = jax.lax.dynamic_index_in_dim(self.head[...], t, axis=0, keepdims=False)  # [D, K]
        return h[:, 0] @ head, caches


def encoder_tokens(
    item_tokens: jax.Array, users: jax.Array, history: jax.Array, cfg: TigerConfig
) -> jax.Array:
    """[B, 1 + M * L] encoder input from user buckets [B] and left-padded item ids [B, M].

    `item_tokens` [N + 1, L] holds each item's code tokens (row 0 = PAD).
    """
    b = history.shape[0]
    user = NUM_SPECIAL + cfg.num_levels * cfg.codebook_size + users
    return jnp.concatenate([user[:, None], item_tokens[history].reshape(b, -1)], 1).astype(
        jnp.int32
    )


@jax.jit
def sequence_log_probs(model: Tiger, enc_tokens: jax.Array, codes: jax.Array) -> jax.Array:
    """Sum over levels of log p(code_l | codes_<l, input) for candidate IDs codes [B, C, L] -> [B, C]."""
    b, c, levels = codes.shape
    memory, valid = model.encode(enc_tokens)
    flat = codes.reshape(b * c, levels)
    logp = jax.nn.log_softmax(model.decode(memory, valid, flat[:, :-1]), -1)
    return jnp.take_along_axis(logp, flat[..., None], -1)[..., 0].sum(-1).reshape(b, c)


@dataclasses.dataclass(frozen=True)
class SemanticIndex:
    """Semantic IDs of the catalogue: items 1..N -> codes, the trie of the distinct IDs and
    the items behind each ID (a trie leaf index m is `ids[m]`, held by `id_items[m]`)."""

    item_codes: np.ndarray  # [N + 1, L]; row 0 (padding) is unused
    codebook_size: int
    ids: np.ndarray  # [M, L] distinct IDs, lexicographically sorted
    trie: Trie  # over `ids`, no terminator (every ID has L codes)
    id_items: np.ndarray  # [M, G]: items sharing ID m, ascending, 0-padded

    @classmethod
    def from_mapping(
        cls,
        index: Mapping[int, np.ndarray] | np.ndarray,
        num_items: int,
        codebook_size: int | None = None,
    ) -> SemanticIndex:
        """From {dense item id (1..N): codes [L]} or an array [N + 1, L] (row 0 ignored)."""
        if isinstance(index, Mapping):
            missing = sorted(set(range(1, num_items + 1)) - set(index))
            if missing:
                raise ValueError(
                    f"semantic-ID index lacks {len(missing)} of {num_items} items (first: {missing[:5]})"
                )
            first = np.asarray(index[1])
            item_codes = np.zeros((num_items + 1, first.shape[0]), np.int64)
            item_codes[1:] = np.stack([np.asarray(index[i]) for i in range(1, num_items + 1)])
        else:
            item_codes = np.asarray(index, np.int64)
            if item_codes.ndim != 2 or item_codes.shape[0] != num_items + 1:
                raise ValueError(
                    f"index array must be [{num_items + 1}, L], got {item_codes.shape}"
                )
        k = int(item_codes[1:].max()) + 1 if codebook_size is None else codebook_size
        if item_codes[1:].min() < 0 or item_codes[1:].max() >= k:
            raise ValueError(
                f"codes must lie in 0..{k - 1}, got {item_codes[1:].min()}..{item_codes[1:].max()}"
            )
        # The distinct IDs, which one each item has, then each ID's items in ascending order.
        ids, which = np.unique(item_codes[1:], axis=0, return_inverse=True)
        which = which.reshape(-1)
        order = np.argsort(which, kind="stable")
        counts = np.bincount(which, minlength=len(ids))
        slot = np.arange(num_items) - np.repeat(np.cumsum(counts) - counts, counts)
        id_items = np.zeros((len(ids), counts.max()), np.int32)
        id_items[which[order], slot] = order + 1
        return cls(item_codes, k, ids, Trie.build(ids, None), id_items)

    @property
    def num_levels(self) -> int:
        return self.item_codes.shape[1]

    @property
    def num_collisions(self) -> int:
        """Items that share their ID with an item of smaller id."""
        return int((self.id_items > 0).sum() - len(self.id_items))


@functools.partial(jax.jit, static_argnames=("beam_size", "max_fanout"))
def beam_search(
    model: Tiger,
    enc_tokens: jax.Array,
    trie: TrieArrays,
    beam_size: int,
    max_fanout: int,
    live: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Trie-constrained beam search over the L levels (`eval.decoding.beam_search` with
    `Tiger.decode_step`; beam scores are summed log-probs, no length penalty). `live`
    [B, num_nodes] (`eval.decoding.trie.live_nodes`): the trie nodes each example may enter.

    Returns (codes [B, beam, L]; leaves [B, beam], indices into `SemanticIndex.ids`, -1
    where fewer valid IDs exist; scores [B, beam], descending, -inf if empty).
    """
    cfg = model.cfg
    memory, valid = model.encode(enc_tokens)
    caches, memory_kvs = model.start_decoding(memory, beam_size)
    rows = memory.shape[0] * beam_size

    def step(codes: jax.Array, caches, t: jax.Array):  # the code of level t -> logits of t + 1
        tokens = NUM_SPECIAL + t * cfg.codebook_size + codes
        return model.decode_step(tokens, t + 1, caches, memory_kvs, valid)

    logits, caches = model.decode_step(
        jnp.full((rows,), BOS, jnp.int32), 0, caches, memory_kvs, valid
    )
    codes, scores, leaves = shared_beam_search(
        step, logits, caches, num_beams=beam_size, max_len=cfg.num_levels, eos=jnp.array([-1], jnp.int32),
        trie=trie, max_fanout=max_fanout, length_penalty=0.0, live=live,
    )  # fmt: skip
    return codes, leaves, scores


@functools.partial(jax.jit, static_argnames=("k",))
def leaves_to_items(
    leaves: jax.Array, id_items: jax.Array, k: int, seen: jax.Array | None = None
) -> jax.Array:
    """Ranked IDs [B, beam] -> top-k distinct items [B, k] (0 = empty), each ID's items in
    ascending order; items marked in `seen` [B, N + 1] (bool) are left out."""
    b = leaves.shape[0]
    items = jnp.where((leaves >= 0)[..., None], id_items[jnp.maximum(leaves, 0)], 0).reshape(b, -1)
    if seen is not None:
        items = jnp.where(jnp.take_along_axis(seen, items, 1), 0, items)
    if items.shape[1] < k:
        items = jnp.pad(items, ((0, 0), (0, k - items.shape[1])))
    order = jnp.argsort(
        items == 0, axis=1, stable=True
    )  # compact: non-empty slots first, in rank order
    return jnp.take_along_axis(items, order, 1)[:, :k]
