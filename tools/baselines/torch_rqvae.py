"""PyTorch RQ-VAE, the same model as `rqvae.model.RQVAE` (straight-through estimator).

MLP encoder input -> hidden_dims -> code_dim (ReLU between layers), L-level residual
quantiser (nearest code by squared distance), mirrored decoder; loss = reconstruction
(sum over dims, mean over items) + sum over levels of ||sg(r) - e||^2 + beta ||r - sg(e)||^2.
`load_flax_state` copies the weights of a Flax model so the two compute the same loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def _mlp(dims: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (512, 256, 128), code_dim: int = 32,
                 num_levels: int = 3, codebook_size: int = 256, beta: float = 0.25):  # fmt: skip
        super().__init__()
        dims = (input_dim, *hidden_dims, code_dim)
        self.encoder, self.decoder = _mlp(dims), _mlp(dims[::-1])
        self.codebooks = nn.Parameter(
            torch.randn(num_levels, codebook_size, code_dim) / code_dim**0.5
        )
        self.beta = beta

    @staticmethod
    def _run(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(layers):
            x = layer(x if i == 0 else torch.relu(x))
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, codes [B, L])."""
        z = self._run(self.encoder, x)
        r, codes, vq = z, [], 0.0
        for e in self.codebooks:
            dist = (r * r).sum(-1, keepdim=True) - 2 * r @ e.T + (e * e).sum(-1)
            idx = dist.argmin(-1)
            q = e[idx]
            vq = (
                vq
                + ((r.detach() - q) ** 2).sum(-1).mean()
                + self.beta * ((r - q.detach()) ** 2).sum(-1).mean()
            )
            codes.append(idx)
            r = r - q.detach()
        z_q = z + ((z - r).detach() - z).detach()  # straight-through: value = sum of codes
        x_hat = self._run(self.decoder, z_q)
        recon = ((x_hat - x) ** 2).sum(-1).mean()
        return recon + vq, torch.stack(codes, -1)


def load_flax_state(net: RQVAE, state) -> None:
    """Copies `nnx.state(rqvae.model.RQVAE)` (STE, no standardisation) into `net`."""
    with torch.no_grad():
        for name in ("encoder", "decoder"):
            for i, layer in enumerate(getattr(net, name)):
                flax_layer = state[name][i]
                layer.weight.copy_(torch.from_numpy(np.asarray(flax_layer["kernel"][...]).T.copy()))
                layer.bias.copy_(torch.from_numpy(np.asarray(flax_layer["bias"][...]).copy()))
        net.codebooks.copy_(torch.from_numpy(np.asarray(state["codebooks"][...]).copy()))
