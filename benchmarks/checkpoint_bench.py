"""Time checkpoints written in the training thread against checkpoints written in the background
(`train.async_checkpoint`): the same short run both ways, alternating, on the device given.

    python benchmarks/checkpoint_bench.py [--preset small] [--steps 60] [--every 10] [--rounds 2] [key=value ...]

After an untimed warm-up run, each run trains --steps steps with a checkpoint every --every steps (and at the end), then times one
more save: how long the training thread is held, and when the checkpoint is on disk. Prints the run's
wall time and the median tokens/s of the steps right after a save and of the others. Extra key=value
settings apply to both (the default turns compilation and the CUDA-graph step off, so that the runs
start at once).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from moeforge.config import load_config
from moeforge.train.trainer import Trainer


def run(preset: str, steps: int, every: int, background: bool, extra: list[str], out: Path) -> str:
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(preset, None, [f"train.steps={steps}", f"train.checkpoint_every={every}", "train.keep_checkpoints=2",
                                     "train.eval_every=0", "train.sample_tokens=0", f"train.out={out}",
                                     "train.log_every=1000000", "train.compile=false", "train.cuda_graph=false",
                                     f"train.async_checkpoint={str(background).lower()}", *extra])
    trainer = Trainer(cfg, progress=False)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    after = [r["tokens_per_s"] for r in recs if r["step"] % every == 1 and r["step"] > 1]
    others = [r["tokens_per_s"] for r in recs if r["step"] % every not in (0, 1) and r["step"] > 2]
    t1 = time.perf_counter()
    trainer.save()
    t2 = time.perf_counter()
    trainer.wait_for_checkpoints()
    t3 = time.perf_counter()
    trainer.close()
    gib = sum(f.stat().st_size for f in trainer.ckpt_root.rglob("*") if f.is_file()) / 2 / 2**30  # (2 kept)
    return (f"{preset} background={background}: {steps} steps and {steps // every + 1} saves in {wall:.1f} s | "
            f"a save holds the training thread {t2 - t1:.2f} s, on disk after {t3 - t1:.2f} s ({gib:.2f} GiB) | "
            f"median tokens/s of the steps after a save {statistics.median(after):.0f}, others "
            f"{statistics.median(others):.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(a.preset, a.every, a.every, False, a.overrides, Path(tmp) / "run")  # warm-up (kernels, allocator, caches)
        for _ in range(a.rounds):
            for background in (False, True):
                print(run(a.preset, a.steps, a.every, background, a.overrides, Path(tmp) / "run"), flush=True)


if __name__ == "__main__":
    main()
