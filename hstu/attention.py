"""HSTU pointwise (SiLU) causal attention: XLA (dense reference, causal blocks) and Pallas.

For each batch row b, head h and query position i < lengths[b]:

    out[b, i, h] = sum_{j <= i} SiLU(q[b, i, h] . k[b, j, h] + rab[b, i, j]) / n * v[b, j, h]

with no 1/sqrt(d) scaling (HSTU, arXiv:2402.17152, eq. 2). `n` is the padded length N
(`n_norm="padded"`, the reference's default) or the row's real length (`n_norm="length"`).
Rows at or beyond `lengths[b]` (right padding) are zero.

`impl="xla"` splits the queries into blocks of <= `XLA_BLOCK` rows and skips the key
blocks above the diagonal (at N 200: 75% of the dense work, bias included when it is
given as a `RabFn`). The Pallas kernel runs one program per (batch, head, query block)
and loops over key blocks only up to the causal diagonal and the row's length, so fully
masked blocks are never loaded. Its backward (`custom_vjp`) is two more kernels: one per
query block (dq and the rows of d(rab)) and one per key block (dk and dv), each visiting
only the blocks on or below the causal diagonal and within the rows' lengths.
"""

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NNorm = Literal["padded", "length"]
Impl = Literal["xla", "pallas"]
# A relative bias given lazily: (row_start, row_end, col_end) -> [B or 1, rows, col_end].
RabFn = Callable[[int, int, int], jax.Array]
XLA_BLOCK = 128  # largest query block of the blocked XLA path


def _row_scale(lengths: jax.Array, n: int, n_norm: NNorm) -> jax.Array:
    """[B, n] float32: 1/normaliser on valid rows (i < length), 0 on padding rows."""
    lengths = lengths.astype(jnp.int32)
    valid = jnp.arange(n, dtype=jnp.int32)[None, :] < lengths[:, None]
    if n_norm == "padded":
        denom = jnp.full(lengths.shape, n, jnp.float32)
    elif n_norm == "length":
        denom = jnp.maximum(lengths, 1).astype(jnp.float32)
    else:
        raise ValueError(f"hstu_attention: n_norm must be 'padded' or 'length', got {n_norm!r}")
    return jnp.where(valid, 1.0 / denom[:, None], 0.0)


def _check_shapes(q, k, v, rab, lengths) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"hstu_attention: expected q,k [B,N,H,dqk] and v [B,N,H,dv], got "
            f"q{q.shape} k{k.shape} v{v.shape}"
        )
    b, n = q.shape[:2]
    if (
        rab is not None
        and not callable(rab)
        and (rab.ndim != 3 or rab.shape[0] not in (1, b) or rab.shape[1:] != (n, n))
    ):
        raise ValueError(f"hstu_attention: rab must be [{b} or 1, {n}, {n}], got {rab.shape}")
    if lengths.shape != (b,):
        raise ValueError(f"hstu_attention: lengths must be [{b}], got {lengths.shape}")


def hstu_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rab: jax.Array | None,
    lengths: jax.Array,
    *,
    n_norm: NNorm = "padded",
) -> jax.Array:
    """XLA reference: dense einsum with causal and per-row length masks."""
    n = q.shape[1]
    scores = jnp.einsum("bnhd,bmhd->bhnm", q, k)
    if rab is not None:
        scores = scores + rab[:, None].astype(scores.dtype)
    causal = jnp.tril(jnp.ones((n, n), dtype=bool))
    scale = _row_scale(lengths, n, n_norm).astype(scores.dtype)  # [B, N]
    weights = jnp.where(causal, jax.nn.silu(scores), 0.0) * scale[:, None, :, None]
    return jnp.einsum("bhnm,bmhd->bnhd", weights, v)


