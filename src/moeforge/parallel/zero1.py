"""ZeRO-1 (parallel.sharding=zero1): the AdamW state is partitioned over the data ranks.

DeepSeek-V3 trained with ZeRO-1 data parallelism (report §3.2). Parameters and gradients stay
replicated: gradients are all-reduced as with sharding=none. Each parameter has one owner among
the ranks that replicate it, and only the owner keeps its AdamW moments and updates it. The owners
then broadcast the new values. Optimizer memory per rank drops by the number of data ranks, while
parameters and gradients stay whole. FSDP's zero2 also shards the gradients.

Owners are chosen per replication group:
- attention, dense and shared-expert parameters are replicated over dp x ep and owned within it;
- routed-expert slices are replicated over dp only (ep ranks hold different experts), so they are
  owned within the dp group.
Each group's parameters go to its ranks by a greedy balance of element counts, in a fixed order, so
every rank computes the same assignment without communicating.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .expert import expert_names


def assign_owners(params: list[tuple[str, nn.Parameter]], n: int) -> list[int]:
    """Owner index (0..n-1) of each parameter: largest first to the least loaded rank (ties: lowest)."""
    load = [0] * n
    owner = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i][1].numel(), params[i][0])):
        r = min(range(n), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += params[i][1].numel()
    return owner


class Zero1:
    """Which parameters this rank owns, and the broadcast of the updated values after a step."""

    def __init__(self, model: nn.Module, ctx):
        routed = expert_names(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        dense = [(n, p) for n, p in named if n not in routed]
        experts = [(n, p) for n, p in named if n in routed]
        # (parameters, owner per parameter, the group, its ranks in group order, my index in it)
        self.groups = []
        for params, group, size, me in ((dense, ctx.dp_ep_group, ctx.data_ranks, ctx.data_rank),
                                        (experts, ctx.dp_group, ctx.dp, ctx.dp_rank)):
            if params:
                self.groups.append((params, assign_owners(params, size), group, size, me))
        self.owned = {n for params, owner, _, _, me in self.groups
                      for (n, _), o in zip(params, owner) if o == me}

    def owns(self, name: str) -> bool:
        return name in self.owned

    @torch.no_grad()
    def broadcast_updates(self) -> None:
        """After optimizer.step(): every parameter takes its owner's new value (one flat broadcast per owner)."""
        for params, owner, group, size, _ in self.groups:
            if size == 1:
                continue
            ranks = dist.get_process_group_ranks(group)
            for r in range(size):
                mine = [p for (_, p), o in zip(params, owner) if o == r]
                if not mine:
                    continue
                flat = torch.cat([p.detach().reshape(-1) for p in mine])
                dist.broadcast(flat, src=ranks[r], group=group)
                for p, part in zip(mine, flat.split([p.numel() for p in mine])):
                    p.copy_(part.view_as(p))
