"""FP8 training of Linear layers and routed experts with DeepSeek-V3's recipe (§3.3), emulated exactly.

All three GEMMs of a Linear y = x W^T run on FP8 E4M3 operands with FP32 accumulation:
- Fprop  y  = x  W^T : x in 1x128 tiles along K (its channels), W in 128x128 blocks;
- Dgrad  dx = dy W   : dy in 1x128 tiles along N (its channels), W in 128x128 blocks;
- Wgrad  dW = dy^T x : both in 1x128 tiles along the token dimension (quantising transposed tensors).
This file is the reference: each operand is quantised with moeforge.fp8.quant, dequantised and
multiplied in FP32, which is exactly the arithmetic of an FP8 GEMM with per-block scales whose
accumulator keeps FP32 (the GPU kernels are tested against it). Master weights, the optimizer,
embedding, output head, router, norms and attention core stay in higher precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, grouped_mm
from .cache import cached
from .quant import dequantize, fake_quantize, quantize

ACT, WEIGHT = (1, 128), (128, 128)


@dataclass(frozen=True)
class FP8Recipe:
    pow2_scales: bool = False  # round scales up to powers of two (UE8M0, DeepSeek-V3.1)
    save_fp8_inputs: bool = True  # keep the Linear input for backward in FP8 instead of full precision


def _exact(fn):
    """Run an emulated GEMM's forward outside autocast: its products must stay FP32, as an FP8 GEMM's
    accumulator does, whatever autocast would do to a plain matmul (backward runs without autocast)."""

    def forward(ctx, x, *args):
        with torch.autocast(x.device.type, enabled=False):
            return fn(ctx, x, *args)

    return staticmethod(forward)


def _weight_hat(owner, name, weight: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
    """The dequantised 128x128-block FP8 weight, once per step within fp8.weight_cache (see cache.py)."""
    return cached(owner, (name, "ref", recipe.pow2_scales), lambda: fake_quantize(weight, WEIGHT, recipe.pow2_scales))


class _FP8LinearFn(torch.autograd.Function):
    @_exact
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe, owner=None):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)  # [T, K]
        xq, xs = quantize(x2, ACT, recipe.pow2_scales, check_finite=False)
        w_hat = _weight_hat(owner, "weight", weight, recipe)  # [N, K]
        y = dequantize(xq, xs, ACT) @ w_hat.T  # FP32 accumulation
        if recipe.save_fp8_inputs:
            ctx.save_for_backward(xq, xs, weight)
        else:
            ctx.save_for_backward(x2, weight)
        ctx.recipe, ctx.x_shape, ctx.x_dtype, ctx.owner = recipe, x.shape, x.dtype, owner
        return y.to(x.dtype).unflatten(0, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        recipe = ctx.recipe
        if recipe.save_fp8_inputs:
            xq, xs, weight = ctx.saved_tensors
            x_hat = dequantize(xq, xs, ACT)
        else:
            x2, weight = ctx.saved_tensors
            x_hat = x2.float()
        g = grad_out.reshape(-1, grad_out.shape[-1]).float()  # [T, N]
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: reduction over N
            dx = fake_quantize(g, ACT, recipe.pow2_scales) @ _weight_hat(ctx.owner, "weight", weight, recipe)
            dx = dx.to(ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # Wgrad: reduction over tokens, both operands tiled along T
            g_t = fake_quantize(g.T.contiguous(), ACT, recipe.pow2_scales)  # [N, T]
            x_t = fake_quantize(x_hat.T.contiguous(), ACT, recipe.pow2_scales)  # [K, T]
            dw = (g_t @ x_t.T).to(weight.dtype)
        return dx, dw, None, None


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8 with fine-grained scaling; same parameters, same state dict."""

    recipe: FP8Recipe = FP8Recipe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # GPU path (Triton quantisers + blockwise FP8 GEMMs) where it can run
            from . import gpu

            if gpu.available(x, self.weight):
                y = gpu.fp8_linear(x, self.weight, self.recipe, self)
                return y if self.bias is None else y + self.bias
        y = _FP8LinearFn.apply(x, self.weight, self.recipe, self)
        return y if self.bias is None else y + self.bias


