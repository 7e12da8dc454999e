"""AdamW with its two moments stored in BF16 (DeepSeek-V3 §3.3.3, a memory saver: "we adopt the
BF16 data format instead of FP32 to track the first and second moments in the AdamW optimizer").

The update is torch.optim.AdamW's, computed in FP32 one parameter at a time: the moments are read
from BF16, updated with the FP32 gradient, used for the parameter update in FP32 and stored back
rounded to BF16 (round to nearest). The memory per parameter of training goes from 16 bytes (FP32
weight, gradient and two moments) to 12; the FP32 temporaries are one parameter's at a time.

The gradients are divided by `grad_scale` when the trainer sets it (gradient clipping folded into
the update, as with the fused torch AdamW), and the step count stays on the device: no host sync.
A state saved by either optimizer loads into the other (moments cast on load).
"""

from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = self.grad_scale
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    for k in MOMENTS:
                        st[k] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
                st["step"] += 1
                g = p.grad.float()
                if scale is not None:
                    g = g / scale
                m = st["exp_avg"].float().lerp_(g, 1 - beta1)
                v = st["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias1 = 1 - beta1 ** st["step"]
                bias2_sqrt = (1 - beta2 ** st["step"]).sqrt()
                p.mul_(1 - lr * wd)
                p.add_((m / (v.sqrt() / bias2_sqrt).add_(eps)) * (-lr / bias1))
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
        return loss
