"""Data parallelism: batch shares, gradient synchronisation, the global gradient norm, FSDP2.

Batches stay global: every data rank (one of the dp x ep ranks of a stage) reads the same global
micro-batch from the loader and keeps rows data_rank::dp*ep, so a step computes the mathematics of
the single-process step (the loader state is the same on every rank, which keeps resume simple).

Gradients. With R = dp x ep data ranks, each rank's loss L_r is a mean over its own rows and the
global loss is L = (1/R) sum_r L_r (equal numbers of targets per rank: packed data has no padding).
  - non-expert parameters (replicated on all R ranks): grad = (1/R) sum_r dL_r/dw: all-reduce over dp x ep;
  - routed experts (sliced over ep, replicated over dp): autograd on ep rank j already sums, through the
    all-to-all's backward, the contributions of all ep ranks' tokens; the dp replicas then sum theirs.
    grad = (1/R) * all-reduce-sum over dp (note 1/R, not 1/dp).
Both in a few flat buckets per dtype (no per-parameter all-reduce), and only after the last micro-batch.

sharding=zero2|full uses FSDP2 (`fully_shard`): experts sharded over the dp mesh dim, everything
else over dp x ep; reshard_after_forward False (zero2) or True (full).
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import nn

from ..errors import MoeforgeError
from .expert import expert_names

BUCKET_BYTES = 32 * 2**20  # gradients per all-reduce; a few large messages beat many small ones


def check_batch_sizes(micro_batch: int, ctx) -> None:
    """Every data rank must get the same number of sequences from each micro-batch."""
    if ctx is not None and micro_batch % ctx.data_ranks:
        raise MoeforgeError(f"train.micro_batch_size: the micro batch ({micro_batch} sequences) is not divisible by "
                            f"the {ctx.data_ranks} data-parallel ranks (dp x ep = {ctx.dp} x {ctx.ep})")


def data_shard(batch: torch.Tensor, ctx) -> torch.Tensor:
    """This rank's rows of a global micro-batch [B, ...] -> [B / (dp*ep), ...] (rows data_rank::dp*ep)."""
    if ctx is None or ctx.data_ranks == 1:
        return batch
    return batch[ctx.data_rank::ctx.data_ranks]


def _is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh")  # an FSDP2 DTensor


@torch.no_grad()
def _all_reduce_buckets(grads: list[torch.Tensor], group, divide: float) -> None:
    """Sum `grads` over `group` (None: no communication) and divide, in flat buckets per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        buckets, current, size = [], [], 0
        for g in same:
            nbytes = g.numel() * g.element_size()
            if current and size + nbytes > BUCKET_BYTES:
                buckets.append(current)
                current, size = [], 0
            current.append(g)
            size += nbytes
        if current:
            buckets.append(current)
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            if group is not None:
                dist.all_reduce(flat, group=group)
            flat.div_(divide)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))


@torch.no_grad()
def sync_gradients(model: nn.Module, ctx) -> None:
    """After the last micro-batch's backward (sharding=none or zero1): average the gradients as the
    single-process step would have them (see the module docstring). No-op for one data rank."""
    if ctx is None or ctx.data_ranks == 1 or ctx.sharding not in ("none", "zero1"):
        return
    routed_names = expert_names(model)
    dense, routed = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # every rank must contribute the same bucket layout
            p.grad = torch.zeros_like(p)
        (routed if name in routed_names else dense).append(p.grad)
    _all_reduce_buckets(dense, ctx.dp_ep_group, ctx.data_ranks)
    _all_reduce_buckets(routed, ctx.dp_group if ctx.dp > 1 else None, ctx.data_ranks)


def _square_norm(g: torch.Tensor) -> torch.Tensor:
    """sum(g * g) in FP32. CPU: pow + sum (pairwise summation; torch.nn.utils.clip_grad_norm_'s norm on
    CPU, torch 2.13, has relative errors up to ~1e-4 on an embedding gradient of 0.5M entries, this is
    within ~1e-7 of FP64). CUDA: one reduction kernel without the squared temporary."""
    if g.is_cuda:
        return torch.linalg.vector_norm(g, dtype=torch.float32).square()
    return g.float().pow(2).sum()


@torch.no_grad()
def global_grad_norm(model: nn.Module, ctx) -> torch.Tensor:
    """The 2-norm of the single-process gradient, whatever the layout (a device tensor, no host sync):
      replicated gradients (non-expert, after all-reduce): the same on every rank, counted once;
      expert gradients sliced over ep (replicated over dp): summed over the ep ranks;
      FSDP shards (DTensor): every dp x ep rank holds a disjoint piece: summed over dp x ep;
      pipeline stages hold disjoint parameters: summed over pp.
    ctx None: one process (no communication).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    routed_names = expert_names(model) if ctx is not None else set()
    device = params[0][1].grad.device if params else torch.device("cpu")
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    partitioned = torch.zeros((), dtype=torch.float32, device=device)  # summed over dp x ep below
    for name, p in params:
        if _is_sharded(p.grad):
            partitioned += _square_norm(p.grad.to_local())
        elif name in routed_names and ctx.ep > 1:
            partitioned += _square_norm(p.grad) / ctx.dp  # the dp replicas each add 1/dp of it
        else:
            replicated += _square_norm(p.grad)
    if ctx is not None and ctx.data_ranks > 1:
        dist.all_reduce(partitioned, group=ctx.dp_ep_group)
    total_sq = replicated + partitioned
    if ctx is not None and ctx.pp > 1:
        dist.all_reduce(total_sq, group=ctx.pp_group)
    return total_sq.sqrt()


