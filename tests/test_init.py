"""`moeforge train --init CHECKPOINT` (train.init_from): a new run that starts from a checkpoint's weights.

- with learning rates too small to move an FP32 weight (and no bias updates), the run ends with the
  checkpoint's weights bit for bit, routing biases included: so it started from them; its config
  takes the checkpoint's model and records the checkpoint; without --init the same run ends elsewhere;
- a run started with --init and resumed equals the uninterrupted one (the resume reads its own
  checkpoint, not the --init one);
- refusals as one-line errors: another model config, --init with --resume, a path with no checkpoint.
Under expert parallelism (2 ranks) the same start is tested in tests/test_parallel.py.
"""

from __future__ import annotations

import dataclasses

import torch

from conftest import STEPS_INDEPENDENT_SCHEDULE, read_metrics
from moeforge.train.checkpoint import load_checkpoint_config, load_trained_model

SHAPE = ["train.seq_len=64", "train.batch_size=4", "train.sample_tokens=8"]  # the checkpoint's context is 64
FROZEN = [*SHAPE, "train.lr=1e-30", "train.muon_lr=1e-30", "train.bias_update_speed=0", "train.eval_every=0",
          "train.checkpoint_every=0"]


def _weights(run) -> dict:
    return load_trained_model(run, "cpu")[0].state_dict()


def test_a_run_starts_from_the_checkpoints_weights(cli, trained_run, tmp_path):
    out = tmp_path / "init"
    r = cli("train", "--init", trained_run.out, "--out", out, "--steps", "2", "--data", trained_run.data,
            "--no-progress", *FROZEN)
    assert r.rc == 0, r.err
    start, got = _weights(trained_run.out), _weights(out)
    assert start.keys() == got.keys() and all(torch.equal(start[k], got[k]) for k in start)
    assert any(k.endswith("e_score_correction_bias") and start[k].abs().sum() > 0 for k in start)  # trained biases
    cfg = load_checkpoint_config(out / "checkpoints" / "step_0000002")
    assert cfg.model == load_checkpoint_config(trained_run.checkpoint(8)).model
    assert cfg.train.init_from == str(trained_run.checkpoint(8))

    plain = tmp_path / "plain"  # the same settings without --init: the initialisation's weights instead
    r = cli("train", "--out", plain, "--steps", "2", "--data", trained_run.data, "--no-progress", *FROZEN,
            *(f"model.{k}={v}" for k, v in dataclasses.asdict(cfg.model).items() if k != "eos_token_id"))
    assert r.rc == 0, r.err
    other = _weights(plain)
    assert not torch.equal(other["embed.weight"], start["embed.weight"])


def test_resuming_a_run_started_from_a_checkpoint(cli, trained_run, tmp_path):
    common = ["--init", trained_run.out, "--data", trained_run.data, "--no-progress", *STEPS_INDEPENDENT_SCHEDULE,
              *SHAPE, "train.eval_every=0", "train.checkpoint_every=2", "train.lr=1e-3", "train.optimizer=adamw"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli("train", "--out", whole, "--steps", "4", *common).rc == 0
    assert cli("train", "--out", parts, "--steps", "2", *common).rc == 0
    r = cli("train", "--out", parts, "--steps", "4", "--resume", "--no-progress")
    assert r.rc == 0, r.err
    def steps(run):  # the training records (the 2-step run also validated at its end), without timings
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "tflops")} for r in read_metrics(run)
                if "loss" in r]

    assert steps(parts) == steps(whole) and len(steps(whole)) == 4
    a, b = _weights(whole), _weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], _weights(trained_run.out)["embed.weight"])  # it did train


def test_init_refusals(cli, trained_run, tmp_path, expect_error, snapshot):
    before = snapshot(tmp_path)
    expect_error(cli("train", "--init", trained_run.out, "--out", tmp_path / "a", "--steps", "1", *SHAPE,
                     "model.max_position_embeddings=64", "model.num_hidden_layers=3"), "train", "another model config")
    expect_error(cli("train", "--init", trained_run.out, "--out", tmp_path / "b", "--resume"), "train",
                 "--init", "--resume")
    expect_error(cli("train", "--init", tmp_path / "nothing", "--out", tmp_path / "c"), "train", "does not exist")
    assert snapshot(tmp_path) == before
