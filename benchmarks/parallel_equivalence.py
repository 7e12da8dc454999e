"""Same training, other layouts: do expert and pipeline parallelism give the one-process loss curve?

    python benchmarks/parallel_equivalence.py --out DIR [--preset small] [--steps 200] \
        --layout 2:parallel.ep=2 --layout 4:parallel.ep=4 \
        --layout "2:parallel.pp=2 parallel.schedule=dualpipev" [--json FILE] [key=value ...]

Runs `moeforge train` once in one process (the reference), then under torchrun for every layout
("NPROC:overrides"), with the same config, data, order and seed, and compares the training loss of
every step (the relative difference to the reference: the largest over the first 10 steps, the
largest and the mean over all) and the final validation. Writes DIR/equivalence.csv, and
DIR/equivalence.png when matplotlib is installed. NVLink multicast stays off in every process
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fp8_accuracy import read  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    env = {**os.environ, **NO_MULTICAST}
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - t0


def compare(ref: dict[int, float], other: dict[int, float]) -> dict:
    steps = sorted(set(ref) & set(other))
    rel = [abs(other[s] - ref[s]) / abs(ref[s]) for s in steps]
    first = [r for s, r in zip(steps, rel) if s <= 10]
    return {"steps": len(steps), "max_rel_first10": max(first, default=float("nan")),
            "max_rel": max(rel, default=float("nan")), "mean_rel": sum(rel) / len(rel) if rel else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--layout", action="append", default=[], help='"NPROC:key=value ..." (repeatable)')
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    def train(run_dir: Path, extra: list[str]) -> list[str]:  # options first, then the key=value overrides
        return ["-m", "moeforge", "train", "--preset", a.preset, "--steps", str(a.steps), "--no-progress",
                "--out", str(run_dir), "train.eval_every=0", "train.checkpoint_every=0", "train.sample_tokens=0",
                *a.overrides, *extra]

    runs = {"one process": ([sys.executable, *train(out / "ref", [])], out / "ref")}
    for i, spec in enumerate(a.layout):
        nproc, _, extra = spec.partition(":")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}"]
        runs[spec] = ([*torchrun, *train(out / f"layout{i}", extra.split())], out / f"layout{i}")
    results, curves = [], {}
    for name, (cmd, run_dir) in runs.items():
        rc, seconds = run(cmd, out / f"{run_dir.name}.log", a.timeout)
        losses, final = read(run_dir / "metrics.jsonl")
        curves[name] = losses
        row = {"layout": name, "exit_code": rc, "seconds": round(seconds, 1), "val_loss": final.get("val_loss"),
               **compare(curves["one process"], losses)}
        results.append(row)
        val = f"{row['val_loss']:.4f}" if row["val_loss"] is not None else "-"
        print(f"{name:45s} exit {rc:3d}  {row['steps']:4d} steps  max rel. diff first 10 {row['max_rel_first10']:.2e}  "
              f"all {row['max_rel']:.2e} (mean {row['mean_rel']:.2e})  final val loss {val}  {seconds:.0f} s", flush=True)
    steps = sorted(curves["one process"])
    with open(out / "equivalence.csv", "w") as f:
        f.write("step," + ",".join(f'"{n}"' for n in curves) + "\n")
        for s in steps:
            f.write(f"{s}," + ",".join(str(c.get(s, "")) for c in curves.values()) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"preset": a.preset, "steps": a.steps, "results": results}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(sorted(c), [c[s] for s in sorted(c)], lw=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "equivalence.png", dpi=120)


if __name__ == "__main__":
    main()
