"""The trainer under pipeline parallelism (parallel.pp=2, gloo on CPU) against the single-process trainer.

- Three optimizer steps of 4 micro-batches each (1f1b and dualpipev): the logged per-step losses
  (main, MTP, balance) within rtol 1e-4 of the single-process run's (the forward is the same FP32
  arithmetic; gradients are summed in another order, which AdamW amplifies a little per step).
- Every rank writes its stages' pieces with torch.distributed.checkpoint: one process reads them
  all back (model and AdamW moments, under the single model's names) with logits close to the
  single-process run's.
- DualPipeV with attention masked to documents (train.document_mask): the single process's losses.
- PP=2 x EP=2 (4 processes): the same comparison, each stage's experts split over 2 ranks; and with
  each stage's AdamW state partitioned (ZeRO-1) or its parameters sharded by FSDP2 (zero2, full)
  over the stage's data ranks.
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
from dist import DIST_MODEL, measure_model_states, planned_model_states, run_dist, run_torchrun, teardown_aborted
from moeforge.config import config_from_dict, load_config

STEPS = 3
MODEL = [
    *DIST_MODEL, "model.num_hidden_layers=4",
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


def train_run(cfg_dict: dict, cache: str | None, resume: bool = False, steps: int = STEPS) -> dict:
    """`steps` trainer steps (after resuming from the newest checkpoint), then a checkpoint (every
    rank joins the gather; rank 0 writes it)."""
    if cache is not None:
        os.environ["MOEFORGE_CACHE"] = cache
    from moeforge.train.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg_dict), resume=resume, progress=False)
    if trainer.stages is not None:  # memory for this rank's stages only: the rest of the model stays on meta
        from moeforge.parallel.pipeline import stage_state_dict

        mine = set(stage_state_dict(trainer.stages))
        for name, t in trainer.model.state_dict().items():
            assert t.is_meta == (name not in mine), name
    memory = measure_model_states(trainer)
    records = [trainer.train_step() for _ in range(steps)]
    path = trainer.save()
    biases = {}
    if trainer.stages is not None:
        from moeforge.parallel.pipeline import moe_layers

        biases = {n: m.gate.e_score_correction_bias.clone() for n, m in moe_layers(trainer.stages).items()}
    trainer.close()
    return {"records": records, "path": str(path), "biases": biases, "memory": memory}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, mf_cache_dir):
    out = tmp_path_factory.mktemp("pipe_ref") / "run"
    res = single_process(lambda: train_run(make_config(data_dir, out), None), mf_cache_dir)
    res["out"] = out
    return res


LAYOUTS = {  # name: (processes, parallel overrides)
    "1f1b": (2, ["parallel.pp=2", "parallel.schedule=1f1b"]),
    "dualpipev": (2, ["parallel.pp=2", "parallel.schedule=dualpipev"]),
    # each rank's stage pieces written by DCP's thread, from CPU copies, while the run goes on
    "dualpipev_async_checkpoint": (2, ["parallel.pp=2", "parallel.schedule=dualpipev", "train.async_checkpoint=true"]),
    "1f1b_ep2": (4, ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=1f1b"]),
    # DeepSeek-V3's combination: pipeline stages whose AdamW state is partitioned over their data ranks
    "1f1b_dp2_zero1": (4, ["parallel.pp=2", "parallel.sharding=zero1", "parallel.schedule=1f1b"]),
    # FSDP2 inside each stage: parameters, gradients and AdamW state sharded over the stage's data ranks
    "1f1b_dp2_full": (4, ["parallel.pp=2", "parallel.sharding=full", "parallel.schedule=1f1b"]),
    "dualpipev_ep2_zero2": (4, ["parallel.pp=2", "parallel.ep=2", "parallel.sharding=zero2",
                                "parallel.schedule=dualpipev"]),
}


@pytest.mark.dist
@pytest.mark.parametrize("schedule", list(LAYOUTS))
def test_pipeline_trainer_matches_single_process(schedule, reference, data_dir, mf_env, tmp_path):
    from moeforge.train.checkpoint import load_trained_model

    out = tmp_path / "run"
    nproc, extra = LAYOUTS[schedule]
    cfg = make_config(data_dir, out, extra)
    results = run_dist(train_run, nproc, cfg, str(mf_env), init=False)
    # each rank's weights, gradients and optimizer state are what `moeforge plan` predicts for it
    assert [res["memory"] for res in results] == planned_model_states(cfg, nproc), schedule
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
    # the ranks' DCP pieces read back in one process: every weight and AdamW moment of the model
    _check_distributed_checkpoint(Path(results[0]["path"]), Path(reference["path"]))
    model, mcfg = load_trained_model(out, "cpu")
    with torch.no_grad():
        logits = model(fixed_tokens(mcfg.model.vocab_size))
        ref_logits = ref_model(fixed_tokens(mcfg.model.vocab_size))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3)
    if schedule in ("1f1b_dp2_zero1", "1f1b_dp2_full"):  # resume: each rank reads back its moments (ZeRO-1: the
        # ones it owns; FSDP: its shards); the next step is one process's
        import shutil

        ref_out = tmp_path / "ref_copy"
        shutil.copytree(reference["out"], ref_out)
        ref_next = single_process(lambda: train_run(make_config(data_dir, ref_out), None, resume=True, steps=1),
                                  mf_env)["records"][0]
        for res in run_dist(train_run, nproc, cfg, str(mf_env), True, 1, init=False):
            (rec,) = res["records"]
            assert rec["step"] == STEPS + 1
            for key in ("loss", "grad_norm"):
                assert rec[key] == pytest.approx(ref_next[key], rel=LOSS_RTOL), f"resumed {key}"


@pytest.mark.dist
def test_pipeline_trainer_with_muon_matches_single_process(data_dir, mf_env, tmp_path):
    """train.optimizer=muon on pipeline stages (pp=2, 1F1B): the stages' prefixed parameter names
    still keep the embedding, head and gates on AdamW, and the losses and gradient norms are the
    single process's."""
    muon = ["train.optimizer=muon", "train.muon_lr=5e-3"]
    ref = single_process(lambda: train_run(make_config(data_dir, tmp_path / "ref", muon), None), mf_env)
    nproc, extra = LAYOUTS["1f1b"]
    cfg = make_config(data_dir, tmp_path / "run", [*muon, *extra])
    results = run_dist(train_run, nproc, cfg, str(mf_env), init=False)
    assert [res["memory"] for res in results] == planned_model_states(cfg, nproc)  # Muon's momentum, AdamW's moments
    for rank, res in enumerate(results):
        assert [r["step"] for r in res["records"]] == [1, 2, 3]
        for a, b in zip(res["records"], ref["records"]):
            for key in ("loss", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), f"rank {rank} step {a['step']} {key}"


