"""DeepSeekMoE: router with auxiliary-loss-free bias, routed experts by grouped GEMM, shared experts.

Report §2.1.2, eqs. 12-20. The data path of the routed experts is
    route -> dispatch (permute tokens to a contiguous per-expert layout) -> grouped GEMM
    -> combine (weight, un-permute, sum over the K choices of each token).
Dispatch and combine live in a Dispatcher object so that expert parallelism can swap in one
that moves tokens between ranks (all-to-all) without touching this file's model code.

Shape legend: B batch, S sequence, T = B*S tokens, D hidden, E routed experts, K experts per token,
G groups, I expert intermediate size, N = T*K routed token copies.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..triton_launch import AVAILABLE, eager_triton
from .layers import FeedForward, compute_dtype

class Router(nn.Module):
    """Scores, group-limited top-K selection with the routing bias, gate weights (eqs. 13-16)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.score_func, self.norm_topk_prob = cfg.scoring_func, cfg.norm_topk_prob
        self.route_scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # b_i of eq. 16: used for selection only, updated outside autograd after each step; kept in FP32.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, D] -> gate weights [T, K] (FP32), expert indices [T, K], affinity scores [T, E] (FP32)."""
        logits = F.linear(x.float(), self.weight.float())  # gating stays in FP32
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias  # bias affects selection only
        indices = None
        # not eager_triton: route_topk is a custom op, so it also runs inside compiled blocks
        if choice.is_cuda and AVAILABLE:
            from . import route_triton  # needs Triton

            if route_triton.supported(choice, self.n_group, self.top_k):
                indices = route_triton.route_topk(choice, self.n_group, self.topk_group, self.top_k)
        if indices is None:
            indices = self.select(choice)
        weights = scores.gather(1, indices)  # gates from the unbiased scores
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores

    def select(self, choice: torch.Tensor) -> torch.Tensor:
        """The reference selection: choice [T, E] -> the top-K experts [T, K] among the topk_group
        groups whose two best scores sum highest (route_triton.route_topk on CUDA)."""
        if self.n_group > 1:
            T = choice.shape[0]
            grouped = choice.view(T, self.n_group, -1)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # a group scores by its top-2
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).view(T, -1)
        return choice.topk(self.top_k, dim=-1).indices  # [T, K]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[e-1]:offsets[e]] times w[e] for every expert e.

    x: [N, in], w: [E, in, out], offsets: int32 [E] cumulative row counts ending at N -> [N, out].
    Uses torch's grouped GEMM where it has a kernel for these inputs (CPU; CUDA in BF16),
    otherwise the per-expert reference loop.
    """
    if hasattr(F, "grouped_mm") and x.dtype == w.dtype and _aligned(x) and _aligned(w):
        if x.dtype == torch.bfloat16:
            return F.grouped_mm(x, w, offs=offsets)
        if x.device.type == "cpu":  # the CPU kernel takes FP32 too
            return _grouped_mm_untraced(x, w, offsets)
    return grouped_mm_reference(x, w, offsets)


@torch.compiler.disable
def _grouped_mm_untraced(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM between compiled graphs: its shape function for compilation accepts BF16
    only, though the CPU kernel takes FP32 too."""
    return F.grouped_mm(x, w, offs=offsets)


def _aligned(t: torch.Tensor) -> bool:
    """torch's grouped GEMM needs every non-unit stride to be a multiple of 16 bytes."""
    return all(s * t.element_size() % 16 == 0 for s in t.stride() if s != 1)


@torch.compiler.disable
def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Plain per-expert loop; the reference the grouped GEMM is tested against (syncs the host).
    Never traced by torch.compile: traced, the loop's pieces were compiled again for every expert's
    row count until dynamo's recompilation limit."""
    out, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        out.append(x[start:end] @ w[e])
        start = end
    return torch.cat(out) if out else x.new_zeros(0, w.shape[-1])


