"""`moeforge plot`: the curves of one or more runs' metrics.jsonl in one figure, and a line per run.

Every stage writes one JSON record per step to OUT/metrics.jsonl (train: docs/training.md; sft and
grpo: docs/posttrain.md). This reads them, picks the panels the records have (or the ones asked for),
draws each run in its own colour (noisy per-step series faint, with a trailing mean over them; the
sparse validation records as points on a line), and writes a PNG, PDF or SVG atomically. A run that
is still going can be plotted: a last line that is still being written is skipped.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MoeforgeError

# (record key, panel title), in the order the panels are drawn when none are asked for
PANELS = (
    ("loss", "training loss (nats)"),
    ("val_bpb", "validation bits per byte"),
    ("val_loss", "validation loss (nats)"),
    ("mtp_loss", "MTP loss (nats, mean over depths)"),
    ("reward", "reward (mean)"),
    ("accuracy", "accuracy"),
    ("kl", "KL to the starting model"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("tokens_per_s", "tokens/s"),
    ("imbalance", "expert load imbalance (max/mean, mean over layers)"),
    ("completion_tokens", "completion length (tokens)"),
)
# series logged at every step, noisy enough to want a running mean; the others are drawn as they are
SMOOTHED = {"loss", "mtp_loss", "balance_loss", "reward", "reward_std", "accuracy", "format", "kl", "clipped",
            "grad_norm", "tokens_per_s", "tflops", "mfu", "imbalance", "imbalance_max", "completion_tokens",
            "seconds"}
FORMATS = (".png", ".pdf", ".svg")


@dataclass
class Run:
    label: str
    path: Path  # the metrics.jsonl
    records: list[dict]
    skipped: int = 0  # lines that were not JSON records (a line still being written)
    keys: set[str] = field(default_factory=set)

    def series(self, key: str, x: str, whole: bool | None = None) -> tuple[list[float], list[float]]:
        """(x values, values) of the records that have `key` (and `x`) as finite numbers. whole: only
        the records of a validation on the whole held-out split (True: the trainer's last one, marked
        "val_whole") or only the others (False); None: all."""
        xs, ys = [], []
        for r in self.records:
            v, at = r.get(key), r.get(x)
            if whole is not None and bool(r.get("val_whole")) != whole:
                continue
            if _number(v) and _number(at):
                xs.append(float(at))
                ys.append(float(v))
        return xs, ys


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_run(path: str | Path) -> Run:
    """A run folder (its metrics.jsonl) or a metrics.jsonl file."""
    p = Path(path)
    file = p / "metrics.jsonl" if p.is_dir() else p
    if not file.is_file():
        where = f"'{p}' has no metrics.jsonl" if p.is_dir() else f"'{p}' does not exist"
        raise MoeforgeError(f"{where}: give a run folder (the --out of train, sft or grpo) or its metrics.jsonl")
    records, skipped = [], 0
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                if isinstance(r, dict) and _number(r.get("step")):
                    records.append(r)
                else:
                    skipped += 1
    except OSError as e:
        raise MoeforgeError(f"cannot read '{file}': {e.strerror}") from None
    if not records:
        raise MoeforgeError(f"'{file}' holds no step records (JSON objects with a \"step\")")
    keys = {k for r in records for k, v in r.items() if _number(v)}
    label = (file.parent if file.name == "metrics.jsonl" else file).name or str(file)
    return Run(label, file, records, skipped, keys)


def read_runs(paths: list[str]) -> list[Run]:
    runs = [read_run(p) for p in paths]
    labels = [r.label for r in runs]
    for r in runs:  # two runs of one folder name (runs/a/x, runs/b/x): tell them apart by their paths
        if labels.count(r.label) > 1:
            r.label = str(r.path.parent if r.path.name == "metrics.jsonl" else r.path)
    return runs


def choose_panels(runs: list[Run], metrics: list[str] | None) -> list[tuple[str, str]]:
    """The panels to draw: the asked-for keys (each present in some run), else PANELS' keys that some run has."""
    present = set().union(*(r.keys for r in runs)) - {"step"}
    titles = dict(PANELS)
    if metrics:
        missing = [m for m in metrics if m not in present]
        if missing:
            raise MoeforgeError(f"--metrics {','.join(missing)}: not in the records; they have "
                                f"{', '.join(sorted(present))}")
        return [(m, titles.get(m, m)) for m in metrics]
    panels = [(k, t) for k, t in PANELS if k in present]
    if not panels:
        raise MoeforgeError(f"none of the usual metrics in the records; choose with --metrics from "
                            f"{', '.join(sorted(present))}")
    return panels


def trailing_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def auto_window(n: int) -> int:
    """The running mean's window when none is given: about 2% of the points, 1 for short runs."""
    return max(1, round(n / 50))


@dataclass
class Line:
    """One run's curve in one panel: ys as drawn (a trailing mean where `raw` is kept), the raw values
    drawn faintly behind it, whether the points are sparse (validation records: drawn as points), and
    the validation on the whole held-out split that ends a training run (a point of its own: the
    ones during the run score `train.eval_batches` batches of it, so the two do not join into one
    curve)."""
    label: str
    xs: list[float]
    ys: list[float]
    raw: list[float] | None
    sparse: bool
    whole: tuple[list[float], list[float]] | None = None


