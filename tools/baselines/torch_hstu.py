"""Dense PyTorch HSTU with the parameter names of the generative-recommenders research model.

Written from the HSTU paper (arXiv:2402.17152) for parity checks of `hstu.model.HSTU`.
State-dict keys match `generative_recommenders/research/modeling/sequential/hstu.py`:

    _embedding_module._item_emb.weight
    _input_features_preproc._pos_emb.weight
    _hstu._attention_layers.{i}._uvqk
    _hstu._attention_layers.{i}._o.weight / ._o.bias
    _hstu._attention_layers.{i}._rel_attn_bias._pos_w / ._ts_w

The jagged reference is emulated on right-padded dense tensors: keys at or beyond a row's
length never reach a valid query (causality), and padded rows of the output are zero.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class LocalEmbeddingModule(nn.Module):
    def __init__(self, num_items: int, dim: int):
        super().__init__()
        self._item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        nn.init.trunc_normal_(self._item_emb.weight, std=0.02, a=-0.04, b=0.04)


class LearnablePositionalEmbeddingInputFeaturesPreprocessor(nn.Module):
    def __init__(self, max_seq_len: int, dim: int, dropout_rate: float):
        super().__init__()
        self._pos_emb = nn.Embedding(max_seq_len, dim)
        std = math.sqrt(1.0 / dim)
        nn.init.trunc_normal_(self._pos_emb.weight, std=std, a=-2 * std, b=2 * std)
        self._emb_dropout = nn.Dropout(dropout_rate)

    def forward(self, ids: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = item_emb * item_emb.shape[-1] ** 0.5 + self._pos_emb(torch.arange(n, device=ids.device))
        return self._emb_dropout(x) * (ids != 0).unsqueeze(-1).to(x.dtype)


class RelativeBucketedTimeAndPositionBasedBias(nn.Module):
    def __init__(self, max_seq_len: int, num_buckets: int = 128):
        super().__init__()
        self._max_seq_len = max_seq_len
        self._num_buckets = num_buckets
        self._ts_w = nn.Parameter(torch.empty(num_buckets + 1).normal_(0, 0.02))
        self._pos_w = nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(0, 0.02))

    def forward(self, timestamps: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, N, N]: pos_w[j - i + N_max - 1] + ts_w[bucket(ts[i+1] - ts[j])]."""
        n = timestamps.shape[1]
        idx = torch.arange(n, device=timestamps.device)
        pos = self._pos_w[idx[None, :] - idx[:, None] + self._max_seq_len - 1]
        ext = torch.cat([timestamps, timestamps[:, -1:]], dim=1)
        delta = (ext[:, 1:, None] - timestamps[:, None, :]).abs().clamp(min=1)
        buckets = (torch.log(delta.float()) / 0.301).long().clamp(0, self._num_buckets)
        return pos[None] + self._ts_w[buckets]


class SequentialTransductionUnit(nn.Module):
    def __init__(
        self,
        dim: int,
        linear_dim: int,
        attention_dim: int,
        num_heads: int,
        dropout_rate: float,
        max_seq_len: int,
        num_buckets: int = 128,
    ):
        super().__init__()
        self._h, self._dv, self._dqk = num_heads, linear_dim, attention_dim
        self._dropout_rate = dropout_rate
        self._uvqk = nn.Parameter(
            torch.empty(dim, 2 * num_heads * linear_dim + 2 * num_heads * attention_dim).normal_(
                0, 0.02
            )
        )
        self._o = nn.Linear(num_heads * linear_dim, dim)
        nn.init.xavier_uniform_(self._o.weight)
        self._rel_attn_bias = RelativeBucketedTimeAndPositionBasedBias(max_seq_len, num_buckets)

    def forward(
        self,
        x: torch.Tensor,
        timestamps: torch.Tensor,
        lengths: torch.Tensor,
        n_norm: str = "padded",
    ) -> torch.Tensor:
        b, n, d = x.shape
        h, dv, dqk = self._h, self._dv, self._dqk
        uvqk = F.silu(F.layer_norm(x, [d], eps=1e-6) @ self._uvqk)
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        valid = torch.arange(n, device=x.device)[None, :] < lengths[:, None]  # [B, N]
        v = v * valid.unsqueeze(-1)
        scores = torch.einsum("bnhd,bmhd->bhnm", q.reshape(b, n, h, dqk), k.reshape(b, n, h, dqk))
        scores = scores + self._rel_attn_bias(timestamps).unsqueeze(1)
        denom = n if n_norm == "padded" else lengths.clamp(min=1).to(x.dtype)[:, None, None, None]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
        attn = F.silu(scores) / denom * causal
        out = torch.einsum("bhnm,bmhd->bnhd", attn, v.reshape(b, n, h, dv)).reshape(b, n, h * dv)
        y = u * F.layer_norm(out, [h * dv], eps=1e-6)
        return self._o(F.dropout(y, p=self._dropout_rate, training=self.training)) + x


class HSTUJagged(nn.Module):
    def __init__(self, layers: list[SequentialTransductionUnit]):
        super().__init__()
        self._attention_layers = nn.ModuleList(layers)


class HSTU(nn.Module):
    """`forward(ids, timestamps, lengths) -> [B, N, D]` L2-normalised, zero at padding."""

    def __init__(
        self,
        num_items: int,
        max_seq_len: int = 200,
        embedding_dim: int = 50,
        num_blocks: int = 2,
        num_heads: int = 1,
        attention_dim: int = 50,
        linear_dim: int = 50,
        dropout_rate: float = 0.2,
        num_buckets: int = 128,
        n_norm: str = "padded",
    ):
        super().__init__()
        self._n_norm = n_norm
        self._embedding_module = LocalEmbeddingModule(num_items, embedding_dim)
        self._input_features_preproc = LearnablePositionalEmbeddingInputFeaturesPreprocessor(
            max_seq_len, embedding_dim, dropout_rate
        )
        self._hstu = HSTUJagged(
            [
                SequentialTransductionUnit(
                    embedding_dim,
                    linear_dim,
                    attention_dim,
                    num_heads,
                    dropout_rate,
                    max_seq_len,
                    num_buckets,
                )
                for _ in range(num_blocks)
            ]
        )

    def forward(
        self, ids: torch.Tensor, timestamps: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        x = self._input_features_preproc(ids, self._embedding_module._item_emb(ids))
        for layer in self._hstu._attention_layers:
            x = layer(x, timestamps, lengths, self._n_norm)
        valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        x = x * valid.unsqueeze(-1).to(x.dtype)
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
