"""End-to-end tests of training: resume determinism, gradient accumulation, checkpoints, metrics.

Every run goes through the real CLI (`moeforge.cli.main`, in-process) on the tiny model and the
small test corpus of conftest.py; the shared 8-step baseline run is `trained_run`.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from moeforge.cli import main
from moeforge.errors import MoeforgeError
from moeforge.train import checkpoint as ckpt
from moeforge.train.trainer import Trainer

BASELINE_STEPS = 8  # the `trained_run` fixture of conftest.py: 8 steps ...
BASELINE_CHECKPOINT_EVERY = 4  # ... with a checkpoint every 4

TRAIN_KEYS = {"step", "loss", "lr", "tokens", "mtp_loss", "balance_loss", "grad_norm", "tokens_per_s", "imbalance"}


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_losses(records: list[dict]) -> dict[int, float]:
    """step -> loss of the training records (the last one wins when a step was logged twice)."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def load_weights(step_dir) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(step_dir, ("model.pt",))["model.pt"]


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: tensor {k} differs"


# ---------------------------------------------------------------------------------------------
# 1. resume determinism
# ---------------------------------------------------------------------------------------------
def test_resume_is_bit_identical_to_uninterrupted_run(cli, trained_run, tmp_path):
    """Compares `train --steps 4` + `train --resume --steps 8` (another out folder) with the
    uninterrupted 8-step baseline: the "loss" of every step 1..8 in metrics.jsonl is == (bit-
    identical), and the step-8 model weights and optimizer state are torch.equal.

    Both runs use conftest's STEPS_INDEPENDENT_SCHEDULE: lr, MTP weight and bias-update schedules
    are fractions of train.steps, so a run planned for 4 steps legitimately differs from the first
    4 steps of one planned for 8 (test_interrupted_run_... covers the default schedules)."""
    out = tmp_path / "resumed"
    r = cli("train", "--out", out, "--steps", 4, *trained_run.train_args)
    assert r.rc == 0, r.err
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_0000004"]
    # No --data / overrides: the resumed run takes its config from the checkpoint.
    r = cli("train", "--out", out, "--resume", "--steps", 8, "--no-progress")
    assert r.rc == 0, r.err
    assert "checkpoint: " in r.out and "step_0000008" in r.out

    base = step_losses(trained_run.metrics())
    resumed = step_losses(read_metrics(out))
    assert sorted(base) == list(range(1, BASELINE_STEPS + 1))
    assert resumed == base  # exact float equality, step by step
    # training learns something: the preset's constant lr moves the loss within 8 steps
    assert base[BASELINE_STEPS] < base[1]

    final = trained_run.checkpoint(BASELINE_STEPS)
    assert_same_state(load_weights(final), load_weights(out / "checkpoints" / "step_0000008"), "model")
    opt_a = ckpt.load_checkpoint(final, ("optimizer.pt",))["optimizer.pt"]
    opt_b = ckpt.load_checkpoint(out / "checkpoints" / "step_0000008", ("optimizer.pt",))["optimizer.pt"]
    for pa, pb in zip(opt_a["state"].values(), opt_b["state"].values()):
        assert_same_state(pa, pb, "optimizer")


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, trained_run, mf_cache_dir):
    """The baseline's exact command, interrupted (Ctrl-C) after step 5, then `--resume`d.

    Step 4 is a periodic checkpoint (checkpoint_every=4), not the end of a run, and the schedule
    is the baseline's (total steps 8 from the start). Returns the out folder, both exit statuses,
    and metrics.jsonl and the checkpoints as they were before the resume.
    """
    out = tmp_path_factory.mktemp("interrupted") / "run"
    real_step = Trainer._launch_step

    def step_then_interrupt(self):
        if self.step == 5:
            raise KeyboardInterrupt
        return real_step(self)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the `cli` fixture does (see conftest.py)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MOEFORGE_CACHE", str(mf_cache_dir))
            mp.setattr(Trainer, "_launch_step", step_then_interrupt)
            rc_interrupted = main(["train", "--out", str(out), "--steps", str(BASELINE_STEPS), *trained_run.train_args])
            mp.setattr(Trainer, "_launch_step", real_step)
            metrics_before_resume = read_metrics(out)
            ckpts_before_resume = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
            rc_resumed = main(["train", "--out", str(out), "--resume", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "rc": (rc_interrupted, rc_resumed), "metrics_before": metrics_before_resume,
            "ckpts_before": ckpts_before_resume}


def test_interrupted_run_resumes_from_periodic_checkpoint(interrupted_run, trained_run):
    """Ctrl-C after step 5 exits 130 leaving step_0000004 (the periodic checkpoint); `--resume`
    (no --steps) continues from step 4 to 8. Compares the losses of steps 1..8 (the latest record
    of each step) and the final weights with the baseline's: bit-identical."""
    assert interrupted_run["rc"] == (130, 0)
    assert interrupted_run["ckpts_before"] == ["step_0000004"]
    assert max(step_losses(interrupted_run["metrics_before"])) == 5
    out = interrupted_run["out"]
    assert step_losses(read_metrics(out)) == step_losses(trained_run.metrics())
    assert_same_state(load_weights(trained_run.checkpoint(BASELINE_STEPS)),
                      load_weights(out / "checkpoints" / "step_0000008"), "model")


def test_metrics_have_one_record_per_step_after_resume(interrupted_run):
    """Compares the steps of the training records of metrics.jsonl after interrupt + resume with
    1..8: each step once."""
    steps = [r["step"] for r in read_metrics(interrupted_run["out"]) if "loss" in r]
    assert steps == list(range(1, BASELINE_STEPS + 1))


# ---------------------------------------------------------------------------------------------
# gradient accumulation, checkpoint retention, crash leftovers
# ---------------------------------------------------------------------------------------------
def test_grad_accumulation_keep_checkpoints_and_crash_leftovers(cli, trained_run, tmp_path, snapshot):
    """micro_batch_size=2 with batch_size=4 (2 micro-batches per step), a checkpoint every step,
    keep_checkpoints=2:

    * step 1's loss equals the baseline's step-1 loss (same batch, same init; batch 4 in one go)
      up to float rounding, and every record says batch_size 4, tokens = 4 * 64 * step;
    * after 3 steps only step_0000002 and step_0000003 remain;
    * a crash mid-write (a `.tmp-step_*` folder with partial files, and a `step_*` folder without
      a manifest) is ignored by list_checkpoints / resolve_checkpoint and by `--resume`, which
      continues from step 3 (to step 4), leaving the leftovers alone.
    """
    out = tmp_path / "accum"
    r = cli("train", "--out", out, "--steps", 3, *trained_run.train_args, "train.micro_batch_size=2",
            "train.checkpoint_every=1", "train.keep_checkpoints=2")
    assert r.rc == 0, r.err
    records = [x for x in read_metrics(out) if "loss" in x]
    assert [x["step"] for x in records] == [1, 2, 3]
    assert all(x["batch_size"] == 4 and x["tokens"] == 4 * 64 * x["step"] for x in records)
    assert records[0]["loss"] == pytest.approx(step_losses(trained_run.metrics())[1], rel=1e-5, abs=1e-6)

    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000003"]

    # simulate crashes: a half-written temp folder (newer step) and a manifest-less step folder
    tmp = root / f".tmp-step_0000004-{os.getpid() + 1}"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"\x80\x02partial")
    (tmp / "config.toml").write_text("[model]\n")
    partial = root / "step_0000099"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"\x80\x02partial")
    leftovers = {**{f"tmp/{k}": v for k, v in snapshot(tmp).items()},
                 **{f"partial/{k}": v for k, v in snapshot(partial).items()}}

    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_0000002", "step_0000003"]
    assert ckpt.resolve_checkpoint(out).name == "step_0000003"
    r = cli("train", "--out", out, "--resume", "--steps", 4, "--no-progress")
    assert r.rc == 0, r.err
    records = [x for x in read_metrics(out) if "loss" in x]
    assert [x["step"] for x in records] == [1, 2, 3, 4]
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_0000003", "step_0000004"]
    assert ckpt.load_checkpoint(root / "step_0000004", ("state.pt",))["state.pt"]["step"] == 4
    assert {**{f"tmp/{k}": v for k, v in snapshot(tmp).items()},
            **{f"partial/{k}": v for k, v in snapshot(partial).items()}} == leftovers


