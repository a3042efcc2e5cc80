r"""Memory and time of the full-catalogue softmax: chunked (`hstu.losses`) vs dense.

  python -m tools.bench_losses [--num_items=100000] [--batch_size=128] [--max_seq_len=50]

Loss + gradients (w.r.t. the queries and the item table) of next-item cross-entropy over
every item, for B x N query tokens of width D. Memory is XLA's own account of the
compiled program (`memory_analysis()`: temporaries + outputs, i.e. the peak beyond the
inputs), so the dense version need not fit in RAM to be measured; time is the median of
repeated calls, on a catalogue small enough for both (`--time_items`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from eval import cli
from eval.allocator import active_allocator, reexec_with_tcmalloc
from hstu.losses import chunked_softmax_loss
from tools.timing import cpu_threads, median_seconds


def dense_softmax_loss(query, table, targets, weights, temperature=1.0):
    """The reference: [B, N, num_items + 1] logits materialised."""
    logits = (query @ table.T / temperature).at[..., 0].set(-jnp.inf)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _inputs(num_items: int, b: int, n: int, d: int):
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.standard_normal((b, n, d)) * 0.1, jnp.float32),
        jnp.asarray(rng.standard_normal((num_items + 1, d)) * 0.1, jnp.float32),
        jnp.asarray(rng.integers(1, num_items + 1, (b, n)), jnp.int32),
        jnp.ones((b, n), jnp.float32),
    )


def _compiled(loss, args):
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return grad, grad.lower(*args).compile()


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def main(argv):
    del argv
    f = flags.FLAGS
    b, n, d = f.batch_size, f.max_seq_len, f.embedding_dim
    losses = {
        "dense": dense_softmax_loss,
        f"chunked ({f.chunk})": lambda q, t, y, w: chunked_softmax_loss(q, t, y, w, 1.0, f.chunk),
    }
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {cpu_threads()} "
          f"CPU threads, allocator {active_allocator()}")  # fmt: skip
    print(f"full softmax loss + grads, B {b} x N {n} tokens, D {d}")
    args = _inputs(f.num_items, b, n, d)
    for name, loss in losses.items():
        _, compiled = _compiled(loss, args)
        print(f"  {f.num_items:,} items, {name}: peak {peak_bytes(compiled) / 2**20:,.0f} MiB "
              f"(inputs {sum(a.nbytes for a in args) / 2**20:,.0f} MiB)")  # fmt: skip
    small = _inputs(f.time_items, b, n, d)
    times = {}
    for name, loss in losses.items():
        fn, _ = _compiled(loss, small)
        jax.block_until_ready(fn(*small))
        times[name] = median_seconds(lambda fn=fn: jax.block_until_ready(fn(*small)), f.repeats)
        print(f"  {f.time_items:,} items, {name}: {times[name] * 1e3:.1f} ms per call")
    dense, chunked = times.values()
    print(f"  chunked / dense time: {chunked / dense:.2f}x")


if __name__ == "__main__":
    reexec_with_tcmalloc()
    flags.DEFINE_integer("num_items", 100_000, "Catalogue size for the memory account.")
    flags.DEFINE_integer("time_items", 10_000, "Catalogue size for the timing.")
    flags.DEFINE_integer("batch_size", 128, "B.")
    flags.DEFINE_integer("max_seq_len", 50, "N.")
    flags.DEFINE_integer("embedding_dim", 64, "D.")
    flags.DEFINE_integer("chunk", 8192, "Items per chunk.")
    flags.DEFINE_integer("repeats", 5, "Timed calls (median).")
    cli.run(main)
