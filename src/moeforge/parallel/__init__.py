"""Parallelism applied to a built single-device model (the model code never sees a process group).

    ctx = init_distributed(cfg.parallel)        # None for one process
    model = build_model(cfg.model, "meta")
    apply_expert_parallel(model, ctx)           # E/ep experts per rank, all-to-all dispatch
    apply_fsdp(model, ctx, bf16)                # parallel.sharding=zero2|full (pipeline stages:
                                                # apply_fsdp_stages)
    model = model.to_empty(device=ctx.device)
    load_full_state_dict(model, state, ctx)     # single-process weights, sliced/sharded

See docs/parallelism.md. Pipeline parallelism lives in pipeline.py.
"""

from .data import (apply_fsdp, apply_fsdp_stages, check_batch_sizes, clip_coefficient, data_shard, global_grad_norm, scale_gradients,
                   set_gradient_sync, sync_gradients)
from .expert import (AllToAllDispatcher, Dispatcher, apply_expert_parallel, expert_names, full_state_dict, full_tensor, is_expert_key, load_full_optimizer_state_dict, load_full_state_dict,
                     max_ranks_per_token, moe_count_reduce, slice_state_dict)
from .mesh import ParallelContext, init_distributed, resolve_layout
from .zero1 import Zero1

__all__ = [
    "AllToAllDispatcher", "Dispatcher", "ParallelContext", "apply_expert_parallel", "apply_fsdp", "apply_fsdp_stages",
    "check_batch_sizes",
    "clip_coefficient", "data_shard", "expert_names", "full_state_dict", "full_tensor",
    "global_grad_norm", "scale_gradients",
    "init_distributed", "is_expert_key", "load_full_optimizer_state_dict", "load_full_state_dict",
    "max_ranks_per_token", "moe_count_reduce",
    "resolve_layout", "set_gradient_sync", "Zero1", "slice_state_dict", "sync_gradients",
]
