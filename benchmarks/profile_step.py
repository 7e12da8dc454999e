"""Profile one training step of a preset on the GPU: the CUDA kernels that take the most time.

    python benchmarks/profile_step.py [--preset bench] [--rows 30] [key=value ...]

The model and step are `moeforge bench`'s (random tokens); two warm-up steps run first. Also printed:
the wall time of a step (median of 3, host synchronised around each) against the sum of the profiled
step's kernel times; when the wall time is much larger, the GPU waits for the host.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moeforge.config import load_config
from moeforge.train.step import (build_optimizer, build_train_model, forward_backward, optimizer_update,
                                    resolve_device, resolve_precision)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.preset, None, a.overrides)
    t = cfg.train
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    model = build_train_model(cfg, device, precision, None)
    optimizer = build_optimizer(model, cfg)
    n_micro = t.batch_size // t.micro_batch
    windows = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch, t.seq_len + 1), device=device)
               for _ in range(n_micro)]

    def step(i: int) -> None:
        forward_backward(model, iter(windows), n_micro, t.mtp_lambda, cfg, device, precision)
        optimizer_update(model, optimizer, model.moe_layers(), cfg, i, None)

    for i in range(2):
        step(i)
    walls = []
    for i in range(2, 5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(5)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))
    kernels_ms = sum(e.self_device_time_total for e in events) / 1e3
    wall_ms = 1e3 * statistics.median(walls)
    print(f"step wall time {wall_ms:.1f} ms (median of 3); kernels of one step {kernels_ms:.1f} ms "
          f"({100 * kernels_ms / wall_ms:.0f}% of the wall time)")


if __name__ == "__main__":
    main()
