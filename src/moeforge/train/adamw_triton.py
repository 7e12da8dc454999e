"""The GPU path of AdamWBF16Moments (adamw.py): one Triton kernel per parameter that reads the
weight, the gradient and the two BF16 moments once and writes the weight and the moments once.

The reference is adamw.py's _foreach update, which makes a dozen passes over FP32 copies of the
moments: on the bench preset (3.4B parameters) it took about 100 ms more per optimizer step than
torch's fused FP32 AdamW. The arithmetic here is the reference's, in the same order, in FP32
(tests/test_speed_gpu.py compares the two). Divisions and square roots are IEEE-rounded
(div_rn, sqrt_rn), as PyTorch's CUDA kernels compute them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_launch import launch
from .adamw import bias_corrections

BLOCK = 2048


@triton.jit
def _adamw_bf16_kernel(p_ptr, g_ptr, m_ptr, v_ptr, bias1_ptr, bias2_sqrt_ptr, scale_ptr, lr_ptr, n, lr, beta2,
                       one_minus_beta1, one_minus_beta2, eps, decay, wd, HAS_SCALE: tl.constexpr, LR_PTR: tl.constexpr,
                       BLOCK: tl.constexpr):
    if LR_PTR:  # the lr is a device scalar (a captured step, train/graph.py): the decay from it in FP32
        lr = tl.load(lr_ptr)
        decay = 1.0 - lr * wd
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.math.div_rn(g, tl.load(scale_ptr))
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    m = m + one_minus_beta1 * (g - m)  # torch.lerp(m, g, w) for w < 0.5
    v = v * beta2
    v = v + one_minus_beta2 * g * g
    denom = tl.math.div_rn(tl.sqrt_rn(v), tl.load(bias2_sqrt_ptr)) + eps
    update = tl.math.div_rn(tl.math.div_rn(m, denom), tl.load(bias1_ptr))
    p = p * decay
    p = p + (-lr) * update
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(v_ptr + offs, v.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)


def update(params: list[torch.Tensor], states: list[dict], lr: float | torch.Tensor, beta1: float, beta2: float,
           eps: float, wd: float, scale: torch.Tensor | None) -> None:
    """AdamW on FP32 parameters (contiguous) with BF16 moments; the states' step counts already
    incremented. lr: a number, or a 0-dim FP32 device tensor read by the kernel."""
    scale_arg = scale.reshape(()).float() if scale is not None else None
    bias1, bias2_sqrt = bias_corrections(states, beta1, beta2)  # on the device, from the step counts
    lr_ptr = isinstance(lr, torch.Tensor)
    lr_f = 0.0 if lr_ptr else float(lr)
    for p, st, b1, b2 in zip(params, states, bias1, bias2_sqrt):
        n = p.numel()
        args = (p, p.grad, st["exp_avg"], st["exp_avg_sq"], b1, b2, scale_arg if scale_arg is not None else p,
                lr if lr_ptr else p, n, lr_f, float(beta2), float(1 - beta1), float(1 - beta2), float(eps),
                float(1 - lr_f * wd), float(wd))
        launch(_adamw_bf16_kernel, (triton.cdiv(n, BLOCK),), args,
               {"HAS_SCALE": scale_arg is not None, "LR_PTR": lr_ptr, "BLOCK": BLOCK}, num_warps=8, num_stages=1)


def supported(p: torch.Tensor, st: dict) -> bool:
    """Whether the kernel handles this parameter: FP32 and contiguous on CUDA, with a gradient and
    moments of its layout."""
    g = p.grad
    return (p.is_cuda and p.dtype == torch.float32 and p.is_contiguous() and g is not None and g.is_contiguous()
            and g.dtype in (torch.float32, torch.bfloat16) and st["exp_avg"].is_contiguous()
            and st["exp_avg_sq"].is_contiguous() and st["step"].is_cuda)
