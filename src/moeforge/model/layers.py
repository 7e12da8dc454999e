"""Building blocks: RMSNorm, rotary embeddings with YaRN scaling, the SwiGLU feed-forward network.

Shape legend: B batch, S sequence, D hidden, H heads, R rotary dim (qk_rope_head_dim), I intermediate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear would compute x in: autocast's when it is on, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in FP32 and returned in the dtype the Linears that read it
    compute in (compute_dtype: autocast's when it is on, else the input's).

    Under BF16 autocast the residual stream stays FP32 while y comes out in BF16: the single rounding
    a Linear's autocast would apply to it anyway, done once in the norm's kernel. Its readers then move
    half the bytes (the FP8 quantisers, the routed experts' gather, the router), and where several of
    them read y, autograd sums their gradients in BF16 rather than FP32.

    keep_dtype: return the input's dtype even under autocast (y in FP32 from the FP32 residual
    stream). fp8.convert_to_fp8 sets it on the norms in front of FP8 GEMMs (FP8Recipe.norm_output):
    their quantisers then read y unrounded, and the gradients of y are summed in FP32.
    """

    keep_dtype = False

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        out = dtype if self.keep_dtype else compute_dtype(x)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x.to(dtype)).to(out)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# --------------------------------------------------------------------------------------
# Rotary embeddings (applied to the decoupled RoPE part of MLA only) with YaRN (report §4.3)
# --------------------------------------------------------------------------------------
def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """sqrt(t) = 0.1 * mscale * ln(s) + 1 (1 when the context is not extended)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_nope + qk_rope), times the YaRN mscale squared when the context is extended."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the magnitude factor applied to cos/sin.

    Without scaling: theta^(-2i/R). With YaRN: frequencies whose wavelength fits the original
    context many times (fast rotations, above beta_fast turns) keep their value; slow ones
    (below beta_slow turns) are interpolated by 1/factor; a linear ramp blends in between.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq.float(), 1.0
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

    def correction_dim(turns: float) -> float:  # the dim index whose wavelength makes `turns` turns over `orig`
        return dim * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (keep frequency), 0: interpolate (divide by factor)
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq.float(), float(attention_factor)


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [S, R/2] (FP32) for positions 0..seq_len-1."""
    inv_freq, mag = rope_frequencies(cfg)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(t, inv_freq.to(device))  # [S, R/2]
    return angles.cos() * mag, angles.sin() * mag


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's checkpoints lay them out.

    x: [B, S, H, R]; cos, sin: [S, R/2], or [B, S, R/2] for positions of each row's own (decoding
    left-padded prompts). Output pairs stay interleaved, in x's dtype.
    """
    dtype = x.dtype
    x = x.float().unflatten(-1, (-1, 2))  # [B, S, H, R/2, 2]
    x0, x1 = x[..., 0], x[..., 1]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [(B,) S, 1, R/2] broadcast over heads
    out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1)
    return out.flatten(-2).to(dtype)


# --------------------------------------------------------------------------------------
# SwiGLU FFN: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts.
# --------------------------------------------------------------------------------------
class FeedForward(nn.Module):
    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up_proj
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
