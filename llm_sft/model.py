"""Qwen2 / Qwen2.5 / Qwen3 decoder-only language model in Flax NNX.

Numerically follows HF ``transformers`` (``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``):
fp32 RMSNorm, half-split RoPE (``rotate_half``), grouped-query attention with an fp32
softmax, SwiGLU MLP. Qwen2 has q/k/v biases; Qwen3 has per-head RMSNorm on q and k
(applied before RoPE) and a configurable ``attention_bias``. Sliding-window attention is
not implemented (``use_sliding_window: true`` configs are rejected).

Module names mirror the HF checkpoint (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
...) so that ``llm_sft.params`` is a short key table. Every parameter carries its
partition spec over the ('data', 'fsdp', 'tensor') mesh as NNX ``out_sharding`` metadata.

Masking: ``attention_mask`` [B, T] holds 0 for padding and a positive segment id for real
tokens (plain 0/1 for padded batches; 1, 2, 3, ... for packed sequences, in which case
pass explicit ``positions``). A query attends to keys at earlier-or-equal slots with the
same non-zero id. Without explicit positions they are ``cumsum(mask) - 1`` (as HF
``generate`` does for left padding), continued across the KV cache.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from eval.data.formats import read_json
from eval.errors import ConfigError
from llm_sft.sharding import Spec, constrain, mesh_active

_MASK_VALUE = float(jnp.finfo(jnp.float32).min)
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """Partition specs over mesh axes ('data', 'fsdp', 'tensor'); kernels are [in, out]."""

    embed_vd: Spec = ("tensor", "fsdp")
    qkv_kernel_dh: Spec = ("fsdp", "tensor")
    qkv_bias_h: Spec = ("tensor",)
    o_kernel_hd: Spec = ("tensor", "fsdp")
    o_bias_d: Spec = (None,)
    mlp_up_kernel_df: Spec = ("fsdp", "tensor")
    mlp_down_kernel_fd: Spec = ("tensor", "fsdp")
    lm_head_dv: Spec = ("fsdp", "tensor")
    norm: Spec = (None,)
    act_btd: Spec = (("data", "fsdp"), None, None)
    act_btf: Spec = (("data", "fsdp"), None, "tensor")
    act_btnh: Spec = (("data", "fsdp"), None, "tensor", None)
    act_btv: Spec = (("data", "fsdp"), None, "tensor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus dtype policy (``param_dtype`` storage, ``dtype`` compute)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    o_bias: bool = False
    qk_norm: bool = False
    model_type: str = "qwen2"
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    shd: ShardingConfig = ShardingConfig()
    # The source config.json (as JSON text) so that save_hf keeps fields we do not model
    # (token ids, max_position_embeddings, ...). Excluded from equality and hashing.
    hf_config_json: str = dataclasses.field(default="", compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if self.model_type not in _ARCHITECTURES:
            raise ValueError(
                f"model_type must be one of {sorted(_ARCHITECTURES)}, got {self.model_type!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_hf_config(
        cls,
        hf: Mapping[str, Any] | str | Path,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = None,
        **overrides: Any,
    ) -> ModelConfig:
        """Builds a config from an HF config dict, a ``config.json`` path or its folder."""
        source = "<dict>"
        if not isinstance(hf, Mapping):
            path = Path(hf)
            path = path / "config.json" if path.is_dir() else path
            source = str(path)
            hf = read_json(path)
        model_type = hf.get("model_type")
        if model_type not in _ARCHITECTURES:
            raise ConfigError(
                f"{source}: model_type={model_type!r}, expected one of {sorted(_ARCHITECTURES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(
                f"{source}: hidden_act={hf['hidden_act']!r}, only 'silu' is supported"
            )
        if hf.get("use_sliding_window", False):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"{source}: rope type {rope_type!r} is not supported (only 'default')"
            )
        heads = hf["num_attention_heads"]
        is_qwen3 = model_type == "qwen3"
        attention_bias = bool(hf.get("attention_bias", False))
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if is_qwen3 else True,
            o_bias=attention_bias if is_qwen3 else False,
            qk_norm=is_qwen3,
            model_type=model_type,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            dtype=dtype,
            param_dtype=dtype if param_dtype is None else param_dtype,
            hf_config_json=json.dumps(dict(hf)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """HF ``config.json`` contents (source fields kept, architecture fields overwritten)."""
        out = json.loads(self.hf_config_json) if self.hf_config_json else {}
        out.update(
            model_type=self.model_type,
            architectures=[_ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            use_sliding_window=False,
            torch_dtype=self.param_dtype.name,
        )
        out.pop("dtype", None)
        if "rope_parameters" in out:
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.model_type == "qwen3":
            out["attention_bias"] = self.qkv_bias
        return out


@flax.struct.dataclass
class Cache:
    """Static-length KV cache shared by all layers.

    k, v: per layer [B, S, num_kv_heads, head_dim]; mask: [B, S] int32 segment id of each
    filled slot (0 = empty or padding); index: int32 scalar, the next slot to write.
    """

    k: list[jax.Array]
    v: list[jax.Array]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
        """Empty cache for ``max_len`` slots (prompt plus new tokens)."""
        shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
        dtype = config.dtype if dtype is None else dtype
        zeros = [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]
        return cls(
            k=zeros,
            v=list(zeros),
            mask=jnp.zeros((batch_size, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def _partitioned(init: Any, spec: Spec) -> Any:
    """Initializer carrying sharding metadata; shards eagerly only under an active mesh."""
    return nnx.with_partitioning(init, tuple(spec), eager_sharding=mesh_active())


def _linear(
    cfg: ModelConfig,
    d_in: int,
    d_out: int,
    use_bias: bool,
    kernel_spec: Spec,
    bias_spec: Spec,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_partitioned(nnx.initializers.normal(cfg.initializer_range), kernel_spec),
        bias_init=_partitioned(nnx.initializers.zeros_init(), bias_spec),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, normalised in fp32 (HF ``Qwen2RMSNorm``)."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.eps = cfg.rms_norm_eps
        self.dtype = cfg.dtype
        self.scale = nnx.Param(
            jnp.ones((dim,), cfg.param_dtype),
            out_sharding=tuple(cfg.shd.norm),
            eager_sharding=mesh_active(),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding with HF's half-split layout. x: [B, T, N, H]; positions: [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with optional KV cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        shd, d, h = cfg.shd, cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(
            cfg, d, cfg.num_heads * h, cfg.qkv_bias, shd.qkv_kernel_dh, shd.qkv_bias_h, rngs
        )
        self.k_proj = _linear(
            cfg, d, cfg.num_kv_heads * h, cfg.qkv_bias, shd.qkv_kernel_dh, shd.qkv_bias_h, rngs
        )
        self.v_proj = _linear(
            cfg, d, cfg.num_kv_heads * h, cfg.qkv_bias, shd.qkv_kernel_dh, shd.qkv_bias_h, rngs
        )
        self.o_proj = _linear(
            cfg, cfg.num_heads * h, d, cfg.o_bias, shd.o_kernel_hd, shd.o_bias_d, rngs
        )
        self.q_norm = RMSNorm(h, cfg) if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, cfg) if cfg.qk_norm else None

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        index: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x: [B, T, D]; mask: [B, T, S] bool; kv: cached (k, v) [B, S, K, H] or None."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, positions, cfg.rope_theta), cfg.shd.act_btnh)
        k = constrain(apply_rope(k, positions, cfg.rope_theta), cfg.shd.act_btnh)
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            k, v = constrain(k, cfg.shd.act_btnh), constrain(v, cfg.shd.act_btnh)
            kv = (k, v)

        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
        logits = (
            jnp.einsum(
                "btkgh,bskh->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32
            )
            * cfg.head_dim**-0.5
        )
        logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(cfg.dtype))
        out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
        return constrain(self.o_proj(out), cfg.shd.act_btd), kv


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        shd, d, f = cfg.shd, cfg.hidden_size, cfg.intermediate_size
        self.act_spec = shd.act_btf
        self.gate_proj = _linear(cfg, d, f, False, shd.mlp_up_kernel_df, (None,), rngs)
        self.up_proj = _linear(cfg, d, f, False, shd.mlp_up_kernel_df, (None,), rngs)
        self.down_proj = _linear(cfg, f, d, False, shd.mlp_down_kernel_fd, (None,), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), self.act_spec)
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.act_spec = cfg.shd.act_btd
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        index: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        attn, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, index)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, self.act_spec), kv


def segment_mask(q_seg: jax.Array, k_seg: jax.Array, q_start: jax.Array | int) -> jax.Array:
    """[B, T, S] bool: key slot <= query slot, same segment id, key not padding.

    q_seg: [B, T] ids of the queries, which occupy slots q_start .. q_start + T - 1;
    k_seg: [B, S] ids of the key slots 0 .. S - 1.
    """
    q_slot = q_start + jnp.arange(q_seg.shape[1])
    causal = jnp.arange(k_seg.shape[1])[None, :] <= q_slot[:, None]
    same = k_seg[:, None, :] == q_seg[:, :, None]
    return causal[None] & same & (k_seg[:, None, :] > 0)


class Qwen(nnx.Module):
    """Qwen2/Qwen3 causal LM: ``model(input_ids, ...) -> (logits, cache[, hidden])``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        shd = config.shd
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            embedding_init=_partitioned(
                nnx.initializers.normal(config.initializer_range), shd.embed_vd
            ),
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _linear(
                config, config.hidden_size, config.vocab_size, False, shd.lm_head_dv, (None,), rngs
            )
        )

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: Cache | None = None,
        return_hidden: bool = False,
        logits_to_keep: int | None = None,
    ):
        """Runs the model on ``input_ids`` [B, T].

        Args:
          positions: [B, T] RoPE positions; default ``cumsum(attention_mask > 0) - 1``
            (clipped at 0), offset by the number of real tokens already in ``cache``.
          attention_mask: [B, T] int, 0 = padding, >0 = segment id (default all ones).
          cache: KV cache; the T new tokens are written at ``cache.index`` (the caller
            must keep ``cache.index + T`` within the cache length).
          return_hidden: also return the final-norm hidden states [B, T, D]
            (HF ``hidden_states[-1]``).
          logits_to_keep: compute logits for the last this many positions only (HF's
            ``logits_to_keep``; 1 for a prefill, 0 for none); None = all T.

        Returns:
          ``(logits [B, T or logits_to_keep, V], new_cache or None)``, plus ``hidden``
          if requested.
        """
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if cache is None:
            k_seg, index, offset = attention_mask, 0, 0
        else:
            index = cache.index
            k_seg = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
            offset = jnp.sum(cache.mask > 0, axis=1, keepdims=True)
        if positions is None:
            positions = jnp.maximum(offset + jnp.cumsum(attention_mask > 0, axis=1) - 1, 0)
        mask = segment_mask(attention_mask, k_seg, index)

        x = constrain(self.embed_tokens(input_ids), cfg.shd.act_btd)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = layer(x, positions, mask, kv, index)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        hidden = self.norm(x)
        keep = hidden.shape[1] if logits_to_keep is None else logits_to_keep
        logits = self.head(hidden[:, hidden.shape[1] - keep :])
        new_cache = (
            None
            if cache is None
            else Cache(k=new_k, v=new_v, mask=k_seg, index=index + input_ids.shape[1])
        )
        return (logits, new_cache, hidden) if return_hidden else (logits, new_cache)

    def head(self, hidden: jax.Array) -> jax.Array:
        """LM head: final-norm hidden states [B, T, D] -> logits [B, T, V] (tied or not)."""
        if self.lm_head is None:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return constrain(logits, self.config.shd.act_btv)
