"""The trainer under pipeline parallelism (parallel.pp=2, gloo on CPU) against the single-process trainer.

- Three optimizer steps of 4 micro-batches each (1f1b and dualpipev): the logged per-step losses
  (main, MTP, balance) within rtol 1e-4 of the single-process run's (the forward is the same FP32
  arithmetic; gradients are summed in another order, which AdamW amplifies a little per step).
- Rank 0 alone writes the checkpoint, in the single-process layout: the model state dict has the
  single model's keys and shapes, the optimizer state dict the single-process parameter indices,
  and it loads in one process (load_trained_model) with logits close to the single-process run's.
- `torchrun -m moeforge train ... parallel.pp=2 parallel.schedule=dualpipev`: rank 0 writes the
  metrics, the final validation and a sample (from a single-device copy of the gathered model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import single_process
from dist import run_dist, run_torchrun, teardown_aborted
from moeforge.config import config_from_dict, load_config

STEPS = 3
MODEL = [
    "model.hidden_size=64", "model.num_hidden_layers=4", "model.first_k_dense_replace=1",
    "model.intermediate_size=128", "model.moe_intermediate_size=32", "model.n_routed_experts=8",
    "model.n_group=2", "model.topk_group=1", "model.num_experts_per_tok=2", "model.n_shared_experts=1",
    "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
    "model.v_head_dim=16", "model.num_attention_heads=2", "model.max_position_embeddings=64",
    "model.num_nextn_predict_layers=1",
    # the CLI's default preset scales the routed experts by 2.5; the in-process reference's config by 1.0
    "model.routed_scaling_factor=1.0",
]
TRAIN = [
    f"train.steps={STEPS}", "train.seq_len=32", "train.batch_size=8", "train.micro_batch_size=2",
    "train.warmup_steps=0", "train.lr=2e-3", "train.grad_clip=0.5", "train.bias_update_speed=0.01",
    "train.sample_tokens=0", "train.eval_every=0",
]
LOSS_RTOL = 1e-4


def make_config(data, out, extra=()) -> dict:
    return load_config(None, None, [*MODEL, *TRAIN, f"train.data={data}", f"train.out={out}", *extra]).to_dict()


def fixed_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(7))


def train_run(cfg_dict: dict, cache: str | None) -> dict:
    """STEPS trainer steps, then a checkpoint (every rank joins the gather; rank 0 writes it)."""
    if cache is not None:
        os.environ["MOEFORGE_CACHE"] = cache
    from moeforge.train.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg_dict), progress=False)
    records = [trainer.train_step() for _ in range(STEPS)]
    path = trainer.save()
    biases = {}
    if trainer.stages is not None:
        from moeforge.parallel.pipeline import moe_layers

        biases = {n: m.gate.e_score_correction_bias.clone() for n, m in moe_layers(trainer.stages).items()}
    trainer.close()
    return {"records": records, "path": str(path), "biases": biases}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, mf_cache_dir):
    out = tmp_path_factory.mktemp("pipe_ref") / "run"
    res = single_process(lambda: train_run(make_config(data_dir, out), None), mf_cache_dir)
    res["out"] = out
    return res


@pytest.mark.dist
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_pipeline_trainer_matches_single_process(schedule, reference, data_dir, mf_env, tmp_path):
    from moeforge.train import checkpoint as ckpt
    from moeforge.train.checkpoint import load_trained_model

    out = tmp_path / "run"
    cfg = make_config(data_dir, out, ["parallel.pp=2", f"parallel.schedule={schedule}"])
    results = run_dist(train_run, 2, cfg, str(mf_env), init=False)
    for rank, res in enumerate(results):  # every pp rank reports the same (broadcast) losses
        assert [r["step"] for r in res["records"]] == [1, 2, 3]
        for a, b in zip(res["records"], reference["records"]):
            for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), f"{schedule} rank {rank} step {a['step']} {key}"
            assert a["imbalance"] == pytest.approx(b["imbalance"], rel=1e-6)
    # the routing biases of both ranks' layers together are the single-process model's
    ref_model, _ = load_trained_model(reference["out"], "cpu")
    ref_buffers = dict(ref_model.named_buffers())
    seen = {}
    for res in results:
        seen.update(res["biases"])
    assert set(seen) == {n for n, _ in ref_model.named_modules() if hasattr(_, "tokens_per_expert")}
    for name, bias in seen.items():
        torch.testing.assert_close(bias, ref_buffers[f"{name}.gate.e_score_correction_bias"], rtol=0, atol=1e-6)
    # rank 0 wrote a single-process checkpoint
    parts = ckpt.load_checkpoint(Path(results[0]["path"]), map_location="cpu")
    ref_parts = ckpt.load_checkpoint(Path(reference["path"]), map_location="cpu")
    model_sd, ref_sd = parts["model.pt"], ref_parts["model.pt"]
    assert list(model_sd) == list(ref_sd)
    for k in ref_sd:
        assert model_sd[k].shape == ref_sd[k].shape, k
    opt, ref_opt = parts["optimizer.pt"], ref_parts["optimizer.pt"]
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in ref_opt["param_groups"]]
    assert sorted(opt["state"]) == sorted(ref_opt["state"])
    for i, st in ref_opt["state"].items():
        torch.testing.assert_close(opt["state"][i]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    assert parts["state.pt"]["step"] == STEPS
    model, mcfg = load_trained_model(out, "cpu")
    with torch.no_grad():
        logits = model(fixed_tokens(mcfg.model.vocab_size))
        ref_logits = ref_model(fixed_tokens(mcfg.model.vocab_size))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.dist
def test_torchrun_cli_pp2_dualpipev(reference, data_dir, mf_cache_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m moeforge train ... parallel.pp=2 parallel.schedule=dualpipev`."""
    out = tmp_path / "run"
    args = ["-m", "moeforge", "train", "--out", out, "--steps", STEPS, "--data", data_dir, "--no-progress",
            *MODEL, *TRAIN, "train.sample_tokens=4", "parallel.pp=2", "parallel.schedule=dualpipev"]
    res = run_torchrun(args, 2, env={"MOEFORGE_CACHE": str(mf_cache_dir)}, cwd=tmp_path)
    metrics = out / "metrics.jsonl"
    assert res.returncode == 0 or (teardown_aborted(res) and metrics.is_file()), res.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for a, b in zip(train, reference["records"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
    assert any("val_loss" in r for r in records)
    assert "parallel: 2 ranks = pp 2 x dp 1 x ep 1 | schedule dualpipev" in res.stdout
    assert res.stdout.count("validation: loss") == 1 and "sample:" in res.stdout
    assert (out / "checkpoints" / f"step_{STEPS:07d}").is_dir()


def test_pipeline_layouts_the_trainer_refuses():
    """pp with dp/ep (not supported by the trainer yet), sharding, and too few micro-batches: clear errors."""
    from types import SimpleNamespace

    from moeforge.errors import MoeforgeError
    from moeforge.train.trainer import check_pipeline_layout

    cfg = config_from_dict(make_config("unused", "unused", ["parallel.pp=2", "parallel.schedule=dualpipev"]))
    check_pipeline_layout(cfg, SimpleNamespace(pp=2, dp=1, ep=1))  # 4 micro-batches: fine
    for ctx, fragment in [(SimpleNamespace(pp=2, dp=1, ep=2), "dp = ep = 1"),
                          (SimpleNamespace(pp=2, dp=2, ep=1), "dp = ep = 1")]:
        with pytest.raises(MoeforgeError, match=fragment):
            check_pipeline_layout(cfg, ctx)
    cfg.train.micro_batch_size = 4  # 2 micro-batches < 2 x pp stages of dualpipev
    with pytest.raises(MoeforgeError, match="fewer than the 4 pipeline stages"):
        check_pipeline_layout(cfg, SimpleNamespace(pp=2, dp=1, ep=1))
    cfg.train.micro_batch_size = 2
    cfg.parallel.sharding = "zero2"
    with pytest.raises(MoeforgeError, match="sharding"):
        check_pipeline_layout(cfg, SimpleNamespace(pp=2, dp=1, ep=1))
