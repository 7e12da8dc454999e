"""Pipeline bubble: the measured idle share of a pipeline step against the report's Table 2.

    torchrun --nproc-per-node PP benchmarks/pipeline_bubble.py --schedule 1f1b|zbv|dualpipev \\
        [--preset small] [--micro-batches N] [--json FILE] [key=value ...]

N micro-batches of train.micro_batch_size sequences (1 unless given as an override).

On every rank:
1. The isolated cost of one micro-batch through this rank's stages, without communication:
   - F: the forward;
   - B: the backward for the input gradients only;
   - W = (full backward) - B: the weight gradients.
   The last stage's F includes the head and loss, as in the schedule.
2. The time T of a whole pipeline step of N micro-batches (the trainer's `pipeline_train_step`).
3. The bubble fraction 1 - N (F + B + W) / T, which also counts the send/receive time.

The report's bubble formulas (DeepSeek-V3 Table 2, in units of one stage's chunk) are evaluated with
the measured F, B, W. The slowest rank's numbers are printed.
- 1F1B: (PP - 1)(F + B);
- ZB1P: (PP - 1)(F + B - 2W);
- DualPipe: (PP/2 - 1)(F&B + B - 3W), with F&B = F + B overlapped.
A V schedule puts two stages on each rank; its F, B and W are the two stages' sum.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from moeforge import parallel
from moeforge.bench import report_numbers
from moeforge.config import load_config
from moeforge.parallel import pipeline
from moeforge.train.step import build_train_model, resolve_precision, split_train_pipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_costs(stages, factory, cfg, device, reps: int = 3) -> tuple[float, float, float]:
    """(F, B, W) seconds of one micro-batch through this rank's stages, run on their own."""
    m, B, S = cfg.model, factory.micro_batch, factory.seq_len
    F_t = B_t = full_t = 0.0
    for st in stages:
        mod = st.submod
        for rep in range(reps + 1):  # the first round warms up
            if mod.is_first:
                inputs = [torch.randint(0, m.vocab_size, (B, S), device=device)]
            else:
                extra = m.num_nextn_predict_layers if factory.mode == "forwarded" else 0
                inputs = [torch.randn(B, S, m.hidden_size, device=device, requires_grad=True),
                          torch.zeros((), device=device, requires_grad=True),
                          *(torch.randn(B, S, m.hidden_size, device=device, requires_grad=True) for _ in range(extra))]
            kwargs = {"mtp_tokens": torch.randint(0, m.vocab_size, (B, S), device=device)} \
                if mod.is_last and factory.mode == "shared" else {}
            grads_in = [t for t in inputs if t.requires_grad]
            _sync(device)
            t0 = time.perf_counter()
            out = mod(*inputs, **kwargs)
            if mod.is_last:
                out = factory.loss(out, torch.randint(0, m.vocab_size, (B, S), device=device))
                outs, seeds = [out], [torch.ones_like(out)]
            else:
                outs = [o for o in out if o.requires_grad]
                seeds = [torch.ones_like(o) for o in outs]
            _sync(device)
            t1 = time.perf_counter()
            if grads_in:  # input gradients only
                torch.autograd.grad(outs, grads_in, seeds, retain_graph=True)
            _sync(device)
            t2 = time.perf_counter()
            torch.autograd.backward(outs, seeds)  # input and weight gradients
            _sync(device)
            t3 = time.perf_counter()
            mod.zero_grad(set_to_none=True)
            factory.loss.records.clear()
            if rep == 0:
                continue
            F_t += (t1 - t0) / reps
            B_t += (t2 - t1) / reps
            full_t += (t3 - t2) / reps
    return F_t, B_t, max(0.0, full_t - B_t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedule", default="1f1b", choices=["1f1b", "zbv", "dualpipev", "interleaved1f1b"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # micro-batches of 1 sequence unless the overrides set train.micro_batch_size
    micro = load_config(a.preset, None, ["train.micro_batch_size=1", *a.overrides]).train.micro_batch_size
    cfg = load_config(a.preset, None, [*a.overrides, f"parallel.pp={world}", f"parallel.schedule={a.schedule}",
                                       f"train.batch_size={a.micro_batches * micro}", f"train.micro_batch_size={micro}"])
    pctx = parallel.init_distributed(cfg.parallel, cfg.train.device)
    device = pctx.device
    precision = resolve_precision(cfg.train.precision, device)
    model = build_train_model(cfg, device, precision, pctx)
    stages, factory = split_train_pipeline(model, cfg, pctx, precision, device)
    F, B, W = stage_costs(stages, factory, cfg, device)
    n, S = a.micro_batches, cfg.train.seq_len
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, cfg.model.vocab_size, (n * micro, S + 1), generator=g).to(device)
    times = []
    for i in range(a.steps + 1):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        pipeline.pipeline_train_step(stages, factory, window[:, :-1], window[:, 1:], n_micro=n, mtp_lambda=0.3,
                                     balance_alpha=1e-4)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        for st in stages:
            st.submod.zero_grad(set_to_none=True)
    T = sum(times) / len(times)
    mine = torch.tensor([T, F, B, W], dtype=torch.float64, device=device)  # NCCL: on the GPU
    every = [torch.zeros_like(mine) for _ in range(pctx.world_size)]
    dist.all_gather(every, mine)
    if pctx.is_main:
        T = max(float(e[0]) for e in every)
        F, B, W = (max(float(e[i]) for e in every) for i in (1, 2, 3))  # the slowest rank's chunk
        P = pctx.pp
        busy = n * (F + B + W)
        # Table 2 counts in chunks (one stage); a V schedule has two per rank. Its B is the full
        # backward (our B + W) and F&B an overlapped forward + backward pair (at most F + B + W).
        v = len(stages)
        f, b_full, w = F / v, (B + W) / v, W / v
        formulas = {"1f1b": (P - 1) * (f + b_full), "zbv": (P - 1) * (f + b_full - 2 * w),
                    "dualpipev": (P / 2 - 1) * ((f + b_full) + b_full - 3 * w)}
        out = {"schedule": a.schedule, "pp": P, "micro_batches": n, "micro_batch_size": micro, "step_s": T, "F_s": F, "B_s": B, "W_s": W,
               "bubble_fraction": max(0.0, 1 - busy / T)}
        if a.schedule in formulas:
            out["table2_bubble_s"] = formulas[a.schedule]
            out["table2_bubble_fraction"] = formulas[a.schedule] / (busy + formulas[a.schedule])
        report_numbers(out, a.json, digits=4)
    pctx.destroy()


if __name__ == "__main__":
    main()
