"""Time causal attention with MLA's head dims (qk 192, v 128) on each SDPA backend, forward + backward.

    python benchmarks/attention_probe.py [--seq 4096] [--heads 16] [--batch 1]

Flash attention needs equal q/k and v head dims: its row pads v to 192 and drops the padding after.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    B, H, S, QK, V = a.batch, a.heads, a.seq, 192, 128
    q, k = (torch.randn(B, H, S, QK, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, S, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flops = 3 * 2 * B * H * S * S * (QK + V) / 2  # causal: half the score matrix; fwd + bwd (x3)

    def plain():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def padded():
        return F.scaled_dot_product_attention(q, k, F.pad(v, (0, QK - V)), is_causal=True)[..., :V]

    ref = plain()
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    rows = [("default", None, plain), ("flash (v padded)", SDPBackend.FLASH_ATTENTION, padded),
            ("cudnn", SDPBackend.CUDNN_ATTENTION, plain), ("efficient", SDPBackend.EFFICIENT_ATTENTION, plain)]
    for name, backend, fn in rows:
        try:
            ctx = sdpa_kernel(backend) if backend is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
            with ctx:
                out = fn()
                grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
                err = max((g - r).abs().max().item() / r.abs().max().item() for g, r in zip(grads, ref_grads))
                for _ in range(3):
                    torch.autograd.grad(fn().sum(), (q, k, v))
                torch.cuda.synchronize()
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                for _ in range(10):
                    torch.autograd.grad(fn().sum(), (q, k, v))
                t1.record()
                torch.cuda.synchronize()
                ms = t0.elapsed_time(t1) / 10
            print(f"{name:>18}: {ms:7.2f} ms fwd+bwd, {flops / ms / 1e9:6.0f} TFLOP/s, max rel grad diff {err:.1e}")
        except RuntimeError as e:
            print(f"{name:>18}: unavailable ({str(e).splitlines()[0][:100]})")


if __name__ == "__main__":
    main()
