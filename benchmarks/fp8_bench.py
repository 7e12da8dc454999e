"""FP8 GPU path benchmark (SM90): FP8Linear forward+backward vs BF16, raw GEMM TFLOP/s, quantiser
bandwidth, the grouped expert GEMM, a whole MoE layer, plus probes of torch._scaled_mm's blockwise rules and of the FP8
GEMMs' accumulation error. Times are medians of CUDA-event timings after warm-up
(triton.testing.do_bench, L2 flushed between runs).

    PYTHONPATH=src python benchmarks/fp8_bench.py                       # everything
    PYTHONPATH=src python benchmarks/fp8_bench.py --sections linear,gemm --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch

from moeforge.gpu_state import GPUMonitor, describe, summarize

SECTIONS = ("env", "probe", "accuracy", "quant", "qtiles", "gemm", "linear", "diag", "grouped", "tiles", "moe", "pad")
LINEAR_SHAPES = [(4096, 7168, 2048), (4096, 2048, 7168), (4096, 7168, 18432)]  # tokens, in, out
RESULTS: dict = {}


def bench(fn, warmup=25, rep=100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def record(out: dict, key: str, fn, flops: float, width: int = 52, ms_key: str = "ms") -> None:
    """Time fn (bench) and keep its time (under ms_key) and TFLOP/s under out[key], printing one
    line; a failure is kept and printed instead, and the section goes on."""
    try:
        ms = bench(fn)
        out[key] = {ms_key: ms, "TFLOP/s": flops / ms / 1e9}
        print(f"   {key:{width}s} {ms:8.3f} {ms_key}  {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
    except Exception as e:
        out[key] = f"error: {e}"[:300]
        print(f"   {key:{width}s} error: {type(e).__name__}: {str(e)[:200]}", flush=True)


def section(name):
    def deco(f):
        def run(args):
            t0 = time.time()
            print(f"\n== {name}", flush=True)
            try:
                RESULTS[name] = f(args)
            except Exception as e:  # keep going: one failing section must not lose the others
                traceback.print_exc()
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"   ({time.time() - t0:.1f}s)", flush=True)
        return run
    return deco


@section("env")
def s_env(args):
    import triton

    p = torch.cuda.get_device_properties(0)
    out = {"device": p.name, "sm": f"{p.major}.{p.minor}", "sms": p.multi_processor_count, "torch": torch.__version__,
           "cuda": torch.version.cuda, "triton": triton.__version__,
           "cublaslt": getattr(torch._C, "_cuda_getCompiledVersion", lambda: None)()}
    print(out)
    return out


# ---------------------------------------------------------------------------------------------
def _scale_layouts(xq, xs, wq, ws, kb_pad=None):
    """scale_a column-major [M, Kb]; scale_b whose .t() is row-major [Nb, Kb] (leading dim kb_pad)."""
    sa = xs.t().contiguous().t()
    Nb, Kb = ws.shape
    ld = kb_pad or Kb
    store = torch.zeros(Nb, ld, device=ws.device)
    store[:, :Kb] = ws
    sb = store[:, :Kb].t()
    return sa, sb


@section("probe")
def s_probe(args):
    """Which layouts/shapes torch._scaled_mm's blockwise modes accept here, and whether results are right."""
    from moeforge.fp8 import dequantize, quantize

    dev = torch.device("cuda")
    out = {}

    def case(name, M, K, N, b_kind="block", out_dtype=torch.bfloat16, kb_pad=None, fast=False):
        torch.manual_seed(0)
        x = torch.randn(M, K, device=dev)
        w = torch.randn(N, K, device=dev)
        xq, xs = quantize(x, (1, 128))
        if b_kind == "block":
            wq, ws = quantize(w, (128, 128))
            sa, sb = _scale_layouts(xq, xs, wq, ws, kb_pad)
            wh = dequantize(wq, ws, (128, 128))
        else:
            wq, ws = quantize(w, (1, 128))
            sa = xs.t().contiguous().t()
            sb = ws.t().contiguous()  # .t() is [N, Kb] with strides (1, N)
            wh = dequantize(wq, ws, (1, 128))
        ref = dequantize(xq, xs) @ wh.T
        mag = dequantize(xq, xs).abs() @ wh.abs().T
        try:
            y = torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=fast)
            torch.cuda.synchronize()
            err = float(((y.float() - ref).abs() / mag).max())
            res = f"ok  max |err|/sum|a||b| = {err:.3g}" + ("  WRONG" if err > 1e-2 else "")
        except Exception as e:
            res = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        out[name] = res
        print(f"   {name:58s} {res}", flush=True)

    case("1x128 x 128x128, M=256 K=1024 N=256, bf16 out", 256, 1024, 256)
    case("1x128 x 128x128, fp32 out", 256, 1024, 256, out_dtype=torch.float32)
    case("1x128 x 1x128, fp32 out", 256, 1024, 256, b_kind="row", out_dtype=torch.float32)
    case("1x128 x 128x128, K=384 (3 blocks), scale_b ld 3", 256, 384, 256)
    case("1x128 x 128x128, K=384 (3 blocks), scale_b ld 4", 256, 384, 256, kb_pad=4)
    case("1x128 x 1x128, K=384 (3 blocks)", 256, 384, 256, b_kind="row")
    case("1x128 x 1x128, K=640 (5 blocks)", 256, 640, 256, b_kind="row")
    case("1x128 x 128x128, M=150 (scale_a ld 150)", 150, 512, 256)
    case("1x128 x 1x128, M=150, N=136", 150, 512, 136, b_kind="row")
    case("1x128 x 128x128, N=136", 256, 512, 136)
    case("1x128 x 128x128, use_fast_accum=True", 256, 512, 256, fast=True)
    case("1x128 x 128x128, K=7168 M=N=2048 fp32 out", 2048, 7168, 2048, out_dtype=torch.float32)
    return out


