"""GPU kernels of FP8 training (Hopper, SM90): Triton quantisers and blockwise-scaled FP8 GEMMs.

Quantisation (bit-identical to moeforge.fp8.quant run on the same CUDA tensors: same FP8 bytes, same
FP32 scales, ragged edges and all-zero tiles included):
- `quant_rows(x)`          x [M, N] in 1x128 tiles along N               -> (q [M, N], s [M, ceil(N/128)])
- `quant_cols_t(x)`        x^T in 1x128 tiles (tiles along M), written transposed, x^T never built in
                           BF16 -> (q [N, M], s [N, ceil(M/128)]); `quant_operands(..., segments=)`
                           restarts the tiles at every expert's first row (the experts' Wgrad). Where
                           Triton has Gluon this output comes from the Gluon kernel of
                           `fp8.gluon_quant` (same bytes, faster), else from the Triton kernel
- `quant_rows_and_cols_t(x)` both (a Linear's input: the Fprop operand and the Wgrad operand saved
                           for backward; its output gradient: the Dgrad and Wgrad operands)
- `quant_operands(x, index=i[, scale=s])` any of these for the rows x[i] (times s), gathered by the
                           kernel: the routed experts' rows read from their tokens, and the gradient
                           of their output from the combine's (model/moe_triton.py has the kernels
                           that move such rows without quantising them)
- `quant_blocks(w)`        w [..., N, K] in 128x128 blocks (`quant_block_operand(w, transpose=True)`
                           also returns W^T's operand: the same blocks, byte-transposed)
- `pack_rows(x)` / `unpack_rows(p, D, dtype)`: x in 1x128 tiles, each row's codes and scales packed
                           into one uint8 row (the FP8 expert dispatch's wire format), and back
Scale rule: s = max(amax, 1e-4) / 448, q = clamp(x / s, -448, 448) in float8_e4m3fn, optional
power-of-two rounding s = 2^ceil(log2 s). `x / s` is an IEEE division (div.rn). The division of the
scale by 448 follows what the reference does on the device: PyTorch's CUDA kernels compute
`tensor / python_scalar` as `tensor * fl32(1/448)`, which differs from a true division in the last
bit for about half of all amax values, so on CUDA the kernels do the same (`_ref_scale_mode`
probes the reference once); `scale_mode="div"` gives the true division (the CPU reference's).

Internally every quantised operand is laid out ready for the GEMM ("Operand"): the reduction
dimension padded with zeros to a multiple of 512 for cuBLAS (4 scale blocks; measured with torch
2.11 + CUDA 13 on an H200: 1x128 x 128x128 with 3 K blocks gives silently WRONG results, and torch
rejects the leading dimension 4 that cuBLAS documents), or to a multiple of 128 only for the grouped
kernels (`red_pad`: the routed experts' operands always, an FP8 Linear's where its reduction
dimension is not a multiple of 512, `linear_pad`; fp8_gemm then runs it on the grouped kernel as one
group), the other dimensions to a multiple of 16 (torch rejects N % 16 != 0; M = 150 gave
CUBLAS_STATUS_NOT_SUPPORTED); 1x128 scales stored column-major
(`s_store` [K/128, rows]: the "outer-dim-major" layout torch._scaled_mm wants), 128x128 scales
row-major [rows/128, K/128]. Padding is written by the quantiser itself (zeros), so it costs no
extra pass; results are sliced back.

Transposed outputs are written as 32-bit words of 4 FP8 bytes (`_pack4`): Triton 3.6 transposed
8-bit tensors wrongly on SM90 for some layouts (a layout conversion of an f8 tensor, seen with FP32
inputs), so no 8-bit tensor is ever transposed in registers. W^T for Dgrad is W's codes and scales
transposed (a 128x128 block's amax does not depend on orientation): `transpose_codes`, one Triton pass
of 32-bit words.

GEMMs: `fp8_gemm(a, b)` = dequant(a) @ dequant(b)^T with FP32 accumulation between 128-wide K
blocks, through torch._scaled_mm's blockwise modes (cuBLASLt VEC128_32F x BLK128x128_32F or
VEC128_32F x VEC128_32F; SM90 only, fast accumulation off), or through the Triton kernel
`_gemm_kernel` (`backend="triton"`). The grouped (per-expert) GEMMs run the warp-specialised kernel
of `fp8.gluon_gemm` where Triton has Gluon, else `_gemm_kernel` (`set_grouped_kernel` chooses).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..triton_launch import launch as _launch
from .groups import Groups, group_layout  # noqa: F401  (re-exported: the grouped GEMMs' row groups)
from .quant import AMAX_FLOOR, FP8, FP8_MAX, part_starts

RED_PAD = 512  # reduction dimension: a multiple of 4 blocks of 128 (what cuBLAS's blockwise GEMM needs)
# the grouped GEMMs (ours, Gluon or Triton) loop over whole 128-wide K blocks and need no more: their
# operands pad the reduction dimension to a multiple of 128 only, which at widths that are not
# multiples of 512 (768, 256, 1408) saves the padding's FLOPs and bytes (docs/fp8.md)
GROUPED_RED_PAD = 128
ROW_PAD = 16  # the other GEMM dimensions: 16 elements (16 bytes of FP8)
BLOCK = 128

_FLOOR32 = float(torch.tensor(AMAX_FLOOR, dtype=torch.float32))  # clamp_min casts the scalar to fp32
_RCP32 = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(FP8_MAX, dtype=torch.float32))


def _ru(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _cdiv(n: int, m: int) -> int:
    return (n + m - 1) // m


# ---------------------------------------------------------------------------------------------
# Triton: quantisation
# ---------------------------------------------------------------------------------------------
@triton.jit
def _scale_of(amax, floor, rcp, fmax, POW2: tl.constexpr, RCP: tl.constexpr):
    a = tl.maximum(amax, floor)
    if RCP:
        s = a * rcp  # what torch does on CUDA for `amax / 448.0`
    else:
        s = tl.math.div_rn(a, a * 0.0 + fmax)
    if POW2:  # torch.exp2(torch.ceil(torch.log2(s))); 2^e built exactly from its bits
        e = tl.ceil(libdevice.log2(s))
        s = ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _to_fp8(x, s, fmax):
    q = tl.math.div_rn(x, s)
    q = tl.minimum(tl.maximum(q, -fmax), fmax)
    return q.to(tl.float8e4nv)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _pack4(q):
    """FP8 [R4, 4, C] -> uint32 [R4, C]: the 4 bytes of axis 1 in one little-endian word.

    Transposed outputs are written as 32-bit words holding 4 consecutive rows, so that the only
    layout conversion (the transpose) acts on 32-bit values: Triton 3.6 transposed 8-bit tensors
    wrongly on SM90 for some source layouts (seen with FP32 inputs)."""
    code = q.to(tl.uint8, bitcast=True).to(tl.uint32)
    sh = (tl.arange(0, 4) * 8).to(tl.uint32)
    return tl.reduce(code << sh[None, :, None], 1, _or)


@triton.jit
def _segment_of(tile, tiles_ptr, offs_ptr, n_seg, P2: tl.constexpr):
    """Tile `tile` of a per-group padded layout (tiles_ptr: cumulative tiles per group, offs_ptr:
    cumulative rows) -> (group g, first tile of g, first row of g, end row of g, tile is valid)."""
    idx = tl.arange(0, P2)
    cum = tl.load(tiles_ptr + idx, mask=idx < n_seg, other=2147483647)
    g = tl.sum((cum <= tile).to(tl.int32), axis=0)
    gm = g > 0
    valid = g < n_seg
    tiles_before = tl.load(tiles_ptr + g - 1, mask=gm, other=0)
    rows_before = tl.load(offs_ptr + g - 1, mask=gm, other=0)
    rows_end = tl.load(offs_ptr + g, mask=valid, other=0)
    return g, tiles_before, rows_before, rows_end, valid


@triton.jit
def _quant_1x128_kernel(
    x_ptr,  # source values [R, C]; with IDX, logical row r is source row idx[r]
    idx_ptr, sc_ptr,  # with SCALE, row r is multiplied by sc[r], the product rounded to x's dtype
    q_ptr, s_ptr,  # ROW output: tiles of 128 along the columns
    qtw_ptr, st_ptr,  # COL output, transposed, as int32 words of 4 rows: tiles of 128 along the rows
    seg_tiles_ptr, seg_offs_ptr, n_seg,  # SEG: rows grouped by expert, tiles restart at every group
    R, C, stride_xr,
    q_rows, q_cols, stride_qr, s_sr, s_sc,
    qt_rows, qt_words, stride_qtw, st_sb, st_sc,
    floor, rcp, fmax,
    BR: tl.constexpr, BC: tl.constexpr, ROW: tl.constexpr, COL: tl.constexpr,
    SEG: tl.constexpr, SEG_P2: tl.constexpr, POW2: tl.constexpr, RCP: tl.constexpr, IDX: tl.constexpr,
    SCALE: tl.constexpr,
):
    # the tile is handled as [BR // 4, 4, BC]: row = 4 * i + j
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    R4: tl.constexpr = BR // 4
    i = tl.arange(0, R4)
    j = tl.arange(0, 4)
    c = pid_c * BC + tl.arange(0, BC)
    loc = (i[:, None] * 4 + j[None, :])[:, :, None]  # [R4, 4, 1]
    c3 = c[None, None, :]
    if SEG:
        # tile pid_r of the per-group padded layout -> group g, source rows [start, end)
        g, tiles_before, rows_before, rows_end, gv = _segment_of(pid_r, seg_tiles_ptr, seg_offs_ptr, n_seg, SEG_P2)
        r3 = rows_before + (pid_r - tiles_before) * BR + loc
        r_ok = (r3 < rows_end) & gv
    else:
        r3 = pid_r * BR + loc
        r_ok = r3 < R
    m = r_ok & (c3 < C)
    if IDX:  # the rows are gathered here (the experts' rows from the tokens they were routed from)
        src = tl.load(idx_ptr + r3, mask=r_ok, other=0).to(tl.int64)
    else:
        src = r3.to(tl.int64)
    x = tl.load(x_ptr + src * stride_xr + c3, mask=m, other=0.0).to(tl.float32)
    if SCALE:  # (the combine's gradient: g[token] * gate weight, rounded as PyTorch's product is)
        x = (x * tl.load(sc_ptr + r3, mask=r_ok, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
    ax = tl.abs(x)
    if ROW:  # BC == 128: one tile per row
        s = _scale_of(tl.max(ax, axis=2), floor, rcp, fmax, POW2, RCP)  # [R4, 4]
        q = _to_fp8(x, tl.broadcast_to(s[:, :, None], (R4, 4, BC)), fmax)
        mq = (r3 < q_rows) & (c3 < q_cols)
        tl.store(q_ptr + r3.to(tl.int64) * stride_qr + c3, q, mask=mq)
        r2 = pid_r * BR + i[:, None] * 4 + j[None, :]
        tl.store(s_ptr + r2.to(tl.int64) * s_sr + pid_c * s_sc, s, mask=r2 < q_rows)
    if COL:  # BR == 128: one tile per column
        s = _scale_of(tl.max(tl.max(ax, axis=1), axis=0), floor, rcp, fmax, POW2, RCP)  # [BC]
        q = _to_fp8(x, tl.broadcast_to(s[None, None, :], (R4, 4, BC)), fmax)
        words = tl.trans(_pack4(q)).to(tl.int32, bitcast=True)  # [BC, R4]: row c, words of 4 destination rows
        w = pid_r * R4 + i
        c_ok = c < qt_rows
        w_ok = w < qt_words
        if SEG:
            c_ok = c_ok & gv
            w_ok = w_ok & gv
        tl.store(qtw_ptr + c[:, None].to(tl.int64) * stride_qtw + w[None, :], words, mask=c_ok[:, None] & w_ok[None, :])
        tl.store(st_ptr + pid_r.to(tl.int64) * st_sb + c * st_sc, s, mask=c_ok)


@triton.jit
def _quant_128x128_kernel(
    w_ptr, q_ptr, s_ptr,
    R, C, stride_wb, stride_wr,
    stride_qb, stride_qr, stride_sb, stride_sr,
    floor, rcp, fmax,
    POW2: tl.constexpr, RCP: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    i = tl.arange(0, 32)
    j = tl.arange(0, 4)
    c = pid_c * 128 + tl.arange(0, 128)
    r3 = pid_r * 128 + (i[:, None] * 4 + j[None, :])[:, :, None]  # [32, 4, 1]
    c3 = c[None, None, :]
    m = (r3 < R) & (c3 < C)
    w = tl.load(w_ptr + pid_b * stride_wb + r3.to(tl.int64) * stride_wr + c3, mask=m, other=0.0)
    w = w.to(tl.float32)
    amax = tl.max(tl.max(tl.max(tl.abs(w), axis=2), axis=1), axis=0)
    s = _scale_of(amax, floor, rcp, fmax, POW2, RCP)
    q = _to_fp8(w, tl.zeros_like(w) + s, fmax)
    tl.store(q_ptr + pid_b * stride_qb + r3.to(tl.int64) * stride_qr + c3, q)
    tl.store(s_ptr + pid_b * stride_sb + pid_r * stride_sr + pid_c, s)


@triton.jit
def _transpose_codes_kernel(src_ptr, dst_ptr, stride_sb, stride_sr, stride_db, stride_dw, BC: tl.constexpr):
    """FP8 codes [B, R, C] -> [B, C, R] (R, C multiples of 128 and BC), one [128, BC] tile per program.

    The destination is written as int32 words of 4 consecutive source rows (_pack4), so the register
    transpose moves 32-bit values, never 8-bit ones (see _pack4)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    i = tl.arange(0, 32)
    j = tl.arange(0, 4)
    c = pid_c * BC + tl.arange(0, BC)
    r3 = pid_r * 128 + (i[:, None] * 4 + j[None, :])[:, :, None]  # [32, 4, 1]
    codes = tl.load(src_ptr + pid_b * stride_sb + r3.to(tl.int64) * stride_sr + c[None, None, :])
    words = tl.trans(_pack4(codes)).to(tl.int32, bitcast=True)  # [BC, 32]: column c, rows 4w..4w+3
    w = pid_r * 32 + i
    tl.store(dst_ptr + pid_b * stride_db + c[:, None].to(tl.int64) * stride_dw + w[None, :], words)


