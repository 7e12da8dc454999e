"""Warp-specialised blockwise FP8 GEMM for Hopper (SM90), written in Gluon (Triton's explicit-layout
language, `triton.experimental.gluon`), for the routed experts' grouped GEMMs.

The same contract and argument list as `kernels._gemm_kernel` (C = sum over 128-wide K blocks of
(A.B^T) * scales, DeepSeek-V3's promotion), with the work split across warps instead of loop stages:

- one *load* warp issues the TMA copies of A's [128, 128] and B's [BLOCK_N, 128] tiles into a ring of
  STAGES shared-memory buffers, waiting on each buffer's "empty" barrier before refilling it;
- two *math* warpgroups each own 64 rows of the 128-row tile. For every K block a warpgroup issues
  its tensor-core MMA (wgmma, accumulating the block's 128 products inside the tensor core from zero),
  waits for it, releases the buffer once both warpgroups are done with it and adds the partial product
  into its FP32 accumulator with the block's scales.

Regular Triton runs all warps as one instruction stream with CTA-wide barriers between loop stages,
so the tensor core idles while every warp promotes. Here the two warpgroups meet only at the
buffers' barriers, so one can promote while the other's MMA runs. Nothing makes them: both wait for
the same buffer and can issue and promote together. With TURN they take turns at the tensor core,
which orders the MMAs so that each promotion falls under the other warpgroup's MMA (6-15% faster at
the experts' shapes, docs/fp8.md). The kernel is persistent (one program per SM walks tiles p,
p + programs, ...), so the load warp fetches the next tile while the math warpgroups write the last
one.

With STORE_TMA (the experts' default) a warpgroup writes its finished rows into shared memory and
hands them to an asynchronous TMA store, then goes on to the next tile's MMAs while the copy runs.
Stored from registers, a tile's output took about 3.2 us of a tile's 20 (measured per tile with
%globaltimer at the step's shapes), time in which the warpgroup issued no MMA. A group's last rows,
where a 64-row box would cross into the next group's rows, go from shared memory through a masked
store.

A 256-column tile (BLOCK_N = 256) is two 128-column halves whose MMAs run one after the other: two
64 x 128 FP32 accumulators and one partial per thread (192 registers), where issuing both halves at
once would need 256. It halves the reads of A per FLOP and is the default for the experts' forward
and Dgrad (kernels.WS_GROUPED_CONFIG); their Wgrad runs faster on 128-column tiles with 4 stages
(kernels.WS_WGRAD_CONFIG), where each math warpgroup also keeps its next K block's MMA in flight while
it promotes the last one (PIPE: two 64-register partials, which a 256-column tile has no room for).
Where the tiles' rows start on multiples
of 128 (the Wgrad), the load warp also copies the K block's 1x128 scales with TMA (SCALE_TMA), so the
math warpgroups keep no per-column scales or offsets in registers across the loop.

With ACCUMULATE the kernel adds its result into C instead of overwriting it: the TMA store becomes a
TMA reduce (`cp.reduce.async.bulk.tensor ... .add`, FP32 additions in the memory system, one rounding
each, as `C += result` makes), the masked stores load, add and store. The experts' Wgrad uses it to add
a micro-batch's weight gradient into the .grad of the micro-batches before (fp8.gpu.grad_to_accumulate).

PROMOTE=False is a speed probe only: it accumulates across K blocks in the tensor core without any
scales (wrong results), to measure what the promotion costs (docs/fp8.md).
"""

from __future__ import annotations

import functools

from triton._C.libtriton import ir as _ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..triton_launch import launch as launch_kernel
from .gluon_quant import _segment_of

