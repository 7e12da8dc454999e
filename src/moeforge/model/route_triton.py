"""The router's expert selection (group-limited top-K, eqs. 13-16) as one Triton kernel on CUDA.

The reference (moe.Router.select) makes three `torch.topk` calls per layer: each group's top two
scores, the best groups, then the top K experts among the groups kept, with a scatter and a masked
fill in between. On CUDA each topk launches one block per token (`gatherTopK`, then a sort of the
K values), about 120 us for 32,768 tokens whatever the number of experts: 5.9 ms, 7% of the
`small` preset's compiled BF16 step (docs/performance.md). Here one program takes a block of
tokens and all their scores in registers and picks the groups and the experts by repeated argmax.

Ties: the reference leaves the order of equal scores to torch.topk; here the lower index wins.
With distinct scores both give the same indices in the same (descending) order.

`route_topk` is a torch.library custom op, so torch.compile keeps it inside the compiled block
(no graph break) and calls the kernel as it is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_launch import launch

_MAX_EXPERTS = 1024  # the widest score row one program keeps in registers


@triton.jit
def _route_topk_kernel(c_ptr, out_ptr, T, stride_c, E: tl.constexpr, EP: tl.constexpr, G: tl.constexpr,
                       GP: tl.constexpr, TG: tl.constexpr, K: tl.constexpr, BT: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, EP)
    live = rows < T
    c = tl.load(c_ptr + rows[:, None].to(tl.int64) * stride_c + cols[None, :],
                mask=live[:, None] & (cols < E)[None, :], other=float("-inf"))
    if G > 1:
        gid = cols // (E // G)  # padding columns fall in no group below G
        gcols = tl.arange(0, GP)
        gs = tl.full([BT, GP], float("-inf"), tl.float32)
        for g in tl.static_range(G):  # a group scores by the sum of its top two
            v = tl.where((gid == g)[None, :], c, float("-inf"))
            first = tl.argmax(v, axis=1, tie_break_left=True)
            top1 = tl.max(v, axis=1)
            top2 = tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), v), axis=1)
            gs = tl.where((gcols == g)[None, :], (top1 + top2)[:, None], gs)
        kept = tl.zeros([BT, EP], dtype=tl.int1)
        for _ in tl.static_range(TG):
            best = tl.argmax(gs, axis=1, tie_break_left=True)
            kept = kept | (gid[None, :] == best[:, None])
            gs = tl.where(gcols[None, :] == best[:, None], float("-inf"), gs)
        c = tl.where(kept, c, float("-inf"))
    for k in tl.static_range(K):
        best = tl.argmax(c, axis=1, tie_break_left=True)
        tl.store(out_ptr + rows.to(tl.int64) * K + k, best.to(tl.int64), mask=live)
        c = tl.where(cols[None, :] == best[:, None], float("-inf"), c)


def supported(choice: torch.Tensor, n_group: int, top_k: int) -> bool:
    """Whether the kernel takes these selection scores: FP32 [T, E] on CUDA, E at most 1024 and
    divisible into the groups."""
    E = choice.shape[-1]
    return (choice.is_cuda and choice.dim() == 2 and choice.dtype == torch.float32 and E <= _MAX_EXPERTS
            and E % n_group == 0 and 0 < top_k <= E)


@torch.library.custom_op("moeforge::route_topk", mutates_args=())
def route_topk(choice: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """choice: FP32 [T, E] selection scores -> int64 [T, top_k]: the experts of the top_k highest
    scores among the topk_group groups (of E / n_group experts) whose two best scores sum highest,
    in descending order of score (n_group 1: plain top-K)."""
    T, E = choice.shape
    out = torch.empty(T, top_k, dtype=torch.int64, device=choice.device)
    if T == 0:
        return out
    c = choice if choice.stride(-1) == 1 else choice.contiguous()
    EP = triton.next_power_of_2(E)
    BT = max(1, min(128, 4096 // EP))
    consts = {"E": E, "EP": EP, "G": n_group, "GP": triton.next_power_of_2(max(n_group, 2)),
              "TG": topk_group if n_group > 1 else 0, "K": top_k, "BT": BT}
    launch(_route_topk_kernel, (triton.cdiv(T, BT),), (c, out, T, c.stride(0)), consts, num_warps=4, num_stages=1)
    return out


@route_topk.register_fake
def _(choice, n_group, topk_group, top_k):
    return choice.new_empty(choice.shape[0], top_k, dtype=torch.int64)