def test_background_checkpoints_hold_the_step_they_were_taken_at(cli, trained_run, tmp_path):
    """train.async_checkpoint (the default for one process): every checkpoint is written while the
    next step trains, and holds what a synchronous save of that step holds, file for file (the
    weights and optimizer state bit for bit: a save that read the live tensors would hold a later step)."""
    runs = {}
    for mode in ("true", "false"):
        out = tmp_path / f"async_{mode}"
        r = cli("train", "--out", out, "--steps", 4, *trained_run.train_args, "train.checkpoint_every=1",
                "train.keep_checkpoints=10", f"train.async_checkpoint={mode}")
        assert r.rc == 0, r.err
        runs[mode] = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in runs["true"]] == [p.name for p in runs["false"]] == [f"step_000000{i}" for i in (1, 2, 3, 4)]
    for a, b in zip(runs["true"], runs["false"]):
        pa, pb = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
        assert_same_state(pa["model.pt"], pb["model.pt"], a.name)
        oa, ob = pa["optimizer.pt"], pb["optimizer.pt"]
        assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
        for k in oa["state"]:
            assert_same_state(oa["state"][k], ob["state"][k], f"{a.name} optimizer {k}")
        assert pa["state.pt"]["step"] == pb["state.pt"]["step"] and pa["state.pt"]["loader"] == pb["state.pt"]["loader"]


