"""Expert parallelism: each of the ep ranks holds E/ep routed experts, tokens travel by all-to-all.

    model = build_model(cfg.model, "meta")
    apply_expert_parallel(model, ctx)     # keep this rank's experts, swap in the all-to-all dispatcher
    model = model.to_empty(device=...)    # memory only for the local experts
    load_full_state_dict(model, full_state, ctx)   # a single-process state dict, sliced on the way in

The model's MoE code does not change: it calls `dispatcher.start(x, indices, E).finish()` and hands
the result to its (now local) Experts, then `dispatcher.combine(...)`. AllToAllDispatcher makes the
local expert computation see exactly the token copies a single device would give those experts,
so the step computes the same function as the single-process model (no capacity, no dropping).

Data path of one MoE layer on ep rank j (R = ep ranks, E_l = E/R local experts, K choices per token):
  1. sort the N = T*K local token copies by global expert (as LocalDispatcher); experts are
     contiguous blocks per rank, so this also groups them by destination rank;
  2. exchange per-expert counts (one small all-to-all; the host reads the split sizes: one sync);
  3. all-to-all the token copies (uneven splits);
  4. received rows are grouped (source rank, local expert): stably re-order them to expert-major
     order for the grouped GEMM, with per-local-expert counts;
  combine: undo 4, all-to-all back (splits swapped), then weight and sum per token (LocalDispatcher).
The backward of an all-to-all is the all-to-all with the splits swapped (class _AllToAll).

Shape legend: T tokens on this rank, D hidden, E routed experts, E_l = E/ep local experts,
K experts per token, N = T*K local token copies, M token copies received by this rank.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..errors import MoeforgeError
from ..fp8.quant import dequantize, quantize
from ..model.moe import Experts, LocalDispatcher, MoE, SpreadRows, inverse_permutation, permute_rows

EXPERT_WEIGHTS = ("w1", "w2", "w3")  # stacked over experts in dim 0


class Dispatcher(Protocol):
    """What MoE needs from a dispatcher: route token copies to expert rows and back.

    dispatch(x [T, D], indices [T, K], n_experts) -> (rows sorted by local expert [M, D],
    rows per local expert [E_l], context); combine(y [M, D], weights [T, K], context, T) -> [T, D].
    start(x, indices, n_experts) -> an object whose finish() returns dispatch's result with the rows
    as a `SpreadRows` (source rows and the index that sorts them; the experts gather them, the FP8
    experts inside their quantisers); the MoE layer computes its shared experts between start and
    finish, so a dispatcher can overlap its transfer with them.
    LocalDispatcher (model/moe.py) is the single-device one; AllToAllDispatcher moves rows between
    ep ranks. Another backend (e.g. DeepEP kernels) plugs in by implementing these two methods.
    """

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def start(self, x: torch.Tensor, indices: torch.Tensor, n_experts: int) -> Any: ...

    def combine(self, y: torch.Tensor, weights: torch.Tensor, ctx: Any, n_tokens: int) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------
# differentiable all-to-all with uneven splits
# --------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Rows x[sum(send[:r]):sum(send[:r+1])] go to rank r; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group, pending: list | None = None):
        """pending: a list to receive the async work handle; then the output may be read only after
        pending[0].wait() (the transfer runs while the caller computes something else)."""
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])  # [M, D]
        work = dist.all_to_all_single(out, x.contiguous(), recv, send, group=group, async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, send, recv, group)


# --------------------------------------------------------------------------------------
# FP8 dispatch: 1x128 tiles, one FP32 scale each (report §3.3.2: dispatched activations in FP8)
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _wire_kernels_on(device_index: int):
    if torch.cuda.get_device_capability(device_index) < (8, 9):  # no float8e4nv in Triton before SM89
        return None
    try:
        from ..fp8 import kernels
    except ImportError:  # no Triton
        return None
    return kernels


def _wire_kernels(t: torch.Tensor, width: int):
    """moeforge.fp8.kernels when the fused Triton pack/unpack can run rows of `width` values on t's
    device, else None (checked once per device)."""
    if not t.is_cuda or width % 4:
        return None
    return _wire_kernels_on(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pack_rows_fp8(x: torch.Tensor) -> torch.Tensor:
    """x [N, D] -> uint8 [N, D + 4 ceil(D/128)]: each row's float8_e4m3fn codes in 1x128 tiles (the
    FP8 recipe's scales, moeforge.fp8.quantize), then its FP32 scales' bytes: one all-to-all row per
    token copy. On CUDA one fused Triton pass (bit-identical); elsewhere the reference ops."""
    kernels = _wire_kernels(x, x.shape[-1])
    if kernels is not None:
        return kernels.pack_rows(x)
    q, scale = quantize(x, (1, 128), check_finite=False)
    return torch.cat([q.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=1)


def unpack_rows_fp8(packed: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of pack_rows_fp8: [N, D] in `dtype`, each value its code times its tile's scale."""
    kernels = _wire_kernels(packed, D)
    if kernels is not None:
        return kernels.unpack_rows(packed, D, dtype)
    q = packed[:, :D].contiguous().view(torch.float8_e4m3fn)
    scale = packed[:, D:].contiguous().view(torch.float32)
    return dequantize(q, scale, (1, 128), dtype)