class _FP8GroupedFn(torch.autograd.Function):
    """Rows x[offsets[e-1]:offsets[e]] times w[e] in FP8 (w: [E, in, out], a transposed [E, out, in])."""

    @_exact
    def forward(ctx, x, w, offsets, recipe: FP8Recipe, owner=None, name=None):
        xq, xs = quantize(x, ACT, recipe.pow2_scales, check_finite=False)
        w_hat = _weight_hat(owner, name, w.transpose(1, 2), recipe).transpose(1, 2)  # blocks of [out, in]
        if recipe.save_fp8_inputs:
            ctx.save_for_backward(xq, xs, w, offsets)
        else:
            ctx.save_for_backward(x, w, offsets)
        ctx.recipe, ctx.x_dtype, ctx.owner, ctx.name = recipe, x.dtype, owner, name
        return grouped_mm(dequantize(xq, xs, ACT), w_hat, offsets).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        r = ctx.recipe
        if r.save_fp8_inputs:
            xq, xs, w, offsets = ctx.saved_tensors
            x = dequantize(xq, xs, ACT)
        else:
            x, w, offsets = ctx.saved_tensors
        g = grad_out.float()
        w_hat = _weight_hat(ctx.owner, ctx.name, w.transpose(1, 2), r)  # [E, out, in]
        dx = grouped_mm(fake_quantize(g, ACT, r.pow2_scales), w_hat, offsets).to(ctx.x_dtype)
        # Wgrad per expert: tokens of one expert form the reduction dimension, tiled 1x128 within it.
        dw = torch.zeros_like(w, dtype=torch.float32)
        start = 0
        for e, end in enumerate(offsets.tolist()):  # reference: a loop over experts is fine here
            if end > start:
                xe = fake_quantize(x[start:end].float().T.contiguous(), ACT, r.pow2_scales)  # [in, Te]
                ge = fake_quantize(g[start:end].T.contiguous(), ACT, r.pow2_scales)  # [out, Te]
                dw[e] = xe @ ge.T
            start = end
        return dx, dw.to(w.dtype), None, None, None, None


class FP8Experts(Experts):
    """Routed experts whose three grouped GEMMs run in FP8 (same parameters as Experts)."""

    recipe: FP8Recipe = FP8Recipe()

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        w1, w3, w2 = (w.transpose(1, 2) for w in (self.w1, self.w3, self.w2))
        fn = _FP8GroupedFn.apply
        if x.is_cuda:  # GPU path: Triton grouped FP8 GEMMs over the contiguous per-expert layout
            from . import gpu

            if gpu.available(x, self.w1, self.w2, self.w3):
                fn = gpu.fp8_grouped
        r = self.recipe
        h = F.silu(fn(x, w1, offsets, r, self, "w1")) * fn(x, w3, offsets, r, self, "w3")
        return fn(h, w2, offsets, r, self, "w2")


def convert_to_fp8(model: nn.Module, recipe: FP8Recipe = FP8Recipe()) -> nn.Module:
    """Switch every Linear of the decoder layers and MTP modules, and the routed experts, to FP8.

    The embedding, the output head, the router (not an nn.Linear) and norms stay as they are.
    Parameters are kept (same objects, same names), so checkpoints do not depend on the precision.
    Works on a meta-device model, before materialisation (the construction order of build_model).
    """
    roots = [m for name, m in model.named_children() if name in ("layers", "mtp")]
    for root in roots:
        for module in root.modules():
            if type(module) is nn.Linear:
                module.__class__ = FP8Linear
                module.recipe = recipe
            elif type(module) is Experts:
                module.__class__ = FP8Experts
                module.recipe = recipe
    return model
