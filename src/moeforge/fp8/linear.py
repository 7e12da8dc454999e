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

from ..model.layers import FeedForward, compute_dtype
from ..model.moe import Experts, LocalDispatcher, SpreadRows, grouped_mm
from ..model.mtp import MTPModule
from ..model.transformer import Block
from .cache import cached
from .quant import dequantize, fake_quantize, part_starts, quantize, stack_parts

ACT, WEIGHT = (1, 128), (128, 128)


@dataclass(frozen=True)
class FP8Recipe:
    pow2_scales: bool = False  # round scales up to powers of two (UE8M0, DeepSeek-V3.1)
    # keep the Linear input for backward in FP8 instead of full precision: its Wgrad operand (x^T in
    # 1x128 tiles along the tokens), quantised in the forward from x itself, so that the gradients
    # are the same as without the saver
    save_fp8_inputs: bool = True
    # the dtype of the norms in front of the FP8 GEMMs (the blocks' attention and FFN norms, the MTP
    # modules' input norms) under BF16 autocast: "fp32" (their input's, the residual stream's: the
    # quantisers read the normed values unrounded and the gradients reaching the norms are summed in
    # FP32) or "bf16" (autocast's: half the bytes, 0.7% faster on the bench preset, and a larger loss
    # gap to BF16 on the tiny preset; docs/fp8.md)
    norm_output: str = "fp32"
    # on the GPU, the routed experts' Wgrad kernel adds a micro-batch's weight gradient into the FP32
    # .grad that earlier micro-batches left (gradient accumulation fused into the GEMM: no gradient
    # tensor of its own, no separate addition); the same numbers as autograd's accumulation
    accumulate_wgrad: bool = True

    def __post_init__(self):
        if self.norm_output not in ("fp32", "bf16"):
            raise ValueError(f"FP8Recipe.norm_output: expected fp32 or bf16, got {self.norm_output!r}")


def _exact(fn=None, *, out_dtype: bool = False):
    """Run an emulated GEMM's forward outside autocast: its products must stay FP32, as an FP8 GEMM's
    accumulator does, whatever autocast would do to a plain matmul (backward runs without autocast).
    out_dtype: set ctx.out_dtype, the dtype a Linear returns for x under the caller's autocast
    (compute_dtype), read before autocast is turned off."""
    if fn is None:
        return lambda f: _exact(f, out_dtype=out_dtype)

    def forward(ctx, x, *args):
        if out_dtype:
            ctx.out_dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return fn(ctx, x, *args)

    return staticmethod(forward)


def _weight_hat(owner, name, ws, recipe: FP8Recipe) -> torch.Tensor:
    """The dequantised 128x128-block FP8 weights ws (parts stacked as quant.stack_parts does), once per
    step within fp8.weight_cache (see cache.py)."""
    return cached(owner, (name, "ref", recipe.pow2_scales),
                  lambda: stack_parts([fake_quantize(w, WEIGHT, recipe.pow2_scales) for w in ws]))


