"""`moeforge plot` (plot.py): reading runs' metrics.jsonl, the panels and lines drawn, the image written.

- the lines of a panel: per-step series as their trailing mean with the raw values kept, validation
  records as sparse points, each run's own values (synthetic records with known numbers);
- the reader: a line still being written and lines that are not records are skipped and counted;
  missing files, empty files and unknown metrics are one-line errors;
- the real thing: `moeforge plot` on a training run writes RUN/metrics.png (a PNG, nothing else left
  in the folder) and prints the run's numbers; several runs (train and sft/grpo-like records) in
  one figure, PDF and SVG too; bad input changes nothing on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import snapshot_tree
from moeforge.errors import MoeforgeError
from moeforge.plot import auto_window, choose_panels, panel_lines, read_run, read_runs, summary, trailing_mean

pytest.importorskip("matplotlib")


def _write(path: Path, records: list, tail: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _train_records(n: int, offset: float = 0.0) -> list[dict]:
    out = []
    for s in range(1, n + 1):
        out.append({"step": s, "loss": 10.0 / s + offset + (0.5 if s % 2 else -0.5), "lr": 1e-3 * min(1, s / 10),
                    "grad_norm": 1.0 + s % 3, "tokens": 512 * s})
        if s % 25 == 0 and s < n:  # validation on some batches during the run, on all at its end
            out.append({"step": s, "val_loss": 5.0 / s + offset, "val_bpb": 2.0 / s + offset, "tokens": 512 * s})
    out.append({"step": n, "val_loss": 4.0 / n + offset, "val_bpb": 1.5 / n + offset, "tokens": 512 * n,
                "val_whole": True})
    return out


def test_trailing_mean():
    values = [1.0, 2.0, 6.0, 3.0, 8.0]
    assert trailing_mean(values, 1) == values
    assert trailing_mean(values, 3) == pytest.approx([1.0, 1.5, 3.0, 11 / 3, 17 / 3])
    assert trailing_mean(values, 10) == pytest.approx([1.0, 1.5, 3.0, 3.0, 4.0])
    assert auto_window(10) == 1 and auto_window(500) == 10


def test_panel_lines(tmp_path):
    a = read_run(_write(tmp_path / "a", _train_records(100)))
    b = read_run(_write(tmp_path / "b", _train_records(100, offset=1.0)))
    runs = [a, b]
    assert [k for k, _ in choose_panels(runs, None)] == ["loss", "val_bpb", "val_loss", "lr", "grad_norm"]
    assert [k for k, _ in choose_panels(runs, ["lr", "tokens"])] == ["lr", "tokens"]

    loss = panel_lines(runs, "loss", window=4)
    raw = [10.0 / s + (0.5 if s % 2 else -0.5) for s in range(1, 101)]
    assert loss[0].label == "a" and loss[0].xs == list(range(1, 101)) and loss[0].raw == pytest.approx(raw)
    assert loss[0].ys == pytest.approx(trailing_mean(raw, 4)) and not loss[0].sparse
    assert loss[1].raw == pytest.approx([v + 1.0 for v in raw])  # each run its own values
    assert panel_lines(runs, "loss")[0].ys == pytest.approx(trailing_mean(raw, 2))  # auto: 100 points -> 2
    assert panel_lines(runs, "loss", window=1)[0].raw is None  # no mean: the values alone

    val = panel_lines(runs, "val_bpb", window=4)[0]  # sparse: drawn as logged, as points
    assert val.sparse and val.raw is None and val.xs == [25, 50, 75]
    assert val.ys == pytest.approx([2.0 / s for s in (25, 50, 75)])
    assert val.whole == ([100], [pytest.approx(0.015)])  # the final one, on the whole split: a point apart
    lr = panel_lines(runs, "lr", window=4)[0]  # not a noisy series: never averaged
    assert lr.raw is None and lr.ys == pytest.approx([1e-3 * min(1, s / 10) for s in range(1, 101)])
    by_tokens = panel_lines(runs, "loss", x="tokens", window=1)[0]
    assert by_tokens.xs == [512 * s for s in range(1, 101)]

    line = summary(a, 4)
    assert line.startswith("a: steps 1-100; loss ") and f"{trailing_mean(raw, 4)[-1]:.4g}" in line
    assert "validation bits per byte 0.0150 at step 100 (the whole held-out split)" in line
    no_final = read_run(_write(tmp_path / "c", [r for r in _train_records(100) if not r.get("val_whole")]))
    assert "validation bits per byte 0.0267 at step 75 (best 0.0267)" in summary(no_final)
    assert panel_lines([no_final], "val_bpb")[0].whole is None


def test_reading_skips_what_is_not_a_record(tmp_path):
    run = _write(tmp_path / "live", _train_records(10), tail='{"step": 11, "loss": 0.')  # a line being written
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().replace('{"step": 3,', '[1, 2]\n{"step": 3,', 1))
    r = read_run(run)
    assert [x["step"] for x in r.records] == [*range(1, 11), 10] and r.skipped == 2
    assert "2 line(s) skipped" in summary(r)
    same = read_run(run / "metrics.jsonl")  # the file itself names the run too
    assert same.label == "live" and len(same.records) == 11
    two = read_runs([str(_write(tmp_path / "x" / "run", _train_records(3))),
                     str(_write(tmp_path / "y" / "run", _train_records(3)))])
    assert [t.label for t in two] == [str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]
    with pytest.raises(MoeforgeError, match="no metrics.jsonl"):
        read_run(tmp_path)
    with pytest.raises(MoeforgeError, match="no step records"):
        read_run(_write(tmp_path / "empty", [{"note": 1}]))
    with pytest.raises(MoeforgeError, match="nope: not in the records; they have .*grad_norm"):
        choose_panels([r], ["loss", "nope"])


def test_plot_a_training_run(cli, run_copy):
    result = cli("plot", str(run_copy))
    assert result.rc == 0, result.err
    image = run_copy / "metrics.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".metrics.png")]  # no temporary file left
    records = [json.loads(x) for x in (run_copy / "metrics.jsonl").read_text().splitlines()]
    last_val = [r["val_bpb"] for r in records if "val_bpb" in r][-1]
    steps = max(r["step"] for r in records)
    assert f"run-copy: steps 1-{steps}" in result.out
    assert f"validation bits per byte {last_val:.4f} at step {steps} (the whole held-out split)" in result.out
    assert f"wrote {image} (loss, val_bpb, val_loss, mtp_loss, lr, grad_norm, tokens_per_s, imbalance)" \
        in result.out


def test_plot_several_runs_and_formats(cli, run_copy, tmp_path, expect_error):
    sft = _write(tmp_path / "sft", [{"step": s, "loss": 2.0 / s, "lr": 1e-4, "grad_norm": 0.5, "tokens": 100 * s,
                                      "seconds": 0.1, **({"val_loss": 1.0 / s} if s % 5 == 0 else {})}
                                     for s in range(1, 21)])
    grpo = _write(tmp_path / "grpo", [{"step": s, "reward": s / 20, "accuracy": s / 40, "kl": 0.01 * s,
                                       "loss": 0.1, "grad_norm": 1.0, "completion_tokens": 30.0, "seconds": 1.0}
                                      for s in range(1, 21)])
    for suffix, magic in ((".pdf", b"%PDF"), (".svg", b"<?xml")):
        out = tmp_path / f"all{suffix}"
        result = cli("plot", str(run_copy), str(sft), str(grpo), "--out", str(out), "--smooth", "3")
        assert result.rc == 0, result.err
        assert out.read_bytes()[:len(magic)] == magic
        assert "reward, accuracy, kl" in result.out and "grpo: steps 1-20; loss 0.1 (mean of the last 3); " \
                                                        "reward 0.95 (mean of the last 3)" in result.out

    before = snapshot_tree(tmp_path)
    expect_error(cli("plot", str(run_copy), str(sft)), "plot", "several runs need --out")
    expect_error(cli("plot", str(sft), "--out", str(tmp_path / "x.jpg")), "plot", ".png, .pdf, .svg")
    expect_error(cli("plot", str(sft), "--out", str(tmp_path / "no" / "x.png")), "plot", "does not exist")
    expect_error(cli("plot", str(sft), str(grpo), "--x", "tokens", "--out", str(tmp_path / "t.png")), "plot",
                 "grpo", "no token count")
    expect_error(cli("plot", str(sft), "--metrics", "reward"), "plot", "reward: not in the records")
    expect_error(cli("plot", str(sft), "--smooth", "0"), "plot", "--smooth must be >= 1")
    expect_error(cli("plot", str(tmp_path / "missing")), "plot", "does not exist")
    assert snapshot_tree(tmp_path) == before  # nothing written by the failures
