"""Auxiliary-loss-free load balancing (report §2.1.2, eq. 16) and load statistics.

After each optimizer step every MoE layer's routing bias moves by gamma: down for experts that got
more than the mean number of tokens in the step, up for those that got fewer. The counts are the
step's global counts: every micro-batch (accumulated by the MoE layers in forward) and, when a
`reduce` function is given (distributed training), every rank.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..model.moe import MoE


@torch.no_grad()
def update_routing_bias(moe_layers: list[MoE], gamma: float,
                        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Apply the bias update, reset the counters, and return each layer's load imbalance (max/mean
    tokens per expert, a [layers] tensor on the device: no host sync; imbalance_stats formats it)."""
    if not moe_layers:
        return torch.zeros(0)
    counts = torch.stack([m.tokens_per_expert for m in moe_layers])  # [layers, E]
    if reduce is not None:
        counts = reduce(counts)
    mean = counts.mean(dim=1, keepdim=True)
    if gamma > 0:
        step = gamma * torch.sign(mean - counts)  # +gamma underloaded, -gamma overloaded
        for m, s in zip(moe_layers, step):
            m.gate.e_score_correction_bias.add_(s)
    for m in moe_layers:
        m.tokens_per_expert.zero_()
    return counts.max(dim=1).values / mean.squeeze(1).clamp_min(1e-9)


def imbalance_stats(ratio: list[float]) -> dict[str, float]:
    """Per-layer ratios -> the logged statistics: every layer, the mean over layers and the worst."""
    if not ratio:
        return {}
    stats = {f"imbalance/layer{i}": r for i, r in enumerate(ratio)}
    stats["imbalance"] = sum(ratio) / len(ratio)  # mean over layers of max/mean tokens per expert
    stats["imbalance_max"] = max(ratio)  # the worst layer
    return stats
