"""AdamW with its two moments stored in BF16 (DeepSeek-V3 §3.3.3, a memory saver: "we adopt the
BF16 data format instead of FP32 to track the first and second moments in the AdamW optimizer").

The update is torch.optim.AdamW's, computed in FP32: the moments are read from BF16, updated with
the FP32 gradient, used for the parameter update in FP32 and stored back rounded to BF16 (round to
nearest). The memory per parameter of training goes from 16 bytes (FP32 weight, gradient and two
moments) to 12. On CUDA each parameter is updated by one Triton kernel (adamw_triton.py) that reads
and writes every tensor once. Elsewhere, and as that kernel's test oracle, `reference_update` runs
torch's _foreach ops (multi-tensor kernels) on batches of at most CHUNK elements, so the FP32
temporaries stay bounded by the larger of CHUNK and the largest parameter.

The gradients are divided by `grad_scale` when the trainer sets it (gradient clipping folded into
the update, as with the fused torch AdamW), and the step count stays on the device: no host sync.
A state saved by either optimizer loads into the other (moments cast on load).
"""

from __future__ import annotations

import os

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
CHUNK = 1 << 25  # elements per batch of parameters: 128 MiB per FP32 temporary list
TRITON = os.environ.get("MOEFORGE_ADAMW_TRITON", "1") != "0"  # the GPU kernel where it applies


def _batches(params: list[torch.Tensor], limit: int):
    """Consecutive runs of params whose sizes add up to at most `limit` (a larger one alone)."""
    batch, size = [], 0
    for p in params:
        if batch and size + p.numel() > limit:
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += p.numel()
    if batch:
        yield batch


def closure_loss(closure):
    """torch.optim's closure convention: re-evaluate the loss with autograd on, inside a no-grad step."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamWBF16Moments(torch.optim.Optimizer):
    moment_dtype = torch.bfloat16

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.grad_scale = None  # set per step by the trainer: grads are divided by it

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # (torch casts every state tensor to its parameter's dtype)
        for st in self.state.values():
            for k in MOMENTS:
                if k in st and st[k].dtype != self.moment_dtype:
                    st[k] = st[k].to(self.moment_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        scale = self.grad_scale
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            adamw_states(self.state, params, self.moment_dtype)
            for batch in _batches(params, CHUNK):
                self._update(batch, lr, beta1, beta2, eps, wd, scale)
        return loss

    def _update(self, params, lr, beta1, beta2, eps, wd, scale) -> None:
        states = [self.state[p] for p in params]
        torch._foreach_add_([st["step"] for st in states], 1)
        kernel = _kernel(params, states)  # GPU: one fused pass per parameter (adamw_triton.py)
        (kernel.update if kernel is not None else reference_update)(params, states, lr, beta1, beta2, eps, wd, scale)


def adamw_states(state: dict, params: list[torch.Tensor], moment_dtype: torch.dtype | None = None) -> list[dict]:
    """Each parameter's AdamW state in `state` (an optimizer's): the step count on the device and the
    two moments (in `moment_dtype`, default the parameter's), created zero on first use."""
    for p in params:
        st = state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for k in MOMENTS:
                st[k] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
    return [state[p] for p in params]


def _kernel(params, states):
    """The adamw_triton module when its kernel can update all of these parameters, else None."""
    if not TRITON or not params[0].is_cuda:
        return None
    try:
        from . import adamw_triton
    except ImportError:  # no Triton
        return None
    return adamw_triton if all(adamw_triton.supported(p, st) for p, st in zip(params, states)) else None


def bias_corrections(states, beta1: float, beta2: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """1 - beta1^t and sqrt(1 - beta2^t) from the device-side step counts (no host sync)."""
    steps = [st["step"] for st in states]
    bias1 = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(bias1)
    torch._foreach_add_(bias1, 1)
    bias2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias2_sqrt)
    torch._foreach_add_(bias2_sqrt, 1)
    torch._foreach_sqrt_(bias2_sqrt)
    return bias1, bias2_sqrt


def reference_update(params, states, lr, beta1, beta2, eps, wd, scale) -> None:
    """The update with torch's multi-tensor ops (CPU, and the test oracle of the GPU kernel); the
    states' step counts already incremented."""
    g = [p.grad.float() for p in params]  # (the gradients themselves when FP32: never written)
    if scale is not None:
        g = torch._foreach_div(g, scale)
    m = [st["exp_avg"].float() for st in states]
    v = [st["exp_avg_sq"].float() for st in states]
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    bias1, bias2_sqrt = bias_corrections(states, beta1, beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(m, denom)
    torch._foreach_div_(update, bias1)
    if wd:
        torch._foreach_mul_(params, 1 - lr * wd)
    if isinstance(lr, torch.Tensor):  # a device scalar (train/graph.py): no host read of it
        torch._foreach_mul_(update, lr)
        torch._foreach_sub_(params, update)
    else:
        torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_copy_([st["exp_avg"] for st in states], m)
    torch._foreach_copy_([st["exp_avg_sq"] for st in states], v)
