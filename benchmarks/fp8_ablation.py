"""Where does FP8 training lose accuracy? Ablations of the FP8 recipe on one GPU.

    python benchmarks/fp8_ablation.py grads [--preset small]
    python benchmarks/fp8_ablation.py run --variant NAME --out DIR [--preset small] [key=value ...]
    python benchmarks/fp8_ablation.py all --out DIR [--preset small] [--steps 300] [key=value ...]

`grads` compares, on one batch, the gradients of every parameter from the GPU FP8 path against the
reference emulation (moeforge.fp8.linear, run on the same GPU), and both against BF16: the GPU path
must agree with the emulation far better than FP8 agrees with BF16.

`run` trains one variant with `moeforge train` (same data, order and seed for all):
  bf16      no FP8
  fp8       the recipe, GPU kernels (what --precision fp8 runs)
  emul      the recipe, reference emulation on the GPU (MOEFORGE_FP8_GPU=0)
  lin       FP8 Linear layers only (routed experts in BF16)
  exp       FP8 routed experts only (Linear layers in BF16)
  F, D, W   Linear layers with only Fprop, only Dgrad or only Wgrad quantised (emulated; experts BF16)
  fp32      no FP8, no autocast
  X         BF16 autocast, but every Linear in FP32 (inputs, products, outputs, gradients)
  fp8c      the recipe, with each Linear's input first cast to the autocast dtype (as F.linear does)
`all` runs every variant at the same time on the GPU and prints the loss gap of each to bf16 over the
last third of the steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from fp8_accuracy import run_side_by_side  # noqa: E402

VARIANTS = ("bf16", "fp8", "emul", "lin", "exp", "F", "D", "W", "fp32", "X", "fp8c")


class _PartialFP8Fn(torch.autograd.Function):
    """y = x W^T with only the chosen GEMMs on FP8-quantised operands (emulated, FP32 products)."""

    @staticmethod
    def forward(ctx, x, weight, which: str):
        from moeforge.fp8.linear import ACT, WEIGHT
        from moeforge.fp8.quant import fake_quantize

        x2 = x.reshape(-1, x.shape[-1]).float()
        w = weight.float()
        if "F" in which:
            y = fake_quantize(x2, ACT) @ fake_quantize(w, WEIGHT).T
        else:
            y = x2 @ w.T
        ctx.save_for_backward(x2, w)
        ctx.which, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = which, x.shape, x.dtype, weight.dtype
        return y.to(x.dtype).unflatten(0, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        from moeforge.fp8.linear import ACT, WEIGHT
        from moeforge.fp8.quant import fake_quantize

        x2, w = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).float()
        if "D" in ctx.which:
            dx = fake_quantize(g, ACT) @ fake_quantize(w, WEIGHT)
        else:
            dx = g @ w
        if "W" in ctx.which:
            dw = fake_quantize(g.T.contiguous(), ACT) @ fake_quantize(x2.T.contiguous(), ACT).T
        else:
            dw = g.T @ x2
        return dx.to(ctx.x_dtype).view(ctx.x_shape), dw.to(ctx.w_dtype), None


class PartialFP8Linear(nn.Linear):
    which = ""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            y = _PartialFP8Fn.apply(x, self.weight, self.which)
        return y if self.bias is None else y + self.bias


def patch(variant: str) -> str:
    """Install the variant's model conversion; returns the precision to train with."""
    import moeforge.fp8.gpu as gpu
    import moeforge.train.step as step
    from moeforge.fp8.linear import FP8Experts, FP8Linear
    from moeforge.model.moe import Experts

    if variant in ("bf16", "fp32"):
        return variant
    if variant == "fp8c":
        plain = FP8Linear.forward

        def forward(self, x):
            from moeforge.model.layers import compute_dtype

            return plain(self, x.to(compute_dtype(x)))

        FP8Linear.forward = forward
        return "fp8"
    if variant == "emul":
        gpu.ENABLED = False
    if variant in ("fp8", "emul"):
        return "fp8"

    def convert(model):
        n = 0
        for root in (model.layers, model.mtp):
            for m in root.modules():
                n += type(m) in (nn.Linear, Experts)
                if type(m) is nn.Linear and variant in ("lin", "F", "D", "W", "X"):
                    if variant == "lin":
                        m.__class__ = FP8Linear
                    else:
                        m.__class__, m.which = PartialFP8Linear, variant.replace("X", "")
                elif type(m) is Experts and variant == "exp":
                    m.__class__ = FP8Experts
        changed = sum(type(m) in (FP8Linear, FP8Experts, PartialFP8Linear) for m in model.modules())
        print(f"variant {variant}: {changed} of {n} Linear/Experts modules converted", flush=True)
        return model

    step.convert_to_fp8 = convert
    return "fp8"