def causal_blocks(n: int, block: int | None = None) -> list[tuple[int, int]]:
    """Query blocks (r0, r1) of near-equal size <= `block` (default `XLA_BLOCK`) covering
    [0, n); under a causal mask rows [r0, r1) need keys [0, r1) only."""
    num_blocks = -(-n // (block or XLA_BLOCK))
    size = -(-n // num_blocks)
    return [(r0, min(r0 + size, n)) for r0 in range(0, n, size)]


def hstu_attention_blocked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rab: jax.Array | RabFn | None,
    lengths: jax.Array,
    *,
    n_norm: NNorm = "padded",
    block: int | None = None,
) -> jax.Array:
    """XLA, causal blocks: query rows [r0, r1) see keys [0, r1) only.

    Same result as the reference, but the fully masked blocks above the diagonal are
    never computed: with nb equal query blocks the matmuls and the [B, N, N] elementwise
    work (bias included, when `rab` is a `RabFn`) shrink to (nb + 1) / (2 nb) of dense.
    The products run as `matmul` on head-major [B, H, N, d] arrays with the keys
    transposed once ([B, H, d, N]): XLA:CPU then needs no per-block transposes (the
    einsum layout cost ~25% of the attention's forward + backward time on CPU).
    """
    n = q.shape[1]
    scale = _row_scale(lengths, n, n_norm).astype(q.dtype)  # [B, N]
    qh, vh = q.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, N, d]
    kt = k.transpose(0, 2, 3, 1)  # [B, H, d, N]
    outs = []
    for r0, r1 in causal_blocks(n, block):
        scores = jnp.matmul(qh[:, :, r0:r1], kt[..., :r1])  # [B, H, rows, r1]
        if rab is not None:
            bias = rab(r0, r1, r1) if callable(rab) else rab[:, r0:r1, :r1]
            scores = scores + bias[:, None].astype(scores.dtype)
        causal = jnp.arange(r1)[None, :] <= jnp.arange(r0, r1)[:, None]
        weights = jnp.where(causal, jax.nn.silu(scores), 0.0) * scale[:, None, r0:r1, None]
        outs.append(jnp.matmul(weights, vh[:, :, :r1]))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def _fwd_kernel(scale_ref, q_ref, k_ref, v_ref, *rest, block_q: int, block_k: int, has_rab: bool):
    """One (batch, head, query block): loops over the key blocks it can see."""
    if has_rab:
        rab_ref, o_ref = rest
    else:
        (o_ref,) = rest
    q_start = pl.program_id(2) * block_q
    scale = scale_ref[...]  # [bq]: 1/n on valid rows, 0 on padding rows (a prefix is valid).
    num_valid = jnp.sum((scale > 0).astype(jnp.int32))
    # Keys needed: j <= i < q_start + num_valid; none when the whole block is padding.
    num_k_blocks = jnp.where(num_valid > 0, pl.cdiv(q_start + num_valid, block_k), 0)
    q = q_ref[...]
    rows = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def body(kb, acc):
        k_start = kb * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if has_rab:
            s = s + rab_ref[:, pl.ds(k_start, block_k)].astype(jnp.float32)
        cols = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        a = jnp.where(cols <= rows, jax.nn.silu(s), 0.0)
        return acc + jnp.dot(a.astype(v.dtype), v, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, num_k_blocks, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = (acc * scale[:, None]).astype(o_ref.dtype)


def _silu_and_grad(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    sig = jax.nn.sigmoid(s)
    return s * sig, sig * (1.0 + s * (1.0 - sig))


def _bwd_dq_kernel(
    scale_ref, q_ref, k_ref, v_ref, g_ref, *rest, block_q: int, block_k: int, has_rab: bool
):
    """One (batch, head, query block): dq, and the block's rows of d(rab) for this head."""
    if has_rab:
        rab_ref, dq_ref, drab_ref = rest
        drab_ref[...] = jnp.zeros(drab_ref.shape, drab_ref.dtype)
    else:
        (dq_ref,) = rest
    q_start = pl.program_id(2) * block_q
    scale = scale_ref[...]
    num_valid = jnp.sum((scale > 0).astype(jnp.int32))
    num_k_blocks = jnp.where(num_valid > 0, pl.cdiv(q_start + num_valid, block_k), 0)
    q, g = q_ref[...], g_ref[...]
    rows = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def body(kb, dq):
        k_start = kb * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
        if has_rab:
            s = s + rab_ref[:, pl.ds(k_start, block_k)].astype(jnp.float32)
        cols = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        d_a = jnp.dot(g, v.T, preferred_element_type=jnp.float32) * scale[:, None]
        ds = jnp.where(cols <= rows, d_a * _silu_and_grad(s)[1], 0.0)
        if has_rab:
            drab_ref[:, pl.ds(k_start, block_k)] = ds.astype(drab_ref.dtype)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, num_k_blocks, body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _bwd_dkv_kernel(
    scale_ref, q_ref, k_ref, v_ref, g_ref, *rest, block_q: int, block_k: int, has_rab: bool
):
    """One (batch, head, key block): dk and dv, looping over the query blocks that see it."""
    if has_rab:
        rab_ref, dk_ref, dv_ref = rest
    else:
        dk_ref, dv_ref = rest
    k_start = pl.program_id(2) * block_k
    scale_all = scale_ref[...]
    num_valid = jnp.sum((scale_all > 0).astype(jnp.int32))
    k, v = k_ref[...], v_ref[...]
    cols = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)

    def body(qb, carry):
        dk, dv = carry
        q_start = qb * block_q
        q = q_ref[pl.ds(q_start, block_q), :]
        g = g_ref[pl.ds(q_start, block_q), :]
        scale = scale_ref[pl.ds(q_start, block_q)]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
        if has_rab:
            s = s + rab_ref[pl.ds(q_start, block_q), :].astype(jnp.float32)
        rows = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        causal = cols <= rows
        act, dact = _silu_and_grad(s)
        a = jnp.where(causal, act, 0.0)
        g_scaled = g * scale[:, None].astype(g.dtype)
        ds = jnp.where(
            causal, jnp.dot(g_scaled, v.T, preferred_element_type=jnp.float32) * dact, 0.0
        )
        dv = dv + jnp.dot(a.astype(g.dtype).T, g_scaled, preferred_element_type=jnp.float32)
        dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
        return dk, dv

    # Query blocks from the one holding row k_start (causal) to the last with a valid row.
    first, last = k_start // block_q, pl.cdiv(num_valid, block_q)
    dk, dv = jax.lax.fori_loop(
        first,
        jnp.maximum(first, last),
        body,
        (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32)),
    )
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _head_dim(d: int) -> int:
    """Head dims are padded to a power of two >= 16 (Triton `dot` block constraints)."""
    return max(16, pl.next_power_of_2(d))


