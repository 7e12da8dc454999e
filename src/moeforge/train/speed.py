"""Speed and memory switches applied to a built model: regional torch.compile and recomputation.

Like FP8 and parallelism, these are functions applied to a built single-device model; the model
code knows nothing of them and computes the same function with or without them (tests compare).

Recomputation (report §3.2.3: "recompute all RMSNorm operations and MLA up-projections during
back-propagation"): `train.recompute` lists parts whose outputs are not kept for backward but
recomputed from the kept tensors around them:
  norm    every RMSNorm (attention, FFN, q/kv latent, MTP norms);
  mla_up  MLA's up-projections wq_b and wkv_b;
  swiglu  the SwiGLU activation silu(w1 x) * w3 x of dense FFNs, shared and routed experts;
  full    the whole decoder block (only its input is kept; the classic activation checkpoint).
The parts run as torch's selective activation checkpointing over each block: ops inside a listed
part are recomputed, every other op's output is kept as without recomputation.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..model.attention import MLA
from ..model.head import OutputHead
from ..model.layers import FeedForward, RMSNorm
from ..model.moe import Experts
from ..model.transformer import Block

_SWIGLU_OPS = {torch.ops.aten.silu.default, torch.ops.aten.mul.Tensor}


def blocks(model: nn.Module) -> list[Block]:
    """The decoder blocks of the model, MTP blocks included."""
    return [m for m in model.modules() if isinstance(m, Block)]


def apply_recompute(model: nn.Module, parts: list[str]) -> nn.Module:
    """Recompute the listed parts in backward (see the module docstring). Call before apply_compile."""
    if not parts:
        return model
    if parts == ["full"]:
        for block in blocks(model):
            _wrap_forward(block, None)
        return model
    regions: list[str] = []  # the marked part the forward is in now (innermost last), set by hooks

    def mark(module: nn.Module, part: str) -> None:
        def enter(m, args):  # (a hook's non-None return value would replace the inputs / output)
            regions.append(part)

        def leave(m, args, out):
            regions.pop()

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    for m in model.modules():
        if "norm" in parts and isinstance(m, RMSNorm):
            mark(m, "norm")
        elif "mla_up" in parts and isinstance(m, MLA):
            for name in ("wq_b", "wkv_b"):
                if hasattr(m, name):
                    mark(getattr(m, name), "mla_up")
        elif "swiglu" in parts and isinstance(m, (FeedForward, Experts)):
            mark(m, "swiglu")

    def policy(ctx, op, *args, **kwargs):
        if _fills_buffer(op):  # fresh buffers and the in-place ops filling them: recreate, never cache
            return CheckpointPolicy.PREFER_RECOMPUTE
        part = regions[-1] if regions else None
        if part == "swiglu":  # only the activation: the expert / FFN GEMMs inside stay saved
            return CheckpointPolicy.PREFER_RECOMPUTE if op in _SWIGLU_OPS else CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE if part is not None else CheckpointPolicy.MUST_SAVE

    context = functools.partial(create_selective_checkpoint_contexts, policy)
    for block in blocks(model):
        _wrap_forward(block, context)
    return model


def _fills_buffer(op) -> bool:
    """Tensor factories and in-place ops (scatter_add_, index_add_, ...): a cached output would be
    mutated after caching, which selective checkpointing rightly refuses; both are cheap to redo."""
    name = op.overloadpacket.__name__ if hasattr(op, "overloadpacket") else str(op)
    return name.endswith("_") or name.startswith(("zeros", "ones", "empty", "full", "new_zeros", "new_ones",
                                                  "new_empty", "new_full", "scalar_tensor"))


def _wrap_forward(block: Block, context_fn) -> None:
    forward = block.forward
    kwargs = {"context_fn": context_fn} if context_fn is not None else {}

    @functools.wraps(forward)
    def checkpointed(x, cos, sin, cache=None, start_pos: int = 0, mask=None):
        if cache is not None or not torch.is_grad_enabled():  # decoding / evaluation: nothing to save
            return forward(x, cos, sin, cache, start_pos, mask)
        return checkpoint(forward, x, cos, sin, None, 0, mask, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Regional compilation: torch.compile each decoder block's forward (the blocks share one compiled
    graph: same code and shapes). The embedding, the head and the loss stay eager. Selective
    recomputation marks its parts with module hooks, which compilation does not see: the config
    allows compile only with recompute=full (validate_train). The chunked loss (train.loss_chunk)
    compiles its per-chunk softmax gradient too."""
    for block in blocks(model):
        block.forward = torch.compile(block.forward, dynamic=False, backend=backend)
    for head in model.modules():
        if isinstance(head, OutputHead):
            head.fused_loss = backend
    return model
