"""Data and expert parallelism against the single-process run (gloo on CPU, via tests/dist.py).

What is compared, and with what tolerance:
- One step under each layout (DP=2, EP=2, EP=2xDP=2, EP=4, FSDP) against the single-process step on
  the same model and data: the loss, the gradient norm and every gradient (gathered to the full
  single-process tensors, after clipping) within rtol 1e-5 (+ atol 1e-5 of the tensor's largest
  entry). They are not bit-identical: each rank runs its GEMMs on a share of the rows and the
  all-reduce sums the ranks' partial gradients in another order than one process sums them, which
  moves FP32 results by a few ulps (measured: max relative error ~5e-7).
- Four steps: the losses track the single-process losses within rtol 1e-4 (AdamW's normalisation
  amplifies ulp-level gradient differences a little on each step).
- The routing bias after four steps: identical on all ranks and equal to the single-process bias
  (it moves by +-gamma from integer counts: exact unless a routing decision flips on a near tie).
- A checkpoint written under EP=2 loads in one process with the same logits; resuming it in one
  process (and a single-process checkpoint under EP=2xDP=2 with ZeRO-2) continues the losses.

The model: hidden 64, 3 layers (1 dense + 2 MoE, plus 1 MTP block with MoE), 8 routed experts in 2
groups, top-2, seq 32, global batch 8 in 2 micro-batches of 4 (gradient accumulation included), so
every layout runs in seconds on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import single_process
from dist import DIST_MODEL, measure_model_states, planned_model_states, run_dist, run_torchrun, teardown_aborted
from moeforge.config import ParallelConfig, config_from_dict, load_config
from moeforge.errors import MoeforgeError
from moeforge.parallel import (AllToAllDispatcher, check_batch_sizes, expert_names, full_tensor, init_distributed,
                               max_ranks_per_token, resolve_layout)
from moeforge.parallel.expert import expert_slice, pack_rows_fp8, slice_state_dict, unpack_rows_fp8

STEPS = 4
MODEL = DIST_MODEL
TRAIN = [
    f"train.steps={STEPS}", "train.seq_len=32", "train.batch_size=8", "train.micro_batch_size=4",
    # a real lr from step 1 (no warmup) so four steps move the loss; clip below the initial norm so
    # that the global gradient norm is exercised; a bias speed large enough to see.
    "train.warmup_steps=0", "train.lr=2e-3", "train.grad_clip=0.5", "train.bias_update_speed=0.01",
    "train.sample_tokens=0", "train.eval_every=0", "train.keep_checkpoints=3",
]
LAYOUTS = {  # name: (processes, parallel overrides)
    "dp2": (2, []),
    "dp4": (4, []),
    "fsdp4": (4, ["parallel.sharding=full"]),
    "ep2": (2, ["parallel.ep=2"]),
    "ep2xdp2": (4, ["parallel.ep=2"]),
    "ep2_no_overlap": (2, ["parallel.ep=2", "parallel.overlap_dispatch=false"]),
    "ep4": (4, ["parallel.ep=4"]),
    "fsdp_full_ep2": (2, ["parallel.ep=2", "parallel.sharding=full"]),
    # checkpoints written by DCP's thread from CPU copies while the steps go on
    "fsdp_full_ep2_async_checkpoint": (2, ["parallel.ep=2", "parallel.sharding=full", "train.async_checkpoint=true"]),
    "fsdp_zero2_ep2xdp2": (4, ["parallel.ep=2", "parallel.sharding=zero2"]),
    "zero1_ep2xdp2": (4, ["parallel.ep=2", "parallel.sharding=zero1"]),
}
GRAD_RTOL = 1e-5
LOSS_RTOL = 1e-4


def make_config(data, out, extra=()) -> dict:
    cfg = load_config(None, None, [*MODEL, *TRAIN, f"train.data={data}", f"train.out={out}", *extra])
    return cfg.to_dict()


def fixed_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(7))


def train_run(cfg_dict: dict, cache: str | None, steps: int, resume: bool = False, save_at=(2, 4)) -> dict:
    """Train `steps` steps with the Trainer (single process or one rank of a torchrun-like group)
    and report: per-step records, the full gradients of the first step (rank 0), the routing biases
    and the eval-mode logits of a fixed input after the last step. `cache`: MOEFORGE_CACHE to set
    (in a spawned rank; the parent process sets it with a monkeypatch)."""
    if cache is not None:
        os.environ["MOEFORGE_CACHE"] = cache
    from moeforge.train.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    trainer = Trainer(cfg, resume=resume, progress=False)
    ctx, model = trainer.pctx, trainer.model
    names = expert_names(model)
    grads = {}

    def capture(optimizer, args, kwargs):  # the gradients the optimizer applies (synchronised, clipped)
        if not grads:
            # Clipping is either applied to .grad (FSDP) or left to the fused AdamW kernel, which
            # divides by optimizer.grad_scale as it reads the gradients.
            scale = getattr(optimizer, "grad_scale", None)
            for n, p in model.named_parameters():
                g = full_tensor(p.grad, n in names, ctx).detach().cpu().clone()
                grads[n] = g / scale.cpu() if scale is not None else g

    trainer.optimizer.register_step_pre_hook(capture)
    memory = measure_model_states(trainer)
    records = []
    for _ in range(steps):
        records.append(trainer.train_step())
        if trainer.step in save_at:
            trainer.save()
    val = trainer.validate(3)  # under dp x ep each rank evaluates its rows of every batch
    model.eval()
    with torch.no_grad():
        logits = model(fixed_tokens(cfg.model.vocab_size).to(trainer.device)).cpu()
    biases = [m.gate.e_score_correction_bias.detach().cpu().clone() for m in trainer.moe_layers]
    is_main = trainer.is_main
    trainer.close()
    return {"records": records, "grads": grads if is_main else None, "logits": logits, "biases": biases, "val": val,
            "memory": memory}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, mf_cache_dir):
    """The single-process run every layout is compared with (and its step-2 checkpoint)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = single_process(lambda: train_run(make_config(data_dir, out), None, STEPS), mf_cache_dir)
    res["out"] = out
    return res


