"""Pipeline parallelism (moeforge.parallel.pipeline): layout and placement rules, and 2-rank gloo runs
of every schedule compared with the single-process trainer arithmetic on the same data.

What the multi-process tests compare, and with what tolerance:
- One optimizer step: the loss components (main, MTP per depth, balance; means over micro-batches)
  and the gradient of every parameter, gathered from both ranks by single-model name, against a
  single process running Transformer.losses per micro-batch and (loss / n_micro).backward(), as
  the trainer does. rtol 1e-5, atol 1e-6: the forward is the same FP32 arithmetic op for op (so
  routing is identical), but gradients reach .grad in a different order of FP32 additions (the
  embedding's and head's contributions come from separate backward passes or the zero-bubble
  input/weight split), a few ulps (~1e-7 relative); atol covers gradients near zero.
- The MoE layers' tokens_per_expert after the step (input of the routing-bias update): exactly
  equal, i.e. every micro-batch counted once, none twice.
- Three AdamW steps (clip 1.0, routing-bias update on): the per-step losses within rtol 1e-4
  (AdamW's normalisation turns ulp-level gradient differences into larger parameter differences).
"""

from __future__ import annotations

import dataclasses

import contextlib

import pytest
import torch

from dist import run_dist
from moeforge.config import Config, ModelConfig, ParallelConfig
from moeforge.errors import MoeforgeError
from moeforge.parallel.pipeline import (mtp_mode, num_stages, rank_stages, stage_layout, stage_rank,
                                        validate_micro_batches)

# ---------------------------------------------------------------------------------------------
# layout and placement: no processes
# ---------------------------------------------------------------------------------------------


def pc(pp: int, schedule: str = "1f1b", layout: str = "") -> ParallelConfig:
    return ParallelConfig(pp=pp, schedule=schedule, layout=layout)


def mc(layers: int, mtp: int = 1) -> ModelConfig:
    return ModelConfig(num_hidden_layers=layers, num_nextn_predict_layers=mtp)


def test_even_layout_gives_extra_layers_to_the_middle_stages():
    assert stage_layout(mc(4), pc(2)) == [[0, 1], [2, 3]]
    assert stage_layout(mc(10), pc(4)) == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]
    lay = stage_layout(mc(61), pc(8, "dualpipev"))  # DeepSeek-V3's 61 layers over 16 stages
    assert sum(lay, []) == list(range(61))
    assert [len(s) for s in lay] == [3] + [4] * 13 + [3, 3]
    assert stage_layout(mc(3), pc(1)) == [[0, 1, 2]]


def test_explicit_layout():
    assert stage_layout(mc(10), pc(2, "zbv", "3,3,2,2")) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert stage_layout(mc(4), pc(2, layout=" 1, 3 ")) == [[0], [1, 2, 3]]


