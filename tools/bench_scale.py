r"""Sharded item catalogues: full-ranking retrieval and HSTU training at 1M and 10M items.

  python -m tools.bench_scale [--items=1000000,10000000] [--dim=64] [--devices=8]

On `--devices` fake XLA:CPU devices (one process), a random item table [N + 1, D]:

* retrieval: top-100 lists and target ranks with a 50-item history filtered, for
  `--query_batch` users per call, with the table split by rows over the devices
  (`eval.sharded_ranking.ranks_and_top_k`) and whole on one device (scores [batch, N + 1],
  `lax.top_k`, the path of an unsharded evaluation);
* training: samples/s of the `hstu-amazon` train step (sampled softmax, 512 negatives
  per row, AdamW) with the item table split over the devices (`--shard_items`, mesh
  data:1,model:devices: every device runs the whole batch's transformer, so on shared
  CPU cores the devices take turns at it) and whole on one device.

Peak memory per device is XLA's buffer assignment for the compiled program on the most
loaded device (arguments + outputs + temporaries, aliased buffers once). Fake CPU
devices share this machine's cores and memory, so their users/s is a ratio to read
within one run, not a cluster's speed; a path that cannot allocate is reported as such.
"""

from __future__ import annotations

import gc
import os

from absl import flags

from eval import cli
from eval.allocator import active_allocator, reexec_with_tcmalloc
from tools.launch import process_env
from tools.timing import cpu_threads, median_seconds

K, HISTORY = 100, 50


def _peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return total - m.alias_size_in_bytes


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _failure(err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"fails: {first[:120]}"


def bench_retrieval(num_items: int, dim: int, batch: int, repeats: int) -> dict[str, str]:
    """users/s and peak GiB per device of top-K retrieval, sharded and on one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eval.distributed import make_mesh
    from eval.metrics import target_ranks_jax
    from eval.sharded_ranking import ranks_and_top_k

    rng = np.random.default_rng(0)
    rows = num_items + 1
    queries = rng.standard_normal((batch, dim), np.float32)
    targets = rng.integers(1, num_items + 1, batch).astype(np.int32)
    history = rng.integers(1, num_items + 1, (batch, HISTORY)).astype(np.int32)
    mesh = make_mesh({"model": -1})
    out = {}

    def table_on(sharding):
        def block(index):
            r = index[0]
            start, stop = r.start or 0, r.stop or rows
            return np.random.default_rng(start).standard_normal((stop - start, dim), np.float32)

        return jax.make_array_from_callback((rows, dim), sharding, block)

    table = table_on(jax.NamedSharding(mesh, jax.P("model", None)))
    fn = jax.jit(ranks_and_top_k, static_argnames=("k", "mesh", "axis"))
    args = (queries, table, targets, history)
    compiled = fn.lower(*args, k=K, mesh=mesh).compile()
    jax.block_until_ready(compiled(*args))
    seconds = median_seconds(lambda: jax.block_until_ready(compiled(*args)), repeats)
    out["sharded"] = f"{batch / seconds:,.0f} users/s, {_gib(_peak_bytes(compiled))} GiB"
    del table, args
    gc.collect()

    @jax.jit
    def one_device(queries, table, targets, history):
        scores = queries @ table.T
        b = jnp.arange(batch)[:, None]
        seen = jnp.zeros(scores.shape, bool).at[b, history].set(True).at[:, 0].set(True)
        seen = seen.at[jnp.arange(batch), targets].set(False)
        ranks = target_ranks_jax(scores, targets, seen)
        return ranks, jax.lax.top_k(jnp.where(seen, -jnp.inf, scores), K)

    try:
        device = jax.devices()[0]
        table = table_on(jax.sharding.SingleDeviceSharding(device))
        args = [jax.device_put(a, device) for a in (queries, table, targets, history)]
        compiled = one_device.lower(*args).compile()
        jax.block_until_ready(compiled(*args))
        seconds = median_seconds(lambda: jax.block_until_ready(compiled(*args)), repeats)
        out["one device"] = f"{batch / seconds:,.0f} users/s, {_gib(_peak_bytes(compiled))} GiB"
    except Exception as err:  # noqa: BLE001 - an allocation failure is the measurement
        out["one device"] = _failure(err)
    return out


def bench_training(num_items: int, batch: int, calls: int, repeats: int) -> dict[str, str]:
    """HSTU train-step samples/s and peak GiB per device, item table sharded and not."""
    import jax
    import numpy as np

    from eval.distributed import make_mesh
    from hstu.trainer import make_trainer
    from tools.bench_hstu import _batch

    host = _batch(np.random.default_rng(0), batch, HISTORY, num_items)
    layouts = {
        "sharded": (make_mesh({"data": 1, "model": -1}), True),
        "one device": (None, False),
    }
    out = {}
    for name, (mesh, shard) in layouts.items():
        try:
            tr = make_trainer("hstu-amazon", num_items, dict(batch_size=batch), mesh, shard)
            step = [0]

            def train(k, tr=tr, step=step):
                for _ in range(k):
                    loss = tr.train_step(host, step[0])
                    step[0] += 1
                jax.block_until_ready(loss)

            train(2)  # compile
            rate = batch * calls / median_seconds(lambda train=train: train(calls), repeats)
            lowered = tr.state.lower_train_step(tr.loss, host, jax.random.key(0))
            out[name] = f"{rate:,.0f} samples/s, {_gib(_peak_bytes(lowered.compile()))} GiB"
            del tr, lowered
        except Exception as err:  # noqa: BLE001 - an allocation failure is the measurement
            out[name] = _failure(err)
        gc.collect()
    return out


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    os.environ["XLA_FLAGS"] = process_env(f.devices)["XLA_FLAGS"]  # before JAX starts a backend
    import jax

    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} (one process), "
        f"{cpu_threads()} CPU threads, allocator {active_allocator()}; D {f.dim}, "
        f"retrieval batch {f.query_batch}, top-{K}, {HISTORY}-item history filtered; "
        f"training batch {f.train_batch} x history {HISTORY}"
    )
    print("\n| items | retrieval: table split over devices | retrieval: one device |"
          " HSTU train: table split | HSTU train: one device |")  # fmt: skip
    print("|---|---|---|---|---|")
    for n in map(int, f.items):
        n -= (n + 1) % f.devices  # N + 1 table rows split evenly over the devices
        retrieval = bench_retrieval(n, f.dim, f.query_batch, f.repeats)
        training = bench_training(n, f.train_batch, f.calls, f.repeats)
        print(f"| {n:,} | {retrieval['sharded']} | {retrieval['one device']} | "
              f"{training['sharded']} | {training['one device']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    reexec_with_tcmalloc()
    flags.DEFINE_list("items", ["1000000", "10000000"], "Catalogue sizes.")
    flags.DEFINE_integer("dim", 64, "Item embedding width (retrieval).")
    flags.DEFINE_integer("devices", 8, "Fake XLA:CPU devices.")
    flags.DEFINE_integer("query_batch", 32, "Users per retrieval call.")
    flags.DEFINE_integer("train_batch", 128, "Training rows per step.")
    flags.DEFINE_integer("calls", 3, "Calls per timed repeat (training).")
    flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).")
    cli.run(main)