def assert_matches_reference(res: dict, ref: dict, what: str) -> None:
    # step 1: loss, norm and every gradient within FP32 summation-order tolerance
    r0, q0 = res["records"][0], ref["records"][0]
    assert r0["loss"] == pytest.approx(q0["loss"], rel=GRAD_RTOL), what
    assert r0["grad_norm"] == pytest.approx(q0["grad_norm"], rel=GRAD_RTOL), what
    assert set(res["grads"]) == set(ref["grads"]), what
    for name, g in ref["grads"].items():
        torch.testing.assert_close(res["grads"][name], g, rtol=GRAD_RTOL, atol=GRAD_RTOL * float(g.abs().max()),
                                   msg=lambda m: f"{what}: gradient of {name}: {m}")
    # the following steps track the single-process losses
    for a, b in zip(res["records"], ref["records"]):
        for key in ("loss", "mtp_loss", "balance_loss"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), f"{what}: step {a['step']} {key}"


# ----------------------------------------------------------------------------------------------
# every layout against the single process
# ----------------------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, data_dir, mf_env, tmp_path):
    nproc, extra = LAYOUTS[layout]
    out = tmp_path / "run"
    cfg = make_config(data_dir, out, extra)
    results = run_dist(train_run, nproc, cfg, str(mf_env), STEPS, init=False)
    assert_matches_reference(results[0], reference, layout)
    # each rank's weights, gradients and optimizer state are what `moeforge plan` predicts for it
    assert [res["memory"] for res in results] == planned_model_states(cfg, nproc), layout
    # every rank logged the same (all-reduced) losses, and holds the same routing bias as one process
    for rank, res in enumerate(results):
        assert [r["loss"] for r in res["records"]] == [r["loss"] for r in results[0]["records"]], f"rank {rank}"
        for b, b_rank0, b_ref in zip(res["biases"], results[0]["biases"], reference["biases"]):
            torch.testing.assert_close(b, b_rank0, rtol=0, atol=0)
            torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(res["logits"], reference["logits"], rtol=1e-4, atol=1e-4)
        assert res["val"]["tokens"] == reference["val"]["tokens"] and res["val"]["bytes"] == reference["val"]["bytes"]
        assert res["val"]["loss"] == pytest.approx(reference["val"]["loss"], rel=1e-4), f"rank {rank}"
    # every rank wrote its pieces with torch.distributed.checkpoint; one process reads them all
    _check_checkpoint_loads_in_one_process(out, results[0])
    if layout == "ep2":
        _check_hf_export(out, tmp_path)
        _check_resume_in_one_process(out, reference)
    if layout == "fsdp_full_ep2_async_checkpoint":  # the step-2 pieces are step 2's, written in the background
        assert not list((out / "checkpoints").glob(".tmp-*"))
        _check_resume_in_one_process(out, reference)
    if layout == "fsdp_zero2_ep2xdp2":
        _check_resume_under(out, reference, data_dir, mf_env, ["parallel.ep=4"])
    if layout == "zero1_ep2xdp2":  # each rank saved only the moments it owns; DP=4 owns them differently
        _check_resume_under(out, reference, data_dir, mf_env, ["parallel.sharding=zero1"])


