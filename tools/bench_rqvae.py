r"""RQ-VAE training steps/s: JAX (the `eval.training` step on `rqvae.train.rqvae_loss`) vs PyTorch.

  python -m tools.bench_rqvae [--num_items=4344] [--input_dim=384] [--batch_size=1024]

Same architecture (default input -> 512 -> 256 -> 128 -> 32, 3 x 256 codes), loss
(straight-through, beta 0.25, summed reconstruction), optimiser (AdamW 1e-3, wd 1e-4) and
batch in both frameworks, on random unit-norm inputs (like MiniLM embeddings). Prints the
median steps/s over repeats, the ratio, and the devices.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags
from flax import nnx

from eval import cli
from eval.allocator import active_allocator, reexec_with_tcmalloc
from eval.training import TrainState, step_key
from eval.training.optim import OptimizerConfig, make_optimizer
from rqvae.model import RQVAE, RQVAEConfig
from rqvae.train import TrainConfig, rqvae_loss, update_usage_and_ema
from tools.timing import cpu_threads, median_seconds


def _median_rate(fn, calls: int, repeats: int) -> float:
    return calls / median_seconds(lambda: fn(calls), repeats)


def bench_jax(x: np.ndarray, cfg: RQVAEConfig, batch_size: int, calls: int, repeats: int) -> float:
    """Steps/s of the `eval.training` step on `rqvae.train.rqvae_loss` (what training runs)."""
    config = TrainConfig(model=cfg, learning_rate=1e-3, weight_decay=1e-4)
    state = TrainState(
        RQVAE(x.shape[1], cfg, rngs=nnx.Rngs(0)),
        make_optimizer(OptimizerConfig(config.learning_rate, weight_decay=config.weight_decay), 1),
    )
    rng = np.random.default_rng(0)
    batches = [
        {"x": x[rng.permutation(len(x))[:batch_size]], "tau": np.float32(1.0)} for _ in range(8)
    ]
    step = [0]

    def run(k):
        for _ in range(k):
            batch = batches[step[0] % 8]
            metrics = state.train_step(rqvae_loss, batch, step_key(0, step[0]),
                                       after_update=update_usage_and_ema)  # fmt: skip
            step[0] += 1
        jax.block_until_ready(metrics["loss"])

    run(2)
    return _median_rate(run, calls, repeats)


def bench_torch(
    x: np.ndarray, cfg: RQVAEConfig, batch_size: int, calls: int, repeats: int
) -> float:
    import torch

    from tools.baselines.torch_rqvae import RQVAE as TorchRQVAE

    torch.set_num_threads(cpu_threads())
    net = TorchRQVAE(
        x.shape[1], cfg.hidden_dims, cfg.code_dim, cfg.num_levels, cfg.codebook_size, cfg.beta
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    x_t = torch.from_numpy(x)
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.permutation(len(x))[:batch_size]) for _ in range(8)]
    step = [0]

    def run(k):
        for _ in range(k):
            loss, _ = net(x_t[batches[step[0] % 8]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step[0] += 1

    run(2)
    return _median_rate(run, calls, repeats)


def _define_flags() -> None:
    flags.DEFINE_integer("num_items", 4344, "Items (amazon-scientific-2018's by default).")
    flags.DEFINE_integer("input_dim", 384, "Embedding width (all-MiniLM-L6-v2's).")
    flags.DEFINE_integer("batch_size", 1024, "Items per step.")
    flags.DEFINE_integer("calls", 20, "Steps per timed repeat.")
    flags.DEFINE_integer("repeats", 5, "Timed repeats (the median is reported).")


def main(argv):
    del argv
    f = flags.FLAGS
    import torch

    x = np.random.default_rng(0).normal(size=(f.num_items, f.input_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = RQVAEConfig()
    print(
        f"device: JAX {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"PyTorch {torch.__version__} CPU, {cpu_threads()} threads, allocator {active_allocator()}; {f.num_items} x {f.input_dim} inputs, "
        f"batch {f.batch_size}, {cfg.num_levels} x {cfg.codebook_size} codes; medians of {f.repeats} x {f.calls} steps"
    )
    jax_rate = bench_jax(x, cfg, f.batch_size, f.calls, f.repeats)
    torch_rate = bench_torch(x, cfg, f.batch_size, f.calls, f.repeats)
    print("| model | JAX steps/s | PyTorch steps/s | ratio |\n|---|---|---|---|")
    print(f"| rqvae | {jax_rate:.1f} | {torch_rate:.1f} | {jax_rate / torch_rate:.2f}x |")


if __name__ == "__main__":
    reexec_with_tcmalloc()
    _define_flags()
    cli.run(main)