def _to_head_major(x: jax.Array, n_pad: int, d_pad: int) -> jax.Array:
    """[B, N, H, d] -> zero-padded [B, H, n_pad, d_pad] (padding leaves results unchanged)."""
    return _pad_to(_pad_to(x.transpose(0, 2, 1, 3), 2, n_pad), 3, d_pad)


def _from_head_major(x: jax.Array, n: int, d: int) -> jax.Array:
    """Inverse of `_to_head_major`: [B, H, n_pad, d_pad] -> [B, n, H, d]."""
    return x[:, :, :n, :d].transpose(0, 2, 1, 3)


def _head_major(q, k, v, rab, lengths, n_norm, block_q, block_k):
    """Zero-padded head-major operands of the kernels, the padded bias and row scales."""
    n, (dqk, dv) = q.shape[1], (q.shape[-1], v.shape[-1])
    n_pad = pl.cdiv(n, max(block_q, block_k)) * max(block_q, block_k)
    dqk_p, dv_p = _head_dim(dqk), _head_dim(dv)
    scale = _pad_to(_row_scale(lengths, n, n_norm), 1, n_pad)
    rab_p = None if rab is None else _pad_to(_pad_to(rab, 1, n_pad), 2, n_pad)
    return (
        _to_head_major(q, n_pad, dqk_p),
        _to_head_major(k, n_pad, dqk_p),
        _to_head_major(v, n_pad, dv_p),
        rab_p,
        scale,
    )


