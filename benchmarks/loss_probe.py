"""Time the chunked loss's softmax gradient on the GPU: eager PyTorch, Inductor and the Triton pass.

    python benchmarks/loss_probe.py [--rows 8192] [--vocab 102400] [--tokens 32768] [--hidden 2048] [--sweep]

First one chunk of logits [rows, vocab] in BF16 (the `bench` preset's train.loss_chunk and
vocabulary): each way of computing the loss and its gradient, in ms and in GB/s of the logits read
once and the gradient written once (what the Triton pass moves from memory at best), with how far
each is from an FP32 reference. --sweep also times the Triton kernel's block and warps. Then the whole chunked loss forward + backward (head GEMMs included) over `tokens` rows of
`hidden`, with the Triton pass and with the Inductor version.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from moeforge.model import head
from moeforge.model.loss_triton import softmax_grad_


def _reference(logits, targets, valid):
    x = logits.float()
    lse = torch.logsumexp(x, 1)
    loss = ((lse - x.gather(1, targets[:, None]).squeeze(1)) * valid).sum()
    g = torch.exp(x - lse[:, None])
    g[torch.arange(x.shape[0], device=x.device), targets] -= 1
    return g * valid[:, None], loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=102400)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    C, V = a.rows, a.vocab
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (2 * torch.randn(C, V, device="cuda", generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, V, (C,), device="cuda", generator=g)
    valid = (torch.rand(C, device="cuda", generator=g) > 0.05).float()
    g_ref, loss_ref = _reference(logits, targets, valid)
    gb = 2 * C * V * logits.element_size() / 1e9

    def report(name, fn, inplace):
        work = logits.clone()
        out, loss = fn(work if inplace else logits)
        exact = out.float() == g_ref.to(out.dtype).float()
        ulp = ((out.float() - g_ref).abs() / g_ref.abs().clamp_min(2 ** -126)).max()
        buf = logits.clone()
        ms = do_bench(lambda: fn(buf if inplace else logits), warmup=5, rep=50)
        print(f"{name:40s} {ms:7.3f} ms {gb / ms:5.2f} TB/s | loss rel. diff "
              f"{abs(float(loss) - float(loss_ref)) / float(loss_ref):.1e}, gradient equal to the FP32 "
              f"reference rounded: {100 * float(exact.float().mean()):.2f}%, max rel. diff {float(ulp):.1e}")

    print(f"one chunk: {C} x {V} logits, BF16; {gb:.2f} GB read + written")
    report("eager PyTorch (log_softmax, in place)", lambda x: head._softmax_grad(x, targets, valid, x.dtype), True)
    comp = head._compiled_softmax_grad("inductor")
    report("Inductor (train.compile)", lambda x: comp(x, targets, valid, x.dtype), False)
    report("Triton pass (default)", lambda x: head._softmax_grad_triton(x, targets, valid, x.dtype), True)
    if a.sweep:
        for block in (2048, 4096, 8192):
            for warps in (4, 8, 16):
                if block // (32 * warps) >= 4:
                    report(f"Triton block {block} warps {warps}",
                           lambda x, b=block, w=warps: (x, softmax_grad_(x, targets, valid, block=b,
                                                                          num_warps=w).sum()), True)

    T, D = a.tokens, a.hidden
    h = torch.randn(T, D, device="cuda", generator=g).requires_grad_()
    w = (0.02 * torch.randn(V, D, device="cuda", generator=g)).requires_grad_()
    t = torch.randint(0, V, (T,), device="cuda", generator=g)
    print(f"whole chunked loss, forward + backward: {T} x {D} -> {V}, chunks of {C}, BF16 autocast")
    for name, on in (("Triton pass", True), ("Inductor", False)):
        head.TRITON = on

        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = head.chunked_cross_entropy(h, w, t, C, fused="inductor")
            loss.backward()

        torch.cuda.reset_peak_memory_stats()
        ms = do_bench(run, warmup=3, rep=30)
        print(f"{name:40s} {ms:7.2f} ms, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    head.TRITON = True


if __name__ == "__main__":
    main()
