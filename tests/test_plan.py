"""moeforge.plan: the model-state memory and compute plan of a run, and `moeforge plan`.

The multi-process layouts (expert, data and pipeline parallelism, ZeRO-1, FSDP2) are checked
against what real gloo ranks hold in tests/test_parallel.py and tests/test_pipeline_train.py (every
rank's weights, gradients and optimizer state, byte for byte). Here: one process against a real
optimizer step, the planner's arithmetic on the 671B config, and the command line.
"""

from __future__ import annotations

import re

import pytest
import torch

from dist import DIST_MODEL
from moeforge.config import load_config
from moeforge.errors import MoeforgeError
from moeforge.model import build_model, count_parameters
from moeforge.plan import (activation_memory, compute_plan, in_flight_peaks, model_state_memory, parse_count,
                           rank_activations, stage_activations)
from moeforge.train.step import build_optimizer

MODEL = [*DIST_MODEL, "train.seq_len=32"]


@pytest.mark.parametrize("settings", [["train.optimizer=adamw"], ["train.adam_moments=bf16"],
                                      ["train.optimizer=muon"]], ids=["adamw", "adamw_bf16_moments", "muon"])
def test_one_process_matches_a_real_optimizer_step(settings):
    """The plan of one process against the model and optimizer the trainer builds, after one step:
    parameter elements, weight and gradient bytes, and the bytes of every optimizer state tensor
    (0-dim step counters aside) are equal."""
    cfg = load_config(None, None, [*MODEL, *settings])
    (plan,) = model_state_memory(cfg, 1)
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu")
    optimizer = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    params = list(model.parameters())
    assert plan.params == sum(p.numel() for p in params)
    assert plan.weights == sum(p.nbytes for p in params)
    assert plan.grads == sum(p.grad.nbytes for p in params)
    assert plan.optimizer == sum(v.nbytes for st in optimizer.state.values() for v in st.values()
                                 if isinstance(v, torch.Tensor) and v.ndim > 0)
    assert plan.total == plan.weights + plan.grads + plan.optimizer


def test_v3_671b_expert_parallel_split():
    """DeepSeek-V3's shapes on the meta device: one rank holds every parameter (count_parameters'
    total); with EP=8 a rank holds 1/8 of the routed experts and all the rest, so eight ranks
    together hold the routed experts once and the rest eight times."""
    cfg = load_config("v3-671b", None, [])
    total = count_parameters(build_model(cfg.model, "meta"))["total"]
    (one,) = model_state_memory(cfg, 1)
    assert one.params == total
    assert one.optimizer == 8 * total  # two FP32 AdamW moments
    ep8 = model_state_memory(load_config("v3-671b", None, ["parallel.ep=8"]), 8)
    assert len({r.params for r in ep8}) == 1
    routed = 58 * 3 * 256 * 2048 * 7168 + 1 * 3 * 256 * 2048 * 7168  # 58 MoE layers + the MTP block's
    assert ep8[0].params == total - routed * 7 // 8
    assert sum(r.params for r in ep8) == 8 * (total - routed) + routed


def test_zero1_partitions_the_optimizer_state_once():
    """ZeRO-1 over dp=4 (no EP): each parameter's moments on exactly one rank, so the ranks' optimizer
    bytes add up to one process's, while weights and gradients stay whole on every rank."""
    cfg = load_config(None, None, [*MODEL, "parallel.sharding=zero1"])
    (one,) = model_state_memory(load_config(None, None, MODEL), 1)
    ranks = model_state_memory(cfg, 4)
    assert sum(r.optimizer for r in ranks) == one.optimizer
    assert all(r.weights == one.weights and r.grads == one.grads for r in ranks)
    assert max(r.optimizer for r in ranks) < one.optimizer / 2


def test_dualpipev_puts_embedding_and_head_on_rank_0():
    """pp=2 with DualPipeV: rank 0 holds stages 0 and 3 (embedding, head, MTP), rank 1 the middle
    ones; together they hold every parameter once."""
    cfg = load_config(None, None, [*MODEL, "parallel.pp=2", "parallel.schedule=dualpipev",
                                   "model.num_hidden_layers=4"])
    r0, r1 = model_state_memory(cfg, 2)
    model = build_model(cfg.model, "meta")
    assert r0.params + r1.params == sum(p.numel() for p in model.parameters())
    embed_and_head = model.embed.weight.numel() + model.head.weight.numel()
    assert r0.params - r1.params >= embed_and_head - 2 * max(p.numel() for p in model.layers.parameters())


