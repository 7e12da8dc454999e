"""The transposed 1x128 quantiser in Gluon (Triton's explicit-layout language): x [R, C] -> the codes of
x^T [C, R] in 1x128 tiles along R, and their scales. The same contract, arguments and bytes as the
COL path of `kernels._quant_1x128_kernel` (rows gathered through an index, scaled, restarted at every
expert's first row), faster: 1.25-1.44x at the MoE layers' shapes (docs/fp8.md).

A program quantises a [128 rows, BC columns] tile. It loads the tile with 16 bytes per thread along
the contiguous columns, then moves it (in the source dtype, before any rounding) to a layout in which
every thread holds TPT consecutive rows of one column, through shared memory. There the amax of a
column's 128 rows is a reduction inside a thread and across a few lanes of its warp, and the codes of
a column's rows are consecutive bytes of one row of x^T, written 16 bytes at a time. Regular Triton
chose its own layouts for the same steps, wrote 4-byte words, and needed the codes packed into 32-bit
words for the transpose (`kernels._pack4`).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ..triton_launch import launch

libdevice = gl.extra.libdevice

# BC columns per program, warps, rows per thread in the transposed layout; from the sweep in
# docs/fp8.md (best at every MoE shape measured, H200)
QUANT_COLS_GLUON_CONFIG = {"BC": 64, "num_warps": 8, "TPT": 32}


@gluon.jit
def _segment_of(tile, tiles_ptr, offs_ptr, n_seg, P2: gl.constexpr, num_warps: gl.constexpr):
    """Tile `tile` of a per-group padded layout -> (group, its first tile, first row, end row, valid); see
    kernels._segment_of. num_warps: the caller's (a warp-specialised partition's own count)."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    idx = gl.arange(0, P2, layout=lay)
    cum = gl.load(tiles_ptr + idx, mask=idx < n_seg, other=2147483647)
    g = gl.sum((cum <= tile).to(gl.int32), axis=0)
    gm = g > 0
    valid = g < n_seg
    tiles_before = gl.load(tiles_ptr + g - 1, mask=gm, other=0)
    rows_before = gl.load(offs_ptr + g - 1, mask=gm, other=0)
    rows_end = gl.load(offs_ptr + g, mask=valid, other=0)
    return g, tiles_before, rows_before, rows_end, valid


