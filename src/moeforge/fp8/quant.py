"""Fine-grained FP8 (E4M3) quantisation, DeepSeek-V3 §3.3: the reference implementation.

A tensor is cut into blocks along its last two dimensions: (1, 128) tiles for activations and
activation gradients (one row, 128 channels of the reduction dimension), (128, 128) blocks for
weights. Each block gets one FP32 scale s = max(amax, 1e-4) / 448 computed from the current tensor
(no history), and is stored as q = x / s in float8_e4m3fn; x is recovered as q * s. Blocks at
ragged edges cover what is left. `pow2_scales` rounds s up to a power of two (UE8M0, DeepSeek-V3.1).

The scales returned here are the multipliers that take q back to x; DeepSeek's checkpoints store the
same numbers under the name `weight_scale_inv`.
"""

from __future__ import annotations

import math

import torch

from ..errors import MoeforgeError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
AMAX_FLOOR = 1e-4  # DeepSeek's kernels floor amax so an all-zero block gets a finite scale
BLOCKS = ((1, 128), (128, 128))


def part_starts(sizes, block: int = 128) -> list[int]:
    """First row of each part when parts of `sizes` rows are stacked so that every part but the last
    starts on a multiple of `block` (zero rows in between): 128x128 blocks then never mix two parts.
    The stacked tensor has part_starts(sizes)[-1] + sizes[-1] rows."""
    starts, r = [], 0
    for n in sizes:
        starts.append(r)
        r += -(-n // block) * block
    return starts


def stack_parts(parts) -> torch.Tensor:
    """Tensors [..., n_i, K] stacked along rows at part_starts (zero rows in between)."""
    starts = part_starts([p.shape[-2] for p in parts])
    padded = [torch.nn.functional.pad(p, (0, 0, 0, nxt - r0 - p.shape[-2]))
              for p, r0, nxt in zip(parts[:-1], starts[:-1], starts[1:])]
    return torch.cat([*padded, parts[-1]], dim=-2) if padded else parts[0]


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    block = tuple(block)
    if block not in BLOCKS:
        raise MoeforgeError(f"FP8 block must be (1, 128) or (128, 128), got {block}")
    return block


def _padded_blocks(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """x [..., M, N] -> a view [..., M/br, br, N/bc, bc] and the sizes M, N. A dimension shorter than
    its block is one short block (no copy); one that is neither that nor whole blocks is zero-padded
    (zeros change no block's amax, and the padding is cut off again by _unblock)."""
    br, bc = block
    M, N = x.shape[-2], x.shape[-1]
    br, bc = (M if 0 < M < br else br), (N if 0 < N < bc else bc)
    Mp, Np = math.ceil(M / br) * br, math.ceil(N / bc) * bc
    if (Mp, Np) != (M, N):
        x = torch.nn.functional.pad(x, (0, Np - N, 0, Mp - M))
    return x.unflatten(-1, (Np // bc, bc)).unflatten(-3, (Mp // br, br)), M, N


def _unblock(blocks: torch.Tensor, M: int, N: int) -> torch.Tensor:
    """[..., M/br, br, N/bc, bc] -> [..., M, N] without the padding (contiguous)."""
    out = blocks.flatten(-2).flatten(-3, -2)
    return out if out.shape[-2:] == (M, N) else out[..., :M, :N].contiguous()


def _per_block(scales: torch.Tensor) -> torch.Tensor:
    """Scales [..., M/br, N/bc] as [..., M/br, 1, N/bc, 1]: broadcast over their blocks, never expanded."""
    return scales.unsqueeze(-1).unsqueeze(-3)


def _scaled_blocks(x: torch.Tensor, block: tuple[int, int], pow2_scales: bool):
    """(x's blocks in FP32, per-block scales, M, N)."""
    blocks, M, N = _padded_blocks(x.float(), _check_block(block))
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., M/br, N/bc]
    scales = amax.clamp_min(AMAX_FLOOR) / FP8_MAX
    if pow2_scales:
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    return blocks, scales, M, N


def block_scales(x: torch.Tensor, block: tuple[int, int], pow2_scales: bool = False) -> torch.Tensor:
    """FP32 scales [..., ceil(M/br), ceil(N/bc)] = max(amax, 1e-4) / 448 per block."""
    return _scaled_blocks(x, block, pow2_scales)[1]


def _in_range(x: torch.Tensor, block: tuple[int, int], pow2_scales: bool, check_finite: bool):
    """(x / scale clamped to +-448 as blocks, scales, M, N, squeeze): the values to round to E4M3."""
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    if check_finite and not bool(torch.isfinite(x).all()):
        raise MoeforgeError("cannot quantise to FP8: the tensor holds inf or NaN")
    blocks, scales, M, N = _scaled_blocks(x, block, pow2_scales)
    return (blocks / _per_block(scales)).clamp(-FP8_MAX, FP8_MAX), scales, M, N, squeeze


def quantize(x: torch.Tensor, block: tuple[int, int] = (1, 128), pow2_scales: bool = False,
             check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., M, N] (a 1-D x is one row) -> (float8_e4m3fn tensor like x, FP32 per-block scales)."""
    v, scales, M, N, squeeze = _in_range(x, block, pow2_scales, check_finite)
    q = _unblock(v.to(FP8), M, N)
    return (q.squeeze(0), scales.squeeze(0)) if squeeze else (q, scales)


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] = (1, 128),
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse: q * scale of its block, in `dtype`."""
    block = _check_block(block)
    squeeze = q.dim() == 1
    if squeeze:
        q, scales = q.unsqueeze(0), scales.unsqueeze(0)
    blocks, M, N = _padded_blocks(q.float(), block)
    out = _unblock(blocks * _per_block(scales.float()), M, N).to(dtype)
    return out.squeeze(0) if squeeze else out


def fake_quantize(x: torch.Tensor, block: tuple[int, int], pow2_scales: bool = False) -> torch.Tensor:
    """dequantize(quantize(x)) in FP32: x as the FP8 GEMM sees it (one pass over x's blocks, the
    scales broadcast over them)."""
    v, scales, M, N, squeeze = _in_range(x, block, pow2_scales, check_finite=False)
    out = _unblock(v.to(FP8).float() * _per_block(scales), M, N)
    return out.squeeze(0) if squeeze else out