# ---------------------------------------------------------------------------------------------
# Operands and the quantisation wrappers
# ---------------------------------------------------------------------------------------------
@dataclass
class Operand:
    """A quantised GEMM operand: rows x k valid, stored padded, k is the reduction dimension.

    kind "row":   1x128 tiles along k;  q [ru(rows,16), ru(k,P)], s_store [ru(k,P)/128, ru(rows,16)]
    kind "block": 128x128 blocks;       q [ru(rows,P), ru(k,P)], s_store [ru(rows,P)/128, ru(k,P)/128]
    (P: the padding, RED_PAD = 512 for cuBLAS or GROUPED_RED_PAD = 128 for the grouped kernels)
    kind "segrow": 1x128 tiles along k, k grouped (Wgrad of experts): q [ru(rows,16), tiles*128],
                   s_store [tiles, ru(rows,16)], each group's tiles start on a tile boundary.
    """

    q: torch.Tensor
    s_store: torch.Tensor
    rows: int
    k: int
    kind: str

    @property
    def qv(self) -> torch.Tensor:  # the valid part, as the reference returns it
        return self.q[..., : self.rows, : self.k]

    def row_slice(self, r0: int, n: int) -> "Operand":
        """Rows r0 .. r0+n of a 1x128-tiled operand ("row" / "segrow"), sharing its storage."""
        if self.kind == "block":
            raise ValueError("row_slice applies to 1x128-tiled operands")
        return Operand(self.q[r0:r0 + n], self.s_store[:, r0:r0 + n], n, self.k, self.kind)

    @property
    def sv(self) -> torch.Tensor:  # scales [rows, ceil(k/128)] (1x128) or [ceil(rows/128), ceil(k/128)]
        kb = _cdiv(self.k, BLOCK)
        if self.kind == "row":
            return self.s_store.t()[: self.rows, :kb]
        return self.s_store[..., : _cdiv(self.rows, BLOCK), :kb]


