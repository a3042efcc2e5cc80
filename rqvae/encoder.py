"""BERT encoder (as in sentence-transformers/all-MiniLM-L6-v2) in Flax NNX, with HF weight loading.

Post-LN transformer: word + absolute position + token-type embeddings -> LayerNorm ->
layers of (self-attention -> add & LayerNorm -> GELU MLP -> add & LayerNorm). Sentence
embeddings are sentence-transformers' mean pooling over the attention mask followed by
L2 normalisation. `from_hf` maps a Hugging Face `BertModel` state dict (numpy arrays)
onto the module; HF linear weights are [out, in], NNX kernels [in, out].
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, text: str) -> BertConfig:
        """From a HF `config.json` (unknown keys ignored; only GELU, absolute positions supported)."""
        raw = json.loads(text)
        if (
            raw.get("hidden_act", "gelu") != "gelu"
            or raw.get("position_embedding_type", "absolute") != "absolute"
        ):
            raise ValueError(
                f"config.json: unsupported hidden_act/position_embedding_type in {raw}"
            )
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


class Layer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.num_heads = cfg.num_attention_heads
        self.query, self.key, self.value, self.attn_out = (
            nnx.Linear(d, d, rngs=rngs) for _ in range(4)
        )
        self.attn_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
        self.intermediate = nnx.Linear(d, cfg.intermediate_size, rngs=rngs)
        self.output = nnx.Linear(cfg.intermediate_size, d, rngs=rngs)
        self.out_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, T, D], mask [B, T] (True = token) -> [B, T, D]."""
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)  # noqa: E731
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.num_heads)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, t, d)
        x = self.attn_norm(x + self.attn_out(attn))
        return self.out_norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.word_embeddings = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, d, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
        self.embed_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Last hidden states [B, T, D] of token ids [B, T] (positions 0..T-1)."""
        types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        positions = jnp.arange(input_ids.shape[1])[None]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(types)
        )
        x = self.embed_norm(x)
        mask = attention_mask.astype(bool)
        for layer in self.layers:
            x = layer(x, mask)
        return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """sentence-transformers' mean pooling: average of the unmasked token states [B, D]."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


@jax.jit
def sentence_embeddings(
    model: BertEncoder, input_ids: jax.Array, attention_mask: jax.Array
) -> jax.Array:
    """L2-normalised mean-pooled embeddings [B, D] (all-MiniLM-L6-v2's Pooling + Normalize)."""
    pooled = mean_pool(model(input_ids, attention_mask), attention_mask)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# NNX attribute -> HF module name (BertModel state dict, optional "bert." prefix).
_LAYER_KEYS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "out_norm": "output.LayerNorm",
}
_PARAM_KEYS = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def _hf_name(path: tuple) -> str:
    """HF state-dict key of an NNX parameter path, e.g. ('layers', 0, 'query', 'kernel')."""
    *module, param = (str(p) for p in path)
    if module[0] == "layers":
        name = f"encoder.layer.{module[1]}.{_LAYER_KEYS[module[2]]}"
    else:
        name = "embeddings.LayerNorm" if module[0] == "embed_norm" else f"embeddings.{module[0]}"
    return f"{name}.{_PARAM_KEYS[param]}"


def from_hf(cfg: BertConfig, tensors: Mapping[str, np.ndarray]) -> BertEncoder:
    """A `BertEncoder` holding the weights of a HF BertModel state dict."""
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    abstract = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def load(path, leaf):
        # State paths are dict keys / list indices, then the Variable's `.value` attribute.
        keys = tuple(
            p.key if isinstance(p, jax.tree_util.DictKey) else p.idx
            for p in path
            if not isinstance(p, jax.tree_util.GetAttrKey)
        )
        name = _hf_name(keys)
        if name not in tensors:
            raise KeyError(f"weights lack {name!r} (for {keys})")
        value = np.asarray(tensors[name], np.float32)
        value = value.T if keys[-1] == "kernel" else value
        if value.shape != leaf.shape:
            raise ValueError(f"{name}: shape {value.shape}, expected {leaf.shape}")
        return jnp.asarray(value)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(load, state))
