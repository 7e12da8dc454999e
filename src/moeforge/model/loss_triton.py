"""The chunked loss's softmax gradient on CUDA as one Triton pass over the logits (head.py).

For a chunk of logits x [C, V] (the head GEMM's output, BF16 under autocast) and targets t [C]:
    loss[r] = (logsumexp(x[r]) - x[r, t[r]]) * valid[r]
    g[r, j] = (softmax(x[r])[j] - [j == t[r]]) * valid[r]
written over x itself, which the loss no longer needs. One program per row: a first pass keeps the
running maximum and the sum of exponentials (one exponential per element, rescaled once per
block), a second pass reads the row again and writes the gradient. The compiled torch version
(Inductor) makes the same two reads but writes a new [C, V] tensor and ran 1.45x as long on one
chunk of the `bench` preset (docs/performance.md); eager PyTorch goes through FP32 copies of the
chunk. Tried and not kept: a persistent grid of 1-4 programs per SM, so that the rows in flight
stay in L2 for the second read (at best level with one program per row, up to 3.4x its time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_launch import launch

BLOCK = 4096  # logits per row and iteration


@triton.jit
def _softmax_grad_kernel(x_ptr, t_ptr, valid_ptr, loss_ptr, V, stride, BLOCK: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    base = x_ptr + row.to(tl.int64) * stride
    m = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)  # running maximum
    s = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)  # sum of exp(x - m)
    for off in range(0, V, BLOCK):
        idx = off + cols
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((x - m_new) * LOG2E), axis=0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(t_ptr + row)
    valid = tl.load(valid_ptr + row)
    picked = tl.load(base + t).to(tl.float32)
    tl.store(loss_ptr + row, (lse - picked) * valid)
    for off in range(0, V, BLOCK):
        idx = off + cols
        ok = idx < V
        x = tl.load(base + idx, mask=ok, other=0.0).to(tl.float32)
        g = tl.exp2((x - lse) * LOG2E)
        g = tl.where(idx == t, g - 1.0, g) * valid
        tl.store(base + idx, g.to(x_ptr.dtype.element_ty), mask=ok)


def softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, block: int = BLOCK,
                  num_warps: int = 8) -> torch.Tensor:
    """logits [C, V] (CUDA, contiguous rows) -> the FP32 losses [C], the rows' gradient written over
    logits (see the module's notes). targets [C] in [0, V) (ignored rows clamped to any valid index),
    valid [C] FP32 0/1."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with contiguous rows, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    C, V = logits.shape
    if targets.shape != (C,) or valid.shape != (C,):
        raise ValueError(f"targets and valid must have one entry per row of logits ({C})")
    losses = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C == 0:
        return losses
    launch(_softmax_grad_kernel, (C,),
           (logits, targets.contiguous(), valid.to(torch.float32).contiguous(), losses, V, logits.stride(0)),
           {"BLOCK": block}, num_warps=num_warps)
    return losses
