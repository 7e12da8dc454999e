"""The single-GPU fast paths compute the same function as the plain ones (issue: single-GPU speed).

Each test names what it compares and why its tolerance. Speed itself is measured by `moeforge bench`
on a GPU (docs/performance.md), never asserted here.
"""

from __future__ import annotations

import pytest
import torch

from moeforge.model.head import chunked_cross_entropy, plain_cross_entropy
from moeforge.model.mtp import IGNORE_INDEX


def _head_inputs(T=37, D=24, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(V, D, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    targets[::5] = IGNORE_INDEX  # ignored positions must not count in the loss or the mean
    return h, w, targets


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_chunked_cross_entropy_matches_plain(chunk):
    """Loss and both gradients equal the plain FP32 path within FP32 rounding (rtol 1e-5): the same
    sums in another order. Chunks that do not divide T and a chunk larger than T are included."""
    h, w, targets = _head_inputs()
    ref = plain_cross_entropy(h @ w.T, targets)
    gh_ref, gw_ref = torch.autograd.grad(ref * 1.7, (h, w))  # a non-unit upstream gradient
    out = chunked_cross_entropy(h, w, targets, chunk)
    gh, gw = torch.autograd.grad(out * 1.7, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)


def test_functional_softmax_grad_matches_in_place():
    """The compile-friendly softmax gradient (used with train.compile) equals the eager in-place one:
    FP32 and BF16 logits, ignored rows; and traced by dynamo + AOT autograd (aot_eager backend) it
    gives the same chunked loss and gradients as the eager path."""
    from moeforge.model.head import _softmax_grad, _softmax_grad_functional

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (3 * torch.randn(9, 70, generator=g)).to(dtype)
        targets = torch.randint(0, 70, (9,), generator=g)
        valid = (torch.arange(9) % 4 != 0).float()
        ga, la = _softmax_grad(logits.clone(), targets, valid, dtype)
        gb, lb = _softmax_grad_functional(logits, targets, valid, dtype)
        assert ga.dtype == gb.dtype == dtype
        torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 4e-3)
        torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-5)
        assert torch.all(gb[valid == 0] == 0)
    h, w, targets = _head_inputs()
    eager = chunked_cross_entropy(h, w, targets, 8)
    ge = torch.autograd.grad(eager, (h, w))
    traced = chunked_cross_entropy(h, w, targets, 8, fused="aot_eager")
    gt = torch.autograd.grad(traced, (h, w))
    torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(gt, ge):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_chunked_cross_entropy_bf16_autocast_close_to_plain():
    """Under BF16 autocast both paths run the head GEMM in BF16; they agree to BF16 rounding (1e-2)."""
    h, w, targets = _head_inputs(T=64, D=32, V=80, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain_cross_entropy(torch.nn.functional.linear(h, w), targets)
        out = chunked_cross_entropy(h, w, targets, 16)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    gh, gw = torch.autograd.grad(out, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gh, gh_ref, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, gw_ref, rtol=2e-2, atol=2e-3)


def test_chunked_cross_entropy_all_ignored_is_zero():
    """No valid target: loss 0 and zero gradients (the plain path gives NaN for a mean over nothing)."""
    h, w, targets = _head_inputs(T=6)
    out = chunked_cross_entropy(h, w, torch.full_like(targets, IGNORE_INDEX), 4)
    gh, gw = torch.autograd.grad(out, (h, w))
    assert out.item() == 0 and gh.abs().sum() == 0 and gw.abs().sum() == 0


# ---- recomputation and compilation: same losses, same gradients ----
from conftest import small_cfg  # noqa: E402
from moeforge.config import ModelConfig  # noqa: E402
from moeforge.model import build_model  # noqa: E402
from moeforge.train.speed import apply_compile, apply_recompute  # noqa: E402


def _model_cfg(**kw) -> ModelConfig:
    """Every part the switches touch: query compression (wq_b), dense + MoE layers, shared experts, MTP."""
    return small_cfg(**{"vocab_size": 96, "num_hidden_layers": 3, "routed_scaling_factor": 1.0,
                        "num_nextn_predict_layers": 1, **kw})


def _loss_and_grads(model, tokens):
    out = model.losses(tokens[:, :-1], tokens[:, 1:])
    loss = out["main"] + 0.3 * out["mtp"].sum() + 1e-4 * out["balance"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    counts = [m.tokens_per_expert.clone() for m in model.moe_layers()]
    return loss.detach(), grads, counts


def _reference_and(transform, cfg=None, reference_transform=None):
    """(plain model's loss/grads/counts, transformed copy's), same weights and tokens."""
    cfg = cfg or _model_cfg()
    torch.manual_seed(0)
    plain = build_model(cfg)
    if reference_transform is not None:
        reference_transform(plain)
    other = build_model(cfg, init=False)
    other.load_state_dict(plain.state_dict())
    transform(other)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    return _loss_and_grads(plain, tokens), _loss_and_grads(other, tokens)


@pytest.mark.parametrize("parts", [["expert_casts"], ["expert_casts", "norm", "mla_up"]])
def test_recomputed_expert_casts_free_the_copies_and_keep_the_gradients(parts, one_thread):
    """train.recompute=expert_casts under BF16 autocast: the routed experts' BF16 weight copies are no
    longer alive between forward and backward (without it every MoE layer keeps its three), and the
    loss, gradients and routed-token counts are bit-identical to the plain model's (alone and with
    selective recomputation of other parts)."""
    import gc
    import weakref

    from moeforge.model.moe import Experts

    copies: list = []

    def watch(model):
        for m in model.modules():
            if isinstance(m, Experts):
                def dense_weights(dtype, _real=m.dense_weights):
                    ws = _real(dtype)
                    copies.extend(weakref.ref(w) for w in ws)
                    return ws
                m.dense_weights = dense_weights

    def run(model, tokens):
        del copies[:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.losses(tokens[:, :-1], tokens[:, 1:])
        gc.collect()
        alive = sum(r() is not None for r in copies)
        loss = out["main"] + 0.3 * out["mtp"].sum() + 1e-4 * out["balance"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return loss.detach(), grads, [m.tokens_per_expert.clone() for m in model.moe_layers()], alive

    cfg = _model_cfg()
    torch.manual_seed(0)
    plain = build_model(cfg)
    other = build_model(cfg, init=False)
    other.load_state_dict(plain.state_dict())
    apply_recompute(other, parts)
    watch(plain)
    watch(other)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    loss0, g0, c0, alive0 = run(plain, tokens)
    loss1, g1, c1, alive1 = run(other, tokens)
    n_moe = len(plain.moe_layers())
    assert alive0 == 3 * n_moe and alive1 == 0
    assert torch.equal(loss0, loss1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
    for a, b in zip(c0, c1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("parts", [["norm"], ["mla_up"], ["swiglu"], ["norm", "mla_up", "swiglu"], ["full"]])
def test_recompute_gives_identical_gradients(parts, one_thread):
    """Recomputation re-runs the same FP32 ops on the same inputs: loss, gradients and the routed-token
    counts (counted once, not again during recomputation) are bit-identical to the plain model."""
    (loss0, g0, c0), (loss1, g1, c1) = _reference_and(lambda m: apply_recompute(m, parts))
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
    for a, b in zip(c0, c1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("parts", [["norm", "mla_up", "swiglu"], ["full"]])
def test_recompute_gives_identical_gradients_in_fp8(parts, one_thread):
    """The same with the FP8 model (emulated GEMMs, the FP8 FFNs' one gate/up GEMM and SwiGLU
    Function): recomputation changes no bit of the loss or the gradients."""
    from moeforge.fp8 import convert_to_fp8

    (loss0, g0, _), (loss1, g1, _) = _reference_and(lambda m: apply_recompute(convert_to_fp8(m), parts),
                                                    reference_transform=convert_to_fp8)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)


def test_compiled_blocks_match_eager(one_thread):
    """torch.compile of every block (dynamo + AOT autograd graphs, run by the aot_eager backend so the
    test needs no C++ toolchain time) computes the eager function: FP32 within 1e-5 relative (the
    graphs may reorder reductions)."""
    (loss0, g0, c0), (loss1, g1, c1) = _reference_and(lambda m: apply_compile(apply_recompute(m, ["full"]),
                                                                              backend="aot_eager"))
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    for a, b in zip(c0, c1):
        assert torch.equal(a, b)


def test_compiled_blocks_decode_with_their_own_forward(one_thread):
    """With compiled blocks, a forward with a latent cache (decoding: each position would be another
    compilation) runs the block's own forward; the training form runs the compiled one. Greedy
    decoding of a model with compiled blocks gives the uncompiled model's tokens."""
    from moeforge.generate import generate
    from moeforge.train.speed import _compiled_unless_decoding

    calls = []
    forward = _compiled_unless_decoding(lambda *a: calls.append(("eager", a[3])), lambda *a: calls.append(("compiled", a[3])))
    forward("x", "cos", "sin")
    forward("x", "cos", "sin", "cache", 5)
    assert calls == [("compiled", None), ("eager", "cache")]

    from moeforge.config import load_config

    cfg = load_config("tiny", None, ["model.num_nextn_predict_layers=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu").eval()
    reference = generate(model, [5, 6, 7], 6, temperature=0.0)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        apply_compile(model, backend="eager")
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7, 8]]))  # the compiled form, once
        assert generate(model, [5, 6, 7], 6, temperature=0.0) == reference


@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_model_compiles_each_piece_a_few_times(fp8, one_thread):
    """torch.compile of the model, FP32 and FP8 (the CPU paths, aot_eager backend): the FP8 GEMMs and
    the grouped GEMMs of the CPU run between the compiled graphs, never traced, so no piece is
    compiled again for each layer width or expert (the FP8 `small` preset had hit dynamo's
    recompilation limit on the GPU, the FP8 `tiny` preset ran 13x slower on a CPU). With the limit at
    4 (a piece may meet the dense FFN's, the shared experts' and the routed experts' shapes) and a hit
    made an error, the compiled model computes the eager function (FP32 within 1e-5)."""
    from moeforge.fp8 import convert_to_fp8

    same = convert_to_fp8 if fp8 else (lambda m: m)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        (loss0, g0, _), (loss1, g1, _) = _reference_and(
            lambda m: apply_compile(same(m), backend="aot_eager"), reference_transform=same)
    torch._dynamo.reset()
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


# ---- the parameter EMA in CPU memory ----
from moeforge.train.ema import CPUEMA  # noqa: E402


def test_cpu_ema_follows_the_formula():
    """After each update, ema = decay * ema + (1 - decay) * theta, starting from the initial weights,
    in FP32 on the CPU (the same FP32 operations in the same order: equal within 1 ulp-level 1e-7)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    ema = CPUEMA(model, decay=0.9)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            ema.update()
            for n, p in model.named_parameters():
                expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
        state = ema.state_dict()
        assert state.keys() == expected.keys()
        for n in expected:
            assert state[n].device.type == "cpu" and state[n].dtype == torch.float32
            torch.testing.assert_close(state[n], expected[n], rtol=1e-6, atol=1e-7)
        other = CPUEMA(model, decay=0.9)  # resume: the saved average replaces the fresh one
        other.load_state_dict(state)
        torch.testing.assert_close(other.state_dict(), state, rtol=0, atol=0)
        other.close()
    finally:
        ema.close()


# ---- `moeforge bench` on a CPU: the command's contract (speed is measured on a GPU) ----
BENCH_TINY = ["--preset", "tiny", "--steps", "2", "--warmup", "1", "--seq-len", "32", "--batch-size", "2"]


def test_bench_cli_reports_and_compares_with_transformers(cli, tmp_path):
    """The report has throughput, the spread of the timed steps, the time split (whose parts add up to
    the step) and the comparison with transformers' model; the JSON file holds the same numbers."""
    import json

    out = tmp_path / "bench.json"
    r = cli("bench", *BENCH_TINY, "--vs", "hf", "--json", out, "train.loss_chunk=16")
    assert r.rc == 0, r.err
    assert "moeforge:" in r.out and "transformers:" in r.out and "moeforge / transformers:" in r.out
    assert "time split of one step" in r.out
    results = json.loads(out.read_text())["results"]
    ours, hf = results
    assert ours["name"] == "moeforge" and hf["name"] == "transformers"
    assert ours["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0
    for res in (ours, hf):  # the timed steps' spread: shortest <= median <= longest, around the mean step
        lo, mid, hi = res["step_ms_spread"]
        assert 0 < lo <= mid <= hi and lo <= 1.05 * res["step_ms"] and hi >= 0.95 * res["step_ms"], res
        assert res["gpu_state"] is None  # (no GPU to sample on a CPU)
    assert "GPU during the timed steps" not in r.out
    split = ours["split_ms"]
    assert {"attention", "moe", "dense", "head+loss", "optimizer", "other"} <= split.keys()
    assert all(v >= 0 for v in split.values())
    assert sum(v for k, v in split.items() if k != "total") == pytest.approx(split["total"], rel=0.05)


def test_bench_vs_another_precision(cli, tmp_path):
    """--vs PRECISION: the same steps again in that precision, after the first model is freed, each
    result named by its precision, then the ratio of tokens/s; the JSON holds both."""
    import json

    out = tmp_path / "bench.json"
    r = cli("bench", *BENCH_TINY, "--no-split", "--precision", "fp8", "--vs", "fp32", "--json", out)
    assert r.rc == 0, r.err
    assert "moeforge fp8:" in r.out and "bench: the same steps with precision fp32" in r.out
    assert "moeforge fp32:" in r.out and "fp8 / fp32: " in r.out
    first, second = json.loads(out.read_text())["results"]
    assert (first["name"], second["name"]) == ("moeforge fp8", "moeforge fp32")
    ratio = float(r.out.split("fp8 / fp32: ")[1].split("x")[0])
    assert ratio == pytest.approx(first["tokens_per_s"] / second["tokens_per_s"], abs=0.01)
    assert r.out.count("host syncs inside a step") == 2


def test_bench_header_names_the_micro_batches(cli):
    """A step of several micro-batches (gradient accumulation) says so in the report's first line."""
    r = cli("bench", *BENCH_TINY[:-1], "4", "--no-split", "train.micro_batch_size=2")
    assert r.rc == 0, r.err
    assert "bench: 4 x 32 tokens per step (2 micro-batches of 2)," in r.out
    r = cli("bench", *BENCH_TINY, "--no-split")
    assert r.rc == 0, r.err
    assert "bench: 2 x 32 tokens per step, precision" in r.out


def test_compile_is_refused_with_expert_parallelism():
    """Regional compilation with ep > 1 recompiles every step (the all-to-all splits each block and
    the token counts change): a one-line error, also for the bench preset, which compiles by default."""
    from moeforge.config import load_config
    from moeforge.errors import MoeforgeError

    with pytest.raises(MoeforgeError, match="train.compile.*parallel.ep"):
        load_config("bench", None, ["parallel.ep=2"])
    assert load_config("bench", None, ["parallel.ep=2", "train.compile=false"]).parallel.ep == 2


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.13 GiB. GPU 0 has a total capacity "
                                 "of 79.19 GiB of which 1.20 GiB is free.\nSee the documentation")


def test_bench_out_of_memory_is_one_line(monkeypatch, capsys):
    """Running out of device memory ends with one line naming the allocation and what to change, exit 1."""
    from moeforge import bench, cli

    monkeypatch.setattr(bench, "bench_moeforge", _raise_oom)
    assert cli.main(["bench", *BENCH_TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Tried to allocate 3.13 GiB" in err and "train.micro_batch_size" in err


def test_bench_vs_hf_reports_when_transformers_runs_out_of_memory(monkeypatch, capsys, tmp_path):
    """moeforge's result stands when transformers' model does not fit: no ratio, a note, exit 0."""
    import json

    from moeforge import bench, cli

    monkeypatch.setattr(bench, "bench_hf", _raise_oom)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", *BENCH_TINY, "--no-split", "--vs", "hf", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "moeforge:" in text and "transformers ran out of memory" in text and "moeforge / transformers" not in text
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["results"]] == ["moeforge"] and "out of memory" in saved["notes"][0]


@pytest.mark.parametrize("args, fragments", [
    (["--steps", "0"], ["--steps"]),
    (["--vs", "hf", "--precision", "fp8"], ["transformers", "fp8"]),
    (["--vs", "fp32", "--precision", "fp32"], ["--vs fp32", "already"]),
    (["train.recompute=attention"], ["train.recompute", "attention"]),
    (["train.compile=true", "train.recompute=norm"], ["train.compile"]),
])
def test_bench_bad_input(cli, expect_error, args, fragments):
    expect_error(cli("bench", *BENCH_TINY, "--no-split", *args), "bench", *fragments)


# ---- document masking for packed sequences ----
from moeforge.model.attention import attention, document_ids, document_mask  # noqa: E402


def test_document_ids_start_after_each_eos():
    tokens = torch.tensor([[5, 6, 0, 7, 0, 0, 8], [0, 1, 2, 3, 4, 5, 6]])
    assert document_ids(tokens, eos_id=0).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def test_packed_documents_see_only_themselves(one_thread):
    """With the document mask, the logits of a document packed after another equal those of the
    document alone. RoPE makes attention depend on relative positions only, so the shift of absolute
    positions changes the result by rounding of the rotation angles only (FP32: 2e-5)."""
    cfg = _model_cfg(eos_token_id=0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(3)
    first = torch.randint(1, cfg.vocab_size, (1, 9), generator=g)
    second = torch.randint(1, cfg.vocab_size, (1, 12), generator=g)
    packed = torch.cat([first, torch.zeros(1, 1, dtype=torch.long), second], dim=1)  # doc, EOS, doc
    with torch.no_grad():
        h, _, _, _ = model.hidden(packed, mask=document_mask(document_ids(packed, 0)))
        alone, _, _, _ = model.hidden(second)
        causal, _, _, _ = model.hidden(packed)
    torch.testing.assert_close(h[:, 10:], alone, rtol=2e-5, atol=2e-5)
    assert (causal[:, 10:] - alone).abs().max() > 1e-3  # without the mask the first document leaks in


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose: CPU
def test_flex_attention_block_mask_matches_dense_mask():
    """The GPU path's FlexAttention with the document BlockMask computes the reference dense-mask SDPA
    (forward on the CPU: FlexAttention has no CPU backward). FP32, different summation order: 1e-5."""
    g = torch.Generator().manual_seed(0)
    B, H, S = 2, 2, 40
    q, k = (torch.randn(B, H, S, 24, generator=g) for _ in range(2))
    v = torch.randn(B, H, S, 16, generator=g)
    tokens = torch.randint(1, 9, (B, S), generator=g)
    tokens[0, [5, 17, 30]] = 0
    tokens[1, [12]] = 0
    doc = document_ids(tokens, 0)
    dense, block = document_mask(doc, flex=False), document_mask(doc, flex=True)
    assert isinstance(dense, torch.Tensor) and not isinstance(block, torch.Tensor)
    torch.testing.assert_close(attention(q, k, v, 0.2, block), attention(q, k, v, 0.2, dense), rtol=1e-5, atol=1e-5)


def test_cpu_ema_every_k_steps_uses_decay_to_the_k():
    """ema_every=2: steps 1 and 3 leave the average alone; step 2 and 4 fold in with decay**2."""
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3)
    ema = CPUEMA(model, decay=0.9, every=2)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        for step in range(1, 5):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            ema.update(step)
            if step % 2 == 0:
                for n, p in model.named_parameters():
                    expected[n] = 0.81 * expected[n] + 0.19 * p.detach()
            torch.testing.assert_close(ema.state_dict(), expected, rtol=1e-6, atol=1e-6)
    finally:
        ema.close()


def test_models_too_large_for_the_machine_are_refused(cli, expect_error, monkeypatch, tmp_path):
    """bench and train refuse, before allocating, a model whose weights + gradients + AdamW state exceed
    the free memory (here a machine reporting 1 GiB free), naming both sizes."""
    from moeforge.train import step

    monkeypatch.setattr(step, "available_memory", lambda device: 2**30)
    expect_error(cli("bench", "--preset", "small", "--device", "cpu", "--steps", "1"), "bench",
                 "0.16B parameters", "2.4 GiB", "1.0 GiB free")
    expect_error(cli("train", "--preset", "v2-lite", "--device", "cpu", "--out", tmp_path / "run"), "train",
                 "15.71B parameters", "1.0 GiB free")
    assert not (tmp_path / "run").exists()


def _benchmark_module(name: str = "profile_step"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _profile_step_module():
    return _benchmark_module("profile_step")


def test_routing_count_variants_agree(one_thread):
    """benchmarks/routing_counts.py: every way of counting tokens per expert, over all tokens and per
    sequence, gives bincount's counts, on random choices with an expert nobody picked and on the tiny
    model's own routing (the script stops if one differs)."""
    mod = _benchmark_module("routing_counts")
    flat = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(0))
    order = flat.argsort(stable=True)
    for name, fn in mod.count_variants(8).items():
        assert torch.equal(fn(flat, order).long(), torch.bincount(flat, minlength=8)), name
    for name, fn in mod.sequence_count_variants(8, 4).items():  # 4 sequences of 125 choices
        expect = torch.stack([torch.bincount(row, minlength=8) for row in flat.view(4, 125)])
        assert torch.equal(fn(flat, order).long(), expect), name
    results = mod.main(["--preset", "tiny", "--sequences", "2", "--repeat", "1"])
    assert set(results) == set(mod.count_variants(8)) | set(mod.sequence_count_variants(8, 2))
    assert all(r["eager"] > 0 for r in results.values())


def test_profile_attributes_kernels_to_the_innermost_moeforge_frame():
    """benchmarks/profile_step.py --by-source on a made-up GPU trace: each kernel joins its launch by
    correlation id and lands on the innermost moeforge frame open at the launch, skipping the kernel
    wrappers; a kernel whose launch has no moeforge frame around it (autograd's thread) lands on '-'."""
    attribute = _profile_step_module().attribute_to_source

    def frame(name, ts, dur, tid=1):
        return {"cat": "python_function", "ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid}

    events = [
        frame("site-packages/torch/nn/modules/module.py(1): _call_impl", 0, 100),
        frame("moeforge/model/moe.py(232): forward", 1, 90),
        frame("moeforge/fp8/gpu.py(56): fp8_linear_forward", 10, 20),
        frame("moeforge/fp8/kernels.py(300): quant_operands", 11, 5),  # a kernel wrapper: skipped
        frame("moeforge/model/layers.py(31): forward", 40, 10),
        {"cat": "cuda_runtime", "ph": "X", "name": "cudaLaunchKernel", "ts": 12, "dur": 1, "tid": 1,
         "args": {"correlation": 7}},
        {"cat": "cuda_runtime", "ph": "X", "name": "cudaLaunchKernel", "ts": 60, "dur": 1, "tid": 1,
         "args": {"correlation": 8}},  # after layers.py returned: inside moe.py's forward only
        {"cat": "cuda_driver", "ph": "X", "name": "cuLaunchKernelEx", "ts": 70, "dur": 1, "tid": 2,
         "args": {"correlation": 9}},  # another thread, no frames
    ]
    for corr, name, dur in ((7, "_quant_1x128_kernel", 3000), (8, "gemm", 500), (9, "gemm", 250)):
        events.append({"cat": "kernel", "ph": "X", "name": name, "ts": 1000, "dur": dur, "args": {"correlation": corr}})
    out = attribute(events)
    assert dict(out) == {
        ("moeforge/fp8/gpu.py(56): fp8_linear_forward", "_quant_1x128_kernel"): [3.0, 1],
        ("moeforge/model/moe.py(232): forward", "gemm"): [0.5, 1],
        ("-", "gemm"): [0.25, 1],
    }


def test_profile_idle_gaps_are_the_gpu_timeline_holes_charged_to_the_next_kernel():
    """benchmarks/profile_step.py --gaps on a made-up GPU trace: kernels on two streams that overlap
    leave no gap, a memcpy keeps the GPU busy, and each hole between busy spans is charged to what
    ends it, bucketed by its length; CPU-side events are ignored."""
    idle_gaps = _profile_step_module().idle_gaps
    events = [{"cat": "cuda_runtime", "ph": "X", "name": "cudaLaunchKernel", "ts": 10, "dur": 5000}]
    for name, ts, dur in (("a", 100, 50), ("b", 120, 100), ("c", 1000, 10), ("d", 300, 10)):  # a, b: busy 100-220
        events.append({"cat": "kernel", "ph": "X", "name": name, "ts": ts, "dur": dur})
    events.append({"cat": "gpu_memcpy", "ph": "X", "name": "Memcpy HtoD", "ts": 223, "dur": 67})  # busy 223-290
    idle, buckets, by_next = idle_gaps(events)
    # holes: 220-223 (before the copy, 3 us), 290-300 (before d, 10 us), 310-1000 (before c, 690 us)
    assert idle == pytest.approx(0.703)
    assert buckets == pytest.approx({"under 5 us": 0.003, "5-50 us": 0.010, "50-500 us": 0.0, "500 us and more": 0.690})
    assert {k: [pytest.approx(v[0]), v[1]] for k, v in by_next.items()} == {
        "(a copy or memset)": [0.003, 1], "d": [0.010, 1], "c": [0.690, 1]}


def test_fp8_accuracy_mean_curves_average_the_seeds_at_the_steps_all_runs_logged(tmp_path):
    """benchmarks/fp8_accuracy.py --seeds: each precision's training loss averaged over the finished
    seeds, only at steps every run logged, written as curves.csv in the layout --replot reads."""
    import json

    acc = _benchmark_module("fp8_accuracy")
    logs = {("bf16", 1): {1: 4.0, 2: 3.0, 3: 2.0}, ("fp8", 1): {1: 4.2, 2: 3.2, 3: 2.2},
            ("bf16", 2): {1: 6.0, 2: 5.0}, ("fp8", 2): {1: 5.8, 2: 4.8, 3: 9.9}}
    for (kind, seed), losses in logs.items():
        run = tmp_path / f"{kind}-seed{seed}"
        run.mkdir()
        lines = [json.dumps({"step": t, "loss": v}) for t, v in losses.items()] + [json.dumps({"val_loss": 1.0})]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    steps, means = acc.mean_curves(tmp_path, ("bf16", "fp8"), [1, 2])
    assert steps == [1, 2]
    assert means["bf16"] == [5.0, 4.0] and means["fp8"] == pytest.approx([5.0, 4.0])
    acc.write_curves(tmp_path, "bf16", steps, means["bf16"], means["fp8"])
    rows = (tmp_path / "curves.csv").read_text().splitlines()
    assert rows[0] == "step,bf16,fp8" and [float(x) for x in rows[2].split(",")] == pytest.approx([2, 4.0, 4.0])


def test_fp8_accuracy_compare_two_result_directories_seed_by_seed(tmp_path, capsys):
    """benchmarks/fp8_accuracy.py --compare: the seeds both --seeds directories finished, compared
    run by run. The losses are the tiny preset's seeds 49-64 (docs/fp8.md: the norms in BF16 as A,
    the norms in front of the FP8 GEMMs in FP32 as B); the means and 95% intervals are scipy's
    (stats.t), and t975 matches the t table."""
    import json

    acc = _benchmark_module("fp8_accuracy")
    assert [acc.t975(df) for df in (1, 2, 5, 15, 100)] == pytest.approx([12.706, 4.303, 2.571, 2.131, 1.984], abs=1e-3)
    bf16 = [2.5669, 2.5892, 2.5551, 2.5901, 2.6150, 2.5898, 2.5784, 2.5874, 2.5604, 2.5716, 2.5911, 2.5662,
            2.5573, 2.5649, 2.5816, 2.5703]
    fp8_a = [2.5829, 2.6027, 2.5963, 2.5845, 2.6049, 2.5941, 2.5643, 2.5947, 2.5647, 2.5716, 2.6006, 2.5622,
             2.5927, 2.5789, 2.5790, 2.5853]
    fp8_b = [2.5963, 2.6058, 2.5737, 2.5856, 2.5909, 2.5815, 2.5503, 2.5927, 2.5826, 2.5584, 2.6003, 2.5366,
             2.5709, 2.5747, 2.6013, 2.5721]

    def write(root, kind, seed, loss):
        run = root / f"{kind}-seed{seed}"
        run.mkdir(parents=True)
        lines = [{"step": 1, "loss": 9.0}] + ([{"step": 1000, "val_loss": loss}] if loss is not None else [])
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    for i, seed in enumerate(range(49, 65)):
        for root, fp8 in ((tmp_path / "a", fp8_a[i]), (tmp_path / "b", fp8_b[i])):
            write(root, "bf16", seed, bf16[i])
            write(root, "fp8", seed, fp8)
    write(tmp_path / "b", "bf16", 65, 2.6)  # unfinished in B, absent in A: left out
    write(tmp_path / "b", "fp8", 65, None)
    lines, stats = acc.compare(tmp_path / "a", tmp_path / "b")
    assert len(lines) == 2 + 16 + 1 + 5 and lines[2] == "| 49 | 2.5669 | 2.5829 | 2.5669 | 2.5963 | +0.62% | +1.15% |"
    assert stats["FP8's gap to BF16 in A"] == pytest.approx([0.303, 0.586, -0.009, 0.615], abs=1.5e-3)
    assert stats["FP8's gap to BF16 in B"] == pytest.approx([0.095, 0.722, -0.290, 0.479], abs=1.5e-3)
    assert stats["FP8 runs, B against A, per seed"] == pytest.approx([-0.207, 0.558, -0.505, 0.091], abs=1.5e-3)
    assert stats["BF16 runs, B against A, per seed"] == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(SystemExit, match="need 2 or more"):
        acc.compare(tmp_path / "a", tmp_path / "nothing")


def test_profile_kernel_time_leaves_out_cpu_operators_and_user_annotations():
    """The step's kernel time sums the device events only once: a CPU operator that launched kernels
    and the optimizer's annotated region on the GPU's timeline both span kernels counted already
    (the region had added AdamW's 18 ms twice to a 283 ms FP8 bench step)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def ev(device, us, annotation=False):
        return SimpleNamespace(device_type=device, self_device_time_total=us, is_user_annotation=annotation)

    events = [ev(DeviceType.CUDA, 3000.0), ev(DeviceType.CUDA, 500.0), ev(DeviceType.CPU, 3500.0),
              ev(DeviceType.CUDA, 500.0, annotation=True)]
    assert _profile_step_module().kernel_time_ms(events) == 3.5


def test_profile_step_by_source_runs_on_cpu():
    """The script end to end on the CPU (tiny model): operator self time by moeforge source line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "profile_step.py"), "--preset", "tiny", "--rows", "3",
                        "--by-source", "5", "--fanout", "3", "train.seq_len=64", "train.batch_size=2",
                        "train.micro_batch_size=2", "model.num_hidden_layers=2"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout.split("CPU operator self time by the moeforge source line")[1]
    lines = [ln.split("ms  ") for ln in text.splitlines() if " ms  moeforge/" in ln]
    assert any("moeforge/model/" in src for _, src in lines) and all(float(ms) >= 0 for ms, _ in lines)
    assert "the 5 largest (source line, operator) pairs" in text
    fan = r.stdout.split("forward outputs whose gradients the autograd engine sums: ")[1].splitlines()
    assert int(fan[0].split(",")[0]) > 0 and len(fan) >= 4 and "[2, 64, 128] float32 <- " in "\n".join(fan[1:4])


def test_profile_step_gradient_fanout():
    """benchmarks/profile_step.py --fanout on a small graph: the outputs whose gradient comes from
    several backward nodes, largest (elements x extra consumers) first, leaves' accumulators left out."""
    fanout = _profile_step_module().gradient_fanout
    x = torch.randn(3, 4, requires_grad=True)
    u = torch.randn(6, 6, requires_grad=True) * 3  # three consumers: two sums of 36
    y = x * 2  # two consumers: one sum of 12
    z = (y.sin() + y.cos()).sum() + x.exp().sum() + (u.sin() + u.cos() + u.tanh()).sum()  # x itself: a leaf
    assert fanout(z.grad_fn) == [
        ("MulBackward0", 0, (6, 6), torch.float32, ["CosBackward0", "SinBackward0", "TanhBackward0"]),
        ("MulBackward0", 0, (3, 4), torch.float32, ["CosBackward0", "SinBackward0"]),
    ]


def test_cuda_graph_refuses_what_a_captured_step_cannot_run(cli, expect_error, tmp_path):
    """train.cuda_graph: without a CUDA device a clear one-line error before anything is written;
    each setting the captured step cannot hold (several processes, pipeline stages, Muon) refused by
    name; the CPU EMA and a batch ramp are captured (tests/test_speed_gpu.py)."""
    from moeforge.config import load_config
    from moeforge.errors import MoeforgeError
    from moeforge.train.graph import check_graph_step

    out = tmp_path / "run"
    r = cli("train", "--preset", "tiny", "--steps", 1, "--out", out, "train.cuda_graph=true", "train.device=cpu",
            "--no-progress")
    expect_error(r, "train", "train.cuda_graph", "CUDA device")
    assert not out.exists()
    r = cli("bench", "--preset", "tiny", "train.cuda_graph=true", "train.device=cpu")
    expect_error(r, "bench", "train.cuda_graph", "CUDA device")
    assert r.out == ""  # refused before the header is printed or a model built
    cuda = torch.device("cuda")  # (a device object: nothing runs on it)
    ok = load_config("tiny", None, ["train.optimizer=adamw"])
    check_graph_step(ok, cuda)
    check_graph_step(load_config("tiny", None, ["train.optimizer=adamw", "train.ema_decay=0.9", "train.micro_batch_size=2",
                                                "train.batch_size_start=2", "train.batch_ramp_steps=10"]), cuda)
    for extra, fragment in ((["train.optimizer=muon"], "adamw only"), (["parallel.pp=2"], "pipeline")):
        cfg = load_config("tiny", None, ["train.optimizer=adamw", *extra])
        with pytest.raises(MoeforgeError, match=fragment):
            check_graph_step(cfg, cuda)
    with pytest.raises(MoeforgeError, match="one process"):
        check_graph_step(ok, cuda, pctx=object())
    from moeforge.bench import check_graph_bench

    check_graph_bench(ok, cuda, None, 3)
    with pytest.raises(MoeforgeError, match="--warmup must be at least 3"):  # the capture would be timed
        check_graph_bench(ok, cuda, None, 2)


def test_auto_speed_switches(cli, expect_error, tmp_path, monkeypatch):
    """train.compile and train.cuda_graph "auto": parsed from TOML and overrides, written back as
    "auto"; on a CUDA device they resolve to on where the switch applies and to off (not refused)
    where it does not; on a CPU to off, and a run trains eagerly with them."""
    import dataclasses

    from moeforge import triton_launch
    from moeforge.config import config_from_dict, load_config
    from moeforge.errors import MoeforgeError
    from moeforge.train.speed import AUTO_MAX_MICRO_BATCHES, compile_on, graph_on

    cfg = load_config("tiny", None, ["train.compile=auto", "train.cuda_graph=AUTO", "train.optimizer=adamw"])
    assert cfg.train.compile == "auto" and cfg.train.cuda_graph == "auto"
    assert 'compile = "auto"' in cfg.to_toml() and config_from_dict(cfg.to_dict()).train.cuda_graph == "auto"
    assert load_config("tiny", None, ["train.compile=on"]).train.compile is True
    with pytest.raises(MoeforgeError, match="train.compile: cannot parse 'maybe' as true, false or auto"):
        load_config("tiny", None, ["train.compile=maybe"])
    bad = cfg.to_dict()
    bad["train"]["cuda_graph"] = "yes"
    with pytest.raises(MoeforgeError, match='train.cuda_graph: expected true, false or "auto"'):
        config_from_dict(bad)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # (device objects: nothing runs on them)
    monkeypatch.setattr(triton_launch, "AVAILABLE", True)
    assert not compile_on(cfg, cpu) and not graph_on(cfg, cpu)
    assert compile_on(cfg, cuda) and graph_on(cfg, cuda)

    def with_(*overrides):
        return load_config("tiny", None, ["train.compile=auto", "train.cuda_graph=auto", "train.optimizer=adamw",
                                          *overrides])

    # compile: not with selective recomputation (allowed with "auto", refused with true) or ep > 1
    assert not compile_on(with_("train.recompute=norm"), cuda) and compile_on(with_("train.recompute=full"), cuda)
    assert not compile_on(with_("parallel.ep=2"), cuda) and not compile_on(cfg, cuda, pctx=object())
    with pytest.raises(MoeforgeError, match="train.compile"):
        load_config("tiny", None, ["train.compile=true", "train.recompute=norm"])
    monkeypatch.setattr(triton_launch, "AVAILABLE", False)
    assert not compile_on(cfg, cuda)
    # the captured step: off where train.cuda_graph=true is refused, with document masks, many micro-batches
    for extra in (["train.optimizer=muon"], ["parallel.pp=2"], ["train.document_mask=true"],
                  ["train.micro_batch_size=1", f"train.batch_size={AUTO_MAX_MICRO_BATCHES + 1}"]):
        assert not graph_on(with_(*extra), cuda), extra
    assert not graph_on(cfg, cuda, pctx=object())
    assert graph_on(with_("train.ema_decay=0.9", "train.micro_batch_size=2", "train.batch_size_start=2"), cuda)
    from moeforge.fp8 import gpu as fp8_gpu

    fp8, real = with_("train.precision=fp8"), fp8_gpu.kernels_on
    monkeypatch.setattr(fp8_gpu, "kernels_on", lambda device: False)  # another GPU: the FP8 emulation, not captured
    assert not graph_on(fp8, cuda) and graph_on(with_(), cuda)
    monkeypatch.setattr(fp8_gpu, "kernels_on", lambda device: True)
    assert graph_on(fp8, cuda)
    monkeypatch.setattr(fp8_gpu, "kernels_on", real)
    assert graph_on(with_("train.micro_batch_size=1", f"train.batch_size={AUTO_MAX_MICRO_BATCHES}"), cuda)
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False, cuda_graph=False))
    assert not compile_on(off, cuda) and not graph_on(off, cuda)

    out = tmp_path / "run"
    r = cli("train", "--preset", "tiny", "--steps", 2, "--out", out, "train.compile=auto", "train.cuda_graph=auto",
            "train.device=cpu", "train.eval_every=0", "train.sample_tokens=0", "--no-progress", "--precision", "fp8")
    assert r.rc == 0, r.err
    start = r.out.splitlines()[0]  # the start line says what the run decided
    assert "| precision fp8 | FP8 GEMMs emulated exactly | data:" in start, start
    saved = (out / "config.toml").read_text()
    assert 'compile = "auto"' in saved and 'cuda_graph = "auto"' in saved


def test_checkpointed_optimizer_state_does_not_depend_on_cuda_graph():
    """The lr of a captured step is a device scalar and torch's AdamW runs `capturable` there; the
    state a checkpoint stores holds the number and an eager AdamW's flags, and loads into one."""
    from moeforge.train.graph import portable_optimizer_state

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    p.grad = torch.randn(4, 3)
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(5e-4)
    opt.param_groups[0]["capturable"] = True
    state = portable_optimizer_state(opt.state_dict())
    assert state["param_groups"][0]["lr"] == pytest.approx(5e-4) and not state["param_groups"][0]["capturable"]
    assert opt.param_groups[0]["capturable"]  # (the live optimizer is left as it is)
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-3, fused=True)
    fresh.load_state_dict(state)
    assert isinstance(fresh.param_groups[0]["lr"], float)


class _GraphRecorder:
    """Stands in for CUDA's graph capture in GraphedStep's bookkeeping tests (the real capture is
    tested on the GPU): a "graph" keeps the work its stages handed it while capturing, and replay
    runs that work again."""

    def __init__(self, monkeypatch):
        import contextlib

        self.capturing, self.graph, self.pools = False, None, []
        recorder = self

        class Graph:  # torch.cuda.CUDAGraph
            def __init__(self):
                self.works = []

            def replay(self):
                for work in self.works:
                    work()

            def pool(self):
                return id(self)

        @contextlib.contextmanager
        def capture(g, pool=None, capture_error_mode=None):
            recorder.capturing, recorder.graph = True, g
            recorder.pools.append(pool)
            yield
            recorder.capturing = False

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", capture)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def stages(self, calls: list):
        """(grads, update) as one_process_step's: grads records the step's first token, update returns
        (that token, the lr). A captured stage's outputs are its graph's own buffers."""
        summed, out = torch.zeros(()), torch.zeros(2)

        def grads(windows, lam, gamma, lr):
            def work():
                calls.append(("run", lam, float(lr), [int(w[0, 0]) for w in windows]))
                summed.copy_(windows[0][0, 0].float())
            return self._stage(calls, ("capture grads", lam), work, summed)

        def update(sums, lam, gamma, lr):
            def work():
                calls.append(("update",))
                out.copy_(torch.stack([sums, lr]))
            return (self._stage(calls, ("capture update", lam), work, out),)

        return grads, update, out

    def _stage(self, calls, event, work, buf):
        if self.capturing:
            calls.append(event)
            self.graph.works.append(work)
            return buf
        work()
        return buf.clone()  # an eager stage's outputs are new tensors


def test_graphed_step_captures_once_and_again_when_a_frozen_number_changes(monkeypatch):
    """GraphedStep's bookkeeping: two eager calls, a capture on the third (both stages in one graph),
    then replays that see each step's tokens through the input buffers and the lr through the device
    scalar; a new capture when the MTP weight's schedule switches; the caller gets copies of the
    graph's outputs."""
    from moeforge.config import load_config
    from moeforge.train import graph as graph_mod

    rec = _GraphRecorder(monkeypatch)
    calls = []
    grads, update, out = rec.stages(calls)
    cfg = load_config("tiny", None, ["train.optimizer=adamw", "train.steps=10", "train.mtp_lambda_switch=0.5"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    step = graph_mod.GraphedStep((grads, update), opt, cfg, torch.device("cpu"))
    results = []
    for i in range(8):
        windows = [torch.full((1, 3), 10 * i + j) for j in range(2)]
        results.append(step(windows, i, 0.1 * (i + 1))[0])
    lam0, lam1 = cfg.train.mtp_lambda, cfg.train.mtp_lambda_late
    kinds = [c[0] for c in calls if c[0] != "update"]
    assert kinds == ["run", "run", "capture grads", "capture update", "run", "run", "run",
                     "capture grads", "capture update", "run", "run", "run"]
    assert [c[1] for c in calls if c[0] == "capture grads"] == [lam0, lam1]  # step 5 switches the weight
    assert rec.pools == [None, None] and len(step.graphs) == 1  # one graph a capture
    runs = [c for c in calls if c[0] == "run"]
    assert [r[3][0] for r in runs] == [10 * i for i in range(8)]  # each step's own tokens
    assert [r[2] for r in runs] == pytest.approx([0.1 * (i + 1) for i in range(8)])
    assert [float(r[0]) for r in results] == [10.0 * i for i in range(8)]  # copies, not the live buffer
    assert all(r is not out for r in results[2:])
    assert all(g["capturable"] for g in opt.param_groups)


def test_graphed_step_with_the_ema_and_a_changing_number_of_micro_batches(monkeypatch):
    """With the CPU EMA the step is two graphs sharing a pool, and the EMA's wait comes between their
    replays, its update after them, with the step number the eager step gives it; a new number of
    micro-batches (a batch ramp) frees the graphs and runs one step eagerly, then captures again."""
    from moeforge.config import load_config
    from moeforge.train import graph as graph_mod

    rec = _GraphRecorder(monkeypatch)
    calls = []
    grads, update, _ = rec.stages(calls)

    class EMA:  # records the hooks as CPUEMA's are called
        def before_optimizer_step(self):
            calls.append(("wait",))

        def update(self, step):
            calls.append(("ema", step))

    cfg = load_config("tiny", None, ["train.optimizer=adamw", "train.steps=10"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    step = graph_mod.GraphedStep((grads, update), opt, cfg, torch.device("cpu"))
    counts, results = [2, 2, 2, 2, 3, 3, 3], []
    ema = EMA()
    for i, n in enumerate(counts):
        del calls[:]
        results.append(step([torch.full((1, 3), 10 * i + j) for j in range(n)], i, 0.1, ema)[0])
        kinds = [c[0] for c in calls]
        step_run = ["run", "wait", "update", "ema"]
        if i in (2, 5):  # captured (grads, then update in the first graph's pool), then replayed
            assert kinds == ["capture grads", "capture update", *step_run], (i, kinds)
            assert rec.pools[-2:] == [None, id(step.graphs[0])] and len(step.graphs) == 2
        else:  # eager (warm-up; the first step of 3 micro-batches) or replayed
            assert kinds == step_run, (i, kinds)
        run = next(c for c in calls if c[0] == "run")
        assert calls[-1] == ("ema", i + 1) and run[3] == [10 * i + j for j in range(n)]
        if i == 4:
            assert step.graphs == [] and step.key is None
    assert [float(r[0]) for r in results] == [10.0 * i for i in range(len(counts))]
