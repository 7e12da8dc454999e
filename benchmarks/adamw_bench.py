"""Time one AdamW step over a preset's parameters on the GPU: torch's fused FP32 AdamW against
moeforge's BF16-moment AdamW (the Triton kernel, and the _foreach reference).

    python benchmarks/adamw_bench.py [--preset bench] [--steps 5]

Random FP32 gradients; gradient scaling on (as the trainer's clipping sets it). Prints ms per step
and the bytes moved per step over the time (the update is memory-bound).
"""

from __future__ import annotations

import argparse
import time

import torch

from moeforge.config import load_config
from moeforge.model import build_model
from moeforge.train import adamw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    cfg = load_config(a.preset, None, [])
    shapes = [p.shape for p in build_model(cfg.model, "meta").parameters()]
    n = sum(s.numel() for s in shapes)
    print(f"{a.preset}: {len(shapes)} parameters, {n / 1e9:.2f}B elements")
    variants = {
        "torch fused AdamW, FP32 moments": (lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), 28),
        "BF16 moments, Triton kernel": (lambda ps: adamw.AdamWBF16Moments(ps, 1e-4, (0.9, 0.95), 1e-8, 0.1), 20),
        "BF16 moments, _foreach reference": (lambda ps: adamw.AdamWBF16Moments(ps, 1e-4, (0.9, 0.95), 1e-8, 0.1), 20),
    }
    for name, (make, bytes_per) in variants.items():
        adamw.TRITON = "Triton" in name
        params = [torch.zeros(s, device="cuda", requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make(params)
        opt.grad_scale = torch.tensor(1.5, device="cuda")
        opt.step()  # state allocation and compilation
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            opt.step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / a.steps
        print(f"{name:36s} {dt * 1e3:8.2f} ms/step  {bytes_per * n / dt / 1e12:6.2f} TB/s "
              f"({bytes_per} bytes per parameter read + written)")
        del opt, params
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
