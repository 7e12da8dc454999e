"""The GPU path of FP8 training: FP8Linear and the FP8 routed experts on CUDA (Hopper, SM90).

Same arithmetic as the reference in linear.py (which stays the CPU path and the test oracle), with
the Triton quantisers and blockwise FP8 GEMMs of kernels.py:
- Fprop  y  = x W^T : x quantised in 1x128 tiles along K, W in 128x128 blocks;
- Dgrad  dx = dy W  : dy in 1x128 tiles along N, W^T in 128x128 blocks (the transposed FP8 copy of
                      the forward's quantised W, saved for backward: 1 byte per weight);
- Wgrad  dW = dy^T x: dy^T and x^T in 1x128 tiles along the tokens, never building a transpose.
x's Wgrad operand is quantised in the forward, from x itself, and is what an FP8-saved input keeps
for backward (so the saver changes no gradient).
Linear GEMMs run through torch._scaled_mm (cuBLASLt blockwise scaling); the routed experts' grouped
GEMMs through kernels.grouped_gemm / grouped_wgrad over the contiguous per-expert layout.

Switch it off with MOEFORGE_FP8_GPU=0 (or `moeforge.fp8.gpu.ENABLED = False`): FP8Linear/FP8Experts
then run the reference emulation on CUDA as well.
"""

from __future__ import annotations

import os
import weakref

import torch

from ..model.layers import compute_dtype
from .cache import cached
from .groups import Groups
from .quant import part_starts

ENABLED = os.environ.get("MOEFORGE_FP8_GPU", "1") != "0"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


_DEVICE_OK: dict[int, bool] = {}


@torch.compiler.assume_constant_result  # traced under torch.compile: a constant, not a call into the cache
def _device_ok(index: int) -> bool:
    if index not in _DEVICE_OK:  # (a dict, not functools.lru_cache, which Dynamo warns about and traces through)
        ok = torch.cuda.get_device_capability(index)[0] == 9  # blockwise _scaled_mm is SM90-only
        if ok:
            try:
                from . import kernels  # noqa: F401  (needs Triton)
            except ImportError:
                ok = False
        _DEVICE_OK[index] = ok
    return _DEVICE_OK[index]


def kernels_on(device: torch.device) -> bool:
    """True when the GPU kernels run on this device (CUDA SM90, Triton present, not switched off)."""
    if not ENABLED or device.type != "cuda":
        return False
    return _device_ok(device.index if device.index is not None else torch.cuda.current_device())


def available(*tensors: torch.Tensor) -> bool:
    """True when the GPU kernels can run these tensors (kernels_on their device, float dtypes)."""
    if not tensors:
        return False
    dev = tensors[0].device
    if any(t.device != dev or t.dtype not in _DTYPES for t in tensors):
        return False
    return kernels_on(dev)


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------
# The last FP8 Linear input's quantisation: (weak reference to the tensor whose memory it is, what
# identifies the view and its contents, (codes, x^T codes)); see quantised_input.
_last_input: list = [None]


def _forget_input(ref) -> None:
    if _last_input[0] is not None and _last_input[0][0] is ref:
        _last_input[0] = None


def quantised_input(x2: torch.Tensor, p2: bool, cols: bool, quant_operands, pads: tuple[int, int]) -> tuple:
    """quant_operands(x2, p2, rows=True, cols=cols, red_pad=pads[0], red_pad_t=pads[1]), shared by FP8
    Linears that read the same input one after the other (attention's wq and wkv_a both read the
    normed block input): the previous call's codes are returned again when x2 is a view of the same
    tensor with the same offset, shape and strides, unchanged since (its version counter), with the
    same scale rounding and padding, and x^T's codes are there if cols asks for them. The result is
    held until the next FP8 Linear's input replaces it, or until that tensor is freed, so an input
    nobody reads again costs no memory."""
    base = x2 if x2._base is None else x2._base
    key = (x2.data_ptr(), tuple(x2.shape), x2.stride(), x2._version, p2, pads)
    hit = _last_input[0]
    if hit is not None and hit[0]() is base and hit[1] == key and (hit[2][1] is not None or not cols):
        return hit[2] if cols else (hit[2][0], None)
    out = quant_operands(x2, p2, rows=True, cols=cols, red_pad=pads[0], red_pad_t=pads[1])
    _last_input[0] = (weakref.ref(base, _forget_input), key, out)
    return out