class _FP8LinearFn(torch.autograd.Function):
    """y = x W^T in FP8, W the parts ws [out_i, in] stacked along out at quant.part_starts (one part
    for a Linear; gate and up for an FP8 FeedForward: one GEMM whose output has the gate's columns
    first, zero columns up to the next multiple of 128, then the up projection's). y comes in the
    dtype nn.Linear would return (autocast's when it is on, else x's); dx in x's."""

    @_exact(out_dtype=True)
    def forward(ctx, x: torch.Tensor, recipe: FP8Recipe, owner, name, *ws):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)  # [T, K]
        w_hat = _weight_hat(owner, name, ws, recipe)  # [N, K]
        y = fake_quantize(x2, ACT, recipe.pow2_scales) @ w_hat.T  # FP32 accumulation
        if recipe.save_fp8_inputs:  # x^T's Wgrad operand
            kept = quantize(x2.T.contiguous(), ACT, recipe.pow2_scales, check_finite=False) \
                if any(ctx.needs_input_grad[4:]) else (None, None)
            ctx.save_for_backward(*kept, *ws)
        else:
            ctx.save_for_backward(x2, None, *ws)
        ctx.recipe, ctx.x_shape, ctx.x_dtype, ctx.owner, ctx.name = recipe, x.shape, x.dtype, owner, name
        return y.to(ctx.out_dtype).unflatten(0, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        recipe = ctx.recipe
        kept0, kept1, *ws = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).float()  # [T, N]
        dx, dws = None, [None] * len(ws)
        if ctx.needs_input_grad[0]:  # Dgrad: reduction over N
            dx = fake_quantize(g, ACT, recipe.pow2_scales) @ _weight_hat(ctx.owner, ctx.name, ws, recipe)
            dx = dx.to(ctx.x_dtype).view(ctx.x_shape)
        if any(ctx.needs_input_grad[4:]):  # Wgrad: reduction over tokens, both operands tiled along T
            g_t = fake_quantize(g.T.contiguous(), ACT, recipe.pow2_scales)  # [N, T]
            if recipe.save_fp8_inputs:
                x_t = dequantize(kept0, kept1, ACT)  # [K, T]
            else:
                x_t = fake_quantize(kept0.float().T.contiguous(), ACT, recipe.pow2_scales)
            dw = g_t @ x_t.T  # [N, K]: each part's rows at its start
            dws = [dw[r0:r0 + w.shape[0]].to(w.dtype) for r0, w in zip(part_starts([w.shape[0] for w in ws]), ws)]
        return (dx, None, None, None, *dws)