def test_stage_counts_and_placement():
    assert num_stages(pc(4)) == 4
    assert all(num_stages(pc(4, s)) == 8 for s in ("interleaved1f1b", "zbv", "dualpipev"))
    # 1F1B: one stage per rank
    assert [stage_rank(s, pc(4)) for s in range(4)] == [0, 1, 2, 3]
    # interleaved: a loop, rank r holds r and r + pp
    assert [rank_stages(r, pc(2, "interleaved1f1b")) for r in range(2)] == [[0, 2], [1, 3]]
    # V: rank r holds r and 2pp-1-r; the first and the last stage are on rank 0
    for sched in ("zbv", "dualpipev"):
        assert [rank_stages(r, pc(4, sched)) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
        assert stage_rank(0, pc(4, sched)) == stage_rank(7, pc(4, sched)) == 0


def test_mtp_embedding_mode_follows_placement():
    assert mtp_mode(mc(4), pc(2, "dualpipev")) == "shared"
    assert mtp_mode(mc(4), pc(2, "zbv")) == "shared"
    assert mtp_mode(mc(4), pc(1)) == "shared"
    assert mtp_mode(mc(4), pc(2)) == "forwarded"
    assert mtp_mode(mc(4), pc(2, "interleaved1f1b")) == "forwarded"
    assert mtp_mode(mc(4, mtp=0), pc(2)) == "none"
    # FSDP inside the stages: every stage module is an FSDP root, and the embedding can have one only
    for sharding in ("zero2", "full"):
        assert mtp_mode(mc(4), dataclasses.replace(pc(2, "dualpipev"), sharding=sharding)) == "forwarded"
    assert mtp_mode(mc(4), dataclasses.replace(pc(2, "dualpipev"), sharding="zero1")) == "shared"


def one_line_error(fn, *fragments):
    with pytest.raises(MoeforgeError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f.lower() in msg.lower(), msg
    return msg


@pytest.mark.parametrize("layout, fragments", [
    ("3,3", ["2 entries", "4 pipeline stages"]),
    ("3,3,2,1", ["sum to 9", "10"]),
    ("3,3,4,0", ["at least one layer"]),
    ("3,x,2,2", ["layer counts"]),
])
def test_layout_errors(layout, fragments):
    one_line_error(lambda: stage_layout(mc(10), pc(2, "dualpipev", layout)), "parallel.layout", *fragments)


def test_fewer_layers_than_stages():
    one_line_error(lambda: stage_layout(mc(3), pc(2, "dualpipev")), "4 pipeline stages", "3")
    one_line_error(lambda: stage_layout(mc(3), pc(4)), "at least 4")


def test_micro_batch_rules():
    one_line_error(lambda: validate_micro_batches(pc(2, "dualpipev"), 3), "dualpipev", "3 micro-batches", "4")
    one_line_error(lambda: validate_micro_batches(pc(4), 3), "1f1b", "3 micro-batches", "4")
    one_line_error(lambda: validate_micro_batches(pc(2, "interleaved1f1b"), 5), "interleaved1f1b", "5")
    one_line_error(lambda: validate_micro_batches(pc(2, "zbv"), 0), "at least one")
    one_line_error(lambda: validate_micro_batches(pc(2, "gpipe"), 4), "parallel.schedule")
    for sched, n in [("dualpipev", 4), ("dualpipev", 5), ("dualpipev", 7), ("zbv", 1), ("zbv", 5),
                     ("1f1b", 2), ("interleaved1f1b", 6), ("interleaved1f1b", 3)]:
        validate_micro_batches(pc(2, sched), n)  # no error


# ---------------------------------------------------------------------------------------------
# 2 gloo ranks against the single-process step
# ---------------------------------------------------------------------------------------------
# hidden 64, 4 layers (1 dense + 3 MoE), 8 experts in 2 groups, MTP depth 1 (its block is MoE too).
MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
             num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64)
SEQ, MICRO, N_MICRO, STEPS = 32, 2, 4, 3
LAM, ALPHA, GAMMA, LR, CLIP = 0.3, 0.01, 0.001, 3e-3, 1.0  # alpha large enough that balance grads matter


def make_config() -> Config:
    cfg = Config(model=ModelConfig(**MODEL))
    cfg.train.lr, cfg.train.grad_clip = LR, CLIP
    return cfg


def make_batches(n_micro: int = N_MICRO, steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, MODEL["vocab_size"], (n_micro * MICRO, SEQ + 1), generator=g) for _ in range(steps)]


def build(cfg: Config):
    from moeforge.model import build_model

    torch.manual_seed(0)
    return build_model(cfg.model)


def reference_run(n_micro: int = N_MICRO, steps: int = STEPS) -> dict:
    """The trainer's step arithmetic in one process: per micro-batch losses, (loss / n).backward()."""
    from moeforge.train.balance import update_routing_bias
    from moeforge.train.step import build_optimizer

    cfg = make_config()
    model = build(cfg)
    opt = build_optimizer(model, cfg)
    D = cfg.model.num_nextn_predict_layers
    res = {"steps": []}
    for step, window in enumerate(make_batches(n_micro, steps)):
        inputs, targets = window[:, :-1], window[:, 1:]
        rec = torch.zeros(D + 2)
        for i in range(n_micro):
            rows = slice(i * MICRO, (i + 1) * MICRO)
            out = model.losses(inputs[rows], targets[rows])
            mtp = out["mtp"].sum() * (LAM / D)
            loss = out["main"] + mtp + ALPHA * out["balance"]
            (loss / n_micro).backward()
            rec += torch.cat([out["main"].reshape(1), out["mtp"], out["balance"].reshape(1)]).detach() / n_micro
        res["steps"].append(rec)
        if step == 0:
            res["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            res["counts"] = {n: m.tokens_per_expert.clone() for n, m in model.named_modules()
                             if hasattr(m, "tokens_per_expert")}
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_routing_bias(model.moe_layers(), GAMMA)
    res["bias"] = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    return res