@functools.lru_cache(maxsize=None)
def _ref_scale_mode(device_index: int) -> str:
    """'rcp' if moeforge.fp8.quant on this CUDA device computes amax/448 as amax*fl32(1/448), else 'div'."""
    from .quant import block_scales

    probe = torch.zeros(1, BLOCK, device=torch.device("cuda", device_index))
    probe[0, 0] = 3.0  # 3/448 and 3*fl32(1/448) differ in fp32
    s = float(block_scales(probe, (1, 128))[0, 0])
    three = torch.tensor(3.0, dtype=torch.float32)
    rcp = float(three * torch.tensor(_RCP32, dtype=torch.float32))  # fp32 products, as the kernels do
    div = float(torch.div(three, torch.tensor(FP8_MAX, dtype=torch.float32)))
    assert rcp != div
    if s not in (rcp, div):
        raise RuntimeError(f"moeforge.fp8.quant's scale on CUDA ({s!r}) is neither amax/448 nor amax*fl32(1/448)")
    return "rcp" if s == rcp else "div"


def _rcp_flag(x: torch.Tensor, scale_mode: str | None) -> bool:
    if scale_mode is None:
        if x.device.type != "cuda":  # the CPU reference divides (Triton's interpreter runs on the CPU)
            scale_mode = "div"
        else:
            scale_mode = _ref_scale_mode(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if scale_mode not in ("rcp", "div"):
        raise ValueError(f"scale_mode must be 'rcp' or 'div', got {scale_mode!r}")
    return scale_mode == "rcp"


# Tiles of the 1x128 quantiser (rows: [BR, 128] per program; cols: [128, BC]), from
# `fp8_bench.py --sections qtiles`. The transposed (cols) output runs the Gluon kernel of
# fp8.gluon_quant where Gluon is available (1.25-1.44x the Triton kernel at the MoE layers' shapes,
# docs/fp8.md); QUANT_COLS_CONFIG is the Triton kernel's, used without Gluon or with
# QUANT_COLS_KERNEL["name"] = "triton".
QUANT_ROWS_CONFIG = {"BR": 32, "num_warps": 4}
QUANT_COLS_CONFIG = {"BC": 32, "num_warps": 4}
try:
    from . import gluon_quant as _gluon_quant
except (ImportError, AttributeError):  # a Triton without Gluon (or without its libdevice)
    _gluon_quant = None
QUANT_COLS_KERNEL = {"name": "gluon" if _gluon_quant is not None else "triton"}


def _check_pad(red_pad: int) -> None:
    if red_pad not in (GROUPED_RED_PAD, RED_PAD):
        raise ValueError(f"red_pad must be {GROUPED_RED_PAD} or {RED_PAD}, got {red_pad!r}")


def _check_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def quant_operands(x: torch.Tensor, pow2_scales: bool = False, *, rows: bool = True, cols: bool = False,
                   segments: tuple | None = None, index: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, scale_mode: str | None = None,
                   red_pad: int = RED_PAD, red_pad_t: int | None = None) -> tuple[Operand | None, Operand | None]:
    """x [R, C] -> (1x128 tiles along C: Operand rows=R, k=C; 1x128 tiles along R of x^T: Operand rows=C, k=R).

    segments (cols only): (tiles_cum int32 [G], offs_cum int32 [G], max_tiles) with groups of rows
    whose 1x128 tiles along R restart at every group (experts).
    index (int64 [R]): quantise the rows x[index] instead (x [M, C]), gathered by the kernels: the
    same bytes as quantising x.index_select(0, index), which is never built.
    scale ([R], with index): quantise x[index] * scale[:, None] (each product rounded to x's dtype),
    the same bytes as quantising that product built by PyTorch in x's dtype.
    red_pad, red_pad_t: the reduction dimension of the rows output (C), and of x^T's (R, without
    segments; default red_pad), is zero-padded to a multiple of it (RED_PAD for cuBLAS,
    GROUPED_RED_PAD for the grouped GEMMs).
    """
    red_pad_t = red_pad if red_pad_t is None else red_pad_t
    _check_pad(red_pad)
    _check_pad(red_pad_t)
    x = _check_2d(x)
    R, C = x.shape
    if index is not None:
        if index.dim() != 1 or index.dtype != torch.int64:
            raise ValueError(f"index must be a 1-D int64 tensor, got {index.dtype} of shape {tuple(index.shape)}")
        R = index.numel()
    if scale is not None and (index is None or scale.shape != (R,)):
        raise ValueError("scale needs index and one entry per row of it")
    idx = index if index is not None else x
    sc = scale if scale is not None else x
    dev = x.device
    rcp = _rcp_flag(x, scale_mode)
    if segments is not None and not cols:
        raise ValueError("segments apply to the transposed (cols) output")
    p2 = bool(pow2_scales)
    if rows:  # 1x128 tiles along C: [BR rows, 128 columns] per program
        q_rows, q_cols = _ru(R, ROW_PAD), _ru(C, red_pad)
        q = torch.empty(q_rows, q_cols, dtype=FP8, device=dev)
        s = torch.empty(q_cols // BLOCK, q_rows, dtype=torch.float32, device=dev)
        br, nw = QUANT_ROWS_CONFIG["BR"], QUANT_ROWS_CONFIG["num_warps"]
        _launch(_quant_1x128_kernel, (_cdiv(q_rows, br), q_cols // BLOCK),
                (x, idx, sc, q, s, q.view(torch.int32), s, x, x, 1, R, C, x.stride(0),
                 q_rows, q_cols, q_cols, 1, q_rows, 0, 0, 0, 0, 0, _FLOOR32, _RCP32, FP8_MAX),
                dict(BR=br, BC=128, ROW=True, COL=False, SEG=False, SEG_P2=2, POW2=p2, RCP=rcp,
                     IDX=index is not None, SCALE=scale is not None), nw)
    if cols:  # 1x128 tiles along R, written transposed: [128 rows, BC columns] per program
        qt_rows = _ru(C, ROW_PAD)
        if segments is None:
            qt_cols = _ru(R, red_pad_t)
            n_tiles = qt_cols // BLOCK
            seg_t = seg_o = x
            n_seg = 1
        else:
            n_tiles = int(segments[2])
            qt_cols = n_tiles * BLOCK
            seg_t, seg_o = segments[0], segments[1]
            n_seg = seg_t.numel()
        qt = torch.empty(qt_rows, qt_cols, dtype=FP8, device=dev)
        st = torch.empty(n_tiles, qt_rows, dtype=torch.float32, device=dev)
        seg_p2 = triton.next_power_of_2(max(n_seg, 2))
        if QUANT_COLS_KERNEL["name"] == "gluon":
            _gluon_quant.quant_cols(x, idx, sc, qt, st, seg_t, seg_o, n_seg, R, C, floor=_FLOOR32, rcp=_RCP32,
                                    fmax=FP8_MAX, seg=segments is not None, seg_p2=seg_p2, pow2=p2, rcp_mode=rcp,
                                    gather=index is not None, scale=scale is not None)
        else:
            bc, nw = QUANT_COLS_CONFIG["BC"], QUANT_COLS_CONFIG["num_warps"]
            _launch(_quant_1x128_kernel, (qt_cols // BLOCK, _cdiv(qt_rows, bc)),
                    (x, idx, sc, qt, st, qt.view(torch.int32), st, seg_t, seg_o, n_seg, R, C, x.stride(0),
                     0, 0, 0, 0, 0, qt_rows, qt_cols // 4, qt_cols // 4, qt_rows, 1, _FLOOR32, _RCP32, FP8_MAX),
                    dict(BR=128, BC=bc, ROW=False, COL=True, SEG=segments is not None, SEG_P2=seg_p2, POW2=p2,
                         RCP=rcp, IDX=index is not None, SCALE=scale is not None), nw)
    a = Operand(q, s, R, C, "row") if rows else None
    b = None
    if cols:
        b = Operand(qt, st, C, R, "row" if segments is None else "segrow")
    return a, b


def quant_block_operand(w, pow2_scales: bool = False, *, transpose: bool = False,
                        scale_mode: str | None = None, red_pad: int = RED_PAD,
                        out_pad: int | None = None) -> tuple[Operand, Operand | None]:
    """w [..., N, K] (one leading batch dim at most) in 128x128 blocks -> Operand (and that of w^T).

    w may be a list of parts [E, N_i, K] (the gate and up weights of the experts): they are quantised
    into one operand, stacked along N at quant.part_starts (each part's blocks are its own).
    red_pad, out_pad: K, and N (W^T's reduction dimension; default red_pad), are zero-padded to a
    multiple of them."""
    out_pad = red_pad if out_pad is None else out_pad
    _check_pad(red_pad)
    _check_pad(out_pad)
    parts = list(w) if isinstance(w, (list, tuple)) else [w]
    dims = {p.dim() for p in parts}
    if not dims <= {2, 3} or len(dims) != 1 or len({(*p.shape[:-2], p.shape[-1]) for p in parts}) != 1:
        raise ValueError(f"expected 2-D or 3-D weights of one batch and K, got {[tuple(p.shape) for p in parts]}")
    parts = [(p if p.dim() == 3 else p.unsqueeze(0)) for p in parts]
    parts = [p if p.stride(-1) == 1 else p.contiguous() for p in parts]
    E, _, K = parts[0].shape
    starts = part_starts([p.shape[1] for p in parts], BLOCK)
    N = starts[-1] + parts[-1].shape[1]
    Np, Kp = _ru(N, out_pad), _ru(K, red_pad)
    dev = parts[0].device
    rcp = _rcp_flag(parts[0], scale_mode)
    q = torch.empty(E, Np, Kp, dtype=FP8, device=dev)
    s = torch.empty(E, Np // BLOCK, Kp // BLOCK, dtype=torch.float32, device=dev)
    for i, (p, r0) in enumerate(zip(parts, starts)):
        # each program writes a whole [128, 128] block (zeros past the part's rows): the last part
        # also fills the padding up to Np, the others exactly their own block rows
        n_blocks = (Np - r0) // BLOCK if i == len(parts) - 1 else _cdiv(p.shape[1], BLOCK)
        qp, sp = q[:, r0:], s[:, r0 // BLOCK:]
        _launch(_quant_128x128_kernel, (n_blocks, Kp // BLOCK, E),
                (p, qp, sp, p.shape[1], K, p.stride(0), p.stride(1), qp.stride(0), qp.stride(1), sp.stride(0),
                 sp.stride(1), _FLOOR32, _RCP32, FP8_MAX), dict(POW2=bool(pow2_scales), RCP=rcp), 16)
    if transpose:  # W^T's 128x128 blocks are W's, transposed: the same codes and scales (Dgrad's operand)
        qt = transpose_codes(q)
        st = s.transpose(1, 2).contiguous()
    if 2 in dims:
        q, s = q[0], s[0]
        if transpose:
            qt, st = qt[0], st[0]
    a = Operand(q, s, N, K, "block")
    return a, (Operand(qt, st, K, N, "block") if transpose else None)


def transpose_codes(q: torch.Tensor) -> torch.Tensor:
    """FP8 codes [E, R, C] -> a contiguous [E, C, R] (R and C multiples of 128), in one Triton pass."""
    E, R, C = q.shape
    if R % BLOCK or C % BLOCK:
        raise ValueError(f"transpose_codes needs dimensions in multiples of {BLOCK}, got {tuple(q.shape)}")
    qt = torch.empty(E, C, R, dtype=FP8, device=q.device)
    src, dst = q.view(torch.uint8), qt.view(torch.int32)
    _launch(_transpose_codes_kernel, (R // BLOCK, C // 64, E),
            (src, dst, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1)), dict(BC=64), 4)
    return qt


# SwiGLU of the experts' fused gate/up output ---------------------------------------------------
@triton.jit
def _swiglu_kernel(gu_ptr, dh_ptr, out_ptr, R, I, up0, stride_gu, stride_dh, stride_out,
                   BACKWARD: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Forward: out[r, c] = silu(g) * u with g = gu[r, c], u = gu[r, up0 + c]. Backward: out = d(gu):
    out[r, c] = dh * u * sig * (1 + g * (1 - sig)), out[r, up0 + c] = dh * silu(g). FP32 inside."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (r[:, None] < R) & (c[None, :] < I)
    row = r[:, None].to(tl.int64) * stride_gu
    g = tl.load(gu_ptr + row + c[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row + up0 + c[None, :], mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    if BACKWARD:
        dh = tl.load(dh_ptr + r[:, None].to(tl.int64) * stride_dh + c[None, :], mask=m, other=0.0).to(tl.float32)
        orow = r[:, None].to(tl.int64) * stride_out
        tl.store(out_ptr + orow + c[None, :], (dh * u * sig * (1 + g * (1 - sig))).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(out_ptr + orow + up0 + c[None, :], (dh * g * sig).to(out_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(out_ptr + r[:, None].to(tl.int64) * stride_out + c[None, :],
                 (g * sig * u).to(out_ptr.dtype.element_ty), mask=m)


def swiglu(gate_up: torch.Tensor, inter_dim: int, dh: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up of gate_up [N, C] (gate: first inter_dim columns, up: last inter_dim) -> [N, I];
    with dh, the gradient with respect to gate_up instead ([N, C], zero between gate and up)."""
    R, C = gate_up.shape
    up0 = C - inter_dim
    if dh is None:
        out = torch.empty(R, inter_dim, dtype=gate_up.dtype, device=gate_up.device)
    else:
        dh = dh if dh.stride(-1) == 1 else dh.contiguous()
        out = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
        if up0 > inter_dim:
            out[:, inter_dim:up0].zero_()
    _launch(_swiglu_kernel, (_cdiv(R, 32), _cdiv(inter_dim, 128)),
            (gate_up, dh if dh is not None else gate_up, out, R, inter_dim, up0, gate_up.stride(0),
             dh.stride(0) if dh is not None else 0, out.stride(0)), dict(BACKWARD=dh is not None, BR=32, BC=128), 4)
    return out


# FP8 rows on the wire (expert dispatch) -------------------------------------------------------
@triton.jit
def _pack_rows_kernel(x_ptr, o8_ptr, o32_ptr, R, D, stride_xr, stride_o8, stride_o32, s_col, floor, rcp, fmax,
                      BR: tl.constexpr, POW2: tl.constexpr, RCP: tl.constexpr):
    """One [BR, 128] tile: codes to bytes [r, c] of the packed row, the row's scale to word s_col + t."""
    t = tl.program_id(1)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = t * 128 + tl.arange(0, 128)
    r64 = r.to(tl.int64)
    m = (r[:, None] < R) & (c[None, :] < D)
    x = tl.load(x_ptr + r64[:, None] * stride_xr + c[None, :], mask=m, other=0.0).to(tl.float32)
    s = _scale_of(tl.max(tl.abs(x), axis=1), floor, rcp, fmax, POW2, RCP)  # [BR]
    q = _to_fp8(x, tl.broadcast_to(s[:, None], (BR, 128)), fmax)
    tl.store(o8_ptr + r64[:, None] * stride_o8 + c[None, :], q.to(tl.uint8, bitcast=True), mask=m)
    tl.store(o32_ptr + r64 * stride_o32 + s_col + t, s, mask=r < R)


@triton.jit
def _unpack_rows_kernel(i8_ptr, i32_ptr, y_ptr, R, D, stride_i8, stride_i32, s_col, stride_yr, BR: tl.constexpr):
    t = tl.program_id(1)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = t * 128 + tl.arange(0, 128)
    r64 = r.to(tl.int64)
    m = (r[:, None] < R) & (c[None, :] < D)
    q = tl.load(i8_ptr + r64[:, None] * stride_i8 + c[None, :], mask=m, other=0)
    s = tl.load(i32_ptr + r64 * stride_i32 + s_col + t, mask=r < R, other=0.0)
    y = q.to(tl.float8e4nv, bitcast=True).to(tl.float32) * s[:, None]
    tl.store(y_ptr + r64[:, None] * stride_yr + c[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


_WIRE_ROWS = 32


def pack_rows(x: torch.Tensor, pow2_scales: bool = False, scale_mode: str | None = None) -> torch.Tensor:
    """x [N, D] (D % 4 == 0) -> uint8 [N, D + 4 ceil(D/128)]: each row's FP8 codes in 1x128 tiles, then
    its FP32 tile scales' bytes; bit-identical to quant.quantize(x, (1, 128)) packed that way."""
    x = _check_2d(x)
    N, D = x.shape
    if D % 4:
        raise ValueError(f"pack_rows needs a row width divisible by 4, got {D}")
    kb = _cdiv(D, BLOCK)
    out = torch.empty(N, D + 4 * kb, dtype=torch.uint8, device=x.device)
    if N:
        o32 = out.view(torch.float32)
        _launch(_pack_rows_kernel, (_cdiv(N, _WIRE_ROWS), kb),
                (x, out, o32, N, D, x.stride(0), out.stride(0), o32.stride(0), D // 4, _FLOOR32, _RCP32, FP8_MAX),
                dict(BR=_WIRE_ROWS, POW2=bool(pow2_scales), RCP=_rcp_flag(x, scale_mode)), 4)
    return out


def unpack_rows(packed: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of pack_rows: uint8 [N, D + 4 ceil(D/128)] -> q * s in `dtype`, [N, D]."""
    N = packed.shape[0]
    if packed.dim() != 2 or packed.dtype != torch.uint8 or D % 4 or packed.shape[1] != D + 4 * _cdiv(D, BLOCK):
        raise ValueError(f"unpack_rows: not a packed FP8 row buffer of width {D}: {tuple(packed.shape)} {packed.dtype}")
    packed = packed.contiguous()
    y = torch.empty(N, D, dtype=dtype, device=packed.device)
    if N:
        i32 = packed.view(torch.float32)
        _launch(_unpack_rows_kernel, (_cdiv(N, _WIRE_ROWS), _cdiv(D, BLOCK)),
                (packed, i32, y, N, D, packed.stride(0), i32.stride(0), D // 4, y.stride(0)),
                dict(BR=_WIRE_ROWS), 4)
    return y


# Public, reference-shaped API ------------------------------------------------------------------
def quant_rows(x: torch.Tensor, pow2_scales: bool = False, scale_mode: str | None = None):
    """== quant.quantize(x, (1, 128)) for a 2-D CUDA x: (q [M, N], s [M, ceil(N/128)]) (views of padded buffers)."""
    a, _ = quant_operands(x, pow2_scales, rows=True, scale_mode=scale_mode)
    return a.qv, a.sv


def quant_cols_t(x: torch.Tensor, pow2_scales: bool = False, scale_mode: str | None = None):
    """== quant.quantize(x.T.contiguous(), (1, 128))."""
    _, b = quant_operands(x, pow2_scales, rows=False, cols=True, scale_mode=scale_mode)
    return b.qv, b.sv


def quant_rows_and_cols_t(x: torch.Tensor, pow2_scales: bool = False, scale_mode: str | None = None):
    """(quant_rows(x), quant_cols_t(x))."""
    a, b = quant_operands(x, pow2_scales, rows=True, cols=True, scale_mode=scale_mode)
    return (a.qv, a.sv), (b.qv, b.sv)


def quant_blocks(w: torch.Tensor, pow2_scales: bool = False, scale_mode: str | None = None):
    """== quant.quantize(w, (128, 128)) for a 2-D or 3-D CUDA w."""
    a, _ = quant_block_operand(w, pow2_scales, scale_mode=scale_mode)
    return a.qv, a.sv


# ---------------------------------------------------------------------------------------------
# GEMMs
# ---------------------------------------------------------------------------------------------
def _scaled_mm_gemm(a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt blockwise FP8 GEMM through torch._scaled_mm: [a.rows, b.rows] = a_hat @ b_hat^T."""
    Nr = _ru(b.rows, ROW_PAD)
    mat1 = a.q
    mat2 = b.q[:Nr].t()  # [Kp, Nr], column-major: the only layout SM90 takes
    scale_a = a.s_store.t()  # [Mp, Kb], strides (1, Mp): outer-dim-major
    if b.kind == "block":
        scale_b = b.s_store[: _cdiv(Nr, BLOCK)].t()  # .t() is [Nb, Kb] row-major, Kb % 4 == 0
    else:
        scale_b = b.s_store  # [Kb, Nr]: .t() is [Nr, Kb] with strides (1, Nr)
    out = torch._scaled_mm(mat1, mat2, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=False)
    return out[: a.rows, : b.rows]


@triton.jit
def _gemm_kernel(
    a_desc, b_desc, c_ptr, sa_ptr, sb_ptr,
    tiles_ptr, offs_ptr, n_groups,
    M, N, KB, b_group_rows, stride_cg, stride_cm,
    sa_sm, sa_sk, sb_sg, sb_sn, sb_sk,
    B_BLOCK: tl.constexpr, GROUP_M_ROWS: tl.constexpr, GROUP_K: tl.constexpr, G_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    FOLD: tl.constexpr = False,
):
    """C[m, n] = sum_kb (A[m, kb] . B[n, kb]) * sa[m, kb] * sb[n or n//128, kb]: one tensor-core dot per
    128-wide K block, promoted into the FP32 accumulator with its two scales (DeepSeek-V3's recipe).
    A and B are read through TMA descriptors ([BLOCK_M, 128] and [BLOCK_N, 128] boxes, K-major).

    GROUP_M_ROWS: rows of A grouped (experts, forward/dgrad): axis 0 walks the per-group tiles of
    BLOCK_M rows (a group's tiles start at its first row); B's rows and sb are per group.
    GROUP_K: the K blocks grouped (experts, wgrad): axis 1 is the group g, which reduces over its
    own blocks [tiles[g-1], tiles[g]) and writes C[g] (stride_cg).
    FOLD (applies to 128x128-blocked B with BLOCK_N = 128, ignored otherwise): the tile's one B scale
    per K block is folded into A's row scales first, so the promotion is one multiply-add per element.
    """
    BLOCK_K: tl.constexpr = 128
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if GROUP_M_ROWS:
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        g, tiles_before, row0, row_end, gv = _segment_of(pid_m, tiles_ptr, offs_ptr, n_groups, G_P2)
        row_t = row0 + (pid_m - tiles_before) * BLOCK_M
        offs_m = row_t + tl.arange(0, BLOCK_M)
        mask_m = (offs_m < row_end) & gv
        kb0 = 0
        kb1 = tl.where(gv, KB, 0)
        b_row = g * b_group_rows + pid_n * BLOCK_N
    else:
        num_pid_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_M * num_pid_n
        group_id = pid // width
        first_m = group_id * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        row_t = pid_m * BLOCK_M
        offs_m = row_t + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        b_row = pid_n * BLOCK_N
        if GROUP_K:
            gm = g > 0
            kb0 = tl.load(tiles_ptr + g - 1, mask=gm, other=0)
            kb1 = tl.load(tiles_ptr + g)
        else:
            kb0 = 0
            kb1 = KB
    g64 = g.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    sa_ptrs = sa_ptr + offs_m.to(tl.int64) * sa_sm
    sb_base = sb_ptr
    if GROUP_M_ROWS:
        sb_base += g64 * sb_sg
    if B_BLOCK:
        sb_ptrs = sb_base + (offs_n // 128) * sb_sn
    else:
        sb_ptrs = sb_base + offs_n.to(tl.int64) * sb_sn
    sb_one = sb_base + (pid_n * BLOCK_N // 128) * sb_sn  # FOLD: the tile's single B scale column
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        a = a_desc.load([row_t, kb * BLOCK_K])
        b = b_desc.load([b_row, kb * BLOCK_K])
        sa = tl.load(sa_ptrs + kb * sa_sk, mask=mask_m, other=0.0)
        if FOLD and B_BLOCK and BLOCK_N == 128:
            s_row = sa * tl.load(sb_one + kb * sb_sk)
            acc += tl.dot(a, b.T) * s_row[:, None]
        else:
            sb = tl.load(sb_ptrs + kb * sb_sk, mask=mask_n, other=0.0)
            acc += tl.dot(a, b.T) * sa[:, None] * sb[None, :]
    c_base = c_ptr + row_t.to(tl.int64) * stride_cm
    if GROUP_K:
        c_base += g64 * stride_cg
    c_ptrs = c_base + tl.arange(0, BLOCK_M)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Tile configurations, from sweeps on an H200 (docs/fp8.md, `fp8_bench.py --sections tiles`). FOLD took the Triton grouped
# forward/Dgrad GEMM from 569 to 697 TFLOP/s (64 experts, 2048 -> 1408), and 64-row tiles with one warpgroup to 742.
# The grouped Wgrad (two 1x128-tiled operands, nothing to fold) runs best with 64-row tiles, one
# warpgroup and 3 stages (477 -> 657 TFLOP/s).
GEMM_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4, "FOLD": True}
TRITON_GROUPED_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4, "FOLD": True}
TRITON_WGRAD_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
# The grouped GEMMs run the warp-specialised Gluon kernel where Gluon is available (docs/fp8.md): the
# forward/Dgrad with 128 x 256 tiles at 674-983 TFLOP/s against the Triton kernel's 640-787; the Wgrad
# (its 1x128 scales copied by TMA) with 128 x 128 tiles and 3 stages at 658-765 against 506-671 for
# 128 x 256 tiles and 621-699 for the Triton kernel (H200, 2026-11-30; the FP8 bench step 2.6-3.0% faster).
# The forward/Dgrad's math warpgroups take turns at the tensor core up to 32 K blocks (6-15% faster at
# the 64-expert shapes, 11% slower over 56 blocks); the Wgrad was slower with turns.
try:
    from .gluon_gemm import WS_CONFIG

    WS_GROUPED_CONFIG = {**WS_CONFIG, "BLOCK_N": 256, "STAGES": 3, "MATH_REGS": 240, "LOAD_REGS": 24,
                         "STORE_TMA": True, "TURN": 1, "TURN_MAX_KB": 32}
    WS_WGRAD_CONFIG = {**WS_CONFIG, "FOLD": False, "STAGES": 4, "STORE_TMA": True, "PIPE": True}
except ImportError:  # a Triton without Gluon's Hopper API
    WS_GROUPED_CONFIG = WS_WGRAD_CONFIG = None
GROUPED_CONFIG = WS_GROUPED_CONFIG or TRITON_GROUPED_CONFIG
WGRAD_CONFIG = WS_WGRAD_CONFIG or TRITON_WGRAD_CONFIG


def set_grouped_kernel(name: str) -> None:
    """The grouped GEMMs' default kernel: "triton" (`_gemm_kernel`) or "ws" (the warp-specialised
    Gluon kernel, the default where Gluon is available)."""
    global GROUPED_CONFIG, WGRAD_CONFIG
    if name == "triton":
        GROUPED_CONFIG, WGRAD_CONFIG = TRITON_GROUPED_CONFIG, TRITON_WGRAD_CONFIG
    elif name == "ws" and WS_GROUPED_CONFIG is not None:
        GROUPED_CONFIG, WGRAD_CONFIG = WS_GROUPED_CONFIG, WS_WGRAD_CONFIG
    else:
        raise ValueError(f"grouped GEMM kernel {name!r} is not available (triton{', ws' * bool(WS_GROUPED_CONFIG)})")


def _desc(t: torch.Tensor, rows: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    t2 = t.reshape(-1, t.shape[-1])
    return TensorDescriptor(t2, list(t2.shape), list(t2.stride()), [rows, BLOCK])


def _triton_gemm(a: Operand, b: Operand, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    cfg = dict(GEMM_CONFIG if config is None else config)
    M, N = a.rows, b.rows
    KB = a.q.shape[1] // BLOCK
    out = torch.empty(M, N, dtype=out_dtype, device=a.q.device)
    if b.kind == "block":
        sb_sn, sb_sk = b.s_store.stride(0), b.s_store.stride(1)
    else:
        sb_sn, sb_sk = b.s_store.stride(1), b.s_store.stride(0)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), 1)
    _gemm_kernel[grid](
        _desc(a.q, cfg["BLOCK_M"]), _desc(b.q, cfg["BLOCK_N"]), out, a.s_store, b.s_store, a.s_store, a.s_store, 1,
        M, N, KB, 0, 0, out.stride(0),
        a.s_store.stride(1), a.s_store.stride(0), 0, sb_sn, sb_sk,
        B_BLOCK=b.kind == "block", GROUP_M_ROWS=False, GROUP_K=False, G_P2=2, **cfg,
    )
    return out


_BACKEND = {"name": "cublas"}


def fp8_gemm(a: Operand, b: Operand, out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None,
             config: dict | None = None) -> torch.Tensor:
    """dequant(a) [M, K] @ dequant(b)^T [K, N] -> [M, N] in out_dtype, FP32 accumulation per 128 block of K.

    a: 1x128 tiles along K; b: 128x128 blocks or 1x128 tiles along K. backend: "cublas"
    (torch._scaled_mm), "triton" or "grouped" (the grouped GEMMs' kernel with one group); default:
    fp8.kernels.set_gemm_backend's choice ("cublas") for operands padded to RED_PAD, "grouped" for
    operands padded to GROUPED_RED_PAD only (cuBLAS cannot run those, linear_pad).
    """
    if a.kind != "row" or b.kind not in ("row", "block"):
        raise ValueError("fp8_gemm: a must be 1x128-tiled, b 1x128-tiled or 128x128-blocked")
    if a.q.shape[1] != b.q.shape[1] or a.k != b.k:
        raise ValueError(f"fp8_gemm: reduction sizes differ ({a.k} vs {b.k})")
    backend = backend or ("grouped" if a.q.shape[1] % RED_PAD else _BACKEND["name"])
    if backend == "cublas":
        if a.q.shape[1] % RED_PAD:  # (3 K blocks gave silently wrong results: module docstring)
            raise ValueError(f"fp8_gemm: cuBLAS needs the reduction dimension padded to {RED_PAD}, "
                             f"got {a.q.shape[1]}")
        return _scaled_mm_gemm(a, b, out_dtype)
    if backend == "triton":
        return _triton_gemm(a, b, out_dtype, config)
    if backend == "grouped":
        return _one_group_gemm(a, b, out_dtype, config)
    raise ValueError(f"unknown backend {backend!r}")


# The FP8 Linears' GEMMs over a reduction dimension k that is not a multiple of RED_PAD: "auto" (the
# grouped GEMMs' kernel, operands padded to GROUPED_RED_PAD only, where padding k to RED_PAD would add
# at least a quarter to it, e.g. 768, 384, 576; cuBLAS elsewhere, e.g. 1408, 2816), "grouped" (always)
# or "cublas" (never). From `fp8_bench.py --sections pad` (H200, docs/fp8.md): at k = 2816 and 5632
# cuBLAS on 9% of padding ran 8-15% faster than the grouped kernel, at k = 576 and 768 the grouped
# kernel 8-10% faster than cuBLAS on 78% and 33%.
LINEAR_UNALIGNED = {"name": "auto" if WS_GROUPED_CONFIG is not None else "cublas"}
UNALIGNED_WASTE = 1.25


def linear_pad(k: int) -> int:
    """The padding of an FP8 Linear's reduction dimension of size k (the operands' quantisers and the
    weight's take it): RED_PAD, or GROUPED_RED_PAD where LINEAR_UNALIGNED runs that GEMM on the grouped
    kernel (fp8_gemm then picks it by the operands' padding)."""
    mode = LINEAR_UNALIGNED["name"]
    if k % RED_PAD == 0 or mode == "cublas":
        return RED_PAD
    if mode == "grouped" or _ru(k, RED_PAD) >= UNALIGNED_WASTE * _ru(k, GROUPED_RED_PAD):
        return GROUPED_RED_PAD
    return RED_PAD


def _one_group_gemm(a: Operand, b: Operand, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """fp8_gemm on the grouped kernels, as one group: a GEMM whose operands need not be padded beyond
    whole 128-wide K blocks. b 128x128-blocked: grouped_gemm over a's rows; b 1x128-tiled (a Wgrad,
    K the tokens): grouped_wgrad. 128-column tiles where 256-column ones would compute more padding."""
    dev = a.q.device
    if b.kind == "block":
        cfg = dict(GROUPED_CONFIG if config is None else config)
        if config is None and b.rows % 256 and _cdiv(b.rows, 128) < 2 * _cdiv(b.rows, 256):
            cfg["BLOCK_N"] = 128
        groups = Groups.from_counts(torch.full((1,), a.rows, dtype=torch.int32, device=dev))
        one = Operand(b.q.unsqueeze(0), b.s_store.unsqueeze(0), b.rows, b.k, "block")
        return grouped_gemm(a, one, groups, out_dtype, cfg)
    tiles = torch.full((1,), a.q.shape[1] // BLOCK, dtype=torch.int32, device=dev)
    return grouped_wgrad(a, b, tiles, out_dtype, config)[0]


def set_gemm_backend(name: str) -> None:
    if name not in ("cublas", "triton"):
        raise ValueError(f"unknown backend {name!r}")
    _BACKEND["name"] = name


# Grouped (per-expert) GEMMs --------------------------------------------------------------------
def _run_gemm(grid, a_q: torch.Tensor, b_q: torch.Tensor, cfg: dict, *args, **constexprs) -> None:
    """Launch the blockwise GEMM on A's and B's codes with `_gemm_kernel`'s argument list: the Triton
    kernel, or with cfg["KERNEL"] == "ws" the warp-specialised Gluon kernel (fp8.gluon_gemm)."""
    cfg = dict(cfg)
    if cfg.pop("KERNEL", "triton") == "ws":
        from . import gluon_gemm

        gluon_gemm.launch(grid, a_q, b_q, *args, config=cfg, **constexprs)
        return
    _gemm_kernel[grid](_desc(a_q, cfg["BLOCK_M"]), _desc(b_q, cfg["BLOCK_N"]), *args, **constexprs, **cfg)


def grouped_gemm(a: Operand, b: Operand, offsets: "torch.Tensor | Groups", out_dtype: torch.dtype,
                 config: dict | None = None) -> torch.Tensor:
    """Rows a[offsets[g-1]:offsets[g]] times dequant(b[g])^T for every group g (b: [G, N, K] blocks);
    offsets: cumulative row counts [G], or their Groups.

    a: 1x128 tiles along K over all rows; b: "block" Operand with a leading group dimension.
    Returns [rows, N] in out_dtype.
    """
    cfg = dict(GROUPED_CONFIG if config is None else config)
    R = a.rows
    G = b.q.shape[0]
    N = b.rows
    KB = a.q.shape[1] // BLOCK
    tiles, offs = group_layout(offsets, cfg["BLOCK_M"])
    out = torch.empty(R, N, dtype=out_dtype, device=a.q.device)
    max_tiles = triton.cdiv(R, cfg["BLOCK_M"]) + G
    grid = (max_tiles * triton.cdiv(N, cfg["BLOCK_N"]), 1)
    _run_gemm(grid, a.q, b.q, cfg, out, a.s_store, b.s_store, tiles, offs, G,
              R, N, KB, b.q.shape[1], 0, out.stride(0),
              a.s_store.stride(1), a.s_store.stride(0), b.s_store.stride(0), b.s_store.stride(1), b.s_store.stride(2),
              B_BLOCK=True, GROUP_M_ROWS=True, GROUP_K=False, G_P2=triton.next_power_of_2(max(G, 2)))
    return out


def grouped_wgrad(gt: Operand, xt: Operand, tiles: torch.Tensor, out_dtype: torch.dtype,
                  config: dict | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
    """dW[g] = gt_hat[:, group g's tiles] @ xt_hat[:, group g's tiles]^T -> [G, gt.rows, xt.rows].

    into: an FP32 [G, gt.rows, xt.rows] contiguous tensor (an earlier micro-batch's gradient) that dW
    is added into and returned: the warp-specialised kernel adds each tile as it stores it (no dW
    tensor in memory), the Triton kernel's dW is added after. Either way each element is
    into + dW, rounded once."""
    cfg = dict(WGRAD_CONFIG if config is None else config)
    G = tiles.numel()
    M, N = gt.rows, xt.rows
    if into is not None:
        if into.shape != (G, M, N) or into.dtype != torch.float32 or not into.is_contiguous() or out_dtype != into.dtype:
            raise ValueError(f"grouped_wgrad: into must be a contiguous FP32 [{G}, {M}, {N}] tensor and out_dtype "
                             f"FP32, got {into.dtype} {tuple(into.shape)} and {out_dtype}")
        if cfg.get("KERNEL") != "ws":
            return into.add_(grouped_wgrad(gt, xt, tiles, out_dtype, config))
    out = torch.empty(G, M, N, dtype=out_dtype, device=gt.q.device) if into is None else into
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), G)
    _run_gemm(grid, gt.q, xt.q, cfg, out, gt.s_store, xt.s_store, tiles, tiles, G,
              M, N, 0, 0, out.stride(0), out.stride(1),
              gt.s_store.stride(1), gt.s_store.stride(0), 0, xt.s_store.stride(1), xt.s_store.stride(0),
              B_BLOCK=False, GROUP_M_ROWS=False, GROUP_K=True, G_P2=2,
              **({"ACCUMULATE": True} if into is not None else {}))
    return out
