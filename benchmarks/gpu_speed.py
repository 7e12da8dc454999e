"""Run `moeforge bench` variants on one GPU, each in its own process, and print a markdown table.

    python benchmarks/gpu_speed.py --out DIR speed      # the bench preset: compiled / eager / FP8 / vs transformers
    python benchmarks/gpu_speed.py --out DIR memory     # peak memory per memory saver at two depths

Every variant writes DIR/NAME.json (the `moeforge bench --json` output) and DIR/NAME.log; a variant
that fails is reported with the last line of its log and the others still run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = [sys.executable, "-m", "moeforge", "bench"]

SPEED = {  # the bench preset compiles its blocks and runs one micro-batch of 8 with BF16 AdamW moments
    "bf16-compile": ["--vs", "hf"],
    "bf16-eager-m4": ["train.compile=false", "train.micro_batch_size=4", "--no-split"],
    "bf16-compile-m4-full": ["train.micro_batch_size=4", "train.recompute=full", "--no-split"],
    "fp8-compile": ["--precision", "fp8", "--no-split"],
}

# Memory savers, eager, at 2 micro-batches of 1 sequence per step, FP32 AdamW moments unless the
# saver is the BF16 moments: the peak comes at the end of the second micro-batch's forward, with the
# activations and the first micro-batch's gradients alive.
SAVERS = {
    "none": [],
    "BF16 AdamW moments": ["train.adam_moments=bf16"],
    "chunked-loss": ["train.loss_chunk=4096"],
    "chunked-loss + recompute full": ["train.loss_chunk=4096", "train.recompute=full"],
    "recompute norm,mla_up,swiglu": ["train.recompute=norm,mla_up,swiglu"],
    "recompute full": ["train.recompute=full"],
    "fp8 (FP8-saved inputs)": ["--precision", "fp8"],
}


def run(name: str, args: list[str], out: Path, timeout: int) -> dict | None:
    js, log = out / f"{name}.json", out / f"{name}.log"
    cmd = BENCH + args + ["--json", str(js)]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s", -1
    log.write_text(" ".join(cmd) + "\n" + text)
    print(f"## {name} ({time.time() - t0:.0f} s, rc {rc})\n{text.strip()[-1500:]}\n", flush=True)
    return json.loads(js.read_text()) if rc == 0 and js.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["speed", "memory"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--layers", default="4,7", help="memory: the two depths measured")
    ap.add_argument("--only", default="", help="comma list of variant names to run")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, a.only.split(",")))
    rows = []
    if a.what == "speed":
        for name, args in SPEED.items():
            if only and name not in only:
                continue
            res = run(name, ["--steps", str(a.steps), "--warmup", str(a.warmup)] + args, out, a.timeout)
            for r in (res or {}).get("results", []):
                rows.append(f"| {name} | {r['name']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
                            f"{100 * (r['mfu'] or 0):.1f}% | {r['peak_mem_gib']:.1f} |")
        print("| variant | framework | tokens/s | TFLOP/s | MFU | peak GiB |\n|---|---|---|---|---|---|")
    else:
        for name, args in SAVERS.items():
            if only and name not in only:
                continue
            peaks = []
            for layers in a.layers.split(","):
                tag = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
                base = ["--steps", "2", "--warmup", "1", "--no-split", "--batch-size", "2", "train.micro_batch_size=1",
                        "train.loss_chunk=0", "train.adam_moments=fp32", "train.compile=false",
                        f"model.num_hidden_layers={layers}"]
                res = run(f"mem-{tag}-L{layers}", base + args, out, a.timeout)
                peaks.append(res["results"][0]["peak_mem_gib"] if res else None)
            rows.append(f"| {name} | " + " | ".join(f"{p:.1f}" if p else "failed" for p in peaks) + " |")
        print(f"| saver | peak GiB at layers {a.layers} |\n|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
