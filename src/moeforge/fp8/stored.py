"""Weights kept in FP8 as an FP8 checkpoint stores them: E4M3 codes plus one FP32 scale per block.

For inference from an FP8 Hugging Face checkpoint (DeepSeek-V3's release layout: `weight` in
float8_e4m3fn and `weight_scale_inv` with one multiplier per 128x128 block). The weights stay in
FP8 in memory, one byte per value against two for BF16, and each module dequantises its weight
when it runs. `moeforge.hf.load(path, keep_fp8=True)` builds them. They are buffers, not parameters:
these modules are not trained.

    weight[i, j] (real) = codes[i, j] * weight_scale_inv[i // 128, j // 128]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts
from ..model.layers import compute_dtype


def dequantize_blocks(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP32 codes[..., i, j] * scale_inv[..., i // block[0], j // block[1]] (ragged last blocks allowed)."""
    rows, cols = codes.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return codes.float() * scale


def _scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


class FP8StoredLinear(nn.Module):
    """y = x W^T with W kept as FP8 codes and block scales (no bias, like every Linear of the model)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], device=None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        shape = (out_features, in_features)
        self.register_buffer("weight", torch.empty(shape, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(_scale_shape(shape, self.block), device=device))

    def dense_weight(self) -> torch.Tensor:
        """The weight in FP32 (what a model that dequantised at load time holds)."""
        return dequantize_blocks(self.weight, self.weight_scale_inv, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(compute_dtype(x)))


class FP8StoredExperts(Experts):
    """Routed experts whose stacked weights w1, w3 [E, I, D] and w2 [E, D, I] are kept in FP8; the
    whole layer's weights are dequantised when it runs, then the same grouped GEMMs as Experts."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, block: tuple[int, int], device=None):
        nn.Module.__init__(self)
        self.block = tuple(block)
        for name, shape in (("w1", (n_experts, inter_dim, dim)), ("w3", (n_experts, inter_dim, dim)),
                            ("w2", (n_experts, dim, inter_dim))):
            self.register_buffer(name, torch.empty(shape, dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer(f"{name}_scale_inv", torch.empty(_scale_shape(shape, self.block), device=device))

    def dense_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(dequantize_blocks(getattr(self, n), getattr(self, f"{n}_scale_inv"), self.block).to(dtype)
                     for n in ("w1", "w3", "w2"))


def keep_in_fp8(model: nn.Module, names: set[str], block: tuple[int, int]) -> set[str]:
    """Swap, on a meta-device model, every Linear whose `<module>.weight` is in `names`, and every routed
    Experts whose three weights are, for its FP8-stored counterpart. Returns the state-dict names now
    held in FP8 (the others stay as they were)."""
    kept = set()
    for mod_name, module in list(model.named_modules()):
        prefix = f"{mod_name}." if mod_name else ""
        if type(module) is nn.Linear and f"{prefix}weight" in names:
            new = FP8StoredLinear(module.in_features, module.out_features, block, device="meta")
            kept.add(f"{prefix}weight")
        elif type(module) is Experts and all(f"{prefix}{w}" in names for w in ("w1", "w2", "w3")):
            E, inter, dim = module.w1.shape
            new = FP8StoredExperts(E, dim, inter, block, device="meta")
            kept.update(f"{prefix}{w}" for w in ("w1", "w2", "w3"))
        else:
            continue
        parent_name, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return kept