@gluon.jit
def _quant_cols_kernel(x_ptr, idx_ptr, sc_ptr, qt_ptr, st_ptr, seg_tiles_ptr, seg_offs_ptr, n_seg, R, C, stride_xr,
                       qt_rows, stride_qt, st_sb, floor, rcp, fmax,
                       BC: gl.constexpr, TPT: gl.constexpr, SEG: gl.constexpr, SEG_P2: gl.constexpr,
                       POW2: gl.constexpr, RCP: gl.constexpr, IDX: gl.constexpr, SCALE: gl.constexpr):
    """Program (t, j): rows [128 t, 128 t + 128) (of the tile's group with SEG) and columns [BC j, BC j + BC)
    of x -> qt[BC j + c, 128 t + r] and st[t, BC j + c]. Rows past the group's (or x's) end give zero
    codes; with SEG, tiles past the last group are not written."""
    num_warps: gl.constexpr = gl.num_warps()
    pid_r = gl.program_id(0)
    pid_c = gl.program_id(1)
    VEC: gl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth  # 16 bytes
    TC: gl.constexpr = BC // VEC  # threads along the columns when loading
    load_l: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TC, TC], [num_warps, 1], [1, 0])
    col_l: gl.constexpr = gl.BlockedLayout([TPT, 1], [128 // TPT, 32 * TPT // 128], [1, num_warps], [0, 1])
    valid = pid_r >= 0
    if SEG:
        _, tiles_before, rows_before, row_end, valid = _segment_of(pid_r, seg_tiles_ptr, seg_offs_ptr, n_seg, SEG_P2,
                                                                   num_warps)
        row0 = rows_before + (pid_r - tiles_before) * 128
        row_end = gl.where(valid, row_end, 0)
    else:
        row0 = pid_r * 128
        row_end = R
    r = row0 + gl.arange(0, 128, layout=gl.SliceLayout(1, load_l))
    c = pid_c * BC + gl.arange(0, BC, layout=gl.SliceLayout(0, load_l))
    r_ok = r < row_end
    if IDX:  # the rows are gathered here (the experts' rows from the tokens they were routed from)
        src = gl.load(idx_ptr + r, mask=r_ok, other=0).to(gl.int64)
    else:
        src = r.to(gl.int64)
    m = gl.expand_dims(r_ok, 1) & gl.expand_dims(c < C, 0)
    x = gl.load(x_ptr + gl.expand_dims(src * stride_xr, 1) + gl.expand_dims(c, 0), mask=m, other=0.0)
    if SCALE:  # (the combine's gradient: g[token] * gate weight, rounded as PyTorch's product is)
        sc = gl.load(sc_ptr + r, mask=r_ok, other=0.0).to(gl.float32)
        x = (x.to(gl.float32) * gl.expand_dims(sc, 1)).to(x_ptr.dtype.element_ty)
    x = gl.convert_layout(x, col_l).to(gl.float32)
    a = gl.maximum(gl.max(gl.abs(x), axis=0), floor)
    if RCP:
        s = a * rcp  # what torch does on CUDA for `amax / 448.0`
    else:
        s = gl.div_rn(a, a * 0.0 + fmax)
    if POW2:  # torch.exp2(torch.ceil(torch.log2(s))); 2^e built exactly from its bits
        e = gl.ceil(libdevice.log2(s))
        s = ((e.to(gl.int32) + 127) << 23).to(gl.float32, bitcast=True)
    q = gl.div_rn(x, gl.expand_dims(s, 0))
    q = gl.minimum(gl.maximum(q, -fmax), fmax).to(gl.float8e4nv)
    t = pid_r * 128 + gl.arange(0, 128, layout=gl.SliceLayout(1, col_l))
    co = pid_c * BC + gl.arange(0, BC, layout=gl.SliceLayout(0, col_l))
    c_ok = (co < qt_rows) & valid
    gl.store(qt_ptr + gl.expand_dims(co.to(gl.int64) * stride_qt, 0) + gl.expand_dims(t, 1), q,
             mask=gl.expand_dims(c_ok, 0))
    gl.store(st_ptr + pid_r.to(gl.int64) * st_sb + co, s, mask=c_ok)


def quant_cols(x, idx, sc, qt, st, seg_tiles, seg_offs, n_seg: int, R: int, C: int, *, floor: float, rcp: float,
               fmax: float, seg: bool, seg_p2: int, pow2: bool, rcp_mode: bool, gather: bool, scale: bool,
               config: dict | None = None) -> None:
    """Write qt [qt_rows, tiles x 128] and st [tiles, qt_rows] (the COL outputs of
    kernels.quant_operands) from x [*, C] (rows R, or x[idx] with `gather`)."""
    cfg = QUANT_COLS_GLUON_CONFIG if config is None else config
    qt_rows, n_tiles = qt.shape[0], st.shape[0]
    grid = (n_tiles, -(-qt_rows // cfg["BC"]))
    launch(_quant_cols_kernel, grid,
           (x, idx, sc, qt, st, seg_tiles, seg_offs, n_seg, R, C, x.stride(0), qt_rows, qt.stride(0), st.stride(0),
            floor, rcp, fmax),
           dict(BC=cfg["BC"], TPT=cfg["TPT"], SEG=seg, SEG_P2=seg_p2, POW2=pow2, RCP=rcp_mode, IDX=gather, SCALE=scale),
           cfg["num_warps"])


__all__ = ["QUANT_COLS_GLUON_CONFIG", "quant_cols"]
