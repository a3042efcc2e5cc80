"""PyTorch RecGPT forward pass (after RecGPT/RecGPT's `GPT4Rec.py`), for parity checks with
`hstu.recgpt` and speed comparisons.

Keys: item_embeddings, position_embeddings, user_embeddings, segment_embeddings,
layers.{i}.attention.{query,key,value,out}_projection, layers.{i}.norm1 / norm2,
layers.{i}.linear1 / linear2, output_layer. Post-norm decoder layers; causal softmax
attention, or causal Flow-Attention written with the code's cumulative [L, d, d] products
(the JAX port writes it as one masked [L, L] matrix, so the two check each other). Inputs
are right-padded; positions count from the start or are aligned on the newest item.
"""

from __future__ import annotations

import math

import torch
from torch import nn

FLOW_EPS = 1e-6


def flow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = FLOW_EPS):
    """Causal Flow-Attention on [B, H, L, d] (the code's `Flow_Attention_Causal`)."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    normal = torch.arange(1, q.shape[2] + 1, dtype=q.dtype, device=q.device)[None, None, :]
    incoming = normal / torch.einsum("nhld,nhld->nhl", q + eps, k.cumsum(dim=2) + eps)
    outgoing = normal / torch.einsum("nhld,nhld->nhl", k + eps, q.cumsum(dim=2) + eps)
    sink = torch.einsum("nhld,nhld->nhl", q + eps, (k * outgoing[..., None]).cumsum(dim=2) + eps)
    source = torch.einsum("nhld,nhld->nhl", k + eps, (q * incoming[..., None]).cumsum(dim=2) + eps)
    source = torch.clamp(source / normal, min=-1.0, max=1.0).exp()
    allocation = torch.sigmoid(sink / normal)
    competition = source / source.cumsum(dim=-1) * normal
    kv = torch.einsum("nhld,nhlm->nhldm", k, v * competition[..., None]).cumsum(dim=2)
    out = torch.einsum("nhld,nhldm->nhlm", q * (incoming / normal)[..., None], kv)
    return out * allocation[..., None]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n = q.shape[2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, d: int, num_heads: int, kind: str):
        super().__init__()
        self.num_heads, self.kind = num_heads, kind
        self.query_projection = nn.Linear(d, d)
        self.key_projection = nn.Linear(d, d)
        self.value_projection = nn.Linear(d, d)
        self.out_projection = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads

        def heads(y):
            return y.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = (
            heads(p(x)) for p in (self.query_projection, self.key_projection, self.value_projection)
        )
        out = (flow_attention if self.kind == "flow" else softmax_attention)(q, k, v)
        return self.out_projection(out.transpose(1, 2).reshape(b, n, d))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, num_heads: int, ffn_dim: int, dropout_rate: float, kind: str):
        super().__init__()
        self.attention = Attention(d, num_heads, kind)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x)))
        ffn = self.linear2(nn.functional.gelu(self.linear1(x)))
        return self.norm2(x + self.dropout(ffn))


class RecGPT(nn.Module):
    """`forward(ids, users, segments=None) -> [B, N, D]`; `output_layer` is the softmax head."""

    def __init__(
        self,
        num_items: int,
        max_seq_len: int = 50,
        embedding_dim: int = 128,
        num_blocks: int = 2,
        num_heads: int = 2,
        ffn_dim: int = 256,
        dropout_rate: float = 0.1,
        attention: str = "softmax",
        user_buckets: int = 65536,
        positions: str = "end",
    ):
        super().__init__()
        d = embedding_dim
        self.max_seq_len, self.positions, self.user_buckets = max_seq_len, positions, user_buckets
        self.item_embeddings = nn.Embedding(num_items + 1, d)
        self.position_embeddings = nn.Embedding(max_seq_len, d)
        self.user_embeddings = nn.Embedding(user_buckets, d) if user_buckets else None
        self.segment_embeddings = nn.Embedding(2, d)
        self.layers = nn.ModuleList(
            DecoderLayer(d, num_heads, ffn_dim, dropout_rate, attention) for _ in range(num_blocks)
        )
        self.output_layer = nn.Linear(d, num_items + 1)

    def position_ids(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        pos = torch.arange(n, device=ids.device)[None, :]
        if self.positions == "start":
            return pos.expand_as(ids)
        lengths = (ids != 0).sum(dim=1, keepdim=True)
        return torch.clamp(self.max_seq_len - lengths + pos, 0, self.max_seq_len - 1)

    def forward(self, ids: torch.Tensor, users: torch.Tensor, segments: torch.Tensor | None = None):
        x = self.item_embeddings(ids) + self.position_embeddings(self.position_ids(ids))
        x = x + self.segment_embeddings(torch.zeros_like(ids) if segments is None else segments)
        if self.user_embeddings is not None:
            x = x + self.user_embeddings(users % self.user_buckets)[:, None]
        for layer in self.layers:
            x = layer(x)
        return x