@contextlib.contextmanager
def recast_in_backward(params, casts):
    """Inside: autograd saves, instead of each tensor of `casts` (params[i] cast to another dtype; or
    a view of one), the parameter and the view's geometry, and casts it again in the backward: a
    layer's weight copies in the compute dtype no longer live from its forward to its backward. The
    cast is deterministic, so the backward sees the same values. Nothing changes where no cast was
    made (same dtype), without autograd, or under torch.compile (which decides what it saves itself)."""
    pairs = [(p, c) for p, c in zip(params, casts) if c.dtype != p.dtype]
    if not pairs or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    # keyed by the storage objects' ids, the objects held here: an id is unique while its object lives
    by_storage = {id(st): (st, p, c.dtype) for p, c in pairs for st in (c.untyped_storage(),)}

    def pack(t: torch.Tensor):
        hit = by_storage.get(id(t.untyped_storage()))
        if hit is None:
            return t
        return (hit[1], hit[2], t.size(), t.stride(), t.storage_offset())

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        p, dtype, size, stride, offset = saved
        return p.detach().to(dtype).as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class Experts(nn.Module):
    """E routed SwiGLU experts stored as stacked weights (paper names w1 gate, w3 up, w2 down).

    recast_weights (train.recompute=expert_casts): the weights cast to the compute dtype are cast
    again in the backward instead of being kept from the forward (recast_in_backward)."""

    recast_weights: bool = False

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def dense_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, w3 [E, I, D] and w2 [E, D, I] in dtype."""
        return self.w1.to(dtype), self.w3.to(dtype), self.w2.to(dtype)

    def forward(self, x: "torch.Tensor | SpreadRows", counts: torch.Tensor) -> torch.Tensor:
        """x: [N, D] sorted by expert (or the SpreadRows of a dispatch), counts: [E] tokens per local
        expert -> [N, D]."""
        if isinstance(x, SpreadRows):
            x = x.gather()
        dtype = compute_dtype(x)
        x = x.to(dtype)
        offsets = counts.cumsum(0).to(torch.int32)
        casts = self.dense_weights(dtype)
        w1, w3, w2 = (w.transpose(1, 2) for w in casts)
        with recast_in_backward((self.w1, self.w3, self.w2), casts) if self.recast_weights else contextlib.nullcontext():
            h = F.silu(grouped_mm(x, w1, offsets)) * grouped_mm(x, w3, offsets)  # [N, I]
            return grouped_mm(h, w2, offsets)  # [N, D]

    def forward_combined(self, rows: "SpreadRows", counts: torch.Tensor, weights: torch.Tensor, dispatcher,
                         ctx, n_tokens: int) -> torch.Tensor:
        """The experts' outputs combined per token by the dispatcher that sent the rows ([T, D]); FP8
        experts on a GPU do a single-device dispatcher's combine inside their last GEMM's Function."""
        return dispatcher.combine(self(rows, counts), weights, ctx, n_tokens)


def expert_counts(flat_indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert [E] (int64), computed on the device without a host sync (unlike bincount)."""
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat_indices.device)
    return counts.scatter_add_(0, flat_indices, torch.ones_like(flat_indices))


class Ready:
    """A dispatch that is already complete: finish() returns its result."""

    def __init__(self, result):
        self.result = result

    def finish(self):
        return self.result


class _PermuteRows(torch.autograd.Function):
    """rows[i] = x[perm[i]] for a permutation perm. Forward and backward are both gathers: the
    autograd of x[perm] would scatter the gradient back with an accumulating index_put."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)  # (6x faster than x[perm] on a CPU; the same gather on GPU)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[perm], differentiable through gathers (`inverse` = inverse_permutation(perm))."""
    return _PermuteRows.apply(x, perm, inverse)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inverse[perm[i]] = i."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