def test_pipeline_trainer_with_document_masking_matches_single_process(data_dir, mf_env, tmp_path):
    """train.document_mask on pipeline stages (pp=2, DualPipeV: each rank's two stages build the mask
    from the micro-batch's tokens, which every rank reads): the losses and gradient norms are the
    single process's with the same setting, and differ from the causal run's (the windows hold
    documents' ends, so the setting is in play)."""
    import json

    short = tmp_path / "short"  # the corpus's paragraphs as documents of their own: ends in every window
    short.mkdir()
    for src in sorted(data_dir.iterdir()):
        paragraphs = [p for p in src.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        (short / f"{src.stem}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    docs = ["train.document_mask=true"]
    causal = single_process(lambda: train_run(make_config(short, tmp_path / "causal"), None), mf_env)
    ref = single_process(lambda: train_run(make_config(short, tmp_path / "ref", docs), None), mf_env)
    assert ref["records"][0]["loss"] != pytest.approx(causal["records"][0]["loss"], rel=1e-6)
    nproc, extra = LAYOUTS["dualpipev"]
    results = run_dist(train_run, nproc, make_config(short, tmp_path / "run", [*docs, *extra]), str(mf_env),
                       init=False)
    for rank, res in enumerate(results):
        assert [r["step"] for r in res["records"]] == [1, 2, 3]
        for a, b in zip(res["records"], ref["records"]):
            for key in ("loss", "mtp_loss", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), f"rank {rank} step {a['step']} {key}"


def _check_distributed_checkpoint(path: Path, ref_path: Path) -> None:
    """Model and optimizer of a DCP checkpoint loaded into a single-process model and AdamW: the
    moments equal the single-process run's (exp_avg_sq within 1e-3: gradients summed in another order)."""
    from moeforge.model import build_model
    from moeforge.parallel import dcp
    from moeforge.train import checkpoint as ckpt
    from moeforge.train.step import build_optimizer

    assert ckpt.is_distributed(path) and not (path / "model.pt").exists()
    cfg = ckpt.load_checkpoint_config(path)
    assert ckpt.load_checkpoint(path)["state.pt"]["step"] == STEPS
    model = build_model(cfg.model, "cpu", init=False)
    optimizer = build_optimizer(model, cfg)
    dcp.load(path / "dcp", model, optimizer, None)
    ref = ckpt.load_checkpoint(ref_path, map_location="cpu")
    ref_model = build_model(cfg.model, "cpu", init=False)
    ref_model.load_state_dict(ref["model.pt"])
    ref_opt = build_optimizer(ref_model, cfg)
    ref_opt.load_state_dict(ref["optimizer.pt"])
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        st, ref_st = optimizer.state[p], ref_opt.state[ref_params[name]]
        assert float(st["step"]) == float(ref_st["step"]) == STEPS, name
        torch.testing.assert_close(st["exp_avg_sq"], ref_st["exp_avg_sq"], rtol=1e-3, atol=1e-9, msg=name)


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
    """Too few micro-batches, and FSDP's full sharding with dualpipev: clear errors; zero2, full with 1f1b
    and document masking are accepted."""
    from types import SimpleNamespace

    from moeforge.errors import MoeforgeError
    from moeforge.train.step import check_pipeline_layout

    cfg = config_from_dict(make_config("unused", "unused", ["parallel.pp=2", "parallel.schedule=dualpipev"]))
    check_pipeline_layout(cfg, SimpleNamespace(pp=2, dp=1, ep=1))  # 4 micro-batches: fine
    check_pipeline_layout(cfg, SimpleNamespace(pp=2, dp=1, ep=2))  # with expert parallelism too
    cfg.train.micro_batch_size = 4  # 2 micro-batches < 2 x pp stages of dualpipev
    with pytest.raises(MoeforgeError, match="fewer than the 4 pipeline stages"):
        check_pipeline_layout(cfg, SimpleNamespace(pp=2, dp=1, ep=1))
    cfg.train.micro_batch_size = 2
    cfg.train.document_mask = True  # every stage masks its attention to the documents: accepted
    check_pipeline_layout(cfg, SimpleNamespace(pp=2, dp=1, ep=1))
    cfg.train.document_mask = False
    cfg.parallel.sharding = "zero2"  # FSDP inside the stages: accepted
    check_pipeline_layout(cfg, SimpleNamespace(pp=2, dp=2, ep=1))
    cfg.parallel.sharding = "full"  # resharded after forward: not with dualpipev's split backward
    with pytest.raises(MoeforgeError, match="sharding=full: not supported with parallel.schedule=dualpipev"):
        check_pipeline_layout(cfg, SimpleNamespace(pp=2, dp=2, ep=1))
    cfg.parallel.schedule = "1f1b"
    check_pipeline_layout(cfg, SimpleNamespace(pp=2, dp=2, ep=1))
