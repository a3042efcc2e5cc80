r"""Train the PyTorch SASRec (`torch_sasrec.py`) the way `hstu.train --preset=sasrec-paper` does.

  python -m tools.baselines.train_torch_sasrec --dataset=amazon-games-2014 \
      --data_dir=../shared/data/amazon-games-2014 --epochs=20 --eval_every=1210

The same training rows and batch order as the JAX trainer (`hstu.trainer.training_source`,
`eval.data.examples.batches`), the paper's BCE with one uniform negative per position,
Adam (lr 1e-3, betas (0.9, 0.98)), pmixer/SASRec.pytorch's init (Xavier-normal on every
matrix); validation with the data set's protocol through `eval.protocols`. Prints the
validation NDCG@10 / HR@10 curve, so a JAX run's curve can be compared with PyTorch's on
the same data (a learning-dynamics check beside the numerical parity test).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from absl import flags

from eval import cli, data, protocols
from eval.data import examples as ex_lib
from hstu.trainer import query_inputs, training_source
from tools.baselines.torch_sasrec import SASRec
from tools.timing import cpu_threads


def init_like_pmixer(model: SASRec) -> None:
    """Xavier-normal on every parameter with >= 2 dims; padding rows zeroed."""
    for param in model.parameters():
        if param.dim() >= 2:
            torch.nn.init.xavier_normal_(param.data)
    model.item_emb.weight.data[0] = 0


def train(dataset: str, data_dir: str, epochs: int, eval_every: int | None, max_seq_len: int = 50,
          dropout: float = 0.5, batch_size: int = 128, seed: int = 0) -> list[dict]:  # fmt: skip
    """Trains and returns the validation metrics at every evaluation."""
    torch.manual_seed(seed)
    torch.set_num_threads(cpu_threads())
    ds = data.load(dataset, data_dir)
    split = data.split(ds)
    protocol = data.DATASETS[ds.name].protocol
    source = training_source(split, max_seq_len)
    per_epoch = max(1, len(source) // batch_size)
    eval_every = eval_every or per_epoch
    model = SASRec(ds.num_items, max_seq_len, 50, 2, 1, dropout)
    init_like_pmixer(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    loader = ex_lib.batches(source, batch_size, seed=seed, num_epochs=None)
    gen = torch.Generator().manual_seed(seed)

    def scores(index: np.ndarray) -> np.ndarray:
        inputs = query_inputs(split.valid, index, max_seq_len)
        with torch.no_grad():
            out = model(torch.from_numpy(inputs["ids"].astype(np.int64)))
            query = out[
                torch.arange(len(index)), torch.from_numpy(inputs["lengths"].astype(np.int64)) - 1
            ]
            s = query @ model.item_emb.weight.T
            s[:, 0] = -torch.inf
        return s.numpy()

    curve, start = [], time.perf_counter()
    for step in range(1, per_epoch * epochs + 1):
        model.train()
        ids = torch.from_numpy(next(loader)["ids"].astype(np.int64))
        out, targets = model(ids)[:, :-1], ids[:, 1:]
        negatives = torch.randint(1, ds.num_items + 1, targets.shape, generator=gen)
        pos = (out * model.item_emb(targets)).sum(-1)
        neg = (out * model.item_emb(negatives)).sum(-1)
        w = (targets != 0).float()
        wn = w * (negatives != targets).float()
        loss = (F.softplus(-pos) * w).sum() / w.sum() + (F.softplus(neg) * wn).sum() / wn.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss = loss.detach()
        if step % eval_every == 0:
            model.eval()
            if protocol == "full":
                valid = protocols.full_ranking(scores, split.valid, ds.num_items)
            else:
                valid = protocols.sampled_ranking(
                    lambda idx, cand: np.take_along_axis(scores(idx), cand, axis=1), split.valid, ds.num_items
                )  # fmt: skip
            curve.append({"step": step, "epoch": step / per_epoch, "loss": loss.item(), **valid})
            print(f"step {step} (epoch {step / per_epoch:.1f}, {time.perf_counter() - start:.0f}s): loss {loss.item():.4f} "
                  f"valid NDCG@10 {valid['NDCG@10']:.4f} HR@10 {valid['HR@10']:.4f}", flush=True)  # fmt: skip
    return curve


def main(argv):
    del argv
    f = flags.FLAGS
    train(f.dataset, f.data_dir, f.epochs, f.eval_every, f.max_seq_len, f.dropout_rate, seed=f.seed)


if __name__ == "__main__":
    flags.DEFINE_string("dataset", "amazon-games-2014", "Registered data set name.")
    flags.DEFINE_string("data_dir", None, "Folder with the raw files.", required=True)
    flags.DEFINE_integer("epochs", 20, "Epochs.")
    flags.DEFINE_integer(
        "eval_every", None, "Validate every this many steps (default: each epoch)."
    )
    flags.DEFINE_integer("max_seq_len", 50, "History length.")
    flags.DEFINE_float("dropout_rate", 0.5, "Dropout.")
    flags.DEFINE_integer("seed", 0, "Seed.")
    cli.run(main)