@section("accuracy")
def s_accuracy(args):
    """Accumulation error of the FP8 GEMMs vs the FP32 product of the dequantised operands."""
    from moeforge.fp8 import kernels
    from moeforge.fp8.quant import dequantize

    out = {}
    for (M, K, N, bk) in [(2048, 7168, 2048, "block"), (2048, 18432, 1024, "block"), (2048, 16384, 2048, "row")]:
        torch.manual_seed(1)
        a, _ = kernels.quant_operands(torch.randn(M, K, device="cuda", dtype=torch.bfloat16))
        if bk == "block":
            b, _ = kernels.quant_block_operand(torch.randn(N, K, device="cuda") * 0.02)
            bh = dequantize(b.qv, b.sv, (128, 128))
        else:
            b, _ = kernels.quant_operands(torch.randn(N, K, device="cuda", dtype=torch.bfloat16))
            bh = dequantize(b.qv, b.sv, (1, 128))
        ah = dequantize(a.qv, a.sv, (1, 128))
        ref = (ah.double() @ bh.double().T)
        ref32 = ah @ bh.T
        mag = (ah.abs() @ bh.abs().T).double()
        r = {"fp32_sgemm": float(((ref32.double() - ref).abs() / mag).max())}
        for backend in ("cublas", "triton"):
            try:
                y = kernels.fp8_gemm(a, b, out_dtype=torch.float32, backend=backend).double()
                e = (y - ref).abs()
                r[backend] = {"max_err_over_sum_ab": float((e / mag).max()),
                              "rel_fro": float(e.norm() / ref.norm()),
                              "max_rel_to_max": float(e.max() / ref.abs().max())}
            except Exception as ex:
                r[backend] = f"error: {ex}"[:300]
        key = f"M={M} K={K} N={N} b={bk}"
        out[key] = r
        print(f"   {key}: {r}", flush=True)
    return out