def test_compute_plan_arithmetic():
    """FLOPs x tokens at an MFU of the peak -> GPU-hours and days; DeepSeek-V3's 14.8T tokens at
    40.7% of 989 TFLOP/s come to its reported 2,664K GPU-hours within 0.1%."""
    cfg = load_config("v3-671b", None, [])
    c = compute_plan(cfg, 14.8e12, 2048, 0.407, 989)
    assert c.total_flops == pytest.approx(c.flops_per_token * 14.8e12)
    assert c.gpu_hours * 3600 * 989e12 * 0.407 == pytest.approx(c.total_flops)
    assert c.days == pytest.approx(c.gpu_hours / 2048 / 24)
    assert c.gpu_hours == pytest.approx(2.664e6, rel=1e-3)
    for bad in [dict(tokens=0), dict(gpus=0), dict(mfu=1.5), dict(mfu=0), dict(peak_tflops=-1)]:
        args = {"tokens": 1e9, "gpus": 8, "mfu": 0.4, "peak_tflops": 989, **bad}
        with pytest.raises(MoeforgeError):
            compute_plan(cfg, **args)


@pytest.mark.parametrize("text, value", [("14.8T", 14.8e12), ("300B", 3e11), ("2.5m", 2.5e6), ("1e9", 1e9),
                                         ("4096", 4096.0), ("7K", 7e3)])
def test_parse_count(text, value):
    assert parse_count(text) == pytest.approx(value)


def test_parse_count_rejects_nonsense():
    with pytest.raises(MoeforgeError, match="14.8T"):
        parse_count("lots")


def test_plan_command(cli):
    """`moeforge plan` on DeepSeek-V3's layout: the table collapses the equal middle stages into one
    row, the largest rank is the first stage's (embedding + head + MTP), and the compute line gives
    the hours and the cost."""
    r = cli("plan", "--preset", "v3-671b", "--gpus", "2048", "--tokens", "14.8T", "--mfu", "0.407", "--price", "2",
            "--gpu-memory", "80", "parallel.pp=16", "parallel.ep=64", "parallel.schedule=dualpipev",
            "parallel.sharding=zero1", "train.adam_moments=bf16")
    assert r.rc == 0, r.err
    assert "2048 GPUs = pp 16 x dp 2 x ep 64" in r.out
    assert re.search(r"^\s+2-15\s", r.out, re.M)
    largest = re.search(r"largest: ([\d.]+) GiB \(pipeline rank 0\): fits in 80 GiB", r.out)
    assert largest and 20 < float(largest.group(1)) < 40
    hours = float(re.search(r"([\d,]+) GPU-hours", r.out).group(1).replace(",", ""))
    assert hours == pytest.approx(2.664e6, rel=1e-3)
    assert re.search(r"\$5,3\d\d,\d\d\d at \$2 per GPU-hour", r.out)
    r = cli("plan", "--preset", "v3-671b", "--gpu-memory", "80")
    assert r.rc == 0 and "does NOT fit in 80 GiB" in r.out


@pytest.mark.parametrize("argv, fragments", [
    (["--gpus", "3", "parallel.ep=2"], ["does not divide the world size 3"]),
    (["--tokens", "lots"], ["--tokens", "14.8T"]),
    (["--tokens", "1B", "--mfu", "2"], ["--mfu"]),
    (["--gpus", "2", "parallel.pp=2", "parallel.sharding=full", "parallel.schedule=dualpipev", "train.optimizer=adamw"],
     ["sharding=full: not supported with parallel.schedule=dualpipev", "zero2"]),
    (["--gpu-memory", "0"], ["--gpu-memory"]),
])
def test_plan_command_bad_input(cli, expect_error, argv, fragments):
    expect_error(cli("plan", *argv), "plan", *fragments)