def _check_checkpoint_loads_in_one_process(out, res) -> None:
    """The step-4 DCP checkpoint loads in one process (no process group) with the run's logits."""
    from moeforge.train.checkpoint import load_trained_model

    step4 = out / "checkpoints" / "step_0000004"
    from moeforge.parallel.dcp import has_optimizer_state

    assert (step4 / "dcp" / ".metadata").is_file() and not (step4 / "model.pt").exists()
    assert has_optimizer_state(step4 / "dcp")  # the AdamW moments of every parameter came along
    model, cfg = load_trained_model(out, "cpu")  # the newest: step 4
    with torch.no_grad():
        logits = model(fixed_tokens(cfg.model.vocab_size))
    torch.testing.assert_close(logits, res["logits"], rtol=1e-5, atol=1e-5)


def _check_hf_export(out, tmp_path) -> None:
    """`moeforge convert` of a distributed checkpoint: the Hugging Face folder has the same logits."""
    from moeforge import hf
    from moeforge.cli import main
    from moeforge.train.checkpoint import load_trained_model

    assert main(["convert", "--checkpoint", str(out), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    model, cfg = load_trained_model(out, "cpu")
    exported = hf.load(tmp_path / "hf")
    tokens = fixed_tokens(cfg.model.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens), model(tokens), rtol=1e-6, atol=1e-6)


def _drop_newest(out) -> None:
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_0000004")


def _check_resume_under(out, ref, data_dir, mf_env, extra) -> None:
    """The step-2 checkpoint of this layout resumed under another layout (4 processes) continues
    with the single-process losses of steps 3-4 (the AdamW moments and biases came along)."""
    _drop_newest(out)
    cfg = make_config(data_dir, out, extra)
    results = run_dist(train_run, 4, cfg, str(mf_env), 2, resume=True, save_at=(), init=False)
    assert [r["step"] for r in results[0]["records"]] == [3, 4]
    for a, b in zip(results[0]["records"], ref["records"][2:]):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"resumed step {a['step']}"


def _check_resume_in_one_process(out, ref) -> None:
    """The step-2 checkpoint of the EP=2 run resumed in one process (parallel.ep=1): steps 3-4 as the reference's."""
    from moeforge.train.checkpoint import load_checkpoint_config

    _drop_newest(out)
    cfg = load_checkpoint_config(out / "checkpoints" / "step_0000002")
    cfg_dict = cfg.to_dict()
    cfg_dict["parallel"]["ep"] = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train_run(cfg_dict, None, 2, resume=True, save_at=())  # MOEFORGE_CACHE: the mf_env fixture
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in resumed["records"]] == [3, 4]
    for a, b in zip(resumed["records"], ref["records"][2:]):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"resumed step {a['step']}"