class _SpreadCopies(torch.autograd.Function):
    """copies[n] = x[order[n] // K]: the K copies of every token in the expert-sorted order. The
    backward sums each token's K copy gradients, read in token order through the inverse order
    (no atomic adds; the sum accumulates in FP32 for BF16 inputs): on eager CUDA in one Triton pass
    (moe_triton.spread_sum), else a gather and a sum over K, which Inductor fuses when compiled."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        if ctx.k > 1 and eager_triton(grad):
            from .moe_triton import spread_sum

            return spread_sum(grad, inverse, ctx.k), None, None, None
        rows = grad.index_select(0, inverse)
        return (rows if ctx.k == 1 else rows.view(-1, ctx.k, grad.shape[-1]).sum(1)), None, None, None


class SpreadRows(NamedTuple):
    """The rows a dispatch hands the experts, not yet copied: row n of the expert-sorted layout is
    src[index[n]], and the k copies of source row m (copy j = m * k + c) sit at positions inverse[j]
    (k = 1: a permutation). gather() copies them, differentiably (backward: each source row's k copy
    gradients summed). The FP8 experts never copy them: their quantisers read the rows in place."""

    src: torch.Tensor  # [M, D]
    index: torch.Tensor  # [N] int64, N = M * k
    inverse: torch.Tensor  # [N] int64
    k: int

    def gather(self) -> torch.Tensor:
        return _SpreadCopies.apply(self.src, self.index, self.inverse, self.k)


class LocalDispatcher:
    """Single-device dispatch: sort token copies by expert (no padding, no dropping), and back.

    Both directions move rows with gathers (forward and backward): dispatch reads each sorted copy
    from its token, combine reads each token's K expert outputs through the inverse order and takes
    their weighted sum. start(...) begins a dispatch and returns an object whose finish() gives
    dispatch's result with the rows as SpreadRows, left for the experts to gather; a dispatcher that
    moves tokens between devices returns before the transfer is done, so the MoE layer computes its
    shared experts in the meantime (report §3.2.2: overlap of communication and computation). Here
    there is nothing to wait for.
    """

    def start(self, x: torch.Tensor, indices: torch.Tensor, n_experts: int) -> Ready:
        """x: [T, D], indices: [T, K] -> Ready((SpreadRows of x in expert order, counts [E], context
        for combine)): the rows are left for the experts to gather."""
        flat = indices.flatten()  # [N], copy t*K + k is token t's k-th choice
        order = flat.argsort(stable=True)  # copy n of the sorted layout is flat copy order[n]
        inverse = inverse_permutation(order)  # flat copy j sits at sorted position inverse[j]
        counts = expert_counts(flat, n_experts)
        K = indices.shape[1]
        return Ready((SpreadRows(x, order // K, inverse, K), counts, (order, inverse)))

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, n_experts: int):
        """x: [T, D], indices: [T, K] -> x sorted by expert [N, D] (copied), counts [E], context for combine."""
        rows, counts, ctx = self.start(x, indices, n_experts).finish()
        return rows.gather(), counts, ctx

    def combine(self, y: torch.Tensor, weights: torch.Tensor, ctx, n_tokens: int) -> torch.Tensor:
        """y: [N, D] expert outputs (sorted), weights: [T, K] -> [T, D] weighted sum per token."""
        order, inverse = ctx
        if eager_triton(y):
            return _CombineRows.apply(y, weights, order, inverse)  # one pass each way (Inductor fuses the ops below)
        y_tok = permute_rows(y, inverse, order).view(n_tokens, weights.shape[1], y.shape[-1])  # [T, K, D]
        return (y_tok * weights.unsqueeze(-1).to(y.dtype)).sum(1)


class _CombineRows(torch.autograd.Function):
    """LocalDispatcher.combine in Triton kernels (moe_triton): out[t] = sum_c w[t, c] * y[inverse[t*K + c]]
    with w cast to y's dtype, summed in FP32 and rounded once (eager PyTorch rounds each product
    first, in three passes over [T, K, D]); backward: the experts' output gradient g[token] * w in one
    gather (the same numbers as PyTorch's), the gate weights' gradient as FP32 dot products rounded
    to y's dtype."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor):
        from .moe_triton import spread_sum

        k = weights.shape[1]
        wb = weights.to(y.dtype).flatten()
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, wb, order, inverse)
        ctx.k, ctx.w_dtype = k, weights.dtype
        return spread_sum(y, inverse, k, wb)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        from .moe_triton import gather_scaled, row_dots

        y, wb, order, inverse = ctx.saved_tensors
        g = g if g.stride(-1) == 1 else g.contiguous()
        dy = gather_scaled(g, order // ctx.k, wb[order]) if ctx.needs_input_grad[0] else None
        dw = row_dots(g, y, inverse, ctx.k).to(g.dtype).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return dy, dw, None, None


def sequence_expert_counts(indices: torch.Tensor, batch: int, n_experts: int) -> torch.Tensor:
    """Each sequence's choices per expert [batch, E] (int64) from indices [batch * S, K], counted as
    expert_counts counts, over batch x E counters. (An FP32 scatter_add of ones into [batch, E] took
    0.53-0.78 ms a layer in the compiled bench step, against 50-108 us for expert_counts' integer
    one over all choices; H200.)"""
    seq_offset = torch.arange(batch, device=indices.device).unsqueeze(1) * n_experts
    return expert_counts((indices.view(batch, -1) + seq_offset).flatten(), batch * n_experts).view(batch, n_experts)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, n_experts: int,
                          seq_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Complementary sequence-wise balance loss without alpha: mean over sequences of sum_i f_i P_i.

    Eqs. 17-20: f_i = E / (K * S) * #{t in the sequence that selected i},
    P_i = mean_t s'_{i,t} with s' the scores normalised to sum to 1 per token.
    seq_counts: sequence_expert_counts(indices, batch, n_experts) when the caller has them already.
    """
    T, K = indices.shape
    S = T // batch
    probs = scores / scores.sum(dim=-1, keepdim=True)  # s'
    P = probs.view(batch, S, n_experts).mean(dim=1)  # [B, E]
    if seq_counts is None:
        seq_counts = sequence_expert_counts(indices, batch, n_experts)
    f = seq_counts.to(scores.dtype) * n_experts / (K * S)
    return (f * P).sum(dim=-1).mean()


def _recomputing() -> bool:
    """True while activation recomputation re-runs this forward inside backward (count tokens once).
    A compiled region is traced once and recomputed from its graph, so it never re-runs Python."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """h' = shared(u) + sum_k g_k * expert_k(u): the DeepSeekMoE FFN of one layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (FeedForward(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)
        self.dispatcher = LocalDispatcher()
        # Tokens routed to each expert since the last bias update (all micro-batches of a step).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, S, D] -> (output [B, S, D], sequence balance loss without alpha)."""
        B, S, D = x.shape
        u = x.reshape(B * S, D)
        weights, indices, scores = self.gate(u)
        if self.training:
            seq_counts = sequence_expert_counts(indices, B, self.n_experts)  # (indices carry no gradient)
            with torch.no_grad():
                counts = seq_counts.sum(0).float()  # this micro-batch's tokens per expert
                if not _recomputing():  # (the same ops run either way: recomputation replays them in order)
                    self.tokens_per_expert += counts
            balance = sequence_balance_loss(scores, indices, B, self.n_experts, seq_counts)
        else:
            balance = scores.new_zeros(())
        # Permute (and, under expert parallelism, send) the tokens in the dtype the experts compute in:
        # under BF16 autocast that halves the bytes moved compared with the FP32 residual stream.
        pending = self.dispatcher.start(u.to(compute_dtype(u)), indices, self.n_experts)
        shared = self.shared_experts(u) if self.shared_experts is not None else None  # while tokens travel
        rows, counts, ctx = pending.finish()
        y = self.experts.forward_combined(rows, counts, weights, self.dispatcher, ctx, B * S)
        if shared is not None:
            y = y + shared
        return y.view(B, S, D).to(x.dtype), balance

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as a loop over tokens' choices and experts (slow; for tests)."""
        B, S, D = x.shape
        u = x.reshape(B * S, D)
        weights, indices, _ = self.gate(u)
        y = torch.zeros_like(u)
        for e in range(self.n_experts):
            tok, k = (indices == e).nonzero(as_tuple=True)
            if tok.numel():
                h = F.silu(u[tok] @ self.experts.w1[e].T) * (u[tok] @ self.experts.w3[e].T)
                y.index_add_(0, tok, (h @ self.experts.w2[e].T) * weights[tok, k].unsqueeze(-1))
        if self.shared_experts is not None:
            y = y + self.shared_experts(u)
        return y.view(B, S, D)