def panel_lines(runs: list[Run], key: str, x: str = "step", window: int | None = None) -> list[Line | None]:
    """Each run's line for the panel of `key` (None for a run without it). Per-step series (SMOOTHED)
    get a trailing mean over `window` points (None: auto_window; 1: none); series logged at fewer than
    half the records (validation) are sparse and drawn as they are."""
    lines = []
    for run in runs:
        whole = run.series(key, x, whole=True) if key.startswith("val_") else ([], [])
        xs, ys = run.series(key, x, whole=False if whole[1] else None)
        if not ys and not whole[1]:
            lines.append(None)
            continue
        sparse = key.startswith("val_") or len(ys) < 0.5 * len(run.records)
        w = 1 if sparse or key not in SMOOTHED else (window or auto_window(len(ys)))
        lines.append(Line(run.label, xs, trailing_mean(ys, w), ys if w > 1 else None, sparse,
                          whole if whole[1] else None))
    return lines


def summary(run: Run, window: int | None = None) -> str:
    """One line: the run's steps and its latest numbers (per-step series as their trailing mean)."""
    steps = [r["step"] for r in run.records]
    parts = [f"{run.label}: steps {int(min(steps))}-{int(max(steps))}"]
    for key, name in (("loss", "loss"), ("reward", "reward"), ("accuracy", "accuracy")):
        _, ys = run.series(key, "step")
        if ys:
            w = window or auto_window(len(ys))
            parts.append(f"{name} {trailing_mean(ys, w)[-1]:.4g}" + (f" (mean of the last {min(w, len(ys))})"
                                                                      if w > 1 else ""))
    for key, name in (("val_bpb", "validation bits per byte"), ("val_loss", "validation loss")):
        xs, ys = run.series(key, "step", whole=True)
        if ys:
            parts.append(f"{name} {ys[-1]:.4f} at step {int(xs[-1])} (the whole held-out split)")
            break
        xs, ys = run.series(key, "step")
        if ys:
            parts.append(f"{name} {ys[-1]:.4f} at step {int(xs[-1])} (best {min(ys):.4f})")
            break
    if run.skipped:
        parts.append(f"{run.skipped} line(s) skipped that are not records")
    return "; ".join(parts)


def check_out(out: Path) -> None:
    if out.suffix.lower() not in FORMATS:
        raise MoeforgeError(f"--out '{out}': the file name must end in {', '.join(FORMATS)}")
    if out.is_dir():
        raise MoeforgeError(f"--out '{out}' is a folder; give a file name such as {out / 'metrics.png'}")
    if not out.parent.is_dir():
        raise MoeforgeError(f"--out '{out}': the folder '{out.parent}' does not exist")


def plot_runs(runs: list[Run], out: str | Path, metrics: list[str] | None = None, window: int | None = None,
              x: str = "step") -> list[tuple[str, str]]:
    """Draw the runs' panels and write the figure to `out` (.png, .pdf or .svg), atomically. window:
    the running mean's length for per-step series (None: auto_window; 1: none). x: "step" or "tokens".
    Returns the panels drawn."""
    out = Path(out)
    check_out(out)
    if x not in ("step", "tokens"):
        raise MoeforgeError(f"--x must be step or tokens, got {x!r}")
    if x == "tokens":
        lacking = [r.label for r in runs if "tokens" not in r.keys]
        if lacking:
            raise MoeforgeError(f"--x tokens: the records of {', '.join(lacking)} have no token count (grpo logs "
                                f"none); use --x step")
    if window is not None and window < 1:
        raise MoeforgeError(f"--smooth must be >= 1, got {window}")
    panels = choose_panels(runs, metrics)
    try:
        import matplotlib
    except ImportError:
        raise MoeforgeError("moeforge plot needs matplotlib: pip install matplotlib "
                            "(or pip install 'moeforge[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, panels):
        lows, highs = [], []
        for i, line in enumerate(panel_lines(runs, key, x, window)):
            if line is None:
                continue
            c = colours[i % len(colours)]
            if line.raw is not None:
                ax.plot(line.xs, line.raw, color=c, alpha=0.25, linewidth=0.8)
            if line.ys:
                ax.plot(line.xs, line.ys, color=c, linewidth=1.5, marker="o" if line.sparse else None, markersize=3,
                        label=line.label)
            if line.whole is not None:
                ax.plot(*line.whole, color=c, linestyle="none", marker="*", markersize=10,
                        label=f"{line.label}: whole held-out split")
            values = (line.raw or line.ys) + (line.whole[1] if line.whole else [])
            lows.append(min(values))
            highs.append(max(values))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens" if x == "tokens" else "step")
        ax.grid(alpha=0.3)
        if lows and "loss" in key and min(lows) > 0 and max(highs) / min(lows) > 3:
            ax.set_yscale("log")  # the first steps' loss would flatten the rest of the curve
        if lows and (len(runs) > 1 or key.startswith("val_")):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format=out.suffix[1:].lower())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return panels