@torch.compiler.disable
def fp8_matmul(x: torch.Tensor, ws: tuple, recipe: FP8Recipe, owner=None, name: str = "weight") -> torch.Tensor:
    """x [..., K] times the parts ws [out_i, K] stacked along out at quant.part_starts, in FP8:
    [..., N], in the dtype nn.Linear would return (under BF16 autocast BF16, whatever x's dtype:
    an FP32 output doubled the bytes of everything downstream). The GPU kernels where they can run,
    else the reference emulation. owner and name key the quantised weights in fp8.weight_cache
    (owner None: no caching).

    Not traced by torch.compile: each FP8 GEMM runs between compiled graphs anyway (gpu.fp8_linear),
    and traced, this function was compiled again for every input width of the model (the `small`
    preset hit dynamo's recompilation limit)."""
    if x.is_cuda:
        from . import gpu

        if gpu.available(x, *ws):
            return gpu.fp8_linear(x, recipe, owner, name, *ws)
    return _FP8LinearFn.apply(x, recipe, owner, name, *ws)


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8 with fine-grained scaling; same parameters, same state dict."""

    recipe: FP8Recipe = FP8Recipe()

    # Not traced (see fp8_matmul); the graph breaks at the call, in the caller, and the bias add after
    # the GEMM is not a graph of its own, compiled again for every output shape of the model.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_matmul(x, (self.weight,), self.recipe, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # (in y's dtype, as autocast's Linear)


def _spans(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """Cumulative row counts -> each group's [start, end) (a host sync: the reference's loops)."""
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


class _FP8GroupedFn(torch.autograd.Function):
    """Rows x[offsets[e-1]:offsets[e]] times the experts' weights in FP8. ws: parts [E, out_i, in] (the
    stored layout), stacked along out at quant.part_starts and run as one grouped GEMM: w1 and w3 give
    the gate and the up projection from one quantisation of x. Output [N, part_starts[-1] + out_last]."""

    @_exact
    def forward(ctx, x, offsets, recipe: FP8Recipe, owner, name, *ws):
        w_hat = _weight_hat(owner, name, ws, recipe)  # [E, out, in]
        # FP8-saved input: each expert's x^T in 1x128 tiles along its own tokens (its Wgrad operand)
        ctx.x_t = [quantize(x[a:b].T.contiguous(), ACT, recipe.pow2_scales, check_finite=False) if b > a else None
                   for a, b in _spans(offsets)] if recipe.save_fp8_inputs and any(ctx.needs_input_grad[5:]) else None
        ctx.save_for_backward(*(() if recipe.save_fp8_inputs else (x,)), offsets, *ws)
        ctx.recipe, ctx.x_dtype, ctx.owner, ctx.name = recipe, x.dtype, owner, name
        return grouped_mm(fake_quantize(x, ACT, recipe.pow2_scales), w_hat.transpose(1, 2), offsets).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        r = ctx.recipe
        saved = ctx.saved_tensors
        n_kept = 0 if r.save_fp8_inputs else 1
        offsets, ws = saved[n_kept], saved[n_kept + 1:]
        g = grad_out.float()
        w_hat = _weight_hat(ctx.owner, ctx.name, ws, r)  # [E, out, in]
        dx = grouped_mm(fake_quantize(g, ACT, r.pow2_scales), w_hat, offsets).to(ctx.x_dtype)
        if not any(ctx.needs_input_grad[5:]):
            return (dx, None, None, None, None, *(None for _ in ws))
        # Wgrad per expert: tokens of one expert form the reduction dimension, tiled 1x128 within it.
        dw = torch.zeros_like(w_hat, dtype=torch.float32)
        for e, (start, end) in enumerate(_spans(offsets)):  # reference: a loop over experts is fine here
            if end > start:
                if ctx.x_t is not None:
                    xe = dequantize(*ctx.x_t[e], ACT)  # [in, Te]
                else:
                    xe = fake_quantize(saved[0][start:end].float().T.contiguous(), ACT, r.pow2_scales)
                ge = fake_quantize(g[start:end].T.contiguous(), ACT, r.pow2_scales)  # [out, Te]
                dw[e] = ge @ xe.T
        ctx.x_t = None
        starts = part_starts([w.shape[1] for w in ws])
        dws = [dw[:, r0:r0 + w.shape[1]].to(w.dtype) for r0, w in zip(starts, ws)]
        return (dx, None, None, None, None, *dws)


@torch.compiler.disable
def _fp8_grouped_reference(x, offsets, recipe: FP8Recipe, owner, name, *ws) -> torch.Tensor:
    """The emulated grouped GEMMs (_FP8GroupedFn), never traced by torch.compile: they loop over the
    experts on the host (traced, each input width was a graph of its own up to the loop)."""
    return _FP8GroupedFn.apply(x, offsets, recipe, owner, name, *ws)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up from one GEMM's output [N, C] whose first I columns are the gate and last I the
    up projection (zero columns between them when I is not a multiple of 128). Its backward writes
    the gradient into one [N, C] buffer; autograd's split or slices would assemble it with a copy.
    triton: run the GPU kernels (one pass each way; eager PyTorch runs strided slices unvectorised),
    except in a forward that torch.compile traces, where Inductor fuses the torch ops instead. In the
    compiled training step the backward still runs eagerly (seen in its profile: the Function's
    Python backward launches the kernels), so it keeps the kernel unless it is being traced."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, inter_dim: int, triton: bool = False) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        ctx.inter_dim, ctx.triton = inter_dim, triton
        if triton and not torch.compiler.is_compiling():
            from .kernels import swiglu

            return swiglu(gate_up, inter_dim)
        return F.silu(gate_up[:, :inter_dim]) * gate_up[:, -inter_dim:]

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        n = ctx.inter_dim
        if ctx.triton and not torch.compiler.is_compiling():
            from .kernels import swiglu

            return swiglu(gate_up, n, dh), None, None
        gate, up = gate_up[:, :n], gate_up[:, -n:]
        d = torch.empty_like(gate_up)
        torch.mul(dh, F.silu(gate), out=d[:, -n:])
        torch.ops.aten.silu_backward.grad_input(dh * up, gate, grad_input=d[:, :n])
        d[:, n:-n].zero_()
        return d, None, None


class FP8Experts(Experts):
    """Routed experts whose grouped GEMMs run in FP8 (same parameters as Experts): gate and up in one
    GEMM over [w1; w3], then down."""

    recipe: FP8Recipe = FP8Recipe()

    def forward(self, x: "torch.Tensor | SpreadRows", counts: torch.Tensor) -> torch.Tensor:
        """x: the rows sorted by expert [N, D], or a dispatch's SpreadRows: on the GPU its rows are
        gathered by the first GEMM's quantisers, so their sorted BF16 copy is never written."""
        if self._on_gpu(x):
            return self._gpu_forward(x, counts)
        offsets = counts.cumsum(0).to(torch.int32)
        if isinstance(x, SpreadRows):
            x = x.gather()
        r = self.recipe
        gate_up = _fp8_grouped_reference(x, offsets, r, self, "w13", self.w1, self.w3)
        return _fp8_grouped_reference(_SwiGLU.apply(gate_up, self.w1.shape[1], False), offsets, r, self, "w2", self.w2)

    def forward_combined(self, rows: SpreadRows, counts: torch.Tensor, weights: torch.Tensor, dispatcher, ctx,
                         n_tokens: int) -> torch.Tensor:
        """Experts.forward_combined; on the GPU under a single-device dispatch the last GEMM's Function
        does the combine, so that its backward quantises the output gradient read through the
        dispatch's order, times the gate weights, instead of a gathered BF16 copy of it. (Another
        dispatcher's combine moves the rows between devices first.)"""
        if isinstance(dispatcher, LocalDispatcher) and self._on_gpu(rows):
            return self._gpu_forward(rows, counts, weights, ctx)
        return super().forward_combined(rows, counts, weights, dispatcher, ctx, n_tokens)

    def _on_gpu(self, x) -> bool:
        src = x.src if isinstance(x, SpreadRows) else x
        if not src.is_cuda:
            return False
        from . import gpu

        return gpu.available(src, self.w1, self.w2, self.w3)

    def _gpu_forward(self, x, counts, weights=None, combine_ctx=None) -> torch.Tensor:
        """The Triton/Gluon grouped FP8 GEMMs over the contiguous per-expert layout; with weights, the
        combine of LocalDispatcher (context combine_ctx) inside the last one."""
        from . import gpu
        from .groups import Groups

        groups = Groups.from_counts(counts)  # offsets and tiles, shared by both GEMMs' launches and quantisers
        r = self.recipe
        spread = (x.index, x.inverse, x.k) if isinstance(x, SpreadRows) else None
        src = x.src if spread is not None else x
        gate_up = gpu.fp8_grouped(src, groups, r, self, "w13", self.w1, self.w3, spread=spread)
        h = _SwiGLU.apply(gate_up, self.w1.shape[1], True)
        if weights is None:
            return gpu.fp8_grouped(h, groups, r, self, "w2", self.w2)
        return gpu.fp8_grouped(h, groups, r, self, "w2", self.w2, gate=weights, combine=(*combine_ctx, x.k))