def fp8_linear_forward(x2: torch.Tensor, ws: tuple, recipe, out_dtype: torch.dtype, need_dx: bool = True,
                       need_dw: bool = True, owner=None, name: str = "weight"):
    """x2 [T, K], weights ws: parts [N_i, K] stacked along N at quant.part_starts -> (y [T, N] in
    out_dtype, saved state for fp8_linear_backward). owner, name: the key of
    fp8.weight_cache (owner None: no caching). Each reduction dimension (K; N for Dgrad; the tokens T
    for Wgrad) is padded as kernels.linear_pad says, which also picks its GEMM's kernel."""
    from .kernels import fp8_gemm, linear_pad, quant_block_operand, quant_operands

    p2 = recipe.pow2_scales
    save_fp8 = need_dw and recipe.save_fp8_inputs
    (T, K), N = x2.shape, part_starts([w.shape[0] for w in ws])[-1] + ws[-1].shape[0]
    pads = (linear_pad(K), linear_pad(T))
    xa, xt = quantised_input(x2, p2, save_fp8, quant_operands, pads)  # xt: x^T's Wgrad operand, kept for backward
    wa, wt = cached(owner, (name, need_dx, p2, pads[0], linear_pad(N)),
                    lambda: quant_block_operand(ws, p2, transpose=need_dx, red_pad=pads[0], out_pad=linear_pad(N)),
                    ws if need_dx or need_dw else ())
    y = fp8_gemm(xa, wa, out_dtype=out_dtype)
    saved = {
        "xt": xt,
        "x": x2 if (need_dw and not recipe.save_fp8_inputs) else None,
        "wt": wt,
        "x_dtype": x2.dtype,
        "parts": list(zip(part_starts([w.shape[0] for w in ws]), [w.shape[0] for w in ws], [w.dtype for w in ws])),
        "recipe": recipe,
    }
    return y, saved


def fp8_linear_backward(grad2: torch.Tensor, saved: dict, need_dx: bool = True, need_dw: bool = True):
    """grad2 [T, N] -> (dx [T, K] in the input's dtype or None, [dW_i [N_i, K] in the weights' dtypes]
    or Nones)."""
    from .kernels import fp8_gemm, linear_pad, quant_operands

    p2 = saved["recipe"].pow2_scales
    g = grad2 if grad2.stride(-1) == 1 else grad2.contiguous()
    pads = (linear_pad(g.shape[1]), linear_pad(g.shape[0]))  # as the forward's (N for Dgrad, T for Wgrad)
    ga, gt = quant_operands(g, p2, rows=need_dx, cols=need_dw, red_pad=pads[0], red_pad_t=pads[1])
    dx = fp8_gemm(ga, saved["wt"], out_dtype=saved["x_dtype"]) if need_dx else None
    dws = [None] * len(saved["parts"])
    if need_dw:
        xt = saved["xt"]
        if xt is None:
            _, xt = quant_operands(saved["x"], p2, rows=False, cols=True, red_pad_t=pads[1])
        dtypes = {dt for _, _, dt in saved["parts"]}
        dw = fp8_gemm(gt, xt, out_dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)  # [N, K]
        dws = [dw[r0:r0 + n].to(dt) for r0, n, dt in saved["parts"]]  # each part's rows
    return dx, dws


class FP8LinearGPUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recipe, owner, name, *ws):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        need_dx, need_dw = ctx.needs_input_grad[0], any(ctx.needs_input_grad[4:])
        y, saved = fp8_linear_forward(x2, ws, recipe, need_dx=need_dx, need_dw=need_dw, owner=owner, name=name,
                                      out_dtype=compute_dtype(x))  # (nn.Linear's dtype under autocast)
        if saved["x"] is not None:  # an input: saved the autograd way (version-checked)
            ctx.save_for_backward(saved.pop("x"))
        ctx.saved, ctx.x_shape = saved, x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        need_dx, need_dw = ctx.needs_input_grad[0], any(ctx.needs_input_grad[4:])
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if "x" not in ctx.saved:
            ctx.saved["x"] = ctx.saved_tensors[0] if ctx.saved_tensors else None
        dx, dws = fp8_linear_backward(g, ctx.saved, need_dx=need_dx, need_dw=need_dw)
        ctx.saved = None
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return (dx, None, None, None, *dws)


