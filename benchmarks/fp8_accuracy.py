"""BF16 against FP8 training: the same model, data and seed, the loss curves side by side.

    python benchmarks/fp8_accuracy.py --out DIR [--preset small] [--steps 1000] [key=value ...]
    python benchmarks/fp8_accuracy.py --out DIR --preset tiny --seeds 1,2,3,4   # the spread over seeds
    python benchmarks/fp8_accuracy.py --out DIR_A --compare DIR_B   # two codes or settings, seed by seed

Runs `moeforge train` twice at the same time on one GPU (the second starts once the first has built
the token cache) (--precision bf16 and fp8, identical
otherwise), then reads both metrics.jsonl files and reports:
- the relative gap of the FP8 loss to the BF16 loss, averaged over the last 10% of the common steps;
- the final validation of each run.
It writes DIR/curves.csv and, if matplotlib is installed, DIR/curves.png (`--replot` redraws it). A run that is stopped early
still leaves its metrics, and the comparison uses the steps both reached. With --seeds the same two
files hold the BF16 and FP8 training losses averaged over the seeds whose runs all finished.

--compare DIR_B reads two --seeds result directories (two codes, or two settings) and compares
them seed by seed: each precision's final loss, B against A, and FP8's gap to BF16 in each. On one
kind of GPU these runs are deterministic (the same code, seed and settings give the same final loss
to the digits printed), so a seed's two runs differ only by what changed between A and B.
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


_Z975 = 1.959963984540054  # the standard normal's 97.5% quantile


def t975(df: int) -> float:
    """Student's t 97.5% quantile (two-sided 95% intervals): exact for 1 and 2 degrees of freedom,
    else the Cornish-Fisher expansion around the normal quantile (off by 0.004 at 3, 0.001 at 4,
    3e-4 at 5 and under 1e-4 from 8 on)."""
    if df == 1:
        return math.tan(math.pi * 0.475)
    if df == 2:
        return 0.95 / math.sqrt(2 * 0.975 * 0.025)
    z = _Z975
    terms = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(g / df ** (i + 1) for i, g in enumerate(terms))


def summary(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, standard deviation, low, high): the mean's 95% interval (Student's t); 2+ values."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def final_losses(out: Path, kinds=("bf16", "fp8")) -> dict[int, dict[str, float]]:
    """{seed: {kind: final validation loss}} of the seeds in a --seeds directory whose runs of every
    kind finished."""
    tags = (d.name.removeprefix(f"{kinds[0]}-seed") for d in out.glob(f"{kinds[0]}-seed*"))
    seeds = sorted(int(t) for t in tags if t.lstrip("-").isdigit())
    finals = {}
    for seed in seeds:
        final = {kind: read(out / f"{kind}-seed{seed}" / "metrics.jsonl")[1].get("val_loss") for kind in kinds}
        if None not in final.values():
            finals[seed] = final
    return finals


def pct(new: float, old: float) -> float:
    return 100 * (new - old) / old


def compare(dir_a: Path, dir_b: Path) -> tuple[list[str], dict[str, tuple[float, float, float, float]]]:
    """--compare: the seeds both directories finished, B against A (see the module's notes). Returns
    the report's lines (a Markdown table, then one line per quantity with its 95% interval) and
    {quantity: summary(per-seed values)}."""
    a, b = final_losses(dir_a), final_losses(dir_b)
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise SystemExit(f"--compare: {len(seeds)} seed(s) finished in both {dir_a} and {dir_b}; need 2 or more")
    gap_a = [pct(a[s]["fp8"], a[s]["bf16"]) for s in seeds]
    gap_b = [pct(b[s]["fp8"], b[s]["bf16"]) for s in seeds]
    lines = ["| seed | A bf16 | A fp8 | B bf16 | B fp8 | A gap | B gap |", "|---|---|---|---|---|---|---|"]
    for s, ga, gb in zip(seeds, gap_a, gap_b):
        lines.append(f"| {s} | {a[s]['bf16']:.4f} | {a[s]['fp8']:.4f} | {b[s]['bf16']:.4f} | {b[s]['fp8']:.4f} | "
                     f"{ga:+.2f}% | {gb:+.2f}% |")
    rows = [("FP8's gap to BF16 in A", gap_a), ("FP8's gap to BF16 in B", gap_b),
            ("B's gap less A's, per seed", [gb - ga for ga, gb in zip(gap_a, gap_b)]),
            ("BF16 runs, B against A, per seed", [pct(b[s]["bf16"], a[s]["bf16"]) for s in seeds]),
            ("FP8 runs, B against A, per seed", [pct(b[s]["fp8"], a[s]["fp8"]) for s in seeds])]
    lines.append(f"over {len(seeds)} seeds (mean, standard deviation, 95% interval of the mean):")
    stats = {name: summary(values) for name, values in rows}
    for name, (mean, sd, lo, hi) in stats.items():
        lines.append(f"- {name}: {mean:+.3f}%, sd {sd:.3f}%, {lo:+.3f}% to {hi:+.3f}%")
    return lines, stats


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
            mean, sd, lo, hi = summary(v)
            print(f"{k} vs bf16 over {len(v)} seeds: mean {mean:+.3f}%, sd {sd:.3f}%, standard error "
                  f"{sd / math.sqrt(len(v)):.3f}%, 95% interval {lo:+.3f}% to {hi:+.3f}%, "
                  f"mean |gap| {sum(abs(x) for x in v) / len(v):.3f}%")
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
    ap.add_argument("--compare", metavar="DIR_B", help="compare the --seeds results in --out (A) with those in "
                                                       "DIR_B, seed by seed; runs nothing")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    out = Path(a.out)
    if a.compare:
        for d in (out, Path(a.compare)):
            if not d.is_dir():
                raise SystemExit(f"--compare: no such directory: {d}")
        print("\n".join(compare(out, Path(a.compare))[0]))
        return
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