def clip_coefficient(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that brings a gradient of norm `total` to norm <= max_norm (as torch.nn.utils.clip_grad_norm_)."""
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


@torch.no_grad()
def scale_gradients(model: nn.Module, coef: torch.Tensor) -> None:
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.to_local() if _is_sharded(p.grad) else p.grad
            g.mul_(coef.to(g.dtype))


# --------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------
def apply_fsdp(model: nn.Module, ctx, bf16: bool) -> nn.Module:
    """Shard parameters, gradients and optimizer state with FSDP2 (parallel.sharding=zero2|full).

    Call after apply_expert_parallel and before to_empty. Routed experts are sharded over the dp
    mesh dim (their replicas); blocks, MTP modules and the rest over dp x ep. The experts' gradient
    reduce-scatter divides by dp x ep (see the module docstring), not by the dp of their mesh.
    """
    if ctx is None or ctx.sharding in ("none", "zero1"):
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    reshard = ctx.sharding == "full"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    sharded = _shard_units(model, [*model.layers, *model.mtp], ctx, reshard, mp)
    sharded.append(fully_shard(model, mesh=ctx.dp_ep_mesh, reshard_after_forward=reshard, mp_policy=mp))
    _sum_reductions_on_cpu(sharded, ctx)
    # The trainer calls model.losses(...), not model(...): give it FSDP's pre/post-forward hooks.
    register_fsdp_forward_method(model, "losses")
    return model


def apply_fsdp_stages(stage_modules: list[nn.Module], ctx) -> None:
    """FSDP2 for the pipeline stages of this rank (parallel.sharding=zero2|full with pp > 1), over the
    stage's data ranks as apply_fsdp does: each block and MTP module a unit (its routed experts one
    of their own), and each StageModule the root of its stage, holding what is left (the embedding;
    the final norm and the head). torch's pipeline schedules drive FSDP through the root: gradients
    accumulate unsharded over the micro-batches and are reduce-scattered once, after the last one.

    The root keeps its parameters gathered from its forward to the end of its backward (FSDP's own
    choice for a root), which the head needs: the pipeline's loss calls it after the stage's
    forward. Parameters stay FP32 (no BF16 all-gathers): the stages send the residual stream in its
    own dtype, and autocast does the BF16 arithmetic as it does without FSDP.
    Call after apply_expert_parallel and before to_empty."""
    if ctx is None or ctx.sharding in ("none", "zero1"):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    reshard, mp, sharded = ctx.sharding == "full", MixedPrecisionPolicy(), []
    for stage in stage_modules:
        units = [*stage.layers.values(), *(stage.mtp if getattr(stage, "mtp", None) is not None else ())]
        sharded += _shard_units(stage, units, ctx, reshard, mp)
        sharded.append(fully_shard(stage, mesh=ctx.dp_ep_mesh, reshard_after_forward=False, mp_policy=mp))
    _sum_reductions_on_cpu(sharded, ctx)


def _shard_units(root: nn.Module, units: list[nn.Module], ctx, reshard: bool, mp) -> list[nn.Module]:
    """fully_shard the routed experts under `root` over dp, then each of `units` over dp x ep; returns
    the FSDP modules whose reductions communicate."""
    from torch.distributed.fsdp import fully_shard

    from ..model.moe import MoE

    sharded = []
    for moe in (m for m in root.modules() if isinstance(m, MoE)):
        fully_shard(moe.experts, mesh=ctx.mesh["dp"], reshard_after_forward=reshard, mp_policy=mp)
        moe.experts.set_gradient_divide_factor(float(ctx.data_ranks))
        if ctx.dp > 1:  # (with one rank FSDP divides once without communicating; forcing SUM divides twice)
            sharded.append(moe.experts)
    for unit in units:
        sharded.append(fully_shard(unit, mesh=ctx.dp_ep_mesh, reshard_after_forward=reshard, mp_policy=mp))
    return sharded


def _sum_reductions_on_cpu(sharded: list[nn.Module], ctx) -> None:
    if ctx.device.type == "cpu":
        # gloo has neither ReduceOp.AVG nor PREMUL_SUM: reduce-scatter with SUM, then divide.
        for module in sharded:
            module.set_force_sum_reduction_for_comms(True)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP: reduce-scatter gradients only on the last micro-batch (no-op without FSDP)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