BLOCK_K = gl.constexpr(128)
HALF_N = gl.constexpr(128)  # columns per wgmma (a 256-column tile runs two)
WG_ROWS = gl.constexpr(64)  # rows of the tile per math warpgroup (wgmma's M is 64 per warpgroup)


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Asynchronously add the shared-memory tile src into global memory at coord (a TMA reduce; like
    tma.async_copy_shared_to_global, completed for src's reuse by tma.store_wait)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _tile(t, tiles_ptr, offs_ptr, n_groups, M, N, KB, b_group_rows, tiles_mn,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, G_P2: gl.constexpr,
          GROUP_M_ROWS: gl.constexpr, GROUP_K: gl.constexpr):
    """Tile t of the launch -> (first row of A, end of A's valid rows, row of B, first column, K blocks
    [kb0, kb1), group). Grouped rows: t walks the per-group 128-row tiles, the N tiles fastest; a tile
    past the last group gets no K blocks. Grouped K (Wgrad): t = g * tiles_mn + the (m, n) tile."""
    num_pid_n = gl.cdiv(N, BLOCK_N)
    if GROUP_M_ROWS:
        pid_m = t // num_pid_n
        pid_n = t % num_pid_n
        g, tiles_before, row0, row_end, gv = _segment_of(pid_m, tiles_ptr, offs_ptr, n_groups, G_P2, gl.num_warps())
        row_t = row0 + (pid_m - tiles_before) * BLOCK_M
        kb0 = 0
        kb1 = gl.where(gv, KB, 0)
        # a tile past the last group (g == n_groups) runs no K blocks, but the math warpgroups load
        # their first scales before the K loop: keep those addresses inside the last group's table
        g = gl.minimum(g, n_groups - 1)
        b_row = g * b_group_rows + pid_n * BLOCK_N
    else:
        g = t // tiles_mn
        pid = t % tiles_mn
        num_pid_m = gl.cdiv(M, BLOCK_M)
        width = GROUP_M * num_pid_n
        group_id = pid // width
        first_m = group_id * GROUP_M
        size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        row_t = pid_m * BLOCK_M
        row_end = M
        b_row = pid_n * BLOCK_N
        if GROUP_K:
            kb0 = gl.load(tiles_ptr + g - 1, mask=g > 0, other=0)
            kb1 = gl.load(tiles_ptr + g)
        else:
            kb0 = 0
            kb1 = KB
    return row_t, row_end, b_row, pid_n * BLOCK_N, kb0, kb1, g


@gluon.jit
def _load_partition(a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty,
                    tiles_ptr, offs_ptr, n_groups, M, N, KB, b_group_rows, tiles_mn, n_tiles,
                    GROUP_M: gl.constexpr, G_P2: gl.constexpr, GROUP_M_ROWS: gl.constexpr, GROUP_K: gl.constexpr,
                    B_BLOCK: gl.constexpr, SCALE_TMA: gl.constexpr):
    """Per K block: A's and B's codes; with SCALE_TMA also the block's 1x128 scales of the tile's rows
    of A ([1, BLOCK_M] of A's [K blocks, rows] table) and, unless B is 128x128-blocked, of B."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    if not SCALE_TMA:
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    elif B_BLOCK:
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes + sa_desc.block_type.nbytes
    else:
        nbytes: gl.constexpr = (a_desc.block_type.nbytes + b_desc.block_type.nbytes + sa_desc.block_type.nbytes
                                + sb_desc.block_type.nbytes)
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        row_t, row_end, b_row, off_n, kb0, kb1, g = _tile(
            t, tiles_ptr, offs_ptr, n_groups, M, N, KB, b_group_rows, tiles_mn,
            BLOCK_M, BLOCK_N, GROUP_M, G_P2, GROUP_M_ROWS, GROUP_K)
        for kb in range(kb0, kb1):
            s = it % STAGES
            # a fresh barrier counts as having completed the phase before 0: the first pass does not wait
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), nbytes)
            tma.async_copy_global_to_shared(a_desc, [row_t, kb * BLOCK_K], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [b_row, kb * BLOCK_K], ready.index(s), b_bufs.index(s))
            if SCALE_TMA:
                tma.async_copy_global_to_shared(sa_desc, [kb, row_t], ready.index(s), sa_bufs.index(s))
                if not B_BLOCK:
                    tma.async_copy_global_to_shared(sb_desc, [kb, off_n], ready.index(s), sb_bufs.index(s))
            it += 1


@gluon.jit
def _mma_block(a, b_bufs, s, h: gl.constexpr, pv, acc, PROMOTE: gl.constexpr, turn, j, WG: gl.constexpr,
               TURN: gl.constexpr):
    """One K block of one 128-column half of the tile: the partial product (tensor-core accumulation
    over the block, started from zero), waited for. PROMOTE=False accumulates across blocks in the
    tensor core instead, without scales: a speed probe only, its results are wrong.

    TURN > 0: the two math warpgroups take turns at the tensor core, so that one promotes while the
    other's MMA runs instead of both MMAs sharing the tensor core and both promotions leaving it idle.
    `j` counts the warpgroup's MMAs; warpgroup 0 starts (a fresh barrier counts as having completed the
    phase before 0). The turn passes once the MMA is issued (TURN=1) or once it has finished (TURN=2)."""
    b = b_bufs.index(s).slice(h * HALF_N, HALF_N).permute((1, 0))
    if TURN > 0:
        mbarrier.wait(turn.index(WG), (j & 1) ^ (1 - WG))
    if PROMOTE:
        p = warpgroup_mma(a, b, pv, use_acc=False, is_async=True)
    else:
        p = warpgroup_mma(a, b, acc, use_acc=True, is_async=True)
    if TURN == 1:
        mbarrier.arrive(turn.index(1 - WG), count=1)
    p = warpgroup_mma_wait(num_outstanding=0, deps=(p, ))
    if TURN == 2:
        mbarrier.arrive(turn.index(1 - WG), count=1)
    return p


@gluon.jit
def _promote(acc, pv, sa, sone, sb_base, kb, sb_sk, sb_sn, n0, N, sb_bufs, s, h: gl.constexpr,
             B_BLOCK: gl.constexpr, FOLD: gl.constexpr, PROMOTE: gl.constexpr, SCALE_TMA: gl.constexpr):
    """acc += the half's partial times its scales: A's row scales sa and B's single scale sone (FOLD),
    or B's column scales of columns [n0, n0 + 128), from the stage's copy (SCALE_TMA) or from memory
    (offsets rebuilt here: kept live they would cost 32 registers per half)."""
    if not PROMOTE:
        acc = pv
    elif FOLD:
        acc = acc + pv * gl.expand_dims(sa * sone, 1)
    else:
        col_l: gl.constexpr = gl.SliceLayout(0, pv.type.layout)
        if SCALE_TMA:
            sb = sb_bufs.index(s).reshape([sb_bufs.type.shape[2]]).slice(h * HALF_N, HALF_N).load(col_l)
        else:
            offs = n0 + gl.arange(0, HALF_N, layout=col_l)
            if B_BLOCK:
                cols = offs // 128
            else:
                cols = offs
            sb = gl.load(sb_base + kb * sb_sk + cols * sb_sn, mask=offs < N, other=0.0)
        acc = acc + pv * gl.expand_dims(sa, 1) * gl.expand_dims(sb, 0)
    return acc


@gluon.jit
def _store_half(c_ptr, acc, r0, g64, offs_n, mask_m, mask_n, stride_cg, stride_cm, GROUP_K: gl.constexpr,
                ACCUMULATE: gl.constexpr):
    row_l: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    c_base = c_ptr + r0.to(gl.int64) * stride_cm
    if GROUP_K:
        c_base += g64 * stride_cg
    rows = gl.arange(0, WG_ROWS, layout=row_l)
    c_ptrs = c_base + gl.expand_dims(rows, 1) * stride_cm + gl.expand_dims(offs_n, 0)
    mask = gl.expand_dims(mask_m, 1) & gl.expand_dims(mask_n, 0)
    vals = acc.to(c_ptr.dtype.element_ty)
    if ACCUMULATE:
        vals += gl.load(c_ptrs, mask=mask)
    gl.store(c_ptrs, vals, mask=mask)


@gluon.jit
def _store_tile(c_ptr, acc0, acc1, r0, g64, off_n, mask_m, N, stride_cg, stride_cm, GROUP_K: gl.constexpr,
                NH: gl.constexpr, ACCUMULATE: gl.constexpr):
    """The warpgroup's rows of the tile, one or two 128-column halves, with masked stores."""
    col_l: gl.constexpr = gl.SliceLayout(0, acc0.type.layout)
    offs_n0 = off_n + gl.arange(0, HALF_N, layout=col_l)
    _store_half(c_ptr, acc0, r0, g64, offs_n0, mask_m, offs_n0 < N, stride_cg, stride_cm, GROUP_K, ACCUMULATE)
    if NH == 2:
        offs_n1 = offs_n0 + HALF_N
        _store_half(c_ptr, acc1, r0, g64, offs_n1, mask_m, offs_n1 < N, stride_cg, stride_cm, GROUP_K, ACCUMULATE)