@section("quant")
def s_quant(args):
    from moeforge.fp8 import kernels

    T, K = 4096, 7168
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(18432, 7168, device="cuda")
    out = {}

    def rec(name, fn, nbytes):
        ms = bench(fn)
        out[name] = {"ms": ms, "GB/s": nbytes / ms / 1e6}
        print(f"   {name:48s} {ms:8.4f} ms  {nbytes / ms / 1e6:7.0f} GB/s", flush=True)

    n = T * K
    rec("rows 1x128, bf16 4096x7168", lambda: kernels.quant_operands(x), n * 2 + n + n // 32)
    rec("cols^T 1x128, bf16 4096x7168", lambda: kernels.quant_operands(x, rows=False, cols=True), n * 2 + n + n // 32)
    rec("rows + cols^T (one pass), bf16 4096x7168", lambda: kernels.quant_operands(x, rows=True, cols=True),
        n * 2 + 2 * n + n // 16)
    nw = w.numel()
    rec("128x128 (+transposed), fp32 18432x7168", lambda: kernels.quant_block_operand(w, transpose=True), nw * 4 + 2 * nw)
    rec("128x128, fp32 18432x7168", lambda: kernels.quant_block_operand(w), nw * 4 + nw)
    rec("torch copy bf16 4096x7168 (reference)", lambda: x.clone(), n * 4)
    return out


@section("qtiles")
def s_qtiles(args):
    """Tile sweep of the 1x128 quantiser at the bench preset's shapes (32k tokens x 2048 for a Linear,
    98k routed rows x 2048 / 2816 for the experts), each variant's bytes checked against the default's.
    The transposed ("cols") output is swept for both of its kernels: Triton ([128, BC] tiles) and,
    where Gluon is available, Gluon ([128, BC] tiles, TPT rows per thread once transposed)."""
    from moeforge.fp8 import kernels

    torch.manual_seed(0)
    shapes = {"32768x2048": (32768, 2048), "98304x2048": (98304, 2048), "98304x2816": (98304, 2816)}
    variants = [("rows", "triton", {"BR": br, "num_warps": nw}) for br in (32, 64, 128) for nw in (4, 8)]
    variants += [("cols", "triton", {"BC": bc, "num_warps": nw}) for bc in (32, 64, 128) for nw in (4, 8)]
    if kernels._gluon_quant is not None:
        variants += [("cols", "gluon", {"BC": bc, "num_warps": nw, "TPT": tpt})
                     for bc in (32, 64, 128) for nw in (4, 8) for tpt in (16, 32) if bc >= nw * tpt // 4]
    gluon_cfg = kernels._gluon_quant.QUANT_COLS_GLUON_CONFIG if kernels._gluon_quant is not None else {}
    keep = dict(kernels.QUANT_ROWS_CONFIG), dict(kernels.QUANT_COLS_CONFIG), dict(gluon_cfg), dict(kernels.QUANT_COLS_KERNEL)

    def restore():
        kernels.QUANT_ROWS_CONFIG.update(keep[0])
        kernels.QUANT_COLS_CONFIG.update(keep[1])
        gluon_cfg.update(keep[2])
        kernels.QUANT_COLS_KERNEL.update(keep[3])

    out = {}
    for sname, (R, C) in shapes.items():
        x = torch.randn(R, C, device="cuda", dtype=torch.bfloat16)
        n = R * C
        nbytes = n * 2 + n + n // 32
        refs = {}
        for kind, kernel, tile in variants:
            def run():
                return kernels.quant_operands(x, rows=kind == "rows", cols=kind == "cols")[kind == "cols"]
            restore()
            if kind not in refs:
                refs[kind] = run()  # the defaults
            ref = refs[kind]
            if kind == "cols":
                kernels.QUANT_COLS_KERNEL["name"] = kernel
            (gluon_cfg if kernel == "gluon" else kernels.QUANT_ROWS_CONFIG if kind == "rows"
             else kernels.QUANT_COLS_CONFIG).update(tile)
            got = run()
            same = torch.equal(got.q.view(torch.uint8), ref.q.view(torch.uint8)) and torch.equal(got.s_store, ref.s_store)
            ms = bench(run)
            key = f"{sname} {kind} {kernel} " + " ".join(f"{k} {v}" for k, v in tile.items())
            out[key] = {"ms": ms, "GB/s": nbytes / ms / 1e6, "bit-exact": same}
            print(f"   {key:58s} {ms:8.4f} ms {nbytes / ms / 1e6:6.0f} GB/s {'ok' if same else 'DIFFERENT'}", flush=True)
        restore()
    return out


@section("gemm")
def s_gemm(args):
    from moeforge.fp8 import kernels

    S = 8192
    flops = 2 * S ** 3
    a_bf = torch.randn(S, S, device="cuda", dtype=torch.bfloat16)
    b_bf = torch.randn(S, S, device="cuda", dtype=torch.bfloat16)
    a, _ = kernels.quant_operands(a_bf)
    bw, _ = kernels.quant_block_operand(b_bf)
    br, _ = kernels.quant_operands(b_bf)
    out = {}

    def rec(name, fn):
        record(out, name, fn, flops)

    rec("bf16 torch.mm", lambda: a_bf @ b_bf.T)
    rec("fp8 _scaled_mm 1x128 x 128x128 (cuBLAS)", lambda: kernels.fp8_gemm(a, bw, backend="cublas"))
    rec("fp8 _scaled_mm 1x128 x 1x128 (cuBLAS)", lambda: kernels.fp8_gemm(a, br, backend="cublas"))
    sa_row = torch.ones(S, 1, device="cuda")
    sb_row = torch.ones(1, S, device="cuda")
    rec("fp8 _scaled_mm row-wise, fast accum (no blocks)",
        lambda: torch._scaled_mm(a.q, br.q.t(), scale_a=sa_row, scale_b=sb_row, out_dtype=torch.bfloat16,
                                 use_fast_accum=True))
    for cfg in ({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
                {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
                {"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
                {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}):
        tag = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
        rec(f"fp8 Triton blockwise 1x128 x 128x128 {tag}", lambda cfg=cfg: kernels.fp8_gemm(a, bw, backend="triton", config=cfg))
    return out


@section("linear")
def s_linear(args):
    from torch import nn

    from moeforge.fp8 import FP8Linear, kernels, weight_cache

    out = {}
    for T, K, N in LINEAR_SHAPES:
        flops = 6 * T * K * N
        row = {}
        for wdtype, label in ((torch.bfloat16, "bf16 weights"), (torch.float32, "fp32 master + autocast")):
            torch.manual_seed(0)
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
            mods = {"bf16": nn.Linear(K, N, bias=False, device="cuda", dtype=wdtype),
                    "fp8": FP8Linear(K, N, bias=False, device="cuda", dtype=wdtype)}
            for name, mod in mods.items():
                for backend in (("cublas",) if name == "fp8" else ("-",)):
                    if name == "fp8":
                        kernels.set_gemm_backend(backend)

                    def step(mod=mod):
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=wdtype == torch.float32):
                            y = mod(x)
                        y.backward(g)
                        mod.weight.grad = None
                        x.grad = None

                    def fwd(mod=mod):
                        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=wdtype == torch.float32):
                            mod(x)

                    key = f"{label} | {name}" + (f" ({backend})" if name == "fp8" else "")
                    try:
                        ms = bench(step)
                        ms_f = bench(fwd)
                        row[key] = {"fwd+bwd ms": ms, "fwd ms": ms_f, "TFLOP/s": flops / ms / 1e9}
                        if name == "fp8":  # as in gradient accumulation: W quantised once per optimizer step
                            with weight_cache():
                                ms, ms_f = bench(step), bench(fwd)
                            row[key + ", W once per step"] = {"fwd+bwd ms": ms, "fwd ms": ms_f,
                                                              "TFLOP/s": flops / ms / 1e9}
                    except Exception as e:
                        row[key] = f"error: {e}"[:300]
                        traceback.print_exc()
            kernels.set_gemm_backend("cublas")
        base = {lab: row.get(f"{lab} | bf16", {}).get("fwd+bwd ms") for lab in ("bf16 weights", "fp32 master + autocast")}
        for k, v in row.items():
            if isinstance(v, dict):
                b = base[k.split(" | ")[0]]
                v["speedup"] = b / v["fwd+bwd ms"] if b else None
                print(f"   {T}x{K}->{N}  {k:45s} fwd+bwd {v['fwd+bwd ms']:7.3f} ms  fwd {v['fwd ms']:7.3f} ms  "
                      f"{v['TFLOP/s']:6.1f} TFLOP/s  x{v['speedup']:.2f}", flush=True)
            else:
                print(f"   {T}x{K}->{N}  {k}: {v}", flush=True)
        out[f"{T}x{K}->{N}"] = row
    out["check vs reference"] = _check_linear()
    return out


def _check_linear(T=4096, K=7168, N=2048):
    """After the timed loops (cached kernel launches): the GPU path against the reference emulation."""
    from moeforge.fp8 import FP8Recipe, gpu
    from moeforge.fp8.linear import _FP8LinearFn

    torch.manual_seed(3)
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda") * 0.02
    g = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
    res = []
    for fn in (gpu.fp8_linear, _FP8LinearFn.apply):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, FP8Recipe(), None, "weight", wi)
        y.backward(g)
        res.append((y.float(), xi.grad.float(), wi.grad.float()))
    rel = {n: float((a - b).detach().norm() / b.detach().norm()) for n, a, b in zip(("y", "dx", "dW"), *res)}
    print(f"   GPU path vs reference emulation (4096x7168->2048, rel. Frobenius error): {rel}", flush=True)
    return rel


def _host_and_graph(step, n=30):
    """(host ms per call while the GPU runs behind, wall ms per call with a final sync, CUDA-graph replay ms)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    host, wall = (t1 - t0) / n * 1e3, (t2 - t0) / n * 1e3
    graph_ms = None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        graph_ms = bench(g.replay)
    except Exception as e:
        graph_ms = f"error: {type(e).__name__}: {str(e)[:200]}"
    return host, wall, graph_ms


@section("diag")
def s_diag(args):
    """Where the time of FP8 Linear fwd+bwd goes: each kernel alone (GPU time), the host's time per
    step (Python, autograd, launches), and the GPU-only time of the whole step (CUDA-graph replay)."""
    from torch import nn

    from moeforge.fp8 import FP8Linear, kernels, weight_cache

    out = {}
    for T, K, N in LINEAR_SHAPES:
        torch.manual_seed(0)
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        xa, _ = kernels.quant_operands(x.detach())
        wa, wt = kernels.quant_block_operand(w, transpose=True)
        ga, gt = kernels.quant_operands(g, rows=True, cols=True)
        _, xt = kernels.quant_operands(x.detach(), rows=False, cols=True)
        parts = {
            "quant x (rows + cols^T)": lambda: kernels.quant_operands(x.detach(), rows=True, cols=True),
            "quant W (128x128 + W^T)": lambda: kernels.quant_block_operand(w, transpose=True),
            "Fprop GEMM": lambda: kernels.fp8_gemm(xa, wa),
            "quant dy (rows + cols^T)": lambda: kernels.quant_operands(g, rows=True, cols=True),
            "Dgrad GEMM": lambda: kernels.fp8_gemm(ga, wt),
            "Wgrad GEMM": lambda: kernels.fp8_gemm(gt, xt),
        }
        row = {k: bench(f, warmup=10, rep=40) for k, f in parts.items()}
        row["sum of parts"] = sum(row.values())
        for k, f in parts.items():  # host time per call (issue only; the GPU runs behind)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                f()
            row[f"host ms/call: {k}"] = (time.perf_counter() - t0) / 20 * 1e3
            torch.cuda.synchronize()
        for name, mod in (("bf16", nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)),
                          ("fp8", FP8Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16))):
            def step(mod=mod):
                y = mod(x)
                y.backward(g)
                mod.weight.grad = None
                x.grad = None
            host, wall, graph_ms = _host_and_graph(step)
            row[f"{name} step: host ms/step"] = host
            row[f"{name} step: wall ms/step"] = wall
            row[f"{name} step: CUDA-graph replay ms"] = graph_ms
            if name == "fp8":  # W quantised once per optimizer step (gradient accumulation, prefetch)
                with weight_cache():
                    host, wall, graph_ms = _host_and_graph(step)
                row["fp8, W once per step: host ms/step"] = host
                row["fp8, W once per step: CUDA-graph replay ms"] = graph_ms
        key = f"{T}x{K}->{N}"
        out[key] = row
        for k, v in row.items():
            print(f"   {key:18s} {k:36s} " + (f"{v:8.4f} ms" if isinstance(v, float) else str(v)), flush=True)
    return out


@section("grouped")
def s_grouped(args):
    from moeforge.fp8 import FP8Recipe, gpu
    from moeforge.model.moe import grouped_mm

    E, D, I = 8, 7168, 2048
    torch.manual_seed(0)
    counts = torch.multinomial(torch.ones(E), 32768, replacement=True).bincount(minlength=E)
    offsets = counts.cumsum(0).to(torch.int32).cuda()
    R = int(counts.sum())
    x = torch.randn(R, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(R, I, device="cuda", dtype=torch.bfloat16)
    w32 = (torch.randn(E, I, D, device="cuda") * 0.02).requires_grad_()
    wbf = w32.detach().to(torch.bfloat16).requires_grad_()
    flops = 6 * R * D * I
    out = {"experts": E, "rows": R, "in": D, "out": I}

    def fp8_step():
        y = gpu.fp8_grouped(x, offsets, FP8Recipe(), None, None, w32)
        y.backward(g)
        x.grad = None
        w32.grad = None

    def bf16_step():
        y = grouped_mm(x, wbf.transpose(1, 2), offsets)
        y.backward(g)
        x.grad = None
        wbf.grad = None

    for name, fn in (("bf16 grouped_mm", bf16_step), ("fp8 grouped (Triton)", fp8_step)):
        record(out, name, fn, flops, width=28, ms_key="fwd+bwd ms")
    return out


@section("tiles")
def s_tiles(args):
    """Tile configurations of the grouped FP8 GEMM (Fprop/Dgrad `grouped_gemm`, Wgrad `grouped_wgrad`)
    at MoE shapes; every variant's output is compared with the untuned kernel's (relative Frobenius)."""
    from moeforge.fp8.gluon_gemm import WS_CONFIG
    from moeforge.fp8.kernels import (BLOCK, GEMM_CONFIG, TRITON_GROUPED_CONFIG, TRITON_WGRAD_CONFIG, group_layout,
                                      grouped_gemm, grouped_wgrad, quant_block_operand, quant_operands)

    plain = {k: v for k, v in GEMM_CONFIG.items() if k != "FOLD"}  # 128x128 tiles, 8 warps, 4 stages
    ws = {**WS_CONFIG, "FOLD": True}
    w256 = {**ws, "BLOCK_N": 256, "MATH_REGS": 240, "LOAD_REGS": 24}
    ws_variants = {"ws 128x128, 4 stages": ws, "ws 128x256, 3 stages": {**w256, "STAGES": 3},
                   "ws 128x256, 4 stages": w256,
                   "ws 128x256, probe: no scales (wrong results)": {**w256, "PROMOTE": False}}
    only = getattr(args, "tile_variants", None)
    variants = {
        "fwd": {"triton (64 x 128 tiles)": TRITON_GROUPED_CONFIG, **ws_variants,
                "ws 128x256, 3 stages, TMA store": {**w256, "STAGES": 3, "STORE_TMA": True},
                **{f"ws 128x256, 3 stages, TMA store, turns at {w}": {**w256, "STAGES": 3, "STORE_TMA": True,
                                                                      "TURN": n}
                   for n, w in ((1, "issue"), (2, "completion"))},
                "ws 128x256, turns at issue, probe: no scales": {**w256, "STAGES": 3, "STORE_TMA": True, "TURN": 1,
                                                                 "PROMOTE": False}},
        "wgrad": {"triton (64 x 128 tiles)": TRITON_WGRAD_CONFIG, **ws_variants,
                  **{f"ws 128x128, {n} stages": {**ws, "FOLD": False, "STAGES": n} for n in (3, 5, 6)},
                  "ws 128x128, 3 stages, TMA store": {**ws, "FOLD": False, "STAGES": 3, "STORE_TMA": True},
                  **{f"ws 128x128, 3 stages, TMA store, turns at {w}": {**ws, "FOLD": False, "STAGES": 3,
                                                                        "STORE_TMA": True, "TURN": n}
                     for n, w in ((1, "issue"), (2, "completion"))}},
    }
    if not only:
        variants["fwd"].update({"128 rows, unfolded": plain, "128 rows, folded": {**plain, "FOLD": True}})
        variants["wgrad"]["128 rows, 8 warps"] = plain
    out = {}
    for name, (E, R, K, N) in {"64 experts, 2048 -> 1408": (64, 98304, 2048, 1408),
                               "64 experts, 1408 -> 2048": (64, 98304, 1408, 2048),
                               "64 experts, 196,608 rows, 2048 -> 2816": (64, 196608, 2048, 2816),
                               "64 experts, 196,608 rows, 1408 -> 2048": (64, 196608, 1408, 2048),
                               "8 experts, 7168 -> 2048": (8, 32768, 7168, 2048)}.items():
        torch.manual_seed(0)
        counts = torch.multinomial(torch.ones(E), R, replacement=True).bincount(minlength=E)
        offsets = counts.cumsum(0).to(torch.int32).cuda()
        x = torch.randn(R, K, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(R, N, device="cuda", dtype=torch.bfloat16)
        xa, _ = quant_operands(x, rows=True)
        wa, _ = quant_block_operand(torch.randn(E, N, K, device="cuda") * 0.02)
        tiles, offs = group_layout(offsets, BLOCK)
        seg = (tiles, offs, -(-R // BLOCK) + tiles.numel())
        _, gt = quant_operands(g, rows=False, cols=True, segments=seg)
        _, xt = quant_operands(x, rows=False, cols=True, segments=seg)
        calls = {"fwd": lambda c: grouped_gemm(xa, wa, offsets, torch.bfloat16, config=c),
                 "wgrad": lambda c: grouped_wgrad(gt, xt, tiles, torch.float32, config=c)}
        wb = (torch.randn(E, N, K, device="cuda") * 0.02).to(torch.bfloat16)
        try:
            ms = bench(lambda: torch._grouped_mm(x, wb.transpose(1, 2), offs=offsets))
            out[f"{name}, fwd, bf16 grouped_mm"] = {"ms": ms, "TFLOP/s": 2 * R * K * N / ms / 1e9}
            print(f"   {name + ', fwd, bf16 grouped_mm':58s} {ms:7.3f} ms {2 * R * K * N / ms / 1e9:7.1f} TFLOP/s",
                  flush=True)
        except Exception as e:
            out[f"{name}, fwd, bf16 grouped_mm"] = f"error: {e}"[:300]
        for part, confs in variants.items():
            ref = calls[part](plain).float()
            for cname, cfg in confs.items():
                key = f"{name}, {part}, {cname}"
                try:
                    err = float((calls[part](cfg).float() - ref).norm() / ref.norm())
                    ms = bench(lambda cfg=cfg: calls[part](cfg))
                    out[key] = {"ms": ms, "TFLOP/s": 2 * R * K * N / ms / 1e9, "rel_err_vs_untuned": err}
                    print(f"   {key:58s} {ms:7.3f} ms {2 * R * K * N / ms / 1e9:7.1f} TFLOP/s  (vs untuned {err:.1e})",
                          flush=True)
                except Exception as e:
                    out[key] = f"error: {e}"[:300]
                    print(f"   {key:58s} failed: {type(e).__name__}", flush=True)
    return out


# (preset, GEMM, reduction, output): the FP8 GEMMs of the `small` and `bench` presets whose reduction
# dimension is not a multiple of 512 (Fprop: the Linear's input width; Dgrad: its output width)
PAD_LINEARS = [
    ("small", "wq_a fprop", 768, 384), ("small", "wkv_a fprop", 768, 288),
    ("small", "wo fprop", 768, 768), ("small", "dense w13 fprop", 768, 4096),
    ("small", "wq_b fprop", 384, 1152), ("small", "wkv_b fprop", 256, 1536),
    ("small", "shared w2 fprop", 256, 768), ("small", "wq_a dgrad", 384, 768),
    ("small", "wkv_a dgrad", 288, 768), ("small", "wo / w2 dgrad", 768, 768),
    ("small", "wq_b dgrad", 1152, 384), ("small", "wkv_b dgrad", 1536, 256),
    ("bench", "wkv_a dgrad", 576, 2048), ("bench", "shared w2 fprop", 2816, 2048),
    ("bench", "shared w13 dgrad", 5632, 2048),
]
# (preset, GEMM, experts, rows, reduction, output): the routed experts' grouped GEMMs of the same kind
PAD_EXPERTS = [
    ("small", "w13 fprop", 16, 131072, 768, 512), ("small", "w2 fprop", 16, 131072, 256, 768),
    ("small", "w2 dgrad", 16, 131072, 768, 256),
    ("bench", "w2 fprop", 64, 196608, 1408, 2048), ("bench", "w13 dgrad", 64, 196608, 2816, 2048),
]


@section("pad")
def s_pad(args):
    """GEMMs over a reduction dimension that is not a multiple of 512: cuBLAS on operands zero-padded
    to 512 (the only padding it runs right) against the grouped kernel on operands padded to whole
    128-blocks (one group for a Linear, fp8.kernels.linear_pad), and the experts' grouped GEMM both
    ways; BF16 torch.mm / grouped_mm for scale. TFLOP/s count the unpadded FLOPs."""
    from moeforge.fp8.kernels import (GROUPED_RED_PAD, RED_PAD, fp8_gemm, grouped_gemm, quant_block_operand,
                                      quant_operands)

    out = {}

    def rec(key, fn, flops):
        record(out, key, fn, flops, width=64)

    T = 32768
    for preset, name, K, N in PAD_LINEARS:
        torch.manual_seed(0)
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda") * 0.02
        ops = {}
        for pad, backend in ((RED_PAD, "cublas"), (GROUPED_RED_PAD, "grouped")):
            xa, _ = quant_operands(x, red_pad=pad)
            wa, _ = quant_block_operand(w, red_pad=pad)
            ops[backend] = (xa, wa)
        key = f"{preset} {name}, {T} x {K} -> {N}"
        y = {b: fp8_gemm(*ops[b], out_dtype=torch.float32, backend=b) for b in ops}
        err = float((y["grouped"] - y["cublas"]).norm() / y["cublas"].norm())
        print(f"   {key}: grouped vs cublas relative difference {err:.1e}", flush=True)
        out[f"{key}, rel diff"] = err
        wb = w.to(torch.bfloat16)
        rec(f"{key}, bf16 mm", lambda: x @ wb.T, 2 * T * K * N)
        for b in ops:
            rec(f"{key}, fp8 {b} (pad {RED_PAD if b == 'cublas' else GROUPED_RED_PAD})",
                lambda b=b: fp8_gemm(*ops[b], out_dtype=torch.bfloat16, backend=b), 2 * T * K * N)
    for preset, name, E, R, K, N in PAD_EXPERTS:
        torch.manual_seed(0)
        counts = torch.multinomial(torch.ones(E), R, replacement=True).bincount(minlength=E)
        offsets = counts.cumsum(0).to(torch.int32).cuda()
        x = torch.randn(R, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device="cuda") * 0.02
        key = f"{preset} experts {name}, {E} x {R} rows, {K} -> {N}"
        wb = w.to(torch.bfloat16)
        rec(f"{key}, bf16 grouped_mm", lambda: torch._grouped_mm(x, wb.transpose(1, 2), offs=offsets), 2 * R * K * N)
        for pad in (RED_PAD, GROUPED_RED_PAD):
            xa, _ = quant_operands(x, red_pad=pad)
            wa, _ = quant_block_operand(w, red_pad=pad)
            rec(f"{key}, fp8 pad {pad}", lambda xa=xa, wa=wa: grouped_gemm(xa, wa, offsets, torch.bfloat16),
                2 * R * K * N)
    return out


def moe_layer_step(precision: str, tokens: int, device: str, overrides=()):
    """One MoE layer of the bench preset (64 routed experts of 1408, top 6, 2 shared, hidden 2048),
    forward + backward on `tokens` tokens under BF16 autocast, its Linears and experts in FP8 when
    precision is "fp8". Returns (step function, model FLOPs of one step)."""
    from moeforge.config import load_config
    from moeforge.fp8 import convert_to_fp8
    from moeforge.model.moe import MoE

    m = load_config("bench", None, list(overrides)).model
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([MoE(m)])  # convert_to_fp8 converts what is under `layers`
    for p_ in holder.parameters():
        torch.nn.init.normal_(p_, std=0.02)
    if precision == "fp8":
        convert_to_fp8(holder)
    holder.to(device)
    layer = holder.layers[0]
    x = torch.randn(1, tokens, m.hidden_size, device=device, requires_grad=True)
    g = torch.randn(1, tokens, m.hidden_size, device=device)
    active = m.num_experts_per_tok + m.n_shared_experts
    flops = 6 * tokens * m.hidden_size * m.moe_intermediate_size * 3 * active  # router not counted

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            y, _ = layer(x)
        y.backward(g)
        x.grad = None
        for p_ in layer.parameters():
            p_.grad = None

    return step, flops


@section("moe")
def s_moe(args):
    """The issue's MoE-layer comparison: 16k tokens through one bench-preset MoE layer, FP32 master
    weights, BF16 autocast; BF16 grouped_mm against the FP8 path (Linears + grouped FP8 GEMMs).
    Both layers are built once and timed in alternating rounds (which goes first alternates too), so
    that a drift of the GPU's clocks during the run reaches both; the medians over the rounds give the
    speedup, and the rounds' own ratios show its spread. The GPU's SM clock and power during the rounds
    are sampled every 10 ms while each round is timed (nvidia-smi; each round shows its SM clock's
    range): the layer runs at the H200's power cap, and its clock moves."""
    out = {"tokens": 16384, "rounds": args.moe_rounds}
    steps, flops = {}, {}
    for precision in ("bf16", "fp8"):
        steps[precision], flops[precision] = moe_layer_step(precision, 16384, "cuda")
    for precision in ("bf16", "fp8"):  # (Triton's compilation out of the sampled windows)
        steps[precision]()
    torch.cuda.synchronize()
    times, clocks, samples = {"bf16": [], "fp8": []}, {"bf16": [], "fp8": []}, []
    for r in range(args.moe_rounds):
        for precision in (("bf16", "fp8") if r % 2 == 0 else ("fp8", "bf16")):
            with GPUMonitor(torch.device("cuda"), interval_ms=10) as monitor:
                times[precision].append(bench(steps[precision]))
            samples.extend(monitor.samples)
            last = monitor.state()
            clocks[precision].append((last or {}).get("sm_mhz"))  # (min, median, max) or None
        mhz = {p: f" ({clocks[p][-1][0]:,.0f}-{clocks[p][-1][2]:,.0f} MHz)" if clocks[p][-1] else "" for p in clocks}
        print(f"   round {r + 1}: bf16 {times['bf16'][-1]:7.3f} ms{mhz['bf16']}  fp8 {times['fp8'][-1]:7.3f} ms"
              f"{mhz['fp8']}  {times['bf16'][-1] / times['fp8'][-1]:.2f}x", flush=True)
    out["gpu"] = summarize(samples) if samples else last  # (no samples: why, from the last window)
    out["round SM MHz (min, median, max)"] = clocks
    print(f"   GPU during the rounds: {describe(out['gpu'])}", flush=True)
    for precision in ("bf16", "fp8"):
        ms = statistics.median(times[precision])
        out[precision] = {"fwd+bwd ms": ms, "TFLOP/s": flops[precision] / ms / 1e9, "rounds ms": times[precision]}
        print(f"   {precision}: fwd+bwd {ms:7.3f} ms  {flops[precision] / ms / 1e9:6.1f} TFLOP/s  (median of "
              f"{args.moe_rounds}; {min(times[precision]):.3f}-{max(times[precision]):.3f})", flush=True)
    ratios = [b / f for b, f in zip(times["bf16"], times["fp8"])]
    out["fp8 speedup"] = out["bf16"]["fwd+bwd ms"] / out["fp8"]["fwd+bwd ms"]
    out["round speedups"] = ratios
    print(f"   FP8 / BF16 speedup: {out['fp8 speedup']:.2f}x (the medians; rounds {min(ratios):.2f}-"
          f"{max(ratios):.2f}x)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--tile-variants", action="store_true",
                    help="tiles: only the defaults and the warp-specialised variants")
    ap.add_argument("--moe-rounds", type=int, default=5, help="moe: alternating timing rounds of the two layers")
    ap.add_argument("--grouped", choices=("default", "triton", "ws"), default="default",
                    help="the grouped GEMMs' kernel for every section: Triton or warp-specialised Gluon")
    args = ap.parse_args(argv)
    if args.moe_rounds < 1:
        ap.error("--moe-rounds must be at least 1")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (SM90)", file=sys.stderr)
        return 2
    if args.grouped != "default":
        from moeforge.fp8 import kernels
        kernels.set_grouped_kernel(args.grouped)
    runners = {"env": s_env, "probe": s_probe, "accuracy": s_accuracy, "quant": s_quant, "gemm": s_gemm,
               "linear": s_linear, "diag": s_diag, "grouped": s_grouped, "tiles": s_tiles, "moe": s_moe,
               "qtiles": s_qtiles, "pad": s_pad}
    for name in args.sections.split(","):
        runners[name](args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