def _real_saved_bytes(cfg, sequences: int, bf16: bool) -> dict[str, int]:
    """The same count as plan.activation_memory's, on real CPU tensors: the storages one training
    forward saves for backward (each once, parameters left out) per decoder layer, MTP, head and the
    rest."""
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu")
    part, parts = ["rest"], {"rest": 0, "mtp": 0, "head": 0}
    for name, m in ([(f"layer {i}", m) for i, m in enumerate(model.layers)] + [("mtp", m) for m in model.mtp]
                    + [("head", model.head)]):
        parts[name] = 0
        m.register_forward_pre_hook(lambda m, a, _n=name: part.__setitem__(0, _n))
        m.register_forward_hook(lambda m, a, o: part.__setitem__(0, "rest"))
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    keep = []

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            keep.append(t)
            parts[part[0]] += st.nbytes()
        return t

    tokens = torch.randint(0, cfg.model.vocab_size, (sequences, cfg.train.seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16,
                                                                                     enabled=bf16):
        model.losses(tokens[:, :-1], tokens[:, 1:])
    return parts


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_activation_count_equals_a_real_forward(precision):
    """The activations counted on fake tensors are what a real CPU forward saves for its backward, per
    decoder layer, for the MTP module, the head with its loss and the rest: equal in BF16
    autocast; in FP32 within the grouped GEMMs' row offsets (a few int32 per expert GEMM), which the
    FP32 count's stand-in GEMM does not save."""
    cfg = load_config(None, None, [*MODEL, f"train.precision={precision}", "train.loss_chunk=0"])
    count = activation_memory(cfg, 3)
    real = _real_saved_bytes(cfg, 3, precision == "bf16")
    counted = {**{f"layer {i}": b for i, b in enumerate(count.layers)}, "mtp": count.mtp, "head": count.head,
               "rest": count.rest}
    assert counted.keys() == real.keys() and count.counted_as == precision
    for name, b in real.items():
        assert b > 0 or name == "rest"  # (the embedding saves only its int64 indices: the tokens, an input)
        if precision == "bf16":
            assert counted[name] == b, name
        else:
            assert 0 <= b - counted[name] <= 4 * 3 * cfg.model.n_routed_experts, name
    assert count.total == sum(counted.values())


def test_activation_count_per_rank():
    """One micro-batch's activations per pipeline stage and rank: 1F1B over 3 stages gives each rank its
    layer, the first the embedding, the last the MTP module, head and loss; expert parallelism keeps
    E/ep of the experts' weight copies (BF16 casts the grouped GEMMs save); full recomputation keeps
    each block's input (FP32) and rebuilds the largest block (its copies for E/ep experts) in its
    backward; expert_casts leaves the copies out; the other selective parts are not counted; the
    loss in chunks saves less than the whole logits."""
    cfg = load_config(None, None, [*MODEL, "train.precision=bf16"])
    count = activation_memory(cfg, 2)
    (one,) = rank_activations(cfg, count)
    assert one == count.total == sum(count.layers) + count.mtp + count.head + count.rest
    dense, *moe = count.layer_expert_copies
    E, D, I = cfg.model.n_routed_experts, cfg.model.hidden_size, cfg.model.moe_intermediate_size
    assert dense == 0 and moe == [3 * E * D * I * 2] * len(moe) and count.mtp_expert_copies == 3 * E * D * I * 2
    copies = sum(count.layer_expert_copies) + count.mtp_expert_copies
    assert rank_activations(cfg, count, ep=2) == [count.total - copies // 2]
    piped = load_config(None, None, [*MODEL, "train.precision=bf16", "parallel.pp=3", "parallel.schedule=1f1b"])
    stages = stage_activations(piped, count)
    assert stages == [count.layers[0] + count.rest, count.layers[1], count.layers[2] + count.mtp + count.head]
    assert rank_activations(piped, count) == stages
    full = activation_memory(load_config(None, None, [*MODEL, "train.precision=bf16", "train.recompute=full"]), 2)
    assert full.kept() == [2 * cfg.train.seq_len * D * 4] * cfg.model.num_hidden_layers
    assert full.recomputed() == max(count.layers) and full.recomputed(ep=2) == max(count.kept(ep=2))
    assert full.total == sum(full.kept()) + count.mtp + count.head + count.rest
    assert rank_activations(full_cfg := load_config(None, None, [*MODEL, "train.recompute=full"]), full) == \
        [full.total + full.recomputed()]
    assert full_cfg.train.recompute == "full"
    with pytest.raises(MoeforgeError, match="selective recomputation"):
        activation_memory(load_config(None, None, [*MODEL, "train.recompute=norm"]), 2)
    recast = activation_memory(load_config(None, None, [*MODEL, "train.precision=bf16",
                                                        "train.recompute=expert_casts"]), 2)
    assert recast.layers == tuple(b - c for b, c in zip(count.layers, count.layer_expert_copies))
    assert recast.mtp == count.mtp - count.mtp_expert_copies and recast.rest == count.rest
    for extra, fragment in ((["train.recompute=expert_casts,swiglu"], "do not combine"),
                            (["train.recompute=expert_casts,full"], "give it alone"),
                            (["train.recompute=expert_casts", "parallel.sharding=full"], "sharding=full")):
        with pytest.raises(MoeforgeError, match=fragment):
            load_config(None, None, [*MODEL, *extra])
    plain = activation_memory(load_config(None, None, [*MODEL, "train.precision=bf16", "train.loss_chunk=0"]), 2)
    chunked = activation_memory(load_config(None, None, [*MODEL, "train.precision=bf16", "train.loss_chunk=16"]), 2)
    assert chunked.head < plain.head and chunked.layers == plain.layers


def test_schedule_peaks_count_the_micro_batches_in_flight():
    """The activations alive at a pipeline schedule's peak, from torch's own action order: 1F1B's rank r
    holds min(n, pp - r) micro-batches; ZBV and DualPipeV (two stages a rank, the V) hold more on
    their first rank than a single micro-batch and never more than all of them; every micro-batch's
    stages are freed by the end (checked by replaying the order with unit costs)."""
    from moeforge.plan import _schedule_order

    for schedule in ("1f1b", "interleaved1f1b", "zbv", "dualpipev"):
        cfg = load_config(None, None, [*MODEL, "parallel.pp=2", f"parallel.schedule={schedule}",
                                       "model.num_hidden_layers=4"])
        n_stages = 2 if schedule == "1f1b" else 4
        peaks = in_flight_peaks(cfg, [1] * n_stages, 6)
        assert peaks is not None and len(peaks) == 2, schedule
        if schedule == "1f1b":
            assert peaks == [(2, 2), (1, 1)]
            continue
        for bytes_, alive in peaks:
            assert bytes_ == alive and 2 <= alive <= 2 * 6, (schedule, peaks)
        order = _schedule_order(cfg.parallel, 6)
        done = {r: sum(1 for a in order[r] if a is not None for x in (a.sub_actions or (a,))
                       if x.computation_type.name == "FORWARD")
                for r in order}
        assert all(v == 2 * 6 for v in done.values()), (schedule, done)  # each rank: 2 stages x 6 forwards
    assert in_flight_peaks(load_config(None, None, MODEL), [5], 4) == [(5, 1)]


def test_plan_command_counts_activations(cli):
    """`moeforge plan` adds one micro-batch's activations per pipeline rank and the largest rank's
    total with its model states: the bench preset's eager step does not fit 80 GiB (measured: 80.7
    GiB, docs/plan.md); DeepSeek-V3's layout counts one sequence per GPU and 4 of 256 experts' copies."""
    r = cli("plan", "--preset", "bench", "--gpu-memory", "80")
    assert r.rc == 0, r.err
    assert "activations of one micro-batch (8 x 4096 tokens per GPU; train.micro_batch_size 8)" in r.out
    total = float(re.search(r"largest with one micro-batch: ([\d.]+) GiB \(pipeline rank 0\): does NOT fit in 80", r.out).group(1))
    assert 75 < total < 95
    r = cli("plan", "--preset", "v3-671b", "--gpus", "2048", "--gpu-memory", "80", "parallel.pp=16", "parallel.ep=64",
            "parallel.schedule=dualpipev", "parallel.sharding=zero1", "train.micro_batch_size=128")
    assert r.rc == 0, r.err
    assert "over dp x ep = 128 ranks: 1 per GPU" in r.out and "weight copies for 4 of 256 experts" in r.out
    assert re.search(r"^\s+2-15\s+[\d.]+\s+[\d.]+ \(\d+\)\s+[\d.]+$", r.out, re.M)
    assert "largest at the dualpipev schedule's peak over 120 micro-batches" in r.out
    r = cli("plan", "--preset", "tiny", "train.recompute=norm")
    assert r.rc == 0 and "not counted with selective recomputation" in r.out


def test_bench_reports_the_resident_memory_next_to_the_plan():
    """`moeforge bench` on a GPU prints what stays allocated between steps next to the plan's
    weights + optimizer state (the gradients and activations are freed by then)."""
    from moeforge.bench import BenchResult, format_result

    r = BenchResult("moeforge", 1000.0, 10.0, 1.0, 0.5, 60.0, resident_gib=38.51, planned_resident_gib=38.27)
    assert "allocated between steps: 38.51 GiB (moeforge plan: weights + optimizer state 38.27 GiB)" in format_result(r)
    assert "allocated between steps" not in format_result(BenchResult("moeforge", 1000.0, 10.0, 1.0, None, None))


def test_training_refuses_by_the_plans_model_states(monkeypatch):
    """The single-process memory check counts what the plan counts: with free memory between the
    Muon run's model states and the AdamW run's (Muon keeps one FP32 buffer for its matrices, AdamW
    two), Muon is let through and AdamW refused."""
    from moeforge.train import step

    muon, adamw = (load_config(None, None, [*MODEL, f"train.optimizer={o}"]) for o in ("muon", "adamw"))
    need = {o: model_state_memory(c, 1)[0].total for o, c in (("muon", muon), ("adamw", adamw))}
    assert need["muon"] < need["adamw"]
    monkeypatch.setattr(step, "available_memory", lambda device: (need["muon"] + need["adamw"]) // 2)
    step.check_memory(torch.device("cpu"), muon)
    with pytest.raises(MoeforgeError, match="weights, gradients and optimizer state"):
        step.check_memory(torch.device("cpu"), adamw)