@torch.compiler.disable
def fp8_linear(x: torch.Tensor, recipe, owner, name: str, *ws: torch.Tensor) -> torch.Tensor:
    """x W^T with DeepSeek-V3's FP8 recipe on the GPU (no bias), W the parts ws stacked along N at
    quant.part_starts; owner, name: see fp8_linear_forward."""
    return FP8LinearGPUFn.apply(x, recipe, owner, name, *ws)


# ---------------------------------------------------------------------------------------------
# Routed experts (grouped GEMMs over the contiguous per-expert layout)
# ---------------------------------------------------------------------------------------------
def _segments(groups, rows: int) -> tuple:
    """The experts' token groups (groups.Groups) for quant_operands(segments=): 128-token tiles
    restarting at every expert, counted on the device, with the static bound on their number."""
    from .kernels import BLOCK

    tiles = groups.tiles(BLOCK)
    return tiles, groups.offsets, -(-rows // BLOCK) + tiles.numel()


def grad_to_accumulate(w: torch.Tensor, owner=None) -> torch.Tensor | None:
    """Called in a backward: w.grad, where a Wgrad kernel may add a micro-batch's gradient into it in
    place and hand autograd no gradient for w. That is where autograd would do just that: w is a leaf
    Parameter whose .grad exists as a plain contiguous FP32 tensor of w's shape, with no hooks that
    autograd's own accumulation would run; this backward writes w.grad (a .backward() that includes
    w, not torch.autograd.grad, which captures gradients instead, as the zero-bubble pipeline
    schedules do for their weight pass) and builds no graph (no create_graph); and w's module (owner)
    is not sharded by FSDP (whose gradient handling runs on its own hooks). Else None: the gradient
    goes back to autograd."""
    if not (isinstance(w, torch.nn.Parameter) and w.is_leaf and w.requires_grad) or torch.is_grad_enabled():
        return None
    g = w.grad
    if (g is None or type(g) is not torch.Tensor or g.dtype != torch.float32 or g.shape != w.shape
            or not g.is_contiguous() or g.device != w.device or w._backward_hooks
            or getattr(w, "_post_accumulate_grad_hooks", None)):
        return None
    if owner is not None and type(owner).__name__.startswith("FSDP"):  # fully_shard's FSDP<Module> classes
        return None
    try:
        if not torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(w).node):
            return None  # .backward(inputs=...) without w
    except RuntimeError:  # torch.autograd.grad(), or not inside a backward at all
        return None
    return g


