"""Speed and memory switches applied to a built model: regional torch.compile and recomputation.

Like FP8 and parallelism, these are functions applied to a built single-device model; the model
code knows nothing of them and computes the same function with or without them (tests compare).

Recomputation (report §3.2.3: "recompute all RMSNorm operations and MLA up-projections during
back-propagation"): `train.recompute` lists parts whose outputs are not kept for backward but
recomputed from the kept tensors around them:
  norm    every RMSNorm (attention, FFN, q/kv latent, MTP norms);
  mla_up  MLA's up-projections wq_b and wkv_b;
  swiglu  the SwiGLU activation silu(w1 x) * w3 x of dense FFNs, shared and routed experts;
  expert_casts  the routed experts' weights cast to the compute dtype (BF16 under autocast), which
          their grouped GEMMs would otherwise keep from forward to backward: a copy of every
          expert's weights per MoE layer and micro-batch (moe.recast_in_backward);
  full    the whole decoder block (only its input is kept; the classic activation checkpoint).
The first three run as torch's selective activation checkpointing over each block: ops inside a
listed part are recomputed, every other op's output is kept as without recomputation.

`compile_on` and `graph_on` decide train.compile and train.cuda_graph for a run: true and false as
set, "auto" by the device and the settings (on a GPU where the switch applies, else off).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..config import Config
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
    if "expert_casts" in parts:
        for m in model.modules():
            if isinstance(m, Experts):
                m.recast_weights = True
        parts = [p for p in parts if p != "expert_casts"]
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


def _compiled_unless_decoding(eager, compiled):
    @functools.wraps(eager)
    def forward(x, cos, sin, cache=None, start_pos=0, mask=None):
        return (eager if cache is not None else compiled)(x, cos, sin, cache, start_pos, mask)

    return forward


def compile_on(cfg: Config, device: torch.device, pctx=None) -> bool:
    """Whether this run compiles its blocks: train.compile as set, or for "auto" in one process on a
    CUDA device with Triton (Inductor's GPU code), where compilation applies: train.recompute none or
    full and parallel.ep 1 (the settings validate_train refuses with train.compile=true). On a CPU
    "auto" runs eagerly (Inductor's first compilation there takes longer than a short run), and under
    torchrun too (compiled blocks have been measured on one GPU only; set true to compile there)."""
    t = cfg.train
    if t.compile != "auto":
        return bool(t.compile)
    from ..triton_launch import AVAILABLE

    return (device.type == "cuda" and AVAILABLE and pctx is None and t.recompute_parts in ([], ["full"])
            and cfg.parallel.ep == 1)


def graph_refusal(cfg: Config, device: torch.device, pctx=None) -> str | None:
    """Why a captured step cannot run these settings (None: it can)."""
    t = cfg.train
    why = None
    if device.type != "cuda":
        why = f"needs a CUDA device (train.device resolved to {device.type})"
    elif pctx is not None:
        why = "one process only (the collectives of a distributed step are not captured)"
    elif cfg.parallel.pp > 1:
        why = "not with pipeline parallelism (parallel.pp > 1)"
    elif t.optimizer != "adamw":
        why = "with train.optimizer=adamw only"
    return why


AUTO_MAX_MICRO_BATCHES = 16  # "auto" captures steps of at most this many micro-batches


def graph_on(cfg: Config, device: torch.device, pctx=None) -> bool:
    """Whether this run captures its step: train.cuda_graph as set (true: check_graph_step refuses
    what cannot run), or for "auto" where graph_refusal finds nothing, without train.document_mask
    (its FlexAttention block mask is built in the step) and with at most AUTO_MAX_MICRO_BATCHES
    micro-batches a step (a step of many micro-batches is not paced by the host; each one would add
    its kernels to the graph), and not for FP8 where the FP8 kernels cannot run (the exact emulation
    on another GPU was never captured)."""
    t = cfg.train
    if t.cuda_graph != "auto":
        return bool(t.cuda_graph)
    if graph_refusal(cfg, device, pctx) is not None or t.document_mask:
        return False
    if t.precision == "fp8":
        from ..fp8 import gpu

        if not gpu.kernels_on(device):
            return False
    return t.batch_size // t.micro_batch <= AUTO_MAX_MICRO_BATCHES


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Regional compilation: torch.compile each decoder block's forward (the blocks share one compiled
    graph: same code and shapes). The embedding, the head and the loss stay eager. Selective
    recomputation marks its parts with module hooks, which compilation does not see: the config
    allows compile only with recompute=full (validate_train). The chunked loss (train.loss_chunk)
    compiles its per-chunk softmax gradient too. Decoding with a latent cache (a trained model's
    sample, generate) runs the blocks' own forward: compiled, each new position and prompt length would
    be another compilation (generate.py has its own compiled decoding step)."""
    # Inductor's advice that does not apply here: the FP32 matmuls it sees (the router's) are FP32 on
    # purpose, and a split softmax reduction is its own choice
    warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores for float32 matrix multiplication")
    warnings.filterwarnings("ignore", message="\\s*Online softmax is disabled on the fly")
    for block in blocks(model):
        block.forward = _compiled_unless_decoding(block.forward, torch.compile(block.forward, dynamic=False,
                                                                               backend=backend))
    for head in model.modules():
        if isinstance(head, OutputHead):
            head.fused_loss = backend
    return model