def _pallas_forward(q, k, v, rab, lengths, n_norm, block_q, block_k, interpret):
    b, n, h, _ = q.shape
    dv = v.shape[-1]
    qh, kh, vh, rab_p, scale = _head_major(q, k, v, rab, lengths, n_norm, block_q, block_k)
    n_pad, dqk_p, dv_p = qh.shape[2], qh.shape[3], vh.shape[3]
    in_specs = [
        pl.BlockSpec((None, block_q), lambda bi, hi, qi: (bi, qi)),
        pl.BlockSpec((None, None, block_q, dqk_p), lambda bi, hi, qi: (bi, hi, qi, 0)),
        pl.BlockSpec((None, None, n_pad, dqk_p), lambda bi, hi, qi: (bi, hi, 0, 0)),
        pl.BlockSpec((None, None, n_pad, dv_p), lambda bi, hi, qi: (bi, hi, 0, 0)),
    ]
    args = [scale, qh, kh, vh]
    if rab is not None:
        shared = rab.shape[0] == 1
        in_specs.append(
            pl.BlockSpec((None, block_q, n_pad), lambda bi, hi, qi: (0 if shared else bi, qi, 0))
        )
        args.append(rab_p)
    kernel = functools.partial(
        _fwd_kernel, block_q=block_q, block_k=block_k, has_rab=rab is not None
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, h, n_pad, dv_p), q.dtype),
        grid=(b, h, n_pad // block_q),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, block_q, dv_p), lambda bi, hi, qi: (bi, hi, qi, 0)),
        interpret=interpret,
        name="hstu_attention_fwd",
    )(*args)
    return _from_head_major(out, n, dv)


