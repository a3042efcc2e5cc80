"""HSTU pointwise attention: XLA reference vs a naive loop; causal-block XLA path and
Pallas kernel vs reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hstu.attention import (
    causal_blocks,
    hstu_attention,
    hstu_attention_blocked,
    hstu_attention_reference,
)


def _inputs(b=3, n=40, h=2, dqk=8, dv=12, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    q, k, v, rab = normal(b, n, h, dqk), normal(b, n, h, dqk), normal(b, n, h, dv), normal(b, n, n)
    # Random lengths with padding, plus the edge cases 0 and N.
    lengths = jnp.asarray(np.r_[0, n, rng.integers(1, n, b - 2)])
    return q, k, v, rab, lengths


def _naive(q, k, v, rab, lengths, n_norm):
    q, k, v, rab, lengths = map(np.asarray, (q, k, v, rab, lengths))
    b, n, h, _ = q.shape
    out = np.zeros((b, n, h, v.shape[-1]), np.float64)
    for bi in range(b):
        denom = n if n_norm == "padded" else max(lengths[bi], 1)
        for i in range(lengths[bi]):
            for hi in range(h):
                for j in range(i + 1):
                    s = q[bi, i, hi] @ k[bi, j, hi] + rab[bi, i, j]
                    out[bi, i, hi] += s / (1 + np.exp(-s)) / denom * v[bi, j, hi]
    return out


@pytest.mark.parametrize("n_norm", ["padded", "length"])
def test_reference_matches_naive_loop(n_norm):
    q, k, v, rab, lengths = _inputs(b=3, n=7, h=2, dqk=3, dv=5)
    out = hstu_attention(q, k, v, rab, lengths, n_norm=n_norm)
    np.testing.assert_allclose(out, _naive(q, k, v, rab, lengths, n_norm), atol=1e-5)


@pytest.mark.parametrize(
    "rab_kind,n_norm", [("batch", "padded"), ("shared", "length"), (None, "padded")]
)
def test_pallas_forward_matches_reference(rab_kind, n_norm):
    q, k, v, rab, lengths = _inputs()  # N = 40 is not a multiple of the block: padded inside
    rab = {"batch": rab, "shared": rab[:1], None: None}[rab_kind]
    ref = hstu_attention(q, k, v, rab, lengths, n_norm=n_norm)
    fused = jax.jit(lambda *a: hstu_attention(*a, n_norm=n_norm, impl="pallas"))(
        q, k, v, rab, lengths
    )
    assert fused.shape == ref.shape
    np.testing.assert_allclose(fused, ref, atol=1e-5, rtol=0)
    assert not np.any(np.asarray(fused)[0])  # length-0 row is all zeros


@pytest.mark.parametrize(
    "rab_kind,n_norm,n", [("batch", "length", 32), ("shared", "padded", 40), (None, "padded", 40)]
)
def test_pallas_gradients_match_reference(rab_kind, n_norm, n):
    """The backward kernels (dq + d(rab) per query block, dk + dv per key block) against
    autodiff of the XLA path, with padding rows, a length-0 row and N not a block multiple."""
    q, k, v, rab, lengths = _inputs(n=n)
    rab = {"batch": rab, "shared": rab[:1], None: None}[rab_kind]
    w = jnp.asarray(np.random.default_rng(7).standard_normal((3, n, 2, 12), np.float32))
    names = ["q", "k", "v"] + (["rab"] if rab is not None else [])

    def grads(impl):
        def f(q, k, v, r):
            return jnp.sum(w * hstu_attention(q, k, v, r, lengths, n_norm=n_norm, impl=impl))

        return jax.jit(jax.grad(f, argnums=tuple(range(len(names)))))(q, k, v, rab)

    for name, g_ref, g_fused in zip(names, grads("xla"), grads("pallas"), strict=True):
        assert float(jnp.abs(g_ref).max()) > 0, name
        np.testing.assert_allclose(g_fused, g_ref, atol=1e-5, rtol=0, err_msg=name)


def test_causal_blocks_cover_the_sequence():
    assert causal_blocks(40, 16) == [(0, 14), (14, 28), (28, 40)]
    assert causal_blocks(50, 64) == [(0, 50)]


@pytest.mark.parametrize("rab_kind", ["array", "callable", None])
def test_blocked_xla_matches_dense_reference(rab_kind):
    """Values and gradients (q, k, v, rab) of the causal-block path equal the dense one."""
    q, k, v, rab, lengths = _inputs(n=40)
    w = jnp.asarray(np.random.default_rng(3).standard_normal((3, 40, 2, 12), np.float32))
    as_input = {
        "array": lambda r: r,
        "callable": lambda r: lambda r0, r1, c1: r[:, r0:r1, :c1],
        None: lambda r: r,
    }[rab_kind]

    def value_and_grads(attn, wrap):
        def loss(q_, k_, v_, rab_):
            rab_ = None if rab_kind is None else wrap(rab_)
            return jnp.sum(w * attn(q_, k_, v_, rab_, lengths, n_norm="length"))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, rab)

    ref_val, ref_grads = value_and_grads(hstu_attention_reference, lambda r: r)
    val, grads = value_and_grads(
        functools.partial(hstu_attention_blocked, block=16), as_input
    )  # 3 blocks
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for name, g, g_ref in zip("q k v rab".split(), grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=0, err_msg=name)


def test_bad_arguments_raise():
    q, k, v, rab, lengths = _inputs(n=8)
    with pytest.raises(ValueError, match="rab"):
        hstu_attention(q, k, v, rab[:, :4], lengths)
    with pytest.raises(ValueError, match="n_norm"):
        hstu_attention(q, k, v, rab, lengths, n_norm="sqrt")
    with pytest.raises(ValueError, match="impl"):
        hstu_attention(q, k, v, rab, lengths, impl="cuda")