class _AllToAllFP8(torch.autograd.Function):
    """Forward: quantise to FP8 (1x128 tiles), send bytes + scales in one all-to-all, dequantise.
    Backward: the gradients go back unquantised (straight-through; the report keeps them in BF16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        packed = pack_rows_fp8(x)
        out = packed.new_empty(sum(recv), packed.shape[1])
        dist.all_to_all_single(out, packed, recv, send, group=group)
        return unpack_rows_fp8(out, x.shape[1], x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.backward(ctx, grad)[:4]


# --------------------------------------------------------------------------------------
# the dispatcher
# --------------------------------------------------------------------------------------
class _PendingDispatch:
    """A dispatch whose token all-to-all may still be in flight; finish() waits for it."""

    def __init__(self, pending: list, x_recv: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor,
                 counts: torch.Tensor, ctx):
        self.pending, self.x_recv, self.perm, self.inverse = pending, x_recv, perm, inverse
        self.counts, self.ctx = counts, ctx

    def wait(self) -> None:
        for work in self.pending:
            work.wait()  # NCCL: the compute stream waits on the GPU; gloo: the host waits
        self.pending = []

    def finish(self):
        self.wait()
        return SpreadRows(self.x_recv, self.perm, self.inverse, 1), self.counts, self.ctx


class AllToAllDispatcher:
    """Dispatch/combine across the ep ranks of `group`; this rank holds experts
    [rank * E_l, (rank + 1) * E_l). No padding to a capacity and no dropped tokens.
    overlap=False waits for the token all-to-all inside start(), so nothing computes while it
    travels (the baseline for measuring what the overlap hides)."""

    def __init__(self, group, ep: int, ep_rank: int, fp8: bool = False, overlap: bool = True):
        self.group, self.ep, self.ep_rank, self.fp8, self.overlap = group, ep, ep_rank, fp8, overlap
        self.local = LocalDispatcher()

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, n_experts: int):
        rows, counts, ctx = self.start(x, indices, n_experts).finish()
        return rows.gather(), counts, ctx

    def start(self, x: torch.Tensor, indices: torch.Tensor, n_experts: int) -> "_PendingDispatch":
        """Steps 1-2, and step 3 started: the token copies are in flight when this returns (BF16/FP32
        dispatch; FP8 dispatch dequantises on arrival, so it completes here)."""
        R, E_l = self.ep, n_experts // self.ep
        # 1. local sort by global expert (= by destination rank, then expert)
        x_sorted, counts, local_ctx = self.local.dispatch(x, indices, n_experts)  # [N, D], [E]
        # 2. counts: recv_counts[s, e] = copies rank s sends to my local expert e
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(R, E_l)
        splits = torch.cat([counts.view(R, E_l).sum(1), recv_counts.sum(1)]).tolist()  # the one host sync
        send, recv = splits[:R], splits[R:]
        # 3. token copies, [M, D] grouped by (source rank, local expert)
        pending: list = []
        if self.fp8:
            x_recv = _AllToAllFP8.apply(x_sorted, send, recv, self.group)
        else:
            x_recv = _AllToAll.apply(x_sorted, send, recv, self.group, pending)
        # 4. (computed while the copies travel) expert-major order for the grouped GEMM
        expert_of_row = torch.arange(E_l, device=x.device).repeat(R).repeat_interleave(
            recv_counts.flatten(), output_size=sum(recv))  # [M]
        perm = expert_of_row.argsort(stable=True)  # row i of the expert-major layout is received row perm[i]
        inverse = inverse_permutation(perm)
        out = _PendingDispatch(pending, x_recv, perm, inverse, recv_counts.sum(0), (local_ctx, perm, inverse, send, recv))
        if not self.overlap:
            out.wait()
        return out

    def combine(self, y: torch.Tensor, weights: torch.Tensor, ctx, n_tokens: int) -> torch.Tensor:
        local_ctx, perm, inverse, send, recv = ctx
        y_recv = permute_rows(y, inverse, perm)  # [M, D] back in received order
        y_sorted = _AllToAll.apply(y_recv, recv, send, self.group)  # [N, D] back home, sorted by expert
        return self.local.combine(y_sorted, weights, local_ctx, n_tokens)


# --------------------------------------------------------------------------------------
# applying it to a model, and moving state between the full and the sharded layouts
# --------------------------------------------------------------------------------------
def expert_slice(n_experts: int, ep: int, ep_rank: int) -> slice:
    if n_experts % ep:
        raise MoeforgeError(f"parallel.ep: {ep} does not divide model.n_routed_experts={n_experts}")
    per = n_experts // ep
    return slice(ep_rank * per, (ep_rank + 1) * per)


def max_ranks_per_token(n_experts: int, n_group: int, topk_group: int, top_k: int, ep: int) -> int:
    """How many ep ranks one token's K copies can reach: at most K and ep, and with group-limited
    routing at most topk_group x (ranks one group of experts spans). With n_group a multiple of ep
    every group lies on one rank: a token reaches at most topk_group ranks (docs/parallelism.md)."""
    bound = min(ep, top_k)
    if n_group > 1:
        per_rank, per_group = n_experts // ep, n_experts // n_group
        spans = max(len({e // per_rank for e in range(g * per_group, (g + 1) * per_group)}) for g in range(n_group))
        bound = min(bound, topk_group * spans)  # ranks the widest group touches, times groups per token
    return bound


def apply_expert_parallel(model: nn.Module, ctx) -> nn.Module:
    """Keep this ep rank's contiguous E/ep experts in every MoE layer; all-to-all dispatch.

    Call it on the meta model (before to_empty): the other ranks' experts never get memory. On a
    materialised model the local slice is copied, so the full tensors can be freed.
    """
    if ctx.ep == 1:
        return model
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        sl = expert_slice(moe.n_experts, ctx.ep, ctx.ep_rank)
        experts = moe.experts
        for name in EXPERT_WEIGHTS:
            full = getattr(experts, name)
            local = full.detach()[sl]
            if not local.is_meta:
                local = local.clone()
            setattr(experts, name, nn.Parameter(local, requires_grad=full.requires_grad))
        moe.dispatcher = AllToAllDispatcher(ctx.ep_group, ctx.ep, ctx.ep_rank, fp8=ctx.dispatch_fp8,
                                             overlap=ctx.overlap_dispatch)
    return model


def is_expert_key(name: str) -> bool:
    """State-dict / parameter names of routed expert weights (stacked over experts in dim 0)."""
    return re.search(r"(^|\.)experts\.w[123]$", name) is not None


def expert_names(model: nn.Module) -> set[str]:
    """Names of the routed-expert parameters of `model` (found by module type, not by name)."""
    out = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, Experts):
            out.update(f"{mod_name}.{n}" for n in EXPERT_WEIGHTS)
    return out


def rank_part(name: str, value: torch.Tensor, ep: int, ep_rank: int) -> torch.Tensor:
    """Ep rank `ep_rank`'s part of the full tensor `name`: its experts' rows of an expert weight,
    anything else whole."""
    return value[expert_slice(value.shape[0], ep, ep_rank)] if is_expert_key(name) else value


def slice_state_dict(state: dict[str, torch.Tensor], ep: int, ep_rank: int) -> dict[str, torch.Tensor]:
    """A full (single-process) model state dict -> the one of ep rank `ep_rank` (expert rows sliced)."""
    return {k: rank_part(k, v, ep, ep_rank) for k, v in state.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local part of a (possibly FSDP-sharded DTensor) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor, is_expert: bool, ctx) -> torch.Tensor:
    """The single-process tensor behind this rank's piece: un-shard FSDP (DTensor.full_tensor),
    then concatenate the ep ranks' expert slices. Collective: every rank of the stage calls it."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    if is_expert and ctx is not None and ctx.ep > 1:
        parts = [torch.empty_like(t) for _ in range(ctx.ep)]
        dist.all_gather(parts, t.contiguous(), group=ctx.ep_group)
        t = torch.cat(parts)
    return t


