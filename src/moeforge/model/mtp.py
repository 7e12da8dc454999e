"""Multi-token prediction (report §2.2, eqs. 21-25).

Module k (1..D) predicts token t_{i+k+1} at position i from the previous depth's representation
h^{k-1}_i and the embedding of token t_{i+k}:
    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]   (M_k = eh_proj, 2D -> D)
    h^k  = Block_k(h')        logits = Head(RMSNorm(h^k))
Embedding and output head are the main model's (shared parameters). The concatenation puts the
embedding first, as DeepSeek's released checkpoint expects (enorm, hnorm, eh_proj, shared_head).

Shape legend: B batch, S sequence, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm

IGNORE_INDEX = -100


def shift_tokens(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x[:, k:] padded on the right with `fill` to keep the length: position i holds x[i + k].

    Depth k uses shift_tokens(inputs, k, 0) as the 'token ahead' (t_{i+k}) and
    shift_tokens(targets, k, IGNORE_INDEX) as its targets (t_{i+k+1}); the last k positions
    have no target inside the window and are ignored by the loss.
    """
    if k == 0:
        return x
    return F.pad(x[:, k:], (0, min(k, x.shape[1])), value=fill)


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # shared_head.norm in the release

    def forward(self, h_prev: torch.Tensor, emb_ahead: torch.Tensor, cos, sin, mask=None, cache=None,
                start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """h_prev, emb_ahead: [B, S, D] -> (normalised h^k [B, S, D] for the head and the next depth, balance loss).
        cache, start_pos: decoding with the block's own latent cache (generate.generate_speculative)."""
        h = self.eh_proj(torch.cat([self.enorm(emb_ahead), self.hnorm(h_prev)], dim=-1))  # [B, S, 2D] -> [B, S, D]
        h, balance = self.block(h, cos, sin, cache, start_pos, mask=mask)
        return self.norm(h), balance