@pytest.mark.dist
def test_single_process_checkpoint_resumes_under_ep_and_zero2(reference, data_dir, mf_cache_dir, tmp_path):
    """The reference's step-2 checkpoint (model + AdamW moments) resumed on EP=2 x DP=2 with ZeRO-2."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    for p in (out / "checkpoints").iterdir():
        if p.name != "step_0000002":
            shutil.rmtree(p)
    cfg = make_config(data_dir, out, ["parallel.ep=2", "parallel.sharding=zero2"])
    results = run_dist(train_run, 4, cfg, str(mf_cache_dir), 2, resume=True, save_at=(), init=False)
    for a, b in zip(results[0]["records"], reference["records"][2:]):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"resumed step {a['step']}"


# ----------------------------------------------------------------------------------------------
# the dispatcher
# ----------------------------------------------------------------------------------------------
def dispatcher_checks() -> dict:
    """Round trips of AllToAllDispatcher with identity experts on 2 ranks (E=8, K=2, D=16)."""
    import torch.distributed as dist

    rank, E, K, D = dist.get_rank(), 8, 2, 16
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(100 + rank)
    out = {}

    def round_trip(indices, fp8=False, overlap=True):
        T = indices.shape[0]
        x = torch.randn(T, D, generator=g, requires_grad=True)
        w = torch.rand(T, K, generator=g)
        disp = AllToAllDispatcher(group, 2, rank, fp8=fp8, overlap=overlap)
        pending = disp.start(x, indices, E)
        in_flight = len(pending.pending)
        rows, counts, ctx = pending.finish()
        x_local = rows.gather()
        y = disp.combine(x_local, w, ctx, T)  # identity experts
        y.backward(torch.ones_like(y))
        expected = x.detach() * w.sum(-1, keepdim=True)  # sum_k w_k * x_t
        return y.detach(), expected, x.grad, w.sum(-1, keepdim=True).expand(T, D), counts, x_local, in_flight

    # random distinct experts per token
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(12 + 5 * rank)])
    y, exp, grad, exp_grad, counts, x_local, in_flight = round_trip(idx)
    out["random"] = (y, exp, grad, exp_grad, counts)
    out["in_flight"] = in_flight
    # without overlap start() has waited for the copies: nothing left in flight, the same result
    r = round_trip(idx, overlap=False)
    out["no_overlap"] = r[:5]
    out["in_flight_no_overlap"] = r[6]
    # rows per local expert = copies all ranks routed to it
    total = torch.bincount(idx.flatten(), minlength=E)
    dist.all_reduce(total)
    out["expected_counts"] = total[expert_slice(E, 2, rank)]
    # uneven: every token of both ranks goes to experts 0 and 1 (rank 0): rank 1 receives nothing
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]] * (2 + rank))
    r = round_trip(idx)
    out["uneven"] = r[:5] + (r[5].shape[0],)
    # a rank with no tokens at all
    idx = torch.empty(0, K, dtype=torch.long) if rank == 1 else torch.tensor([[4, 6], [7, 5]])
    out["empty"] = round_trip(idx)[:5]
    # FP8 dispatch: the same round trip up to FP8 rounding of the dispatched activations
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(10)])
    out["fp8"] = round_trip(idx, fp8=True)[:4]
    return out


@pytest.mark.dist
def test_all_to_all_dispatcher_round_trip():
    """dispatch -> identity experts -> combine returns sum_k w_k x_t (exactly: rows are only moved
    and weighted), its gradient w.r.t. x is sum_k w_k, with uneven splits, a rank that receives zero
    rows, a rank with no tokens, and FP8 dispatch (within FP8 e4m3 rounding, 2^-4 relative). The
    token copies are still in flight when start() returns, unless overlap is off."""
    for rank, res in enumerate(run_dist(dispatcher_checks, 2)):
        assert res["in_flight"] == 1 and res["in_flight_no_overlap"] == 0
        for case in ("random", "uneven", "empty", "no_overlap"):
            y, expected, grad, expected_grad, counts = res[case][:5]
            torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{case} rank {rank}: {m}")
            torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res["random"][4], res["expected_counts"])
        assert res["uneven"][4].tolist() == ([2 * 3 + 3 * 3, 2 * 3 + 3 * 3, 0, 0] if rank == 0 else [0, 0, 0, 0])
        assert res["uneven"][5] == (30 if rank == 0 else 0)
        y, expected, grad, expected_grad = res["fp8"]
        assert ((y - expected).abs() <= 2 ** -4 * expected.abs() + 1e-6).all()
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)  # backward is not quantised


def test_fp8_dispatch_wire_format():
    """One uint8 row per token: 200 FP8 codes in 1x128 tiles (2 tiles), then the 2 FP32 scales' bytes,
    those of moeforge.fp8.quantize; unpacking gives code x scale, within e4m3's 2^-4 of x."""
    from moeforge.fp8 import quantize

    x = torch.randn(5, 200) * torch.tensor([1e-3, 1.0, 1e3, 7.0, 0.1]).unsqueeze(1)
    packed = pack_rows_fp8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 200 + 4 * 2)
    q, scale = quantize(x, (1, 128))
    assert torch.equal(packed[:, :200], q.view(torch.uint8))
    assert torch.equal(packed[:, 200:].contiguous().view(torch.float32), scale)
    back = unpack_rows_fp8(packed, 200, torch.float32)
    assert ((back - x).abs() <= 2 ** -4 * x.abs() + 1e-9 * x.abs().max()).all()
    assert unpack_rows_fp8(pack_rows_fp8(x[:0]), 200, torch.bfloat16).shape == (0, 200)


