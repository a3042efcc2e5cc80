"""Jitted greedy decoding with a static KV cache (prefill + ``lax.scan``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_sft.model import Cache, Qwen


def greedy_generate(
    model: Qwen,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> jax.Array:
    """Greedy continuation of a LEFT-padded prompt batch.

    Args:
      input_ids, attention_mask: [B, T] prompts, padding on the left (mask 0).
      max_new_tokens: number of tokens to generate (static).
      eos_token_id: id or ids; once a row emits one, its later tokens are
        ``pad_token_id`` (as HF ``generate`` does).

    Returns:
      [B, max_new_tokens] int32 generated tokens (prompt not included).
    """
    graphdef, state = nnx.split(model)
    eos = np.atleast_1d(-1 if eos_token_id is None else np.asarray(eos_token_id))
    return _greedy(
        graphdef,
        state,
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, jnp.int32),
        max_new_tokens,
        jnp.asarray(eos, jnp.int32),
        jnp.asarray(pad_token_id, jnp.int32),
    )


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy(graphdef, state, input_ids, attention_mask, max_new_tokens, eos, pad):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    cache = Cache.init(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = model(input_ids, attention_mask=attention_mask, cache=cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    ones = jnp.ones((batch, 1), jnp.int32)

    def step(carry, _):
        token, done, cache = carry
        token = jnp.where(done, pad, token)
        done = done | jnp.isin(token, eos)
        logits, cache = model(token[:, None], attention_mask=ones, cache=cache)
        return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), done, cache), token

    carry = (first, jnp.zeros((batch,), bool), cache)
    _, tokens = jax.lax.scan(step, carry, None, length=max_new_tokens)
    return tokens.T
