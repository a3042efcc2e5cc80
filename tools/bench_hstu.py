r"""Training and evaluation throughput of HSTU / SASRec / RecGPT: JAX vs the PyTorch baselines.

  python -m tools.bench_hstu [--models=hstu,sasrec,recgpt] [--batch_size=128] [--max_seq_len=200]

Same model, sizes, batch and loss in both frameworks (HSTU / SASRec: sampled softmax, 128
uniform negatives shared across the batch; RecGPT, the `recgpt` preset's model: its
pre-training BCE with one uniform negative per position; AdamW); random right-padded
batches. Prints medians
over repeats of training samples/s and evaluation users/s (full catalogue scores) and
the JAX/PyTorch ratio, with the devices named.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags

from eval import cli
from eval.allocator import active_allocator, reexec_with_tcmalloc
from hstu.trainer import make_trainer
from tools.timing import cpu_threads, median_seconds


def _batch(rng, batch_size, max_len, num_items):
    lengths = rng.integers(max_len // 4, max_len + 1, batch_size)
    ids = rng.integers(1, num_items + 1, (batch_size, max_len))
    ids[np.arange(max_len)[None, :] >= lengths[:, None]] = 0
    ts = np.cumsum(rng.integers(1, 86_400, (batch_size, max_len)), axis=1)
    return {
        "ids": ids.astype(np.int32),
        "timestamps": ts.astype(np.int64),
        "lengths": lengths.astype(np.int32),
        "users": rng.integers(0, 10_000, batch_size).astype(np.int32),
    }


def _median_rate(fn, items_per_call: int, calls: int, repeats: int) -> float:
    return items_per_call * calls / median_seconds(lambda: fn(calls), repeats)


def bench_jax(model: str, batch, num_items: int, calls: int, repeats: int) -> tuple[float, float]:
    n = batch["ids"].shape[1]
    if model == "recgpt":
        tr = make_trainer("recgpt", num_items, dict(max_seq_len=n, negatives_not_in_sequence=False))
    else:
        preset = {"hstu": "hstu-ml", "sasrec": "sasrec-ml"}[model]
        tr = make_trainer(
            preset, num_items, dict(max_seq_len=n, negatives_shared="batch", dropout_rate=0.2)
        )
    step = [0]

    def train(k):
        for _ in range(k):
            loss = tr.train_step(batch, step[0])
            step[0] += 1
        jax.block_until_ready(loss)

    inputs = {**batch, "target_ts": batch["timestamps"][:, -1]}

    def evaluate(k):
        for _ in range(k):
            out = tr.query_scores(inputs)
        jax.block_until_ready(out)

    train(2)
    evaluate(2)
    b = len(batch["ids"])
    return _median_rate(train, b, calls, repeats), _median_rate(evaluate, b, calls, repeats)


def _torch_rates(net, opt, loss, scores, batch_size: int, calls: int, repeats: int):
    """(train samples/s, eval users/s) of a PyTorch model: `loss()` steps, `scores()` calls."""
    import torch

    def train(k):
        net.train()
        for _ in range(k):
            value = loss()
            opt.zero_grad()
            value.backward()
            opt.step()

    def evaluate(k):
        net.eval()
        with torch.no_grad():
            for _ in range(k):
                scores()

    train(2)
    evaluate(2)
    return (
        _median_rate(train, batch_size, calls, repeats),
        _median_rate(evaluate, batch_size, calls, repeats),
    )


def bench_torch_recgpt(batch, num_items: int, calls: int, repeats: int) -> tuple[float, float]:
    """The `recgpt` preset's model and pre-training step in PyTorch (Adam, BCE)."""
    import torch
    import torch.nn.functional as F

    from hstu.recgpt import PRESETS
    from tools.baselines.torch_recgpt import RecGPT

    torch.set_num_threads(cpu_threads())
    arch = PRESETS["recgpt"]["arch"]
    sizes = ("embedding_dim", "num_blocks", "num_heads", "ffn_dim", "dropout_rate")
    n = batch["ids"].shape[1]
    net = RecGPT(num_items, max_seq_len=n, **{k: arch[k] for k in sizes})
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    ids, lengths, users = (
        torch.from_numpy(batch[k].astype(np.int64)) for k in ("ids", "lengths", "users")
    )
    inputs = ids.masked_fill(torch.arange(n)[None, :] >= lengths[:, None] - 1, 0)

    def loss():
        out = net(inputs, users)[:, :-1]
        targets = ids[:, 1:]
        negatives = torch.randint(1, num_items + 1, targets.shape)
        table = net.item_embeddings.weight
        pos = (out * table[targets]).sum(-1)
        neg = (out * table[negatives]).sum(-1)
        w = (targets != 0).float()
        return ((F.softplus(-pos) * w).sum() + (F.softplus(neg) * w).sum()) / w.sum()

    def scores():
        out = net(ids, users)
        return out[torch.arange(len(ids)), lengths - 1] @ net.item_embeddings.weight.T

    return _torch_rates(net, opt, loss, scores, len(ids), calls, repeats)


