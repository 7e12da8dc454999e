"""Registers, spills and shared memory of the warp-specialised grouped FP8 GEMM (fp8/gluon_gemm.py),
compiled for Hopper (sm_90a) without a GPU.

    python benchmarks/kernel_registers.py [--rows 196608] [--hidden 2048] [--inter 1408] [--experts 64]

Triton's compiler targets sm_90a from any machine, and `ptxas -v` (the copy Triton ships) reports
what each variant of the kernel costs in registers: a variant that spills in its K loop is slow
whatever its tiles. The kernel is compiled as a launch would specialise it: integer arguments equal
to 1 become constants, multiples of 16 and the (16-byte aligned) pointers carry a divisibility
hint. Without them the compiler cannot vectorise the stores or fold the unit strides, and the
register counts differ from those of the kernel that runs.

"regs" is the kernel's register allocation (its `maxnreg`); the math warpgroups raise theirs to
MATH_REGS with setmaxnreg, and a spill is what did not fit in those.

Shapes: the experts' gate/up forward (rows x hidden -> 2 x inter per expert) and the weight gradient
of one of its two parts (inter x hidden per expert over all rows), as in the bench preset's step.
Needs Triton 3.6 with Gluon, no GPU.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

from moeforge.fp8 import gluon_gemm
from moeforge.fp8.kernels import WS_GROUPED_CONFIG, WS_WGRAD_CONFIG

SM90 = GPUTarget("cuda", 90, 32)


def launch_ints(part: str, cfg: dict, rows: int, hidden: int, inter: int, experts: int) -> dict:
    """The integer arguments kernels.grouped_gemm / grouped_wgrad pass for these shapes, and the K
    blocks of A's rows that the launch sees (a_k_blocks; the Wgrad's A holds every expert's token tiles)."""
    bm, bn, blk = cfg["BLOCK_M"], cfg["BLOCK_N"], 128
    if part == "forward":  # gate/up: K = hidden, N = 2 x inter, rows grouped by expert
        N, K = 2 * inter, hidden
        row_tiles = -(-rows // bm) + experts
        tiles = row_tiles * -(-N // bn)
        return dict(a_k_blocks=K // blk, n_groups=experts, M=rows, N=N, KB=K // blk, b_group_rows=N, stride_cg=0,
                    stride_cm=N, sa_sm=1, sa_sk=rows + blk * experts, sb_sg=-(-N // blk) * (K // blk),
                    sb_sn=K // blk, sb_sk=1, tiles_mn=tiles, n_tiles=tiles)
    # Wgrad of one part: [inter, hidden] per expert, K = the expert's tokens (grouped K)
    M, N = inter, hidden
    tiles_mn = -(-M // bm) * -(-N // bn)
    return dict(a_k_blocks=-(-rows // blk) + experts, n_groups=experts, M=M, N=N, KB=0, b_group_rows=0,
                stride_cg=M * N, stride_cm=N, sa_sm=1, sa_sk=2 * inter, sb_sg=0, sb_sn=1, sb_sk=hidden,
                tiles_mn=tiles_mn, n_tiles=tiles_mn * experts)


def compile_variant(part: str, cfg: dict, ints: dict):
    """The kernel of one configuration as a launch would build it -> (PTX, shared memory bytes)."""
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    wgrad = part != "forward"
    codes = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn, device="meta")
    scales = torch.empty(64, 4096, dtype=torch.float32, device="meta")
    out = torch.empty(4096, 4096, dtype=torch.float32 if wgrad else torch.bfloat16, device="meta")
    c_desc = gluon_gemm.out_descriptor(out, cfg, wgrad)  # as gluon_gemm.launch decides
    constexprs = gluon_gemm.kernel_options(cfg, k_blocks=ints["a_k_blocks"], b_block=not wgrad, scale_tma=wgrad,
                                           store_tma=c_desc is not None)
    maxnreg = constexprs.pop("maxnreg")
    constexprs.update({"B_BLOCK": not wgrad, "GROUP_M_ROWS": not wgrad, "GROUP_K": wgrad,
                       "G_P2": 2 if wgrad else triton.next_power_of_2(max(ints["n_groups"], 2))})
    tensors = {"a_desc": gluon_gemm.descriptor(codes, bm), "b_desc": gluon_gemm.descriptor(codes, bn),
               "c_ptr": out,
               "sa_ptr": scales, "sb_ptr": scales, "tiles_ptr": torch.empty(1, dtype=torch.int32, device="meta"),
               "offs_ptr": torch.empty(1, dtype=torch.int32, device="meta"),
               "sa_desc": gluon_gemm.scale_descriptor(scales, bm), "sb_desc": gluon_gemm.scale_descriptor(scales, bn)}
    tensors["c_desc"] = c_desc or tensors["sa_desc"]
    fn = gluon_gemm._ws_gemm_kernel
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name == "num_warps":
            continue
        if name in constexprs or (name not in tensors and name not in ints):
            signature[name] = "constexpr"
            consts[(i,)] = constexprs.get(name, fn.params[i].default)
        elif name in tensors:
            signature[name] = mangle_type(tensors[name])
            if signature[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:
            signature[name] = "constexpr"
            consts[(i,)] = 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(GluonASTSource(fn, signature, consts, attrs), target=SM90,
                            options={"num_warps": 4, "maxnreg": maxnreg})
    return kernel.asm["ptx"], kernel.metadata.shared, maxnreg


def ptxas_report(ptx: str, maxnreg: int) -> dict:
    """`ptxas -v` on the PTX: registers, stack frame, spill bytes, and whether ptxas serialised the wgmmas."""
    with tempfile.TemporaryDirectory() as d:
        src, out = f"{d}/k.ptx", f"{d}/k.cubin"
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f"--maxrregcount={maxnreg}", src, "-o", out],
                           capture_output=True, text=True, check=True)
    text = r.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "stack": num(r"(\d+) bytes stack frame"),
            "spill stores": num(r"(\d+) bytes spill stores"), "spill loads": num(r"(\d+) bytes spill loads"),
            # ptxas waits for every wgmma before issuing the next when other instructions write the
            # registers of an accumulator in flight (its warning C7515)
            "wgmma serialized": "wgmma.mma_async instructions are serialized" in text}


def variants() -> dict:
    """(part, configuration) pairs: the defaults and the alternatives docs/fp8.md compares."""
    w256 = {**WS_GROUPED_CONFIG, "FOLD": False, "STORE_TMA": False}
    return {
        "forward, default (128 x 256, TMA store, turns)": ("forward", WS_GROUPED_CONFIG),
        "forward, 128 x 256, stores from registers": ("forward", {**WS_GROUPED_CONFIG, "STORE_TMA": False}),
        "forward, 128 x 128, 4 stages": ("forward", gluon_gemm.WS_CONFIG),
        "forward, 128 x 256, unfolded scales": ("forward", w256),
        "forward, default without turns": ("forward", {**WS_GROUPED_CONFIG, "TURN": 0}),
        "Wgrad, default (128 x 128, 4 stages, TMA store, pipelined)": ("wgrad", WS_WGRAD_CONFIG),
        "Wgrad, default, adding into .grad (TMA reduce)": ("wgrad", {**WS_WGRAD_CONFIG, "ACCUMULATE": True}),
        "Wgrad, 128 x 128, stores from registers": ("wgrad", {**WS_WGRAD_CONFIG, "STORE_TMA": False}),
        "Wgrad, the same, adding into .grad": ("wgrad", {**WS_WGRAD_CONFIG, "STORE_TMA": False, "ACCUMULATE": True}),
        "Wgrad, 128 x 256, 3 stages": ("wgrad", w256),
        "Wgrad, 128 x 128, 3 stages, not pipelined": ("wgrad", {**WS_WGRAD_CONFIG, "STAGES": 3, "PIPE": False}),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=196608, help="routed rows (tokens x top-k)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1408, help="an expert's intermediate size")
    ap.add_argument("--experts", type=int, default=64)
    a = ap.parse_args()
    print(f"{'variant':58s} {'regs':>5s} {'stack':>6s} {'spill st':>9s} {'spill ld':>9s} {'smem':>7s} "
          f"{'wgmma serialized':>16s}")
    for name, (part, cfg) in variants().items():
        ptx, smem, maxnreg = compile_variant(part, cfg, launch_ints(part, cfg, a.rows, a.hidden, a.inter, a.experts))
        r = ptxas_report(ptx, maxnreg)
        print(f"{name:58s} {r['registers']:5d} {r['stack']:6d} {r['spill stores']:9d} {r['spill loads']:9d} {smem:7d} "
              f"{'yes' if r['wgmma serialized'] else 'no':>16s}", flush=True)


if __name__ == "__main__":
    main()