@gluon.jit
def _store_rows_from_smem(c_ptr, c_bufs, buf, r0, row_end, g64, off_n, N, stride_cg, stride_cm,
                          GROUP_K: gl.constexpr, NH: gl.constexpr, ACCUMULATE: gl.constexpr):
    """Rows [r0, row_end) of the warpgroup's C tile, staged in c_bufs[buf (+ 1)], with masked stores
    (8 consecutive columns per thread)."""
    lay: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    rows = gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, lay))
    cols = gl.arange(0, HALF_N, layout=gl.SliceLayout(0, lay))
    mask_m = gl.expand_dims(r0 + rows < row_end, 1)
    base = c_ptr + (r0 + gl.expand_dims(rows, 1)).to(gl.int64) * stride_cm
    if GROUP_K:
        base += g64 * stride_cg
    for h in gl.static_range(NH):
        n = off_n + h * HALF_N + cols
        vals = c_bufs.index(buf + h).load(lay)
        mask = mask_m & gl.expand_dims(n < N, 0)
        if ACCUMULATE:
            vals += gl.load(base + gl.expand_dims(n, 0), mask=mask)
        gl.store(base + gl.expand_dims(n, 0), vals, mask=mask)


@gluon.jit
def _issue(a_bufs, b_bufs, ready, it, p, WG: gl.constexpr):
    """Wait for stage it % STAGES and issue its MMA (from zero) into p's registers -> (p in flight, stage)."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    s = it % STAGES
    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
    b = b_bufs.index(s).permute((1, 0))
    p = warpgroup_mma(a_bufs.index(s).slice(WG * WG_ROWS, WG_ROWS), b, p, use_acc=False, is_async=True)
    return p, s


@gluon.jit
def _retire(acc, p, s, kb, OUTSTANDING: gl.constexpr, sa_bufs, sb_bufs, empty, sb_base, sb_one, sb_sk, sb_sn,
            off_n, N, WG: gl.constexpr, B_BLOCK: gl.constexpr, FOLD: gl.constexpr):
    """Wait for the partial p of K block kb (OUTSTANDING later MMAs may stay in flight), add it into acc
    with the block's scales (A's from the stage's copy) and release its stage s -> (acc, the partial's
    registers)."""
    BLOCK_M: gl.constexpr = sa_bufs.type.shape[2]
    pw = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(p, ))
    sa = sa_bufs.index(s).reshape([BLOCK_M]).slice(WG * WG_ROWS, WG_ROWS).load(gl.SliceLayout(1, acc.type.layout))
    sone = 1.0
    if FOLD:
        sone = gl.load(sb_one + kb * sb_sk)
    acc = _promote(acc, pw, sa, sone, sb_base, kb, sb_sk, sb_sn, off_n, N, sb_bufs, s, 0, B_BLOCK, FOLD, True, True)
    mbarrier.arrive(empty.index(s), count=1)
    return acc, pw


@gluon.jit
def _pipelined_k_loop(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, acc, it, kb0, kb1, sb_base, sb_one, sb_sk,
                      sb_sn, off_n, N, WG: gl.constexpr, B_BLOCK: gl.constexpr, FOLD: gl.constexpr):
    """PIPE: the K loop of a 128-column tile with the next block's MMA in flight while the last one is
    promoted, so that a warpgroup overlaps its own promotion without the other's help: block kb's MMA
    is issued, then block kb-1's partial is waited for, promoted and its stage released (its A scales
    come with the stage: SCALE_TMA). The partials of even and odd blocks have registers of their own
    (pa, pb; 64 + 2 x 64 accumulator registers), and the loop runs two blocks a pass so that neither is
    copied into the other: with the two swapped at the end of every pass, ptxas waited for each wgmma
    before issuing the next (its warning C7515; benchmarks/kernel_registers.py reports it).
    Returns (acc, it)."""
    pb = acc
    if kb1 > kb0:
        pa, sa_s = _issue(a_bufs, b_bufs, ready, it, acc, WG)
        it += 1
        for kb in range(kb0 + 1, kb1 - 1, 2):  # blocks kb (into pb) and kb + 1 (into pa)
            pb, sb_s = _issue(a_bufs, b_bufs, ready, it, pb, WG)
            acc, pw = _retire(acc, pa, sa_s, kb - 1, 1, sa_bufs, sb_bufs, empty, sb_base, sb_one, sb_sk,
                              sb_sn, off_n, N, WG, B_BLOCK, FOLD)
            pa, sa_s = _issue(a_bufs, b_bufs, ready, it + 1, pw, WG)
            acc, pb = _retire(acc, pb, sb_s, kb, 1, sa_bufs, sb_bufs, empty, sb_base, sb_one, sb_sk,
                              sb_sn, off_n, N, WG, B_BLOCK, FOLD)
            it += 2
        if (kb1 - kb0) % 2 == 0:  # one block after the pairs, into pb
            pl, sl = _issue(a_bufs, b_bufs, ready, it, pb, WG)
            acc, pw = _retire(acc, pa, sa_s, kb1 - 2, 1, sa_bufs, sb_bufs, empty, sb_base, sb_one, sb_sk,
                              sb_sn, off_n, N, WG, B_BLOCK, FOLD)
            acc, pw = _retire(acc, pl, sl, kb1 - 1, 0, sa_bufs, sb_bufs, empty, sb_base, sb_one, sb_sk,
                              sb_sn, off_n, N, WG, B_BLOCK, FOLD)
            it += 1
        else:  # the last block is in pa
            acc, pw = _retire(acc, pa, sa_s, kb1 - 1, 0, sa_bufs, sb_bufs, empty, sb_base, sb_one, sb_sk,
                              sb_sn, off_n, N, WG, B_BLOCK, FOLD)
    return acc, it


@gluon.jit
def _math_partition(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, c_ptr, sa_ptr, sb_ptr, tiles_ptr, offs_ptr,
                    n_groups, M, N, KB, b_group_rows, tiles_mn, n_tiles, stride_cg, stride_cm,
                    sa_sm, sa_sk, sb_sg, sb_sn, sb_sk, c_desc, c_bufs, turn,
                    WG: gl.constexpr, B_BLOCK: gl.constexpr, FOLD: gl.constexpr, GROUP_M_ROWS: gl.constexpr,
                    GROUP_K: gl.constexpr, GROUP_M: gl.constexpr, G_P2: gl.constexpr, PROMOTE: gl.constexpr,
                    SCALE_TMA: gl.constexpr, STORE_TMA: gl.constexpr, TURN: gl.constexpr, PIPE: gl.constexpr,
                    ACCUMULATE: gl.constexpr):
    """The tile's rows [64 WG, 64 WG + 64), in one or two 128-column halves. With two halves (a 256-column
    tile) the halves' MMAs run one after the other: 2 x 64 accumulator registers plus one 64-register
    partial, where issuing both at once would need 256."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = b_bufs.type.shape[1]
    NH: gl.constexpr = BLOCK_N // HALF_N
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, HALF_N, 32])
    row_l: gl.constexpr = gl.SliceLayout(1, mma)
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        row_t, row_end, b_row, off_n, kb0, kb1, g = _tile(
            t, tiles_ptr, offs_ptr, n_groups, M, N, KB, b_group_rows, tiles_mn,
            BLOCK_M, BLOCK_N, GROUP_M, G_P2, GROUP_M_ROWS, GROUP_K)
        r0 = row_t + WG * WG_ROWS
        offs_m = r0 + gl.arange(0, WG_ROWS, layout=row_l)
        mask_m = offs_m < row_end
        g64 = g.to(gl.int64)
        sa_ptrs = sa_ptr + offs_m.to(gl.int64) * sa_sm
        sb_base = sb_ptr
        if GROUP_M_ROWS:
            sb_base += g64 * sb_sg
        n1 = off_n + HALF_N
        sb_one0 = sb_base + (off_n // 128) * sb_sn  # FOLD: each half's single B scale
        sb_one1 = sb_one0 + sb_sn
        acc0 = gl.zeros([WG_ROWS, HALF_N], gl.float32, mma)
        acc1 = acc0
        pv = acc0  # the MMA's (ignored, use_acc=False) input: the last partial, dead by then, so no copy
        # Without SCALE_TMA, A's scales (and B's single ones when FOLD) are loaded one block ahead, so
        # their latency hides behind an MMA.
        kb_pre = gl.maximum(gl.minimum(kb0, kb1 - 1), 0)
        sa_n = gl.zeros([WG_ROWS], gl.float32, row_l)
        if not SCALE_TMA:
            sa_n = gl.load(sa_ptrs + kb_pre * sa_sk, mask=mask_m, other=0.0)
        sone0_n = 1.0
        sone1_n = 1.0
        if FOLD:
            sone0_n = gl.load(sb_one0 + kb_pre * sb_sk)
            if NH == 2:
                sone1_n = gl.load(sb_one1 + kb_pre * sb_sk, mask=n1 < N, other=0.0)
        kb_end = kb1
        if PIPE:
            acc0, it = _pipelined_k_loop(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, acc0, it, kb0, kb1, sb_base,
                                         sb_one0, sb_sk, sb_sn, off_n, N, WG, B_BLOCK, FOLD)
            kb_end = kb0  # (the loop below runs no block)
        for kb in range(kb0, kb_end):
            sa = sa_n
            sone0 = sone0_n
            sone1 = sone1_n
            kb_pre = gl.minimum(kb + 1, kb1 - 1)
            if not SCALE_TMA:
                sa_n = gl.load(sa_ptrs + kb_pre * sa_sk, mask=mask_m, other=0.0)
            if FOLD:
                sone0_n = gl.load(sb_one0 + kb_pre * sb_sk)
                if NH == 2:
                    sone1_n = gl.load(sb_one1 + kb_pre * sb_sk, mask=n1 < N, other=0.0)
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            a = a_bufs.index(s).slice(WG * WG_ROWS, WG_ROWS)
            if SCALE_TMA:
                sa = sa_bufs.index(s).reshape([BLOCK_M]).slice(WG * WG_ROWS, WG_ROWS).load(row_l)
            pv = _mma_block(a, b_bufs, s, 0, pv, acc0, PROMOTE, turn, it * NH, WG, TURN)
            if NH == 2:
                acc0 = _promote(acc0, pv, sa, sone0, sb_base, kb, sb_sk, sb_sn, off_n, N, sb_bufs, s, 0,
                                B_BLOCK, FOLD, PROMOTE, SCALE_TMA)
                pv = _mma_block(a, b_bufs, s, 1, pv, acc1, PROMOTE, turn, it * NH + 1, WG, TURN)
                if not SCALE_TMA:
                    mbarrier.arrive(empty.index(s), count=1)
                acc1 = _promote(acc1, pv, sa, sone1, sb_base, kb, sb_sk, sb_sn, n1, N, sb_bufs, s, 1,
                                B_BLOCK, FOLD, PROMOTE, SCALE_TMA)
            else:
                if not SCALE_TMA:
                    mbarrier.arrive(empty.index(s), count=1)
                acc0 = _promote(acc0, pv, sa, sone0, sb_base, kb, sb_sk, sb_sn, off_n, N, sb_bufs, s, 0,
                                B_BLOCK, FOLD, PROMOTE, SCALE_TMA)
            if SCALE_TMA:  # the stage's scales are read by the promotion: release it after
                mbarrier.arrive(empty.index(s), count=1)
            it += 1
        # A Wgrad group without K blocks (an expert without tokens) is stored too: zeros. (That
        # condition is always true; unconditional, the compiler hoists the column offsets and masks
        # above the K loop, where they stay live and spill registers.) A tile past the last group of
        # rows (forward) has no K blocks and nothing to store.
        if GROUP_K:
            has_out = kb1 >= kb0
        else:
            has_out = kb1 > kb0
        if has_out:
            if STORE_TMA:
                # registers -> shared memory (once the previous tile's copies have read the buffers) ->
                # an asynchronous TMA store, clipped at N, so the warpgroup goes on to the next tile's
                # MMAs while the copy runs; the last rows of a group (a box would cross into the next
                # group's) are stored from shared memory with a mask
                buf = WG * NH
                tma.store_wait(0)
                c_bufs.index(buf).store(acc0.to(c_desc.dtype))
                if NH == 2:
                    c_bufs.index(buf + 1).store(acc1.to(c_desc.dtype))
                if r0 + WG_ROWS <= row_end:
                    crow = r0
                    if GROUP_K:
                        crow += g * (stride_cg // stride_cm)  # c viewed as [groups x M, N]
                    fence_async_shared()
                    if ACCUMULATE:
                        _tma_reduce_add(c_desc, [crow, off_n], c_bufs.index(buf))
                        if NH == 2:
                            _tma_reduce_add(c_desc, [crow, off_n + HALF_N], c_bufs.index(buf + 1))
                    else:
                        tma.async_copy_shared_to_global(c_desc, [crow, off_n], c_bufs.index(buf))
                        if NH == 2:
                            tma.async_copy_shared_to_global(c_desc, [crow, off_n + HALF_N], c_bufs.index(buf + 1))
                else:
                    _store_rows_from_smem(c_ptr, c_bufs, buf, r0, row_end, g64, off_n, N, stride_cg, stride_cm,
                                          GROUP_K, NH, ACCUMULATE)
            else:
                _store_tile(c_ptr, acc0, acc1, r0, g64, off_n, mask_m, N, stride_cg, stride_cm, GROUP_K, NH,
                            ACCUMULATE)
    if STORE_TMA:
        tma.store_wait(0)


@gluon.jit
def _ws_gemm_kernel(
    a_desc, b_desc, c_ptr, sa_ptr, sb_ptr,
    tiles_ptr, offs_ptr, n_groups,
    M, N, KB, b_group_rows, stride_cg, stride_cm,
    sa_sm, sa_sk, sb_sg, sb_sn, sb_sk, tiles_mn, n_tiles, sa_desc, sb_desc, c_desc,
    B_BLOCK: gl.constexpr, GROUP_M_ROWS: gl.constexpr, GROUP_K: gl.constexpr, G_P2: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, FOLD: gl.constexpr, SCALE_TMA: gl.constexpr,
    MATH_REGS: gl.constexpr, LOAD_REGS: gl.constexpr, num_warps: gl.constexpr, PROMOTE: gl.constexpr = True,
    STORE_TMA: gl.constexpr = False, TURN: gl.constexpr = 0, PIPE: gl.constexpr = False,
    ACCUMULATE: gl.constexpr = False,
):
    """Persistent: program p runs tiles p, p + programs, ... (see _tile). sa_desc / sb_desc: TMA
    descriptors of the 1x128 scale tables, used with SCALE_TMA (see `launch`)."""
    gl.static_assert(a_desc.block_type.shape[0] == 2 * WG_ROWS)
    gl.static_assert(not PIPE or (b_desc.block_type.shape[0] == HALF_N and TURN == 0 and PROMOTE and SCALE_TMA))
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    sa_bufs = gl.allocate_shared_memory(gl.float32, [STAGES] + sa_desc.block_type.shape, sa_desc.layout)
    sb_bufs = gl.allocate_shared_memory(gl.float32, [STAGES] + sb_desc.block_type.shape, sb_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    if STORE_TMA:  # per math warpgroup, one [64, 128] buffer of C per 128 columns of the tile
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2 * (b_desc.block_type.shape[0] // HALF_N)]
                                           + c_desc.block_type.shape, c_desc.layout)
    else:
        c_bufs = sa_bufs  # unused
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # TURN: warpgroup w's turn
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per math warpgroup
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)

    # (the argument tuples are written out in the call: a constexpr kept in a tuple variable becomes a tensor)
    gl.warp_specialize([
        (_math_partition, (a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, c_ptr, sa_ptr, sb_ptr, tiles_ptr,
                           offs_ptr, n_groups, M, N, KB, b_group_rows, tiles_mn, n_tiles, stride_cg, stride_cm,
                           sa_sm, sa_sk, sb_sg, sb_sn, sb_sk, c_desc, c_bufs, turn, 0, B_BLOCK, FOLD,
                           GROUP_M_ROWS, GROUP_K, GROUP_M, G_P2, PROMOTE, SCALE_TMA, STORE_TMA, TURN, PIPE,
                           ACCUMULATE)),
        (_math_partition, (a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, c_ptr, sa_ptr, sb_ptr, tiles_ptr,
                           offs_ptr, n_groups, M, N, KB, b_group_rows, tiles_mn, n_tiles, stride_cg, stride_cm,
                           sa_sm, sa_sk, sb_sg, sb_sn, sb_sk, c_desc, c_bufs, turn, 1, B_BLOCK, FOLD,
                           GROUP_M_ROWS, GROUP_K, GROUP_M, G_P2, PROMOTE, SCALE_TMA, STORE_TMA, TURN, PIPE,
                           ACCUMULATE)),
        (_load_partition, (a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty,
                           tiles_ptr, offs_ptr, n_groups, M, N, KB, b_group_rows, tiles_mn, n_tiles,
                           GROUP_M, G_P2, GROUP_M_ROWS, GROUP_K, B_BLOCK, SCALE_TMA)),
    ], [4, 1], [MATH_REGS, LOAD_REGS])


# 128 rows = two math warpgroups of 64; BLOCK_N 128 or 256 (one or two weight blocks: FOLD applies
# to each); STAGES, the registers per partition (MATH_REGS, LOAD_REGS, maxnreg: the kernel's 12 warps
# share 64K registers, so maxnreg * 384 must cover 256 * MATH_REGS + 128 * LOAD_REGS), PROGRAMS
# (0: one per SM), STORE_TMA, TURN (0 off, 1 the turn passes at issue, 2 at completion; with
# TURN_MAX_KB only for launches of at most that many K blocks) and PIPE (each warpgroup keeps its next
# MMA in flight while it promotes; 128-column tiles whose scales come by TMA, i.e. the Wgrad) are the
# tunables.
WS_CONFIG = {"KERNEL": "ws", "BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "FOLD": True,
             "MATH_REGS": 232, "LOAD_REGS": 40, "maxnreg": 168, "PROGRAMS": 0, "STORE_TMA": False,
             "TURN": 0, "PIPE": False}


@functools.lru_cache(maxsize=None)
def _nvmma_layout(rows: int, cols: int, dtype) -> gl.NVMMASharedLayout:
    """The default shared-memory layout of [rows, cols] boxes (cached: building one costs ~14 us of
    host time, and a launch needs up to three)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], dtype)


def descriptor(t, rows: int):
    """A TMA descriptor over t viewed as 2-D [-1, K] with [rows, 128] boxes of FP8."""
    t2 = t.reshape(-1, t.shape[-1])
    layout = _nvmma_layout(rows, BLOCK_K.value, gl.float8e4nv)
    return TensorDescriptor(t2, list(t2.shape), list(t2.stride()), [rows, BLOCK_K.value], layout)


_GL_DTYPES = {"torch.bfloat16": gl.bfloat16, "torch.float16": gl.float16, "torch.float32": gl.float32}


SMEM_LIMIT = 232448  # bytes of shared memory one block may use on SM90


def smem_bytes(cfg: dict, out_elsize: int) -> int:
    """The shared memory of the kernel with a TMA store: the STAGES buffers of A's and B's FP8 codes
    and their scales, the turn barriers, and the two warpgroups' [64, 128] buffers of C per 128 columns."""
    bm, bn, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["STAGES"]
    ring = stages * ((bm + bn) * BLOCK_K.value + (bm + bn) * 4 + 16)
    return ring + 16 + 2 * (bn // HALF_N.value) * WG_ROWS.value * HALF_N.value * out_elsize


def out_descriptor(c, config: dict, group_k: bool):
    """A TMA descriptor over the output c viewed as 2-D [-1, N] with [64, 128] boxes (one math
    warpgroup's rows of one 128-column half) where `config` asks for STORE_TMA, or None where it does
    not or a TMA store cannot write c: its buffers would not fit in shared memory, c's rows are not
    16-byte aligned, or (grouped K) a group's M rows are not a multiple of 64, so that a box would
    cross into the next group's rows."""
    dtype = _GL_DTYPES.get(str(c.dtype))
    if (not config.get("STORE_TMA") or smem_bytes(config, c.element_size()) > SMEM_LIMIT or dtype is None
            or not c.is_contiguous() or (c.shape[-1] * c.element_size()) % 16
            or (group_k and c.shape[-2] % WG_ROWS.value) or (c.device.type != "meta" and c.data_ptr() % 16)):
        return None
    c2 = c.reshape(-1, c.shape[-1])
    layout = _nvmma_layout(WG_ROWS.value, HALF_N.value, dtype)
    return TensorDescriptor(c2, list(c2.shape), list(c2.stride()), [WG_ROWS.value, HALF_N.value], layout)


def kernel_options(config: dict, *, k_blocks: int, b_block: bool, scale_tma: bool, store_tma: bool) -> dict:
    """The kernel's tunables (constexprs and maxnreg) for one launch of `config`: FOLD only where B is
    128x128-blocked (one B scale per 128 columns and K block), TURN off where A's rows have more than
    TURN_MAX_KB K blocks (turns cost more than they gain over long K loops, docs/fp8.md), and the
    SCALE_TMA / STORE_TMA decisions of the caller."""
    cfg = {k: v for k, v in config.items() if k not in ("KERNEL", "BLOCK_M", "BLOCK_N", "PROGRAMS", "TURN_MAX_KB")}
    cfg["FOLD"] = bool(cfg.get("FOLD")) and b_block
    cfg["SCALE_TMA"], cfg["STORE_TMA"] = scale_tma, store_tma
    if k_blocks > config.get("TURN_MAX_KB", k_blocks):
        cfg["TURN"] = 0
    if not scale_tma:  # PIPE reads A's scales from the stage (loaded from memory, the loop spills registers)
        cfg["PIPE"] = False
    return cfg


_SCALE_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def scale_descriptor(s, cols: int):
    """A TMA descriptor over a 1x128 scale table s [K blocks, rows] (rows contiguous) with [1, cols]
    boxes: one K block's scales of a tile's rows."""
    return TensorDescriptor(s, list(s.shape), list(s.stride()), [1, cols], _SCALE_LAYOUT)


def launch(grid, a_q, b_q, c, sa, sb, *args, config: dict, **constexprs):
    """Launch the warp-specialised kernel with the argument list and grid of `kernels._gemm_kernel`
    (grid = (tiles, groups); sa, sb: the operands' scale tables); it runs persistently on
    min(tiles * groups, PROGRAMS or the SM count) programs.

    The load warp also copies the 1x128 scales with TMA (SCALE_TMA) when the tiles' rows start on
    multiples of 128, i.e. unless the rows are grouped (experts' forward/Dgrad, whose groups start
    anywhere): a TMA box must start 16-byte aligned along the contiguous dimension, and a grouped
    tile's first row index is that dimension of the scale table (measured: "illegal instruction")."""
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    if bm != 2 * WG_ROWS.value:
        raise ValueError(f"the warp-specialised GEMM runs 128-row tiles, got BLOCK_M={bm}")
    if bn not in (128, 256):
        raise ValueError(f"the warp-specialised GEMM runs 128- or 256-column tiles, got BLOCK_N={bn}")
    b_block = constexprs.get("B_BLOCK", False)
    scale_tma = not constexprs.get("GROUP_M_ROWS", False) and all(
        t.data_ptr() % 16 == 0 and t.stride(0) % 4 == 0 for t in ((sa,) if b_block else (sa, sb)))
    programs = config["PROGRAMS"] or _sm_count(a_q.device)
    tiles_mn, groups = grid
    n_tiles = tiles_mn * groups
    sa_desc = scale_descriptor(sa, bm)
    sb_desc = sa_desc if b_block else scale_descriptor(sb, bn)
    c_desc = out_descriptor(c, config, constexprs.get("GROUP_K", False))
    cfg = kernel_options(config, k_blocks=a_q.shape[-1] // BLOCK_K.value, b_block=b_block, scale_tma=scale_tma,
                         store_tma=c_desc is not None)
    maxnreg = cfg.pop("maxnreg", None)
    launch_kernel(_ws_gemm_kernel, (max(1, min(n_tiles, programs)),),
                  (descriptor(a_q, bm), descriptor(b_q, bn), c, sa, sb, *args, tiles_mn, n_tiles, sa_desc, sb_desc,
                   c_desc or sa_desc), {**constexprs, **cfg}, 4,
                  options=None if maxnreg is None else {"maxnreg": maxnreg})


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


__all__ = ["WS_CONFIG", "descriptor", "launch"]