def _pallas_backward(q, k, v, rab, lengths, g, n_norm, block_q, block_k, interpret):
    """dq, dk, dv, drab from two kernels: per query block (dq, d(rab)) and per key block (dk, dv)."""
    b, n, h, dqk = q.shape
    dv = v.shape[-1]
    qh, kh, vh, rab_p, scale = _head_major(q, k, v, rab, lengths, n_norm, block_q, block_k)
    n_pad, dqk_p, dv_p = qh.shape[2], qh.shape[3], vh.shape[3]
    gh = _to_head_major(g, n_pad, dv_p)
    has_rab = rab is not None
    shared = has_rab and rab.shape[0] == 1
    whole = lambda d: pl.BlockSpec((None, None, n_pad, d), lambda bi, hi, i: (bi, hi, 0, 0))  # noqa: E731
    rows = lambda d: pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i: (bi, hi, i, 0))  # noqa: E731
    cols = lambda d: pl.BlockSpec((None, None, block_k, d), lambda bi, hi, i: (bi, hi, i, 0))  # noqa: E731

    dq_specs = [
        pl.BlockSpec((None, block_q), lambda bi, hi, i: (bi, i)),
        rows(dqk_p),
        whole(dqk_p),
        whole(dv_p),
        rows(dv_p),
    ]
    dq_out_specs = [rows(dqk_p)]
    dq_shapes = [jax.ShapeDtypeStruct(qh.shape, q.dtype)]
    if has_rab:
        dq_specs.append(
            pl.BlockSpec((None, block_q, n_pad), lambda bi, hi, i: (0 if shared else bi, i, 0))
        )
        dq_out_specs.append(
            pl.BlockSpec((None, None, block_q, n_pad), lambda bi, hi, i: (bi, hi, i, 0))
        )
        dq_shapes.append(jax.ShapeDtypeStruct((b, h, n_pad, n_pad), jnp.float32))
    args = [scale, qh, kh, vh, gh] + ([rab_p] if has_rab else [])
    dq_out = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, block_q=block_q, block_k=block_k, has_rab=has_rab),
        out_shape=dq_shapes,
        grid=(b, h, n_pad // block_q),
        in_specs=dq_specs,
        out_specs=dq_out_specs,
        interpret=interpret,
        name="hstu_attention_bwd_dq",
    )(*args)

    dkv_specs = [
        pl.BlockSpec((None, n_pad), lambda bi, hi, i: (bi, 0)),
        whole(dqk_p),
        cols(dqk_p),
        cols(dv_p),
        whole(dv_p),
    ]
    if has_rab:
        dkv_specs.append(
            pl.BlockSpec((None, n_pad, block_k), lambda bi, hi, i: (0 if shared else bi, 0, i))
        )
    dk, dvv = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, block_q=block_q, block_k=block_k, has_rab=has_rab),
        out_shape=[
            jax.ShapeDtypeStruct(kh.shape, k.dtype),
            jax.ShapeDtypeStruct(vh.shape, v.dtype),
        ],
        grid=(b, h, n_pad // block_k),
        in_specs=dkv_specs,
        out_specs=[cols(dqk_p), cols(dv_p)],
        interpret=interpret,
        name="hstu_attention_bwd_dkv",
    )(*args)

    drab = None
    if has_rab:
        drab = jnp.sum(dq_out[1][:, :, :n, :n], axis=1)  # the bias is shared across heads
        drab = jnp.sum(drab, axis=0, keepdims=True) if shared else drab
        drab = drab.astype(rab.dtype)
    return (
        _from_head_major(dq_out[0], n, dqk),
        _from_head_major(dk, n, dqk),
        _from_head_major(dvv, n, dv),
        drab,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _pallas_attention(q, k, v, rab, lengths, n_norm, block_q, block_k, interpret):
    return _pallas_forward(q, k, v, rab, lengths, n_norm, block_q, block_k, interpret)


def _pallas_attention_fwd(q, k, v, rab, lengths, n_norm, block_q, block_k, interpret):
    out = _pallas_forward(q, k, v, rab, lengths, n_norm, block_q, block_k, interpret)
    return out, (q, k, v, rab, lengths)


def _pallas_attention_bwd(n_norm, block_q, block_k, interpret, residuals, g):
    q, k, v, rab, lengths = residuals
    return (*_pallas_backward(q, k, v, rab, lengths, g, n_norm, block_q, block_k, interpret), None)


_pallas_attention.defvjp(_pallas_attention_fwd, _pallas_attention_bwd)


def hstu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rab: jax.Array | RabFn | None,
    lengths: jax.Array,
    *,
    n_norm: NNorm = "padded",
    impl: Impl = "xla",
    interpret: bool | None = None,
    block_q: int = 16,
    block_k: int = 16,
) -> jax.Array:
    """HSTU causal pointwise attention.

    Args:
      q, k: [B, N, H, dqk]; v: [B, N, H, dv].
      rab: relative attention bias [B or 1, N, N] shared across heads, a `RabFn` that
        computes any block of it on demand, or None.
      lengths: [B] int, real (right-padded) sequence lengths.
      n_norm: "padded" divides by N, "length" by each row's real length.
      impl: "xla" (matmuls over causal blocks, `hstu_attention_blocked`) or "pallas"
        (fused forward and backward kernels).
      interpret: run the Pallas kernel in interpret mode; None = only on CPU.
      block_q, block_k: Pallas query / key block sizes.

    Returns:
      [B, N, H, dv]; rows at or beyond `lengths` are zero.
    """
    _check_shapes(q, k, v, rab, lengths)
    if impl == "xla":
        return hstu_attention_blocked(q, k, v, rab, lengths, n_norm=n_norm)
    if impl != "pallas":
        raise ValueError(f"hstu_attention: impl must be 'xla' or 'pallas', got {impl!r}")
    if callable(rab):
        n = q.shape[1]
        rab = rab(0, n, n)
        _check_shapes(q, k, v, rab, lengths)
    _row_scale(lengths, 1, n_norm)  # validates n_norm eagerly
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _pallas_attention(q, k, v, rab, lengths, n_norm, block_q, block_k, interpret)
