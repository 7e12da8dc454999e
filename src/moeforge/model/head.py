"""The output head and its cross-entropy, plain or chunked so the logits never exist in full.

With a large vocabulary the logits dominate activation memory: B*S*V values in FP32 (for
DeepSeek-V3's V = 129280 and 4096 tokens, 2.1 GB per sequence, plus their gradient). The chunked
loss computes logits, loss and both gradients chunk by chunk inside the forward pass and keeps only
dL/dh [T, D] and dL/dW [V, D] for backward (the approach of fused "linear + cross-entropy"
kernels). It computes the same function as the plain path; tests compare the two.

Shape legend: B batch, S sequence, T = B*S tokens, D hidden, V vocabulary, C chunk of tokens.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..triton_launch import eager_triton
from .layers import compute_dtype
from .mtp import IGNORE_INDEX


# the softmax gradient on CUDA as one Triton pass (loss_triton.py); False: the torch path everywhere
TRITON = True
EVAL_CHUNK = 512  # rows of logits at a time in token_losses when no loss_chunk is set (16 MB at V = 8192: CPU caches and no fresh mappings)


class OutputHead(nn.Linear):
    """The output projection (D -> V, no bias). head(h) -> FP32 logits; head(h, targets) -> mean loss.

    `loss_chunk` (tokens per chunk, 0 = plain) is a training setting applied with set_loss_chunk;
    the function computed does not depend on it. `fused_loss` (a torch.compile backend, set by
    train.speed.apply_compile; "" = eager) compiles each chunk's softmax-gradient arithmetic where
    the Triton pass of loss_triton.py does not run it (on CUDA it does).
    """

    def __init__(self, dim: int, vocab: int):
        super().__init__(dim, vocab, bias=False)
        self.loss_chunk = 0
        self.fused_loss = ""

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(h).float()
        if self.loss_chunk > 0:
            return chunked_cross_entropy(h.flatten(0, -2), self.weight, targets.flatten(), self.loss_chunk,
                                         self.fused_loss)
        return plain_cross_entropy(super().forward(h), targets)

    def token_losses(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-target cross-entropy for evaluation: h [..., D], targets [...] -> FP32 losses [...], 0 where
        the target is IGNORE_INDEX. Logits are computed only for positions with a target, a chunk of
        rows at a time (overlapping evaluation windows ignore a quarter or more of the positions, and
        full [B, S, V] logits would be mapped and faulted in afresh for every batch on a CPU). Finds
        the scored rows with nonzero(), a host sync: for evaluation, not for a training step."""
        flat = targets.flatten()
        rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        hs, ts = h.flatten(0, -2).index_select(0, rows), flat.index_select(0, rows)
        # (the result is not a view: FSDP warns about a view returned by a sharded model's forward)
        out = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
        flat_out = out.view(-1)
        chunk = self.loss_chunk if self.loss_chunk > 0 else EVAL_CHUNK
        for start in range(0, rows.numel(), chunk):
            logits = super().forward(hs[start:start + chunk]).float()
            flat_out[rows[start:start + chunk]] = F.cross_entropy(logits, ts[start:start + chunk], reduction="none")
        return out


def plain_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over targets != IGNORE_INDEX, computed in FP32 (the reference)."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


def _softmax_grad(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype):
    """One chunk: (d(sum of losses)/d logits in `dtype`, sum of the losses), in FP32 (the eager path;
    targets clamped to >= 0, valid: 0/1 per row). One fused log-softmax pass writes the FP32 log
    probabilities, which become the gradient in place: on 2 CPU cores 3% less time per step of the
    tiny preset than logsumexp followed by a subtraction and an exponential."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [C, V]
    picked = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    total = -(picked * valid).sum()
    # d(sum of losses)/d logits = softmax - onehot(target), zero on ignored positions
    g = logp.exp_()
    g.scatter_add_(1, targets.unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1))
    g.mul_(valid.unsqueeze(1))
    return g.to(dtype), total


def _softmax_grad_functional(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype):
    """_softmax_grad written without in-place ops, for torch.compile: one pass for the row maxima and
    sums, one for the gradient, the logits read in their GEMM dtype (no FP32 copy in memory)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # [C, 1]
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    picked = torch.where(onehot, x, 0.0).sum(-1)
    total = ((lse.squeeze(1) - picked) * valid).sum()
    g = (torch.exp(x - lse) - onehot.to(x.dtype)) * valid[:, None]
    return g.to(dtype), total