def full_state_dict(model: nn.Module, ctx, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """The state dict the single-process model would have (collective; every rank gets it)."""
    out = {}
    for k, v in model.state_dict().items():
        t = full_tensor(v, is_expert_key(k), ctx)
        out[k] = t.detach().cpu() if to_cpu else t.detach()
    return out


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full-per-ep-rank value into a parameter/buffer that may be an FSDP DTensor."""
    if hasattr(param, "device_mesh"):  # DTensor: keep this rank's shard
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(value)
    else:
        param.copy_(value)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                         ctx, owned: set[str] | None = None) -> None:
    """Load a single-process state dict into an expert-parallel (and/or FSDP) model: each rank keeps
    its ep slice of the experts and its FSDP shard. `state` is a dict (checked against the model
    before anything is copied) or an iterable of (name, value) pairs taken one at a time, such as
    model.initial_values, so that at most one full tensor exists at once. owned: the names this rank
    holds (a pipeline rank: its stages'; the others are skipped); None: all."""
    whole = model.state_dict()
    own = whole if owned is None else {k: v for k, v in whole.items() if k in owned}
    if isinstance(state, dict):
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(whole))
        if missing or unexpected:
            raise MoeforgeError(f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        state = state.items()
    seen = set()
    for k, v in state:
        if k not in own:
            if owned is not None and k not in owned:
                continue  # another pipeline rank's
            raise MoeforgeError(f"weights do not match the model: unexpected {k}")
        if ctx is not None and ctx.ep > 1:
            v = rank_part(k, v, ctx.ep, ctx.ep_rank)
        if tuple(v.shape) != tuple(own[k].shape):
            raise MoeforgeError(f"weights do not match the model: {k} has shape {tuple(v.shape)}, "
                                f"expected {tuple(own[k].shape)}")
        _copy_into(own[k], v)
        seen.add(k)
    if len(seen) != len(own):
        raise MoeforgeError(f"weights do not match the model: missing {sorted(set(own) - seen)[:3]}")


# --------------------------------------------------------------------------------------
# optimizer state (AdamW moments have the shape of their parameter)
# --------------------------------------------------------------------------------------
def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict, ctx,
                                   order: list[str]) -> None:
    """Load a single-process optimizer state dict into this rank's optimizer, matched by parameter
    name: expert moments sliced for this ep rank, FSDP shards cut out, parameters this rank's
    optimizer does not hold (other pipeline stages, other ZeRO-1 owners) skipped.

    order: the single-process optimizer's parameter names in its index order."""
    if len(full["state"]) and max(int(i) for i in full["state"]) >= len(order):
        raise MoeforgeError("optimizer state does not match the model (more parameters than the model has)")
    by_name = {order[int(i)]: st for i, st in full["state"].items()}
    names = {id(p): n for n, p in model.named_parameters()}
    state, groups, start = {}, [], 0
    for g, full_g in zip(optimizer.param_groups, full["param_groups"]):
        for i, p in enumerate(g["params"], start=start):
            st = by_name.get(names[id(p)])
            if st is None:
                continue
            local_state = {}
            for k, v in st.items():
                if torch.is_tensor(v) and v.ndim > 0:
                    if ctx is not None and ctx.ep > 1:
                        v = rank_part(names[id(p)], v, ctx.ep, ctx.ep_rank)
                    if hasattr(p, "device_mesh"):
                        from torch.distributed.tensor import distribute_tensor

                        v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                local_state[k] = v
            state[i] = local_state
        groups.append({**{k: v for k, v in full_g.items() if k != "params"},
                       "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def moe_count_reduce(ctx):
    """The `reduce` for update_routing_bias: sum the [layers, E] counts over the dp x ep ranks."""
    if ctx is None or ctx.data_ranks == 1:
        return None
    return ctx.all_reduce_sum_dp_ep