class FP8FeedForward(FeedForward):
    """The SwiGLU FFN (dense layers, shared experts) in FP8, same parameters: gate and up in one FP8
    GEMM over [w1; w3] (x quantised once, one Dgrad), the SwiGLU in one pass each way, then w2 (an
    FP8Linear). Under torch.compile each FP8 GEMM runs between compiled graphs, so with two GEMMs the
    SwiGLU's silu and product fell into two graphs, each a pass of its own, forward and backward."""

    recipe: FP8Recipe = FP8Recipe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import gpu

        w1, w3 = self.w1.weight, self.w3.weight
        gate_up = fp8_matmul(x, (w1, w3), self.recipe, self, "w13")
        on_gpu = gpu.available(x, w1, w3)
        h = _SwiGLU.apply(gate_up.reshape(-1, gate_up.shape[-1]), w1.shape[0], on_gpu)
        return self.w2(h.unflatten(0, x.shape[:-1]))


# the norms that read the FP32 residual stream in front of FP8 GEMMs (FP8Recipe.norm_output)
_NORMS_BEFORE_FP8 = {Block: ("attn_norm", "ffn_norm"), MTPModule: ("enorm", "hnorm")}


def convert_to_fp8(model: nn.Module, recipe: FP8Recipe = FP8Recipe()) -> nn.Module:
    """Switch every Linear of the decoder layers and MTP modules, the SwiGLU FFNs (dense layers and
    shared experts: FP8FeedForward) and the routed experts to FP8.

    The embedding, the output head, the router (not an nn.Linear) and norms stay as they are; the
    norms that read the residual stream in front of FP8 GEMMs return it in the dtype
    recipe.norm_output says.
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
            elif type(module) is FeedForward:
                module.__class__ = FP8FeedForward
                module.recipe = recipe
            for name in _NORMS_BEFORE_FP8.get(type(module), ()):
                getattr(module, name).keep_dtype = recipe.norm_output == "fp32"
    return model
