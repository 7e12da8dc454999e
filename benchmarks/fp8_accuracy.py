"""BF16 against FP8 training: the same model, data and seed, the loss curves side by side.

    python benchmarks/fp8_accuracy.py --out DIR [--preset small] [--steps 1000] [key=value ...]
    python benchmarks/fp8_accuracy.py --out DIR --preset tiny --seeds 1,2,3,4   # the spread over seeds

Runs `moeforge train` twice at the same time on one GPU (the second starts once the first has built
the token cache) (--precision bf16 and fp8, identical
otherwise), then reads both metrics.jsonl files and reports:
- the relative gap of the FP8 loss to the BF16 loss, averaged over the last 10% of the common steps;
- the final validation of each run.
It writes DIR/curves.csv and, if matplotlib is installed, DIR/curves.png (`--replot` redraws it). A run that is stopped early
still leaves its metrics, and the comparison uses the steps both reached. With --seeds the same two
files hold the BF16 and FP8 training losses averaged over the seeds whose runs all finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path


def read(path: Path) -> tuple[dict[int, float], dict]:
    losses, final = {}, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec and rec.get("loss") is not None:
                losses[rec["step"]] = rec["loss"]
            if "val_loss" in rec:
                final = rec
    return losses, final


def run_side_by_side(runs: dict[str, list[str]], out: Path, timeout: float, gpus: int = 1) -> None:
    """Start every command (stdout to out/NAME.log) at the same time, once the first has built the
    token cache (its metrics.jsonl exists), and wait for all, killing what runs past `timeout` s.
    gpus > 1: the commands go to the GPUs in turn (CUDA_VISIBLE_DEVICES), one CPU thread each."""
    procs = {}
    for i, (name, cmd) in enumerate(runs.items()):
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=str(i % gpus)) if gpus > 1 else None
        procs[name] = subprocess.Popen(cmd, stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env)
        if len(procs) == 1:
            while not (out / name / "metrics.jsonl").is_file() and procs[name].poll() is None:
                time.sleep(1)
    t0 = time.time()
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            print(f"{name}: stopped after {timeout} s")
    print(f"wall time {time.time() - t0:.0f} s")


def plot(path: Path, baseline: str, steps: list[int], base: list[float], fp8: list[float], window: int = 25,
         what: str = "training loss") -> None:
    """Both loss curves as moving averages over `window` steps, and the relative gap below them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return

    def smooth(v):
        return [sum(v[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(v))]

    sb, sq = smooth(base), smooth(fp8)
    fig, (ax, gap) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(steps, sb, label=f"{baseline.upper()}", lw=1.2)
    ax.plot(steps, sq, label="FP8 (1x128 / 128x128)", lw=1.2)
    ax.set_ylabel(f"{what} ({window}-step mean)")
    ax.legend()
    gap.plot(steps, [100 * (q - b) / b for b, q in zip(sb, sq)], lw=1, color="k")
    gap.axhline(0, lw=0.5, color="grey")
    gap.set_ylabel("FP8 gap (%)")
    gap.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_curves(out: Path, baseline: str, steps: list[int], base: list[float], fp8: list[float],
                 what: str = "training loss") -> None:
    """DIR/curves.csv (step, baseline, fp8) and DIR/curves.png (`--replot` redraws it)."""
    with open(out / "curves.csv", "w") as f:
        f.write(f"step,{baseline},fp8\n")
        for row in zip(steps, base, fp8):
            f.write(",".join(map(str, row)) + "\n")
    if steps:
        plot(out / "curves.png", baseline, steps, base, fp8, what=what)


def mean_curves(out: Path, kinds, seeds: list[int]) -> tuple[list[int], dict[str, list[float]]]:
    """Each kind's training loss averaged over the seeds, at the steps that every run logged."""
    curves = {(kind, seed): read(out / f"{kind}-seed{seed}" / "metrics.jsonl")[0] for kind in kinds for seed in seeds}
    steps = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
    return steps, {kind: [sum(curves[kind, seed][t] for seed in seeds) / len(seeds) for t in steps] for kind in kinds}


def seed_pairs(a, out: Path) -> None:
    """--seeds: for every seed a BF16 run, a second BF16 run and an FP8 run, all at once. The second
    BF16 run repeats the first (on a GPU that is not always bit-reproducible), or with --perturb
    changes it at the level of rounding only (e.g. train.loss_chunk, which reorders a sum): the gap
    between the two BF16 runs is what any rounding-level change does to this training, and FP8's
    gap to the first BF16 run is compared with it. Reports each seed's final validation losses, the
    gaps, and their mean, standard deviation and standard error; DIR/curves.csv and .png hold the
    BF16 and FP8 training losses averaged over the seeds that finished."""
    seeds = [int(x) for x in a.seeds.split(",")]
    kinds = {"bf16": ("bf16", []), "bf16-repeat": ("bf16", a.perturb), "fp8": ("fp8", [])}
    if a.pairs_only:
        del kinds["bf16-repeat"]
    runs = {f"{kind}-seed{seed}": [sys.executable, "-m", "moeforge", "train", "--preset", a.preset, "--steps",
                                    str(a.steps), "--precision", prec, "--seed", str(seed),
                                    "--out", str(out / f"{kind}-seed{seed}"), "--no-progress", "train.eval_every=0",
                                    "train.checkpoint_every=0", "train.sample_tokens=0", *a.overrides, *extra]
            for seed in seeds for kind, (prec, extra) in kinds.items()}
    import torch

    run_side_by_side(runs, out, a.timeout, max(1, torch.cuda.device_count()))
    gaps: dict[str, list[float]] = {k: [] for k in kinds if k != "bf16"}
    finished = []
    head = " | ".join(f"{k} vs bf16" for k in gaps)
    lines = [f"| seed | {' | '.join(kinds)} | {head} |", "|---" * (1 + len(kinds) + len(gaps)) + "|"]
    for seed in seeds:
        final = {kind: read(out / f"{kind}-seed{seed}" / "metrics.jsonl")[1].get("val_loss") for kind in kinds}
        if None in final.values():
            lines.append(f"| {seed} | incomplete: {final} |")
            continue
        finished.append(seed)
        rel = {k: 100 * (final[k] - final["bf16"]) / final["bf16"] for k in gaps}
        for k in gaps:
            gaps[k].append(rel[k])
        lines.append(f"| {seed} | {' | '.join(f'{final[k]:.4f}' for k in kinds)} | "
                     f"{' | '.join(f'{rel[k]:+.2f}%' for k in gaps)} |")
    print("\n".join(lines))
    for k, v in gaps.items():
        if len(v) >= 2:
            mean = sum(v) / len(v)
            sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
            print(f"{k} vs bf16 over {len(v)} seeds: mean {mean:+.3f}%, sd {sd:.3f}%, standard error "
                  f"{sd / math.sqrt(len(v)):.3f}%, mean |gap| {sum(abs(x) for x in v) / len(v):.3f}%")
    if finished:
        steps, means = mean_curves(out, ("bf16", "fp8"), finished)
        write_curves(out, "bf16", steps, means["bf16"], means["fp8"],
                     what=f"training loss, mean of {len(finished)} seeds")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--baseline", default="bf16", choices=["bf16", "fp32"], help="fp32 on a CPU (BF16 autocast is slow there)")
    ap.add_argument("--replot", action="store_true", help="only redraw DIR/curves.png from DIR/curves.csv")
    ap.add_argument("--seeds", help="comma list: per seed a BF16 run, a repeat of it and an FP8 run, all at once "
                                    "(spread across the visible GPUs); reports the gaps' statistics")
    ap.add_argument("--perturb", nargs="*", default=[],
                    help="with --seeds: key=value settings of the second BF16 run (default: a plain repeat)")
    ap.add_argument("--pairs-only", action="store_true", help="with --seeds: no second BF16 run")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    out = Path(a.out)
    if a.seeds:
        out.mkdir(parents=True, exist_ok=True)
        seed_pairs(a, out)
        return
    if a.replot:
        rows = [line.split(",") for line in (out / "curves.csv").read_text().splitlines()[1:]]
        plot(out / "curves.png", a.baseline, [int(r[0]) for r in rows], [float(r[1]) for r in rows],
             [float(r[2]) for r in rows])
        return
    out.mkdir(parents=True, exist_ok=True)
    runs = {prec: [sys.executable, "-m", "moeforge", "train", "--preset", a.preset, "--steps", str(a.steps),
                   "--precision", prec, "--out", str(out / prec), "--no-progress", "train.eval_every=0",
                   "train.checkpoint_every=0", "train.sample_tokens=0", *a.overrides]
            for prec in (a.baseline, "fp8")}
    run_side_by_side(runs, out, a.timeout)
    curves = {prec: read(out / prec / "metrics.jsonl") for prec in runs}
    bf16, fp8 = curves[a.baseline][0], curves["fp8"][0]
    common = sorted(set(bf16) & set(fp8))
    write_curves(out, a.baseline, common, [bf16[s] for s in common], [fp8[s] for s in common])
    if not common:
        print("no common steps")
        return
    tail = common[-max(1, len(common) // 10):]
    b = sum(bf16[s] for s in tail) / len(tail)
    q = sum(fp8[s] for s in tail) / len(tail)
    print(f"steps compared: {len(common)} (last {common[-1]}); mean loss over steps {tail[0]}-{tail[-1]}: "
          f"{a.baseline} {b:.4f}, fp8 {q:.4f}, relative gap {100 * (q - b) / b:+.3f}%")
    for prec in runs:
        fin = curves[prec][1]
        if fin:
            print(f"{prec} final validation: loss {fin['val_loss']:.4f}, {fin['val_bpb']:.4f} bits/byte")

if __name__ == "__main__":
    main()
