"""Profile one training step of a preset on the GPU: the CUDA kernels that take the most time.

    python benchmarks/profile_step.py [--preset bench] [--rows 30] [key=value ...]

The model and step are `moeforge bench`'s (random tokens); two warm-up steps run first.
"""

from __future__ import annotations

import argparse

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
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(2)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
