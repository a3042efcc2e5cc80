"""PyTorch SASRec with pmixer/SASRec.pytorch parameter names, for parity checks.

Keys: item_emb, pos_emb, attention_layernorms.{i}, attention_layers.{i} (nn.MultiheadAttention:
in_proj_weight/in_proj_bias/out_proj), forward_layernorms.{i},
forward_layers.{i}.conv1/conv2 (Conv1d, kernel 1), last_layernorm. The block follows the
original SASRec: Q = LN(x), K = V = x, residual on Q; LN then FFN with residual; re-mask
padding. Positions are 0..N-1 (right padding).
"""

import torch
from torch import nn


class PointWiseFeedForward(nn.Module):
    def __init__(self, hidden_units: int, dropout_rate: float):
        super().__init__()
        self.conv1 = nn.Conv1d(hidden_units, hidden_units, kernel_size=1)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(hidden_units, hidden_units, kernel_size=1)
        self.dropout2 = nn.Dropout(dropout_rate)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h = self.dropout1(self.relu(self.conv1(inputs.transpose(-1, -2))))
        return self.dropout2(self.conv2(h)).transpose(-1, -2) + inputs


class SASRec(nn.Module):
    """`forward(ids) -> [B, N, D]` final-LayerNorm features (L2-normalised if asked)."""

    def __init__(
        self,
        num_items: int,
        max_seq_len: int = 200,
        embedding_dim: int = 50,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout_rate: float = 0.2,
        l2_norm_output: bool = False,
    ):
        super().__init__()
        d = embedding_dim
        self.l2_norm_output = l2_norm_output
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(max_seq_len, d)
        self.emb_dropout = nn.Dropout(dropout_rate)
        self.attention_layernorms = nn.ModuleList()
        self.attention_layers = nn.ModuleList()
        self.forward_layernorms = nn.ModuleList()
        self.forward_layers = nn.ModuleList()
        for _ in range(num_blocks):
            self.attention_layernorms.append(nn.LayerNorm(d, eps=1e-8))
            self.attention_layers.append(nn.MultiheadAttention(d, num_heads, dropout_rate))
            self.forward_layernorms.append(nn.LayerNorm(d, eps=1e-8))
            self.forward_layers.append(PointWiseFeedForward(d, dropout_rate))
        self.last_layernorm = nn.LayerNorm(d, eps=1e-8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        seqs = self.item_emb(ids) * self.item_emb.embedding_dim**0.5
        seqs = self.emb_dropout(seqs + self.pos_emb(torch.arange(n, device=ids.device)))
        keep = (ids != 0).unsqueeze(-1).to(seqs.dtype)
        seqs = seqs * keep
        attn_mask = ~torch.tril(torch.ones(n, n, dtype=torch.bool, device=ids.device))
        for i in range(len(self.attention_layers)):
            seqs = seqs.transpose(0, 1)  # MultiheadAttention expects [N, B, D]
            q = self.attention_layernorms[i](seqs)
            mha, _ = self.attention_layers[i](
                q, seqs, seqs, attn_mask=attn_mask, need_weights=False
            )
            seqs = (q + mha).transpose(0, 1)
            seqs = self.forward_layers[i](self.forward_layernorms[i](seqs)) * keep
        feats = self.last_layernorm(seqs)
        if self.l2_norm_output:
            feats = feats / feats.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        return feats