def bench_torch(model: str, batch, num_items: int, calls: int, repeats: int) -> tuple[float, float]:
    if model == "recgpt":
        return bench_torch_recgpt(batch, num_items, calls, repeats)
    import torch
    import torch.nn.functional as F

    from tools.baselines.torch_hstu import HSTU
    from tools.baselines.torch_sasrec import SASRec

    torch.set_num_threads(cpu_threads())
    n = batch["ids"].shape[1]
    if model == "hstu":
        net = HSTU(
            num_items,
            max_seq_len=n,
            embedding_dim=50,
            num_blocks=2,
            num_heads=1,
            attention_dim=50,
            linear_dim=50,
            dropout_rate=0.2,
        )
        table = lambda: net._embedding_module._item_emb.weight  # noqa: E731
    else:
        net = SASRec(
            num_items,
            max_seq_len=n,
            embedding_dim=50,
            num_blocks=2,
            num_heads=1,
            dropout_rate=0.2,
            l2_norm_output=True,
        )
        table = lambda: net.item_emb.weight  # noqa: E731
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)
    ids, ts, lengths = (
        torch.from_numpy(batch[k].astype(np.int64)) for k in ("ids", "timestamps", "lengths")
    )
    args = (ids, ts, lengths) if model == "hstu" else (ids,)

    def loss():
        out = F.normalize(net(*args)[:, :-1], dim=-1)
        targets = ids[:, 1:]
        negatives = torch.randint(1, num_items + 1, (128,))
        emb = F.normalize(table(), dim=-1)
        pos = (out * emb[targets]).sum(-1, keepdim=True)
        neg = out @ emb[negatives].T
        neg = neg.masked_fill(negatives[None, None, :] == targets[..., None], -5e4)
        nll = -F.log_softmax(torch.cat([pos, neg], -1) / 0.05, -1)[..., 0]
        w = (targets != 0).float()
        return (nll * w).sum() / w.sum()

    def scores():
        query = F.normalize(net(*args)[torch.arange(len(ids)), lengths - 1], dim=-1)
        return query @ F.normalize(table(), dim=-1).T

    return _torch_rates(net, opt, loss, scores, len(ids), calls, repeats)


def _define_flags() -> None:
    flags.DEFINE_list("models", ["hstu", "sasrec", "recgpt"], "Models to time.")
    flags.DEFINE_integer("batch_size", 128, "Training / evaluation batch.")
    flags.DEFINE_integer("max_seq_len", 200, "Sequence length N.")
    flags.DEFINE_integer("num_items", 3706, "Catalogue size (ML-1M's by default).")
    flags.DEFINE_integer("calls", 5, "Steps per timed repeat.")
    flags.DEFINE_integer("repeats", 5, "Timed repeats (the median is reported).")


def main(argv):
    del argv
    f = flags.FLAGS
    import torch

    batch = _batch(np.random.default_rng(0), f.batch_size, f.max_seq_len, f.num_items)
    print(
        f"device: JAX {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"PyTorch {torch.__version__} CPU, {cpu_threads()} threads, allocator {active_allocator()}; batch {f.batch_size} x {f.max_seq_len}, "
        f"{f.num_items} items; medians of {f.repeats} x {f.calls} calls"
    )
    print(
        "| model | JAX train samples/s | PyTorch train samples/s | ratio | JAX eval users/s | PyTorch eval users/s | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for model in f.models:
        jt, je = bench_jax(model, batch, f.num_items, f.calls, f.repeats)
        tt, te = bench_torch(model, batch, f.num_items, f.calls, f.repeats)
        print(
            f"| {model} | {jt:.1f} | {tt:.1f} | {jt / tt:.2f}x | {je:.1f} | {te:.1f} | {je / te:.2f}x |"
        )


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
