"""Triton kernels of the MoE layer's token permutation on CUDA: rows move by gathers, sums in FP32.

With N = M * k copies of M source rows (k choices per token) in the expert-sorted layout, copy j =
m * k + c of source row m sits at sorted row inverse[j], and sorted row n holds source row index[n]
(moe.SpreadRows). These kernels do in one pass each what eager PyTorch does in two or three:
- `spread_sum(g, inverse, k[, weights])`: out[m] = sum_c weights[m * k + c] * g[inverse[m * k + c]],
  the backward of spreading rows (unweighted) and the combine of the experts' outputs (weighted
  by the gate weights);
- `gather_scaled(g, index, scale)`: out[n] = scale[n] * g[index[n]], the combine's backward for the
  experts' output, each product rounded to g's dtype as a PyTorch product in that dtype is;
- `row_dots(g, y, inverse, k)`: out[m * k + c] = <g[m], y[inverse[m * k + c]]>, the combine's backward
  for the gate weights.
Used where nothing traces them (eager CUDA); under torch.compile the torch ops are left to Inductor,
which fuses them by itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_launch import launch

_BR, _BC = 16, 256  # rows x columns of one program


def _rows_2d(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _spread_sum_kernel(g_ptr, inv_ptr, w_ptr, out_ptr, M, D, stride_g, stride_o,
                       K: tl.constexpr, WEIGHTED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    r_ok = r < M
    m = r_ok[:, None] & (c[None, :] < D)
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for j in tl.static_range(K):
        copy = r.to(tl.int64) * K + j
        src = tl.load(inv_ptr + copy, mask=r_ok, other=0).to(tl.int64)
        v = tl.load(g_ptr + src[:, None] * stride_g + c[None, :], mask=m, other=0.0).to(tl.float32)
        if WEIGHTED:
            v = v * tl.load(w_ptr + copy, mask=r_ok, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + r[:, None].to(tl.int64) * stride_o + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


def spread_sum(g: torch.Tensor, inverse: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """g [N, D] in the sorted layout, inverse [N] -> [N / k, D] in g's dtype: each source row's k copies
    summed in FP32 in copy order (times weights [N], in copy order, when given) and rounded once."""
    g = _rows_2d(g, "g")
    N, D = g.shape
    if inverse.shape != (N,) or N % k or (weights is not None and weights.shape != (N,)):
        raise ValueError(f"inverse (and weights) must have one entry per row of g ({N}), and k ({k}) must divide it")
    M = N // k
    out = torch.empty(M, D, dtype=g.dtype, device=g.device)
    launch(_spread_sum_kernel, (triton.cdiv(M, _BR), triton.cdiv(D, _BC)),
           (g, inverse, weights if weights is not None else g, out, M, D, g.stride(0), out.stride(0)),
           dict(K=k, WEIGHTED=weights is not None, BR=_BR, BC=_BC), 4)
    return out


@triton.jit
def _gather_scaled_kernel(g_ptr, idx_ptr, s_ptr, out_ptr, N, D, stride_g, stride_o, BR: tl.constexpr, BC: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    r_ok = r < N
    m = r_ok[:, None] & (c[None, :] < D)
    src = tl.load(idx_ptr + r, mask=r_ok, other=0).to(tl.int64)
    s = tl.load(s_ptr + r, mask=r_ok, other=0.0).to(tl.float32)
    v = tl.load(g_ptr + src[:, None] * stride_g + c[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + r[:, None].to(tl.int64) * stride_o + c[None, :], (v * s[:, None]).to(out_ptr.dtype.element_ty), mask=m)


def gather_scaled(g: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """g [M, D], index [N], scale [N] -> [N, D] in g's dtype: row n is g[index[n]] * scale[n], the FP32
    product rounded once (exact before rounding when g and scale are BF16, as PyTorch's product is)."""
    g = _rows_2d(g, "g")
    N, D = index.numel(), g.shape[1]
    if index.shape != (N,) or scale.shape != (N,):
        raise ValueError("index and scale must be 1-D of the same length")
    out = torch.empty(N, D, dtype=g.dtype, device=g.device)
    launch(_gather_scaled_kernel, (triton.cdiv(N, _BR), triton.cdiv(D, _BC)),
           (g, index, scale, out, N, D, g.stride(0), out.stride(0)), dict(BR=_BR, BC=_BC), 4)
    return out


@triton.jit
def _row_dots_kernel(g_ptr, y_ptr, inv_ptr, out_ptr, M, D, stride_g, stride_y,
                     K: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = r < M
    for j in tl.static_range(K):
        copy = r.to(tl.int64) * K + j
        src = tl.load(inv_ptr + copy, mask=r_ok, other=0).to(tl.int64)
        acc = tl.zeros((BR,), dtype=tl.float32)
        for c0 in range(0, D, BC):
            c = c0 + tl.arange(0, BC)
            m = r_ok[:, None] & (c[None, :] < D)
            gv = tl.load(g_ptr + r[:, None].to(tl.int64) * stride_g + c[None, :], mask=m, other=0.0).to(tl.float32)
            yv = tl.load(y_ptr + src[:, None] * stride_y + c[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(gv * yv, axis=1)
        tl.store(out_ptr + copy, acc, mask=r_ok)


def row_dots(g: torch.Tensor, y: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """g [M, D], y [N, D] in the sorted layout, inverse [N] -> FP32 [M, k]: entry (m, c) is the FP32 dot
    product of g[m] with y[inverse[m * k + c]]."""
    g, y = _rows_2d(g, "g"), _rows_2d(y, "y")
    M, D = g.shape
    if y.shape != (M * k, D) or inverse.shape != (M * k,):
        raise ValueError(f"y must be [{M * k}, {D}] and inverse [{M * k}], got {tuple(y.shape)} and {tuple(inverse.shape)}")
    out = torch.empty(M, k, dtype=torch.float32, device=g.device)
    launch(_row_dots_kernel, (triton.cdiv(M, _BR),), (g, y, inverse, out, M, D, g.stride(0), y.stride(0)),
           dict(K=k, BR=_BR, BC=_BC), 4)
    return out