# ----------------------------------------------------------------------------------------------
# the command line under torchrun
# ----------------------------------------------------------------------------------------------
@pytest.mark.dist
def test_torchrun_cli_ep2(reference, data_dir, mf_cache_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m moeforge train ... parallel.ep=2`: rank 0 alone writes the
    metrics (one record per step), whose losses are the single-process run's."""
    out = tmp_path / "run"
    args = ["-m", "moeforge", "train", "--out", out, "--steps", 2, "--data", data_dir, "--no-progress",
            *MODEL, *TRAIN, "train.checkpoint_every=0", "parallel.ep=2"]
    res = run_torchrun(args, 2, env={"MOEFORGE_CACHE": str(mf_cache_dir)}, cwd=tmp_path)
    metrics = out / "metrics.jsonl"
    assert res.returncode == 0 or (teardown_aborted(res) and metrics.is_file()), res.stderr[-3000:]
    import json

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for a, b in zip(train, reference["records"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
    assert "parallel: 2 ranks = pp 1 x dp 1 x ep 2" in res.stdout
    assert res.stdout.count("validation: loss") == 1  # rank 0 reports


@pytest.mark.dist
def test_torchrun_cli_init_from_a_checkpoint_ep2_zero2(reference, data_dir, mf_cache_dir, tmp_path):
    """`train --init CHECKPOINT` under torchrun with expert parallelism and FSDP2: each rank loads its
    slice and shard of the checkpoint's weights, so the run's losses are those of the same run in one
    process (tests/test_init.py), and far from a run that starts from the initialisation."""
    import json

    from conftest import run_cli

    args = ["--init", reference["out"], "--steps", 2, "--data", data_dir, "--no-progress", *TRAIN,
            "train.checkpoint_every=0", "train.eval_every=0", "train.optimizer=adamw"]
    one = tmp_path / "one"
    assert single_process(lambda: run_cli(["train", "--out", one, *args]), mf_cache_dir) == 0
    out = tmp_path / "ep2"
    res = run_torchrun(["-m", "moeforge", "train", "--out", out, *args, "parallel.ep=2", "parallel.sharding=zero2"], 2,
                       env={"MOEFORGE_CACHE": str(mf_cache_dir)}, cwd=tmp_path)
    metrics = out / "metrics.jsonl"
    assert res.returncode == 0 or (teardown_aborted(res) and metrics.is_file()), res.stderr[-3000:]

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    got, want = losses(out), losses(one)
    assert len(got) == len(want) == 2
    assert got == pytest.approx(want, rel=LOSS_RTOL)
    assert abs(want[0] - reference["records"][0]["loss"]) > 0.01  # not the initialisation's first step


@pytest.mark.dist
def test_torchrun_bench_ep2_zero1(mf_cache_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m moeforge bench ... parallel.ep=2 parallel.sharding=zero1`: the step
    runs expert parallel with ZeRO-1, rank 0 alone reports, tokens/s count both ranks."""
    import json

    out = tmp_path / "bench.json"
    args = ["-m", "moeforge", "bench", "--preset", "tiny", "--steps", 2, "--warmup", 1, "--seq-len", 32,
            "--batch-size", 4, "--json", out, "parallel.ep=2", "parallel.sharding=zero1"]
    res = run_torchrun(args, 2, env={"MOEFORGE_CACHE": str(mf_cache_dir)}, cwd=tmp_path)
    assert res.returncode == 0 or (teardown_aborted(res) and out.is_file()), res.stderr[-3000:]
    assert res.stdout.count("moeforge: ") == 1 and "2 ranks = dp 1 x ep 2, sharding zero1" in res.stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["ranks"] == 2 and result["tokens_per_s"] > 0
    assert {"attention", "moe", "optimizer"} <= set(result["split_ms"])


@pytest.mark.dist
def test_all_to_all_benchmark_script_runs(tmp_path):
    """benchmarks/all_to_all_bench.py on 2 gloo processes with small sizes: every number is reported."""
    import json

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "all_to_all_bench.py"
    out = tmp_path / "a2a.json"
    res = run_torchrun([script, "--tokens", 64, "--hidden", 256, "--experts", 8, "--topk", 2, "--reps", 2,
                        "--json", out], 2, cwd=tmp_path)
    assert res.returncode == 0 or (teardown_aborted(res) and out.is_file()), res.stderr[-3000:]
    numbers = json.loads(out.read_text())
    for key in ("dispatch_fp32_GBps", "dispatch_fp8_GBps", "combine_GBps", "all_to_all_GBps"):
        assert numbers[key] > 0, key


@pytest.mark.dist
def test_pipeline_bubble_script_runs(tmp_path):
    """benchmarks/pipeline_bubble.py (PP=2, 1F1B, tiny shapes, gloo): chunk costs, step time, the
    measured bubble fraction and Table 2's formula are all reported."""
    import json

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline_bubble.py"
    out = tmp_path / "bubble.json"
    res = run_torchrun([script, "--schedule", "1f1b", "--preset", "tiny", "--micro-batches", 4, "--steps", 1,
                        "--json", out, "train.seq_len=32", "train.micro_batch_size=2"], 2, cwd=tmp_path)
    assert res.returncode == 0 or (teardown_aborted(res) and out.is_file()), res.stderr[-3000:]
    numbers = json.loads(out.read_text())
    assert numbers["pp"] == 2 and numbers["step_s"] > 0 and numbers["F_s"] > 0 and numbers["B_s"] > 0
    assert numbers["micro_batches"] == 4 and numbers["micro_batch_size"] == 2  # the override is kept
    assert 0 <= numbers["bubble_fraction"] < 1 and numbers["table2_bubble_fraction"] == pytest.approx(
        numbers["table2_bubble_s"] / (4 * (numbers["F_s"] + numbers["B_s"] + numbers["W_s"]) + numbers["table2_bubble_s"]))


@pytest.mark.dist
@pytest.mark.parametrize("settings, message", [
    # a micro batch the data ranks cannot split
    (["train.batch_size=6", "train.micro_batch_size=3", "parallel.ep=2"], ("train.micro_batch_size", "not divisible")),
    # Muon needs whole matrices
    (["train.optimizer=muon", "parallel.sharding=full"], ("train.optimizer=muon: needs whole matrices",)),
])
def test_torchrun_cli_bad_setting(data_dir, mf_cache_dir, tmp_path, settings, message):
    """One clear error line naming the setting, no crash report, no run folder."""
    args = ["-m", "moeforge", "train", "--out", tmp_path / "run", "--steps", 1, "--data", data_dir, "--no-progress",
            *MODEL, *TRAIN, *settings]
    res = run_torchrun(args, 2, env={"MOEFORGE_CACHE": str(mf_cache_dir)}, cwd=tmp_path)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("moeforge train: error:")]
    assert lines and all(m in lines[0] for m in message), res.stderr[-2000:]
    assert "MoeforgeError" not in res.stderr  # reported as a user error, not a crash of moeforge
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# impossible layouts (checked before any process group exists, so no processes are needed)
# ----------------------------------------------------------------------------------------------
def test_world_size_must_be_pp_dp_ep(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(MoeforgeError, match=r"parallel.pp x parallel.dp x parallel.ep = 1 x 3 x 2 = 6 .*world size 4"):
        init_distributed(ParallelConfig(ep=2, dp=3))
    with pytest.raises(MoeforgeError, match=r"parallel.pp x parallel.ep = 1 x 3 = 3 does not divide the world size 4"):
        init_distributed(ParallelConfig(ep=3))
    assert resolve_layout(ParallelConfig(ep=2), 8) == (1, 4, 2)
    assert resolve_layout(ParallelConfig(pp=2, ep=2), 8) == (2, 2, 2)


def test_single_process_ignores_layout(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(ParallelConfig(ep=2)) is None


def test_experts_must_divide_by_ep():
    with pytest.raises(MoeforgeError, match="parallel.ep: 3 does not divide model.n_routed_experts=8"):
        load_config(None, None, [*MODEL, "train.seq_len=32", "parallel.ep=3"])
    with pytest.raises(MoeforgeError, match="parallel.ep"):
        expert_slice(8, 3, 0)


def test_micro_batch_must_divide_by_data_ranks():
    ctx = SimpleNamespace(data_ranks=4, dp=2, ep=2)
    with pytest.raises(MoeforgeError, match=r"train.micro_batch_size: .*6 sequences.* 4 data-parallel ranks"):
        check_batch_sizes(6, ctx)
    check_batch_sizes(8, ctx)
    check_batch_sizes(3, None)


def test_zero1_owners_balance_and_cover_every_parameter():
    """ZeRO-1's assignment: every parameter has exactly one owner and the loads differ by at most
    the largest parameter (greedy, largest first)."""
    from moeforge.parallel.zero1 import assign_owners

    params = [(f"p{i}", torch.nn.Parameter(torch.empty(n))) for i, n in enumerate([50, 7, 30, 30, 9, 1, 64, 3])]
    owner = assign_owners(params, 3)
    assert sorted(set(owner)) == [0, 1, 2]
    loads = [sum(p.numel() for (_, p), o in zip(params, owner) if o == r) for r in range(3)]
    assert sum(loads) == 194 and max(loads) - min(loads) <= 64
    assert assign_owners(params, 3) == owner  # the same on every rank


def test_slice_state_dict():
    """A full state dict sliced for ep rank r keeps experts [r*E/ep, (r+1)*E/ep) and nothing else changes."""
    state = {"layers.1.ffn.experts.w1": torch.arange(8.0).view(8, 1, 1), "layers.1.ffn.gate.weight": torch.ones(8, 2),
             "mtp.0.block.ffn.experts.w2": torch.arange(8.0).view(8, 1, 1)}
    part = slice_state_dict(state, 4, 2)
    assert part["layers.1.ffn.experts.w1"].flatten().tolist() == [4.0, 5.0]
    assert part["mtp.0.block.ffn.experts.w2"].flatten().tolist() == [4.0, 5.0]
    assert part["layers.1.ffn.gate.weight"] is state["layers.1.ffn.gate.weight"]


def test_group_limited_routing_bounds_the_ranks_a_token_reaches():
    """Groups are contiguous blocks of experts, like the ep ranks' slices."""
    assert max_ranks_per_token(256, 8, 4, 8, 64) == 8  # DeepSeek-V3 on EP64: 4 groups x 8 ranks (= 4 nodes)
    assert max_ranks_per_token(256, 8, 4, 8, 8) == 4  # n_group = ep: at most topk_group ranks
    assert max_ranks_per_token(16, 4, 2, 4, 2) == 2  # two whole groups per rank
    assert max_ranks_per_token(16, 1, 1, 4, 8) == 4  # no groups: at most K
    assert max_ranks_per_token(12, 3, 1, 4, 4) == 2  # a group of 4 over ranks of 3 experts straddles 2


@pytest.mark.dist
def test_parallel_equivalence_script(reference, data_dir, mf_cache_dir, tmp_path):
    """benchmarks/parallel_equivalence.py: one process, then EP=2 under torchrun, same data: the
    per-step losses agree (as in the layout tests) and every number is reported."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "eq.json"
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "MOEFORGE_CACHE": str(mf_cache_dir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(root / "benchmarks" / "parallel_equivalence.py"), "--out", str(tmp_path / "eq"),
           "--steps", "2", "--layout", "2:parallel.ep=2", "--json", str(out), "--timeout", "200",
           f"train.data={data_dir}", *MODEL, *TRAIN]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    ref, ep2 = json.loads(out.read_text())["results"]
    assert ref["steps"] == ep2["steps"] == 2 and ref["max_rel"] == 0
    assert ep2["max_rel"] < LOSS_RTOL, ep2
    assert ep2["val_loss"] == pytest.approx(ref["val_loss"], rel=LOSS_RTOL)
    assert (tmp_path / "eq" / "equivalence.csv").read_text().count("\n") == 3


@pytest.mark.dist
def test_plan_predicts_ragged_fsdp_shards(data_dir, mf_env, tmp_path):
    """FSDP2 over 3 ranks cuts the 64-wide tensors into 22, 21 and 21 rows (smaller ones leave the last
    rank less, or nothing): each rank's weights, gradients and AdamW state are what `moeforge plan` predicts."""
    cfg = make_config(data_dir, tmp_path / "run", ["parallel.sharding=full", "train.steps=1", "train.batch_size=6",
                                                   "train.micro_batch_size=3"])
    results = run_dist(train_run, 3, cfg, str(mf_env), 1, save_at=(), init=False)
    measured = [res["memory"] for res in results]
    assert measured[0]["params"] > measured[2]["params"]  # ragged: the first rank holds the most
    assert measured == planned_model_states(cfg, 3)


@pytest.mark.dist
def test_parameter_ema_under_data_parallelism(data_dir, mf_env, tmp_path):
    """train.ema_decay with DP=2 (ZeRO-1): rank 0 keeps the EMA of the replicated parameters and the
    checkpoint holds the one-process run's average; expert parallelism is refused in one line."""
    extra = ["train.ema_decay=0.5"]
    ref = single_process(lambda: train_run(make_config(data_dir, tmp_path / "ref", extra), None, STEPS), mf_env)
    run_dist(train_run, 2, make_config(data_dir, tmp_path / "dp2", [*extra, "parallel.sharding=zero1"]),
             str(mf_env), STEPS, init=False)
    from moeforge.train import checkpoint as ckpt

    def ema(out):
        return ckpt.load_checkpoint(ckpt.resolve_checkpoint(out), ("state.pt",))["state.pt"]["ema"]

    ref_ema, dp_ema = ema(tmp_path / "ref"), ema(tmp_path / "dp2")
    assert ref_ema and set(dp_ema) == set(ref_ema)
    for name, avg in ref_ema.items():  # (Adam amplifies summation-order noise in a few tiny-gradient elements)
        assert (dp_ema[name] - avg).norm() <= 1e-3 * avg.norm(), name
    assert len(ref["records"]) == STEPS
    from dist import DistError

    with pytest.raises(DistError, match="MoeforgeError: train.ema_decay: .*whole parameters"):
        run_dist(train_run, 2, make_config(data_dir, tmp_path / "ep2", [*extra, "parallel.ep=2"]), str(mf_env), 1,
                 init=False)


@pytest.mark.dist
@pytest.mark.parametrize("extra, ranks, layout", [
    (["train.adam_moments=bf16"], 2, ["parallel.sharding=zero1"]),
    (["train.optimizer=muon", "train.muon_lr=5e-3"], 4, ["parallel.sharding=zero1", "parallel.ep=2"]),
], ids=["bf16_moments_zero1", "muon_zero1_ep2xdp2"])
def test_optimizer_state_under_zero1_with_dcp_resume(data_dir, mf_env, tmp_path, extra, ranks, layout):
    """AdamW with BF16 moments under DP=2 (ZeRO-1), and Muon under EP=2 x DP=2 (ZeRO-1; each rank's
    experts orthogonalised on their own, momentum sliced by expert): the one-process losses, and the
    step-2 DCP checkpoint (each state saved by its owner) resumed in one process continues with the
    one-process steps 3-4."""
    ref = single_process(lambda: train_run(make_config(data_dir, tmp_path / "ref", extra), None, STEPS), mf_env)
    out = tmp_path / "dist"
    cfg = make_config(data_dir, out, [*extra, *layout])
    results = run_dist(train_run, ranks, cfg, str(mf_env), STEPS, init=False)
    assert [res["memory"] for res in results] == planned_model_states(cfg, ranks)  # what `moeforge plan` says
    assert len(results[0]["records"]) == len(ref["records"]) == STEPS
    for a, b in zip(results[0]["records"], ref["records"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"step {a['step']}"
    _check_resume_in_one_process(out, ref)