def test_a_failed_background_checkpoint_is_reported(cli, expect_error, trained_run, tmp_path, monkeypatch):
    """A background save that fails (here: the disk full at step 2) stops the run at its next save
    with one line naming the step and the cause; no folder of that step looks complete, and the
    checkpoint before it is intact."""
    real = ckpt.save_checkpoint

    def disk_full_at_2(root, step, *args, **kwargs):
        if step == 2:
            raise OSError(28, "No space left on device")
        return real(root, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", disk_full_at_2)
    out = tmp_path / "full"
    r = cli("train", "--out", out, "--steps", 4, *trained_run.train_args, "train.checkpoint_every=1",
            "train.keep_checkpoints=10")
    expect_error(r, "train", "the checkpoint of step 2 could not be written", "No space left on device")
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_0000001"]
    ckpt.read_manifest_checked(out / "checkpoints" / "step_0000001")


def test_a_background_save_that_would_not_fit_in_host_memory_is_written_in_step(tmp_path, monkeypatch):
    """save_in_background: with the snapshots and the largest file's bytes over HOST_MEMORY_SHARE of
    the host's available memory, the checkpoint is written before it returns (after the save in
    flight), by the calling thread; with room, by the background thread."""
    import threading

    from moeforge.config import load_config
    from moeforge.train.checkpoint import BackgroundSaves, save_in_background

    cfg = load_config("tiny", None, [])
    model, optim, state = {"w": torch.ones(1000)}, {"m": torch.zeros(1000)}, {"step": 1}  # 4,000 bytes each
    writers = []
    real = ckpt.save_checkpoint

    def recording(root, step, *args, **kwargs):
        writers.append((step, threading.current_thread() is threading.main_thread()))
        return real(root, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", recording)
    saves, root = BackgroundSaves(), tmp_path / "checkpoints"
    save_in_background(saves, root, 1, cfg, model, optim, state, 5, free=10**9)
    path = save_in_background(saves, root, 2, cfg, model, optim, state, 5, free=9_000)  # needs 8,000 + 4,000 > 0.8 x 9,000
    assert (path / "manifest.json").is_file()  # on disk when it returns
    saves.wait()
    assert writers == [(1, False), (2, True)]
    assert torch.equal(ckpt.load_checkpoint(path, ("model.pt",))["model.pt"]["w"], model["w"])


def test_background_saves_run_one_at_a_time():
    """BackgroundSaves: a save runs in another thread; the next start waits for it; wait() returns
    once it is done and raises MoeforgeError for one that failed (report=False drops that error)."""
    import threading

    from moeforge.train.checkpoint import BackgroundSaves, cpu_snapshot

    saves, release, order = BackgroundSaves(), threading.Event(), []

    def record(name):  # (name, whether it ran outside the calling thread)
        order.append((name, threading.current_thread() is not threading.main_thread()))

    def slow(name):
        release.wait(5)
        record(name)

    saves.start(1, slow, "first")
    assert order == []
    release.set()
    saves.start(2, record, "second")  # waits for the first
    saves.wait()
    assert order == [("first", True), ("second", True)]
    saves.start(3, lambda: 1 / 0)
    with pytest.raises(MoeforgeError, match="checkpoint of step 3 could not be written: division by zero"):
        saves.wait()
    saves.wait()  # reported once
    saves.start(4, lambda: 1 / 0)
    saves.wait(report=False)
    saves.wait()

    live = {"w": torch.ones(3), "nested": [torch.zeros(2), 5], "lr": 0.1}
    snap = cpu_snapshot(live)
    live["w"].add_(1)
    live["nested"][0].add_(1)
    assert torch.equal(snap["w"], torch.ones(3)) and torch.equal(snap["nested"][0], torch.zeros(2))
    assert snap["nested"][1] == 5 and snap["lr"] == 0.1


def test_list_checkpoints_orders_by_step_and_needs_a_manifest(tmp_path):
    """Compares list_checkpoints on a hand-made folder with the complete step folders, by step
    number (not by name), ignoring temp/old folders, manifest-less folders and stray files."""
    root = tmp_path / "checkpoints"
    for name in ("step_10", "step_9", "step_0000100", ".tmp-step_0000200-1", ".old-step_0000009-1", "step_7"):
        (root / name).mkdir(parents=True)
    for name in ("step_10", "step_9", "step_0000100", ".tmp-step_0000200-1", ".old-step_0000009-1"):
        (root / name / "manifest.json").write_text("{}")
    (root / "step_11").write_text("a file, not a folder")
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_9", "step_10", "step_0000100"]
    assert ckpt.list_checkpoints(tmp_path / "missing") == []


def test_checkpoint_files_are_verified_against_the_manifest(trained_run, tmp_path):
    """A checkpoint of the baseline: its manifest lists every file with size and SHA-256; a
    same-size byte flip fails the checksum, a truncation fails the size check (MoeforgeError
    naming the file), and a missing file is reported as such."""
    import shutil

    src = trained_run.checkpoint(BASELINE_CHECKPOINT_EVERY)
    manifest = json.loads((src / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "optimizer.pt", "state.pt", "config.toml"}
    assert manifest["step"] == BASELINE_CHECKPOINT_EVERY
    ckpt.read_manifest_checked(src)

    cases = {"flip": ("optimizer.pt", "fails its checksum"), "truncate": ("state.pt", "bytes, expected"),
             "remove": ("model.pt", "model.pt is missing")}
    for how, (name, message) in cases.items():
        bad = tmp_path / how
        shutil.copytree(src, bad)
        f = bad / name
        data = bytearray(f.read_bytes())
        if how == "flip":
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        elif how == "truncate":
            f.write_bytes(bytes(data[: len(data) // 2]))
        else:
            f.unlink()
        with pytest.raises(MoeforgeError, match=message) as info:
            ckpt.load_checkpoint(bad)
        assert name in str(info.value)


def test_resume_of_a_finished_run_changes_nothing(cli, run_copy):
    """`--resume` on a run already at its last step trains nothing: the checkpoint of step 8 is
    written again (replacing the folder through a temp name) with byte-identical weights, step 4
    stays, no training record is added (only a validation record), no temp folder is left."""
    root = run_copy / "checkpoints"
    weights = (root / "step_0000008" / "model.pt").read_bytes()
    n_train = len([x for x in read_metrics(run_copy) if "loss" in x])
    r = cli("train", "--out", run_copy, "--resume", "--no-progress")
    assert r.rc == 0, r.err
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004", "step_0000008"]
    assert (root / "step_0000008" / "model.pt").read_bytes() == weights
    ckpt.read_manifest_checked(root / "step_0000008")
    records = read_metrics(run_copy)
    assert len([x for x in records if "loss" in x]) == n_train and "val_loss" in records[-1]


def test_bf16_fim_and_batch_ramp(cli, trained_run, tmp_path, monkeypatch):
    """Options no other test trains with: --precision bf16 (CPU autocast), fill-in-the-middle
    (train.fim_rate=0.5) and a batch ramp from 2 to 4 sequences in micro-batches of 2. Compares
    the records' batch_size and tokens with the ramp (2 then 4; 128 then 384 tokens); losses finite.
    With the threshold of passes over the data lowered to 0, the start says how often the run reads it."""
    from moeforge.train import trainer

    monkeypatch.setattr(trainer, "MAX_PASSES", 0)
    out = tmp_path / "bf16"
    r = cli("train", "--out", out, "--steps", 2, "--precision", "bf16", *trained_run.train_args,
            "train.fim_rate=0.5", "train.batch_size_start=2", "train.batch_ramp_steps=1", "train.micro_batch_size=2")
    assert r.rc == 0, r.err
    assert len([line for line in r.out.splitlines() if line.startswith("note: 2 steps of ")]) == 1
    records = [x for x in read_metrics(out) if "loss" in x]
    assert [(x["batch_size"], x["tokens"]) for x in records] == [(2, 128), (4, 384)]
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in records)
    assert ckpt.load_checkpoint_config(ckpt.resolve_checkpoint(out)).train.precision == "bf16"


def test_passes_note_names_the_passes_over_the_data():
    """The start of a run that would read its training tokens more than MAX_PASSES times says so: the
    `small` preset's former 5,000 steps of 32 x 1024 tokens on the default corpus's 2,826,612 tokens
    (58 passes); its 900 steps now (10 passes) print nothing."""
    from moeforge.train.trainer import MAX_PASSES, passes_note

    note = passes_note(5000, 32 * 1024, 2_826_612)
    assert note.startswith("note: 5,000 steps of 32,768 tokens read the 2,826,612 training tokens 58 times;")
    assert "--steps" in note and "--data" in note and "\n" not in note
    assert passes_note(900, 32 * 1024, 2_826_612) is None
    assert passes_note(MAX_PASSES, 100, 100) is None and passes_note(MAX_PASSES + 1, 100, 100) is not None


def test_fp8_width_note_names_the_measured_ratios():
    """An FP8 run on the GPU kernels at a hidden size below FP8_MIN_WIDTH (the `small` preset's 768)
    is told at its start that BF16 is likely faster there; at the `bench` preset's 2048 and wider,
    nothing."""
    from moeforge.config import load_config
    from moeforge.train.trainer import FP8_MIN_WIDTH, fp8_width_note

    note = fp8_width_note(load_config("small", None, []).model.hidden_size)
    assert note.startswith("note: at hidden size 768 FP8 is likely slower than BF16")
    assert "--precision bf16" in note and "docs/fp8.md" in note and "\n" not in note
    assert fp8_width_note(load_config("bench", None, []).model.hidden_size) is None
    assert fp8_width_note(FP8_MIN_WIDTH - 128) is not None and fp8_width_note(7168) is None


# ---------------------------------------------------------------------------------------------
# 2. metrics.jsonl and the run folder
# ---------------------------------------------------------------------------------------------
def test_metrics_jsonl_one_record_per_step(trained_run):
    """The baseline's metrics.jsonl: one training record per step 1..8 (in order) holding at least
    step, loss, lr, tokens, mtp_loss, balance_loss, grad_norm, tokens_per_s, imbalance with sane
    values (step 4's also the mid-run val_loss / val_bpb of eval_every=4), then one final
    validation record (val_loss, val_bpb) at step 8."""
    records = trained_run.metrics()
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, BASELINE_STEPS + 1))
    for r in train:
        missing = TRAIN_KEYS - r.keys()
        assert not missing, f"step {r['step']} lacks {sorted(missing)}"
        assert r["tokens"] == r["step"] * 4 * 64
        assert r["lr"] == pytest.approx(2e-3)  # conftest's lr, constant (STEPS_INDEPENDENT_SCHEDULE)
        for k in ("loss", "mtp_loss", "balance_loss", "grad_norm", "tokens_per_s"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r[k])
        assert 0 < r["loss"] < 10  # ~ln(8192) = 9.01 at the start
        assert r["imbalance"] >= 1.0  # max / mean tokens per expert
        assert ("val_loss" in r) == (r["step"] == BASELINE_CHECKPOINT_EVERY)
    assert train[BASELINE_CHECKPOINT_EVERY - 1]["val_bpb"] > 0
    others = [r for r in records if "loss" not in r]
    assert len(others) == 1
    assert others[0]["step"] == BASELINE_STEPS and {"val_loss", "val_bpb"} <= others[0].keys()
    assert others[0]["val_bpb"] > 0


def test_run_folder_layout(trained_run):
    """The baseline run folder: config.toml (the resolved config), metrics.jsonl and the two
    newest checkpoints (keep_checkpoints=2: steps 4 and 8), each with manifest.json and the
    config it was trained with (model.hidden_size=64); no temp folders left behind."""
    out = trained_run.out
    assert (out / "config.toml").is_file() and (out / "metrics.jsonl").is_file()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_0000004", "step_0000008"]
    cfg = ckpt.load_checkpoint_config(trained_run.checkpoint(8))
    assert cfg.model.hidden_size == 64 and cfg.train.steps == BASELINE_STEPS
    assert cfg.train.out == str(out)


def test_fresh_run_does_not_mix_metrics_with_a_stopped_run(cli, trained_run, tmp_path, monkeypatch):
    """A run interrupted at step 2 before any checkpoint, then the same command again (allowed:
    no checkpoint to resume): compares the steps of metrics.jsonl's training records with the
    second run's own steps 1..2."""
    out = tmp_path / "run"
    real_step = Trainer._launch_step

    def step_then_interrupt(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "_launch_step", step_then_interrupt)
    assert cli("train", "--out", out, "--steps", 3, *trained_run.train_args).rc == 130
    assert not ckpt.list_checkpoints(out / "checkpoints")
    monkeypatch.setattr(Trainer, "_launch_step", real_step)
    r = cli("train", "--out", out, "--steps", 2, *trained_run.train_args)
    assert r.rc == 0, r.err
    assert [x["step"] for x in read_metrics(out) if "loss" in x] == [1, 2]


# ---------------------------------------------------------------------------------------------
# a foreign tokenizer (EOS not at id 0)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory, data_dir):
    """A Hugging Face word-level tokenizer.json of the corpus's words whose EOS, `</s>`, is id 1."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = set()
    for f in sorted(data_dir.glob("*.txt")):
        words.update(re.findall(r"\w+|[^\w\s]", f.read_text(encoding="utf-8")))
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(sorted(words))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    path = tmp_path_factory.mktemp("tokenizer") / "words.json"
    tok.save(str(path))
    return path


@pytest.fixture
def word_tokenizer_run(cli, trained_run, word_tokenizer, tmp_path, tiny_overrides):
    """A 1-step run with --tokenizer (the word-level one): (out folder, the arguments it used)."""
    out = tmp_path / "words"
    args = ["--data", trained_run.data, "--tokenizer", word_tokenizer, "--no-progress", *tiny_overrides]
    r = cli("train", "--out", out, "--steps", 1, *args)
    assert r.rc == 0, r.err
    return out, args


def test_foreign_tokenizer_trains_and_resumes(cli, word_tokenizer_run):
    """Training with --tokenizer records the tokenizer's EOS id (1) in the checkpoint's config, and
    `--resume` from the run's own config continues (step 2), generate works with that tokenizer."""
    out, _ = word_tokenizer_run
    cfg = ckpt.load_checkpoint_config(ckpt.resolve_checkpoint(out))
    assert cfg.model.eos_token_id == 1 and cfg.train.tokenizer.endswith("words.json")
    r = cli("train", "--out", out, "--resume", "--steps", 2, "--no-progress")
    assert r.rc == 0, r.err
    assert ckpt.resolve_checkpoint(out).name == "step_0000002"
    r = cli("generate", "--checkpoint", out, "--prompt", "def", "--max-new-tokens", 3)
    assert r.rc == 0, r.err
    assert r.out.startswith("def")


def test_foreign_tokenizer_resumes_with_preset(cli, word_tokenizer_run):
    """`--resume --preset tiny` with the very arguments of the first run continues to step 2."""
    out, args = word_tokenizer_run
    r = cli("train", "--out", out, "--resume", "--steps", 2, "--preset", "tiny", *args)
    assert r.rc == 0, r.err


def test_evaluate_shards_rows_and_sums_to_the_whole():
    """evaluate(shard=(r, R)): the R shares (each batch's rows split, the short last batch padded
    with ignored rows) together count every target once and give the whole evaluation's loss."""
    import numpy as np

    from conftest import small_cfg
    from moeforge.model import build_model
    from moeforge.train.trainer import evaluate

    torch.manual_seed(0)
    model = build_model(small_cfg(), "cpu")
    tokens = np.random.default_rng(0).integers(0, 128, 6 * 8 + 4)  # 7 windows of 8: batches of 4 and 3 rows
    token_bytes = torch.randint(0, 3, (128,))
    cpu = torch.device("cpu")
    whole = evaluate(model, tokens, token_bytes, 8, 4, cpu, "fp32")
    parts = [evaluate(model, tokens, token_bytes, 8, 4, cpu, "fp32", shard=(r, 3)) for r in range(3)]
    assert sum(p["tokens"] for p in parts) == whole["tokens"] == 6 * 8 + 3
    assert sum(p["bytes"] for p in parts) == whole["bytes"]
    assert sum(p["loss"] * p["tokens"] for p in parts) / whole["tokens"] == pytest.approx(whole["loss"], rel=1e-6)
    # the reduce hook receives the four totals and its result is what is reported
    doubled = evaluate(model, tokens, token_bytes, 8, 4, cpu, "fp32", shard=(0, 1), reduce=lambda t: 2 * t)
    assert doubled["tokens"] == 2 * whole["tokens"] and doubled["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_a_steps_record_is_read_after_the_next_step_is_queued(cli, trained_run, tmp_path, monkeypatch):
    """The loop queues step n + 1 before it reads step n's numbers (so the host never waits on the
    device with nothing queued), except that a checkpoint step and the last step are read before
    anything else is queued; the records are the same as read one by one: every step once, in
    order, with the numbers train_step gives for the same run."""
    calls = []
    launch, finish = Trainer._launch_step, Trainer._finish_step

    def logged_launch(self):
        out = launch(self)
        calls.append(f"L{out['step']}")
        return out

    def logged_finish(self, p):
        calls.append(f"F{p['step']}")
        return finish(self, p)

    monkeypatch.setattr(Trainer, "_launch_step", logged_launch)
    monkeypatch.setattr(Trainer, "_finish_step", logged_finish)
    args = [a for a in trained_run.train_args if not a.startswith(("train.checkpoint_every", "train.eval_every"))]
    r = cli("train", "--out", tmp_path / "run", "--steps", 6, *args, "train.checkpoint_every=3", "train.eval_every=0")
    assert r.rc == 0, r.err
    assert calls == ["L1", "L2", "F1", "L3", "F2", "F3", "L4", "L5", "F4", "L6", "F5", "F6"]
    records = [x for x in read_metrics(tmp_path / "run") if "loss" in x]
    assert [x["step"] for x in records] == [1, 2, 3, 4, 5, 6]
    assert all(x["tokens_per_s"] > 0 and math.isfinite(x["grad_norm"]) for x in records)
    monkeypatch.undo()

    from moeforge.config import load_config
    from moeforge.train.trainer import Trainer as T

    cfg = load_config(path=str(tmp_path / "run" / "config.toml"), overrides=[f"train.out={tmp_path / 'again'}"])
    trainer = T(cfg, progress=False)
    one_by_one = [trainer.train_step() for _ in range(6)]
    trainer.close()
    for a, b in zip(records, one_by_one):
        assert {k: a[k] for k in ("step", "loss", "grad_norm", "lr", "tokens")} == \
            {k: b[k] for k in ("step", "loss", "grad_norm", "lr", "tokens")}


def test_a_steps_tokens_per_s_counts_its_own_time_only(trained_run, tmp_path):
    """A record read late (the loop reads step n after queuing step n + 1) is timed from its own
    launch to the end of its own work: on the CPU, 1 s spent between the launch and the read (where
    the next step would run) is not counted."""
    import time

    from moeforge.config import load_config
    from moeforge.train.trainer import Trainer as T

    cfg = load_config(path=str(trained_run.out / "config.toml"), overrides=[f"train.out={tmp_path / 'again'}"])
    trainer = T(cfg, progress=False)
    p = trainer._launch_step()
    time.sleep(1.0)
    rec = trainer._finish_step(p)
    trainer.close()
    assert rec["batch_size"] * cfg.train.seq_len / rec["tokens_per_s"] < 1.0


def test_a_step_that_fails_to_queue_keeps_the_record_of_the_step_before(cli, trained_run, tmp_path, monkeypatch):
    """Out of memory while step 3 is queued: step 2's record, not read yet (records are read one step
    late), is still written before the one-line error (exit status 1)."""
    launch = Trainer._launch_step

    def out_of_memory_at_step_3(self):
        if self.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return launch(self)

    monkeypatch.setattr(Trainer, "_launch_step", out_of_memory_at_step_3)
    args = [a for a in trained_run.train_args if not a.startswith(("train.checkpoint_every", "train.eval_every"))]
    r = cli("train", "--out", tmp_path / "run", "--steps", 5, *args, "train.checkpoint_every=0", "train.eval_every=0")
    assert r.rc == 1 and "out of memory" in r.err
    assert [x["step"] for x in read_metrics(tmp_path / "run") if "loss" in x] == [1, 2]