def grads(preset: str) -> None:
    import moeforge.fp8.gpu as gpu
    from moeforge.config import load_config
    from moeforge.fp8 import convert_to_fp8
    from moeforge.model import build_model

    cfg = load_config(preset=preset)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ref = build_model(cfg.model, dev)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    # move away from the initialisation (a few BF16 steps on a repeating pattern of random tokens)
    pattern = torch.randint(0, cfg.model.vocab_size, (4, 65), device=dev)
    data = pattern.repeat(1, 16)[:, :1025]
    for _ in range(30):
        with torch.autocast(dev, torch.bfloat16):
            out = ref.losses(data[:, :-1], data[:, 1:])
        (out["main"] + 0.3 * out["mtp"].sum()).backward()
        opt.step()
        opt.zero_grad()
    batch = torch.randint(0, cfg.model.vocab_size, (4, 1025), device=dev)
    batch[:, 512:] = data[:, 512:]

    def run(model):
        model.zero_grad()
        with torch.autocast(dev, torch.bfloat16):
            out = model.losses(batch[:, :-1], batch[:, 1:])
        (out["main"] + 0.3 * out["mtp"].sum()).backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    g_bf16 = run(ref)
    convert_to_fp8(ref)
    g_gpu = run(ref)
    gpu.ENABLED = False
    g_emul = run(ref)
    gpu.ENABLED = True

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    rows = [(n, rel(g_gpu[n], g_emul[n]), rel(g_emul[n], g_bf16[n])) for n in g_emul]
    rows.sort(key=lambda r: -r[1])
    print("parameter | GPU path vs emulation | emulation vs BF16 (relative Frobenius error of the gradient)")
    for n, a, b in rows[:15]:
        print(f"{n:55s} {a:.2e} {b:.2e}")
    med = sorted(r[1] for r in rows)[len(rows) // 2]
    med_b = sorted(r[2] for r in rows)[len(rows) // 2]
    print(f"median over {len(rows)} parameters: GPU vs emulation {med:.2e}, emulation vs BF16 {med_b:.2e}")


def read_losses(path: Path, key: str = "loss") -> dict[int, float]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get(key) is not None and "step" in rec:
                out[rec["step"]] = rec[key]
    return out


def run_all(a, overrides) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = a.variants.split(",")
    run_side_by_side({v: [sys.executable, __file__, "run", "--variant", v, "--out", str(out / v), "--preset", a.preset,
                          f"train.steps={a.steps}", *overrides] for v in variants}, out, a.timeout)
    curves = {v: read_losses(out / v / "metrics.jsonl") for v in variants}
    base = curves[variants[0]]
    for v in variants:
        final = read_losses(out / v / "metrics.jsonl", "val_bpb")
        if final:
            print(f"{v:5s} validation at step {max(final)}: {final[max(final)]:.4f} bits/byte")
        common = sorted(set(base) & set(curves[v]))
        if not common:
            print(f"{v:5s} no steps")
            continue
        for lo, hi in ((1, 100), (101, 200), (201, common[-1])):
            s = [i for i in common if lo <= i <= hi]
            if s:
                b = sum(base[i] for i in s) / len(s)
                q = sum(curves[v][i] for i in s) / len(s)
                print(f"{v:5s} steps {lo}-{s[-1]}: loss {q:.4f} vs {variants[0]} {b:.4f}: {100 * (q - b) / b:+.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["grads", "run", "all"])
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--out")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; the first is the baseline")
    ap.add_argument("--timeout", type=int, default=480)
    a, overrides = ap.parse_known_args()
    if a.mode == "grads":
        grads(a.preset)
        return
    if a.mode == "all":
        run_all(a, overrides)
        return
    from moeforge.cli import main as cli

    precision = patch(a.variant)
    sys.exit(cli(["train", "--preset", a.preset, "--precision", precision, "--out", a.out, "--no-progress",
                  "train.eval_every=0", "train.checkpoint_every=0", "train.sample_tokens=0", *overrides]))


if __name__ == "__main__":
    main()