class FP8GroupedGPUFn(torch.autograd.Function):
    """Rows x[offsets[e-1]:offsets[e]] times the experts' weights in FP8 (see _FP8GroupedFn): ws are
    parts [E, out_i, in] stacked along out at quant.part_starts into one grouped GEMM. offsets: the
    cumulative rows per expert [E], or their groups.Groups (the experts' two GEMMs share one).

    spread: None, or (index, inverse, k) of a moe.SpreadRows whose source rows x are: the rows are
    then x[index], gathered by the quantisers (the sorted BF16 copy is never built), and the input
    gradient is returned for x itself (each source row's k copy gradients summed, moe_triton.spread_sum).
    combine: None, or (order, inverse, k) of the dispatch (LocalDispatcher's order and its inverse)
    with the gate weights `gate` [T, k]: the output is then the combine's, out[t] = sum_c gate[t, c] *
    y[inverse[t * k + c]] [T, out], and the backward's quantisers read the output gradient through
    the order, times the gate weights (the gathered BF16 gradient is never built)."""

    @staticmethod
    def forward(ctx, x, gate, offsets, recipe, owner, name, spread, combine, *ws):
        from ..model.moe_triton import spread_sum
        from .kernels import GROUPED_RED_PAD as pad
        from .kernels import grouped_gemm, quant_block_operand, quant_operands

        groups = Groups.of(offsets)
        p2 = recipe.pow2_scales
        x = x if x.stride(-1) == 1 else x.contiguous()
        index = spread[0] if spread is not None else None
        rows = index.numel() if index is not None else x.shape[0]
        # Wgrad per expert: 1x128 tiles along each expert's own tokens (restarting at its first token)
        ctx.seg = _segments(groups, rows)
        save_fp8 = recipe.save_fp8_inputs and any(ctx.needs_input_grad[8:])
        xa, ctx.xt = quant_operands(x, p2, rows=True, cols=save_fp8, segments=ctx.seg if save_fp8 else None,
                                    index=index, red_pad=pad)
        wa, wt = cached(owner, (name, p2), lambda: quant_block_operand(ws, p2, transpose=True, red_pad=pad),
                        ws if any(ctx.needs_input_grad) else ())  # [out, in] and [in, out]
        y = grouped_gemm(xa, wa, groups, out_dtype=x.dtype)
        if not recipe.save_fp8_inputs:
            ctx.save_for_backward(x)
        ctx.parts = list(zip(part_starts([w.shape[1] for w in ws]), [w.shape[1] for w in ws], [w.dtype for w in ws]))
        ctx.wt, ctx.groups, ctx.recipe, ctx.x_dtype, ctx.spread = wt, groups, recipe, x.dtype, spread
        ctx.ws, ctx.owner = ws, owner  # (recipe.accumulate_wgrad: grad_to_accumulate's weights)
        ctx.combine = ctx.y = None
        if combine is not None:
            order, inverse, k = combine
            gb = gate.to(y.dtype).flatten()  # the gate weights in y's dtype, as the torch combine casts them
            ctx.combine = (order // k, gb[order], inverse, k, gate.dtype)  # row n's token and gate weight
            ctx.y = y if ctx.needs_input_grad[1] else None  # for the gate weights' gradient
            y = spread_sum(y, inverse, k, gb)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        from ..model.moe_triton import row_dots, spread_sum
        from .kernels import GROUPED_RED_PAD as pad
        from .kernels import grouped_gemm, grouped_wgrad, quant_operands

        p2 = ctx.recipe.pow2_scales
        g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        seg, spread, combine = ctx.seg, ctx.spread, ctx.combine
        need_w = any(ctx.needs_input_grad[8:])  # not with frozen expert weights
        g_index, g_scale = (combine[0], combine[1]) if combine is not None else (None, None)
        ga, gt = quant_operands(g, p2, rows=True, cols=need_w, segments=seg if need_w else None,
                                index=g_index, scale=g_scale, red_pad=pad)  # gt: [out, tokens]
        dx = d_gate = None
        if ctx.needs_input_grad[0]:
            dx = grouped_gemm(ga, ctx.wt, ctx.groups, out_dtype=ctx.x_dtype)
            if spread is not None:
                dx = spread_sum(dx, spread[1], spread[2])
        if combine is not None and ctx.needs_input_grad[1]:  # <g[t], y[inverse[t * k + c]]>, rounded as torch's
            d_gate = row_dots(g, ctx.y, combine[2], combine[3]).to(g.dtype).to(combine[4])
        dws = [None] * len(ctx.parts)
        if need_w:
            xt = ctx.xt
            if xt is None:  # [in, tokens]
                _, xt = quant_operands(ctx.saved_tensors[0], p2, rows=False, cols=True, segments=seg,
                                       index=spread[0] if spread is not None else None, red_pad=pad)
            # one Wgrad per part, each written straight into its own [E, out_i, in] gradient, or added
            # into the part's .grad from earlier micro-batches (then autograd gets None for it)
            for i, ((r0, n, dt), w) in enumerate(zip(ctx.parts, ctx.ws)):
                into = grad_to_accumulate(w, ctx.owner) if ctx.recipe.accumulate_wgrad else None
                dw = grouped_wgrad(gt.row_slice(r0, n), xt, seg[0], out_dtype=dt, into=into)
                dws[i] = dw if into is None else None
        ctx.xt = ctx.wt = ctx.seg = ctx.groups = ctx.spread = ctx.combine = ctx.y = ctx.ws = ctx.owner = None
        return (dx, d_gate, None, None, None, None, None, None, *dws)


# Under torch.compile (train.compile) the FP8 GEMMs run as they are, between compiled graphs: AOT
# autograd cannot trace the Triton kernels' writes into views of another dtype.
@torch.compiler.disable
def fp8_grouped(x: torch.Tensor, offsets, recipe, owner, name, *ws: torch.Tensor,
                spread: tuple | None = None, gate: torch.Tensor | None = None,
                combine: tuple | None = None) -> torch.Tensor:
    """See FP8GroupedGPUFn; combine needs gate."""
    return FP8GroupedGPUFn.apply(x, gate, offsets, recipe, owner, name, spread, combine, *ws)
