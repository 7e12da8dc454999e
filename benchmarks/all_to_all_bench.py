"""Expert all-to-all bandwidth: moeforge's dispatch and combine against a plain all_to_all and a copy.

    torchrun --nproc-per-node 8 benchmarks/all_to_all_bench.py [--tokens 4096] [--hidden 7168]
        [--experts 256] [--topk 8] [--json FILE]

Each rank routes `tokens` tokens of width `hidden` to `topk` of `experts` experts (uniformly at random,
distinct per token), and the experts are split evenly over the ranks (expert parallelism over all of
them). Timed, after warm-up, with the host synchronised around each measurement:
- dispatch (AllToAllDispatcher.start + finish: sort, count exchange, token all-to-all, reorder),
  in BF16 and with FP8 dispatch (1x128 scales);
- combine (reorder back, all-to-all back, weighted sum);
- dist.all_to_all_single of the same number of bytes in equal splits: the transport alone;
- on CUDA with two or more visible GPUs, rank 0's copy of 1 GiB from GPU 0 to GPU 1: the link.
Bandwidth per GPU = bytes this rank sends to other ranks / time (the slowest rank's time). On CPU
(gloo) it runs with small sizes as a check of the script, not as a measurement.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from moeforge.bench import report_numbers
from moeforge.parallel.expert import AllToAllDispatcher


def timed(fn, device, reps: int) -> float:
    """Seconds per call, the slowest rank's, after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = torch.tensor([(time.perf_counter() - t0) / reps], dtype=torch.float64, device=device)  # NCCL: on the GPU
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    if a.experts % world:
        raise SystemExit(f"--experts {a.experts} is not divisible by the {world} ranks")
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(a.tokens, a.hidden, generator=g).to(device, dtype)
    indices = torch.rand(a.tokens, a.experts, generator=g).topk(a.topk, dim=1).indices.to(device)
    weights = torch.full((a.tokens, a.topk), 1.0 / a.topk, device=device)
    E_l = a.experts // world
    off_rank = (indices // E_l != rank).sum().item()  # token copies this rank sends elsewhere
    out = {"ranks": world, "tokens": a.tokens, "hidden": a.hidden, "experts": a.experts, "topk": a.topk,
           "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    for name, fp8 in (("bf16" if cuda else "fp32", False), ("fp8", True)):
        d = AllToAllDispatcher(dist.group.WORLD, world, rank, fp8=fp8)
        with torch.no_grad():
            t_dispatch = timed(lambda: d.dispatch(x, indices, a.experts), device, a.reps)
            y, _, ctx = d.dispatch(x, indices, a.experts)
            t_combine = timed(lambda: d.combine(y, weights, ctx, a.tokens), device, a.reps)
        # bytes per token copy on the wire: FP8 values plus one FP32 scale per 128; else the dtype's
        row_bytes = a.hidden + 4 * -(-a.hidden // 128) if fp8 else a.hidden * x.element_size()
        sent = off_rank * row_bytes
        out[f"dispatch_{name}_ms"] = 1e3 * t_dispatch
        out[f"dispatch_{name}_GBps"] = sent / t_dispatch / 1e9
        if not fp8:  # the combine returns in the compute dtype either way
            out["combine_ms"] = 1e3 * t_combine
            out["combine_GBps"] = off_rank * a.hidden * x.element_size() / t_combine / 1e9
    n = a.tokens * a.topk * a.hidden * x.element_size() // world  # bytes per destination, equal splits
    buf = torch.empty(n * world, dtype=torch.uint8, device=device)
    recv = torch.empty_like(buf)
    t_raw = timed(lambda: dist.all_to_all_single(recv, buf), device, a.reps)
    out["all_to_all_ms"] = 1e3 * t_raw
    out["all_to_all_GBps"] = n * (world - 1) / t_raw / 1e9
    if cuda and torch.cuda.device_count() >= 2 and rank == 0:
        src = torch.empty(2**30, dtype=torch.uint8, device="cuda:0")
        dst = torch.empty(2**30, dtype=torch.uint8, device="cuda:1")
        dst.copy_(src)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        torch.cuda.synchronize()
        out["copy_gpu0_to_gpu1_GBps"] = 5 * 2**30 / (time.perf_counter() - t0) / 1e9
    if rank == 0:
        report_numbers(out, a.json)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