def pipeline_body(schedule: str, layout: str = "", n_micro: int = N_MICRO, steps: int = STEPS) -> dict:
    """One rank: the same model and data, split over 2 pipeline ranks, the same 3 steps."""
    from moeforge.parallel.pipeline import (PipeRank, clip_grad_norm_, moe_layers, named_parameters,
                                            pipeline_train_step, split_pipeline, stage_modules)
    from moeforge.train.balance import update_routing_bias
    from moeforge.train.step import build_optimizer

    cfg = make_config()
    cfg.parallel = ParallelConfig(pp=2, schedule=schedule, layout=layout)
    model = build(cfg)
    ctx = PipeRank()
    stages, factory = split_pipeline(model, cfg.parallel, ctx, micro_batch=MICRO, seq_len=SEQ)
    opt = build_optimizer(stage_modules(stages), cfg)
    layers = moe_layers(stages)
    res = {"steps": [], "stages": [s.stage_index for s in stages]}
    for step, window in enumerate(make_batches(n_micro, steps)):
        out = pipeline_train_step(stages, factory, window[:, :-1], window[:, 1:], n_micro=n_micro,
                                  mtp_lambda=LAM, balance_alpha=ALPHA)
        res["steps"].append(torch.cat([out["main"].reshape(1), out["mtp"], out["balance"].reshape(1)]))
        if step == 0:
            res["grads"] = {n: p.grad.clone() for n, p in named_parameters(stages).items() if p.grad is not None}
            res["counts"] = {n: m.tokens_per_expert.clone() for n, m in layers.items()}
        clip_grad_norm_(stages, CLIP, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_routing_bias(list(layers.values()), GAMMA)
    res["bias"] = {f"{n}.gate.e_score_correction_bias": m.gate.e_score_correction_bias.clone()
                   for n, m in layers.items()}
    return res


@pytest.mark.parametrize("schedule, pp, amp", [("1f1b", 2, None), ("dualpipev", 2, None), ("interleaved1f1b", 2, None),
                                              ("1f1b", 1, None), ("dualpipev", 2, torch.bfloat16)])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_stage_modules_chain_to_the_model(schedule, pp, amp, documents, one_thread):
    """In one process, the stage modules run one after the other compute Transformer.losses and the
    trainer's objective bit for bit (also under BF16 autocast, and with attention masked to the
    documents of tokens that hold end-of-text tokens, train.document_mask: each stage builds the mask
    from the tokens), and their state_dicts partition the model's (the embedding is the one tensor
    two stages share, when the MTP embeddings are shared)."""
    from moeforge.model.attention import document_ids, document_mask
    from moeforge.parallel.pipeline import PipelineLoss, StageModule

    cfg = make_config()
    model = build(cfg)
    pcfg = ParallelConfig(pp=pp, schedule=schedule)
    layout, mode = stage_layout(cfg.model, pcfg), mtp_mode(cfg.model, pcfg)
    mods = [StageModule(model, s, len(layout), layout[s], mode, amp) for s in range(len(layout))]
    window = make_batches(1, 1)[0]
    if documents:  # documents of 5 to 11 tokens
        window = window.clone()
        window[:, 5::11] = window[:, 11::7] = cfg.model.eos_token_id
    inputs, targets = window[:, :-1], window[:, 1:]
    carry = (inputs,)
    for m in mods:
        carry = m(*carry, mtp_tokens=inputs, doc_tokens=inputs if documents else None)
    assert all(t.dtype == torch.float32 for t in carry)  # the static shapes split_pipeline declares
    loss_fn = PipelineLoss(model.head, cfg.model.num_nextn_predict_layers, amp)
    loss_fn.mtp_lambda, loss_fn.balance_alpha = LAM, ALPHA
    loss = loss_fn(carry, targets)
    mask = document_mask(document_ids(inputs, cfg.model.eos_token_id)) if documents else None
    with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
        out = model.losses(inputs, targets, mask=mask)
        if documents:  # (the mask changes the function: the test would pass without it otherwise)
            assert not torch.equal(out["main"], model.losses(inputs, targets)["main"])
    assert torch.equal(loss, out["main"] + out["mtp"].sum() * LAM + ALPHA * out["balance"])
    assert torch.equal(loss_fn.records[0], torch.cat([out["main"].reshape(1), out["mtp"], out["balance"].reshape(1)]))
    keys = [set(m.state_dict()) for m in mods]
    assert set().union(*keys) == set(model.state_dict())
    shared = {k for i, a in enumerate(keys) for b in keys[i + 1:] for k in a & b}
    assert shared == ({"embed.weight"} if mode == "shared" and len(mods) > 1 else set())


@pytest.fixture(scope="module")
def reference():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each: the same CPU kernels, bit for bit
    try:
        return reference_run()
    finally:
        torch.set_num_threads(saved)


def check_against(reference: dict, ranks: list[dict], n_micro: int) -> None:
    # every rank reports the same (broadcast) components
    for r in ranks[1:]:
        for a, b in zip(ranks[0]["steps"], r["steps"]):
            assert torch.equal(a, b)
    # step 1: components and every parameter's gradient, each parameter on exactly one rank
    torch.testing.assert_close(ranks[0]["steps"][0], reference["steps"][0], rtol=1e-5, atol=1e-6)
    grads: dict[str, torch.Tensor] = {}
    for r in ranks:
        assert not set(grads) & set(r["grads"]), "a parameter has gradients on two ranks"
        grads.update(r["grads"])
    assert set(grads) == set(reference["grads"])
    for name, g in reference["grads"].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the step's expert loads: all micro-batches, each once
    counts = {k: v for r in ranks for k, v in r["counts"].items()}
    assert set(counts) == set(reference["counts"])
    for name, c in reference["counts"].items():
        assert torch.equal(counts[name], c), name
        assert c.sum() == n_micro * MICRO * SEQ * MODEL["num_experts_per_tok"]
    # later AdamW steps track the single-process losses; the routing biases moved identically
    assert len(ranks[0]["steps"]) == len(reference["steps"])
    for step, (got, want) in enumerate(zip(ranks[0]["steps"], reference["steps"])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step}: {m}")
    bias = {k: v for r in ranks for k, v in r["bias"].items()}
    assert set(bias) == set(reference["bias"])
    for name, b in reference["bias"].items():
        torch.testing.assert_close(bias[name], b, rtol=0, atol=1e-9)


@pytest.mark.dist
@pytest.mark.parametrize("schedule, layout", [
    ("1f1b", "1,3"),  # uneven: stage 0 holds only the dense layer (its balance output needs no gradient)
    ("dualpipev", ""),
    ("zbv", ""),
    ("interleaved1f1b", ""),
])
def test_pipeline_matches_single_process(schedule, layout, reference):
    """PP=2, 4 micro-batches, 3 AdamW steps, MTP on: MTP embeddings shared (V placement) or forwarded."""
    check_against(reference, run_dist(pipeline_body, 2, schedule, layout), N_MICRO)


@pytest.mark.dist
def test_dualpipev_odd_micro_batches():
    """torch's DualPipeV needs n >= 2pp micro-batches, not an even n: 5 micro-batches, one step."""
    with_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = reference_run(n_micro=5, steps=1)
    finally:
        torch.set_num_threads(with_threads)
    check_against(ref, run_dist(pipeline_body, 2, "dualpipev", "", 5, 1), 5)
