"""Muon for the hidden matrices, AdamW for the rest (`train.optimizer = "muon"`).

Muon (Jordan et al. 2024) replaces each matrix's update by the orthogonalised momentum: the
momentum M (Nesterov form) is mapped to the nearest semi-orthogonal matrix U V^T of its SVD
U S V^T, approximately, by five Newton-Schulz iterations of the quintic
X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) = (3.4445, -4.7750, 2.0315), starting from
M / ||M||_F. Moonlight (Liu et al. 2025, "Muon is Scalable for LLM Training"), whose model is a
DeepSeek-V3-shaped MoE, scales that update by 0.2 * sqrt(max(rows, cols)) so that its RMS matches
AdamW's typical update; with it the AdamW learning rate and decoupled weight decay carry over
unchanged, and Kimi K2 was trained this way. We do the same.

Which parameters: every matrix of the blocks (attention projections, dense and shared FFNs, the
MTP projection) and every routed expert's matrices (the stacked [E, out, in] tensors are E
matrices, orthogonalised as a batch). The embedding, the output head and the router's gate stay
on AdamW, as do norms and other vectors (Moonlight keeps embedding and head on AdamW; the router
decides discrete choices from its rows and is kept on the well-understood update).

The gradients are divided by `grad_scale` when the trainer sets it (gradient clipping folded into
the update, as with torch's fused AdamW). The AdamW part is train/adamw.py's reference update with
FP32 moments. Each matrix must be whole on its rank: one process, data parallelism without FSDP
(or with ZeRO-1), expert and pipeline parallelism; not FSDP shards.
"""

from __future__ import annotations

import torch

from .adamw import adamw_states, closure_loss, reference_update

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
ADAMW_RMS = 0.2  # Moonlight's update RMS match


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U V^T of g's SVD, per matrix over the last two dimensions (leading dimensions
    are a batch), by the quintic Newton-Schulz iteration; in BF16 on GPU, FP32 elsewhere. The
    singular values come out in roughly [0.7, 1.2] rather than exactly 1, which is what Muon wants
    (fast, not exact)."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    batched = x.ndim > 2
    x = x.reshape(-1, *x.shape[-2:])
    for _ in range(steps):
        s = x @ x.mT
        poly = torch.baddbmm(s, s, s, beta=b, alpha=c)  # b A + c A^2 (fused multiply-adds)
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + poly X
    x = x if batched else x[0]
    return (x.mT if tall else x).to(g.dtype)


def orthogonalize_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """orthogonalize() of each tensor, computed in batches: the matrices of equal shape (a tall one
    counted as its transpose), across tensors and within stacked ones, go through the iteration
    together, which on a CPU costs a fraction of one small matrix at a time."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        rows, cols = t.shape[-2:]
        groups.setdefault((min(rows, cols), max(rows, cols), t.dtype, t.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx in groups.values():
        flat = [tensors[i].reshape(-1, *tensors[i].shape[-2:]) for i in idx]
        flat = [f.mT if f.shape[-2] > f.shape[-1] else f for f in flat]  # every matrix wide
        result = orthogonalize(torch.cat(flat) if len(flat) > 1 else flat[0])
        for i, part in zip(idx, result.split([f.shape[0] for f in flat])):
            t = tensors[i]
            out[i] = (part.mT if t.shape[-2] > t.shape[-1] else part).reshape(t.shape)
    return out


def update_scale(shape: torch.Size) -> float:
    return ADAMW_RMS * max(shape[-2], shape[-1]) ** 0.5


class Muon(torch.optim.Optimizer):
    """Param groups carry `muon: bool`: True groups get Muon (momentum, Newton-Schulz, Moonlight's
    scale, decoupled weight decay), the others AdamW with `betas` and `eps`. `lr` and
    `weight_decay` mean the same in both."""

    matrix_state = ("momentum_buffer",)  # a Muon matrix's state (no step count; parallel/dcp.py saves it)

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "momentum": momentum,
                                  "nesterov": nesterov, "weight_decay": weight_decay, "muon": False})
        self.grad_scale = None  # set per step by the trainer: grads are divided by it

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        if self.grad_scale is not None:
            grads = torch._foreach_div(grads, self.grad_scale)
        bufs = []
        for p in params:
            st = self.state[p]
            if not st:
                st.update({k: torch.zeros_like(p) for k in self.matrix_state})
            bufs.append(st["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        directions = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        for p, update in zip(params, orthogonalize_all(directions)):
            p.add_(update, alpha=-lr * update_scale(p.shape))

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        states = adamw_states(self.state, params)
        torch._foreach_add_([st["step"] for st in states], 1)
        beta1, beta2 = group["betas"]
        reference_update(params, states, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                         self.grad_scale)
