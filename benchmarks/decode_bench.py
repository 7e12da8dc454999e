"""Decoding speed: tokens/s of generate.sample_rows with the step eager or replayed as a CUDA graph.

    python benchmarks/decode_bench.py [--preset tiny] [--rows 1 16 64] [--prompt-len 16] [--new 64]
        [--modes eager graph] [--precision bf16|fp32] [--grpo CHECKPOINT --grpo-steps 10]

A random-initialised model of the preset decodes --new tokens for R rows (no stop token, so every
call decodes them all) under BF16 autocast; each (R, mode) is timed over 3 calls after one warm-up
call (the graph is captured anew in every call: its cost is in the times). --grpo also times
`train_grpo` (posttrain/grpo.py) from a checkpoint for --grpo-steps steps with each mode.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import tempfile
import time

import torch

from moeforge import generate
from moeforge.config import load_config
from moeforge.model import build_model


def time_decode(model, rows: int, prompt_len: int, new: int, mode: str, amp) -> float:
    prompts = torch.randint(0, model.cfg.vocab_size, (1, prompt_len)).tolist() * rows
    times = []
    for i in range(4):
        gen = torch.Generator(device="cuda").manual_seed(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp():
            generate.sample_rows(model, prompts, new, 1.0, 1.0, gen, stop_id=None, mode=mode)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def time_grpo(checkpoint: str, steps: int, mode: str) -> float:
    from moeforge.posttrain import grpo
    from moeforge.posttrain.settings import GRPOSettings
    from moeforge.posttrain.tasks import Arithmetic

    plain = generate.sample_rows
    grpo.sample_rows = functools.partial(plain, mode=mode)
    try:
        with tempfile.TemporaryDirectory() as out:
            s = GRPOSettings(steps=steps, max_new_tokens=40, precision="bf16")
            records = grpo.train_grpo(checkpoint, out + "/run", Arithmetic(), s, "cuda", progress=False)
    finally:
        grpo.sample_rows = plain
    return statistics.median(r["seconds"] for r in records[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"])
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--grpo", help="a checkpoint to time GRPO steps from")
    ap.add_argument("--grpo-steps", type=int, default=10)
    a = ap.parse_args()
    cfg = load_config(a.preset, None, [])
    torch.manual_seed(0)
    model = build_model(cfg.model, "cuda").eval()
    amp = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if a.precision == "bf16"
           else contextlib.nullcontext)
    print(f"{torch.cuda.get_device_name()} | preset {a.preset} | {a.precision} | prompt {a.prompt_len} + "
          f"{a.new} new tokens")
    print(f"{'rows':>5} " + " ".join(f"{m + ' tok/s':>14} {m + ' ms/tok':>14}" for m in a.modes))
    for rows in a.rows:
        cells = []
        for mode in a.modes:
            s = time_decode(model, rows, a.prompt_len, a.new, mode, amp)
            cells.append(f"{rows * a.new / s:>14,.0f} {1e3 * s / a.new:>14.2f}")
        print(f"{rows:>5} " + " ".join(cells), flush=True)
    if a.grpo:
        for mode in ("eager", "auto"):
            print(f"grpo ({mode}): {time_grpo(a.grpo, a.grpo_steps, mode):.2f} s a step (median after the first)",
                  flush=True)


if __name__ == "__main__":
    main()