@functools.cache
def _compiled_softmax_grad(backend: str):
    return torch.compile(_softmax_grad_functional, dynamic=False, backend=backend)


def _softmax_grad_triton(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype):
    """_softmax_grad by the Triton kernel of loss_triton.py: the gradient written over the logits (in
    `dtype` already: the GEMM's), one read and one write of them."""
    from .loss_triton import softmax_grad_

    return logits, softmax_grad_(logits, targets, valid).sum()


def _pick_softmax_grad(h: torch.Tensor, fused: str):
    """The Triton pass on CUDA (faster than both torch versions), else the compiled torch version when
    a backend is given, else eager PyTorch."""
    if TRITON and eager_triton(h):
        return _softmax_grad_triton
    return _compiled_softmax_grad(fused) if fused else _softmax_grad


def _chunked_loss_and_grads(h, weight, targets, chunk: int, dtype: torch.dtype, fused: str = ""):
    """(dL/dh, dL/dW in FP32, summed loss, number of valid targets) of the summed cross-entropy."""
    T = h.shape[0]
    w = weight.to(dtype)
    valid = targets != IGNORE_INDEX
    n_valid = valid.sum().clamp_min(1).float()  # stays on the device: no host sync
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    softmax_grad = _pick_softmax_grad(h, fused)
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        hc = h[start:end].to(dtype)  # [C, D]
        tc = targets[start:end].clamp_min(0)
        vc = valid[start:end]
        logits = hc @ w.T  # [C, V] in the GEMM dtype
        g, loss = softmax_grad(logits, tc, vc.to(torch.float32), dtype)
        total += loss
        grad_h[start:end] = (g @ w).to(h.dtype)  # [C, D]
        _accumulate_wgrad(grad_w, g, hc)  # [V, D], FP32 accumulation over chunks
    return grad_h, grad_w, total, n_valid


_FP32_OUT_ADDMM = {"ok": True}


def _accumulate_wgrad(grad_w: torch.Tensor, g: torch.Tensor, hc: torch.Tensor) -> None:
    """grad_w (FP32) += g^T hc. On CUDA with BF16/FP16 operands the GEMM adds into grad_w itself in
    its FP32 accumulator (addmm with an FP32 output): no rounding of each chunk's product to the GEMM
    dtype, and no FP32 copy of it followed by an addition (two passes over [V, D] per chunk). Where
    that addmm is missing (CPU, older torch), the product is converted and added."""
    if grad_w.is_cuda and g.dtype in (torch.bfloat16, torch.float16) and _FP32_OUT_ADDMM["ok"]:
        try:
            torch.addmm(grad_w, g.T, hc, out_dtype=torch.float32, out=grad_w)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_ADDMM["ok"] = False
    grad_w += (g.T @ hc).float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype, fused: str) -> torch.Tensor:
        """h: [T, D], weight: [V, D], targets: [T] -> mean loss over the valid targets (FP32 scalar)."""
        with torch.autocast(h.device.type, enabled=False):  # dtypes are explicit below
            grad_h, grad_w, total, n_valid = _chunked_loss_and_grads(h, weight, targets, chunk, dtype, fused)
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        return (grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          fused: str = "") -> torch.Tensor:
    """Mean cross-entropy of (h @ weight^T) against targets, `chunk` tokens at a time (see the module doc).

    h: [T, D], weight: [V, D], targets: [T] (IGNORE_INDEX entries do not count). fused: a torch.compile
    backend for each chunk's softmax gradient (same function, fewer passes over the logits); "": eager.
    On CUDA with Triton installed the softmax gradient is loss_triton's pass whatever `fused` says.
    """
    return _ChunkedCrossEntropy.apply(h, weight, targets, chunk, compute_dtype(h), fused)


def set_loss_chunk(model: nn.Module, chunk: int) -> None:
    """Compute the training loss of every OutputHead in `model` in chunks of `chunk` tokens (0: plain)."""
    for m in model.modules():
        if isinstance(m, OutputHead):
            m.loss_chunk = chunk
