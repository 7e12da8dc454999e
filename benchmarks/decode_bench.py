"""Decoding speed: tokens/s of generate.sample_rows with the step eager, replayed as a CUDA graph, or
compiled by torch.compile (and replayed as a CUDA graph).

    python benchmarks/decode_bench.py [--preset tiny] [--rows 1 16 64] [--prompt-len 16] [--new 64]
        [--modes eager graph compiled] [--precision bf16|fp32] [--grpo CHECKPOINT --grpo-steps 10]

A random-initialised model of the preset decodes --new tokens for R rows (no stop token, so every
call decodes them all) under BF16 autocast; each (R, mode) is timed over 3 calls after a first call,
whose time is printed too (it warms up, captures, compiles). The later calls reuse the first call's
decoder (generate.reused_decoder). --grpo also times `train_grpo` (posttrain/grpo.py) from a
checkpoint for --grpo-steps steps with each mode: the first step's time, and the median of the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch

from moeforge import generate
from moeforge.config import load_config
from moeforge.model import build_model


def time_decode(model, rows: int, prompt_len: int, new: int, mode: str, amp) -> tuple[float, float]:
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
    return times[0], statistics.median(times[1:])


def time_grpo(checkpoint: str, steps: int, mode: str) -> tuple[float, float]:
    from moeforge.posttrain import grpo
    from moeforge.posttrain.settings import GRPOSettings
    from moeforge.posttrain.tasks import Arithmetic

    plain = grpo.sample_rows

    def forced(model, rows, max_new, temperature, top_p, generator, stop_id, _mode="auto", **kw):
        return plain(model, rows, max_new, temperature, top_p, generator, stop_id, mode, **kw)

    grpo.sample_rows = forced
    try:
        with tempfile.TemporaryDirectory() as out:
            s = GRPOSettings(steps=steps, max_new_tokens=40, precision="bf16")
            records = grpo.train_grpo(checkpoint, out + "/run", Arithmetic(), s, "cuda", progress=False)
    finally:
        grpo.sample_rows = plain
        generate.release_decoder()
    return records[0]["seconds"], statistics.median(r["seconds"] for r in records[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["eager", "graph", "compiled"])
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
    print(f"{'rows':>5} " + " ".join(f"{m + ' tok/s':>16} {m + ' ms/tok':>16} {m + ' 1st call s':>18}"
                                      for m in a.modes))
    for rows in a.rows:
        cells = []
        for mode in a.modes:
            first, s = time_decode(model, rows, a.prompt_len, a.new, mode, amp)
            cells.append(f"{rows * a.new / s:>16,.0f} {1e3 * s / a.new:>16.2f} {first:>18.2f}")
        generate.release_decoder()
        print(f"{rows:>5} " + " ".join(cells), flush=True)
    if a.grpo:
        for mode in ("eager", "auto", "compiled"):
            first, rest = time_grpo(a.grpo, a.grpo_steps, mode)
            print(f"grpo ({mode}): {rest:.3f} s a step (median after the first; the first {first:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
