"""The single-GPU fast paths on CUDA (`pytest -m gpu`; skipped without a GPU).

Each test compares a fast path with its reference on the GPU and says why its tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from moeforge.config import ModelConfig, load_config  # noqa: E402
from moeforge.model import build_model  # noqa: E402
from moeforge.model.attention import attention, document_ids, document_mask  # noqa: E402
from moeforge.model.head import chunked_cross_entropy, plain_cross_entropy  # noqa: E402
from moeforge.train.step import (build_optimizer, build_train_model, forward_backward,  # noqa: E402
                                    optimizer_update)


def test_flex_document_attention_matches_dense_mask_with_gradients():
    """FlexAttention (compiled) with the document BlockMask against SDPA with the dense boolean mask,
    forward and backward, BF16 inputs: within BF16 rounding of the outputs (2e-2)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, S = 2, 4, 512
    q, k = (torch.randn(B, H, S, 192, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    v = torch.randn(B, H, S, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    tokens = torch.randint(1, 50, (B, S), device="cuda", generator=g)
    tokens[0, [100, 300]] = 0
    tokens[1, [7]] = 0
    doc = document_ids(tokens, 0)
    outs, grads = [], []
    for mask in (document_mask(doc), document_mask(doc, flex=False)):
        o = attention(q, k, v, 0.1, mask)
        outs.append(o)
        grads.append(torch.autograd.grad(o.float().square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_chunked_cross_entropy_on_cuda_bf16():
    """Chunked loss under BF16 autocast against the plain path (both BF16 head GEMMs): BF16 rounding."""
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(1000, 256, device="cuda", generator=g).requires_grad_()
    w = (0.05 * torch.randn(5000, 256, device="cuda", generator=g)).requires_grad_()
    t = torch.randint(0, 5000, (1000,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = plain_cross_entropy(torch.nn.functional.linear(h, w), t)
        out = chunked_cross_entropy(h, w, t, 300)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    for a, b in zip(torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


@pytest.mark.parametrize("triton, fused", [(False, "inductor"), (True, ""), (True, "inductor")])
def test_fast_chunked_loss_matches_eager_on_cuda(monkeypatch, triton, fused):
    """The chunked loss's softmax gradient by the Triton pass (loss_triton.py, the CUDA default) or
    compiled by Inductor (train.compile, without Triton) against the eager torch version, BF16
    autocast, a ragged last chunk and ignored targets: the same BF16 gradient up to one BF16 rounding
    of a few elements (the FP32 sums run in another order)."""
    from moeforge.model import head
    from moeforge.model.mtp import IGNORE_INDEX

    g = torch.Generator(device="cuda").manual_seed(2)
    h = torch.randn(1000, 256, device="cuda", generator=g).requires_grad_()
    w = (0.05 * torch.randn(5000, 256, device="cuda", generator=g)).requires_grad_()
    t = torch.randint(0, 5000, (1000,), device="cuda", generator=g)
    t[::7] = IGNORE_INDEX
    res = []
    for on, backend in ((False, ""), (triton, fused)):
        monkeypatch.setattr(head, "TRITON", on)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = chunked_cross_entropy(h, w, t, 300, fused=backend)
        res.append((out, *torch.autograd.grad(out, (h, w))))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(res[1][1:], res[0][1:]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_softmax_grad_against_fp32_reference(dtype):
    """loss_triton.softmax_grad_ against FP32 torch arithmetic on the same logits: a vocabulary that is
    no multiple of the kernel's block, more rows than programs, ignored rows. Losses within FP32
    summation order (1e-5); the gradient written over the logits equals the FP32 one rounded to the
    logits' dtype except for a few elements one rounding away (exp2 against torch's exp), and ignored
    rows are exactly zero."""
    from moeforge.model.loss_triton import softmax_grad_

    g = torch.Generator(device="cuda").manual_seed(3)
    C, V = 1500, 5003
    x = (3 * torch.randn(C, V, device="cuda", generator=g)).to(dtype)
    t = torch.randint(0, V, (C,), device="cuda", generator=g)
    valid = (torch.rand(C, device="cuda", generator=g) > 0.1).float()
    xf = x.float()
    lse = torch.logsumexp(xf, 1)
    loss_ref = (lse - xf.gather(1, t[:, None]).squeeze(1)) * valid
    g_ref = torch.exp(xf - lse[:, None])
    g_ref[torch.arange(C, device="cuda"), t] -= 1
    g_ref *= valid[:, None]
    out = x.clone()
    losses = softmax_grad_(out, t, valid, block=1024)
    torch.testing.assert_close(losses, loss_ref, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(out, g_ref, rtol=1e-5, atol=1e-7)
    else:
        assert float((out.float() == g_ref.to(dtype).float()).float().mean()) > 0.99
        torch.testing.assert_close(out.float(), g_ref, rtol=2 ** -7, atol=1e-30)
    assert not out[valid == 0].any()
    with pytest.raises(ValueError, match="one entry per row"):
        softmax_grad_(out, t[:-1], valid)


@pytest.mark.parametrize("extra", [[], ["train.compile=true"], ["train.optimizer=adamw"],
                                   ["train.optimizer=adamw", "train.adam_moments=bf16"]])
def test_training_step_has_no_host_sync(extra):
    """A whole optimizer step (two micro-batches, BF16, routing, grouped GEMM, chunked loss, clipping,
    the preset's Muon or AdamW, bias update) runs under set_sync_debug_mode('error') after a warm-up
    step: no host sync."""
    cfg = load_config("tiny", None, ["train.batch_size=4", "train.micro_batch_size=2", "train.seq_len=128",
                                     "train.loss_chunk=100", *extra])
    device = torch.device("cuda")
    model = build_train_model(cfg, device, "bf16", None)
    optimizer = build_optimizer(model, cfg)
    windows = [torch.randint(0, cfg.model.vocab_size, (2, 129), device=device) for _ in range(2)]

    def step(i):
        return forward_backward(model, iter(windows), 2, 0.3, cfg, device, "bf16")

    step(0)
    optimizer_update(model, optimizer, model.moe_layers(), cfg, 0, None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums = step(1)
        optimizer_update(model, optimizer, model.moe_layers(), cfg, 1, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(sums).all()


def test_model_with_compiled_blocks_matches_eager_on_cuda():
    """Regional torch.compile (inductor) against eager under BF16 autocast: the losses agree to BF16
    rounding (1e-2; inductor fuses elementwise ops and keeps some intermediates in FP32)."""
    from moeforge.train.speed import apply_compile

    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
                      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                      max_position_embeddings=256, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    eager = build_model(cfg, "cuda")
    compiled = build_model(cfg, "cuda", init=False)
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled)
    tokens = torch.randint(0, 512, (2, 129), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = eager.losses(tokens[:, :-1], tokens[:, 1:])
        b = compiled.losses(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(b["main"], a["main"], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(b["mtp"], a["mtp"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("clip, lr_tensor", [(False, False), (True, False), (True, True)])
def test_bf16_moment_adamw_kernel_matches_reference(clip, lr_tensor):
    """The Triton AdamW with BF16 moments against the _foreach reference: five steps on parameters of
    ragged sizes (one element, a block and a bit, several blocks) with weight decay and, with clip,
    gradient scaling; at each step both start from the reference's state. Same FP32 arithmetic in
    the same order with IEEE divisions and square roots, but the compilers may contract a multiply
    and an add into an FMA differently: the weights agree to 1e-6 relative, and the BF16 moments to
    one BF16 ulp, with at most 0.1% of them rounded the other way (an FP32 ulp apart near a tie)."""
    from moeforge.train import adamw, adamw_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = [(1,), (2049,), (64, 300), (7, 1024)]
    params = [torch.randn(s, device="cuda", generator=gen) for s in sizes]
    states = [{"step": torch.zeros((), device="cuda"), "exp_avg": torch.zeros_like(p, dtype=torch.bfloat16),
               "exp_avg_sq": torch.zeros_like(p, dtype=torch.bfloat16)} for p in params]
    for step in range(5):
        grads = [torch.randn(s, device="cuda", generator=gen) * (step + 1) for s in sizes]
        scale = torch.tensor(1.7 + step, device="cuda") if clip else None
        torch._foreach_add_([st["step"] for st in states], 1)
        runs = []
        for fn in (adamw_triton.update, adamw.reference_update):
            ps = [p.clone() for p in params]
            sts = [{k: t.clone() for k, t in st.items()} for st in states]
            for p, g in zip(ps, grads):
                p.grad = g
            assert all(adamw_triton.supported(p, st) for p, st in zip(ps, sts))
            lr = 1e-3 * (step + 1)  # with lr_tensor: a device scalar, as a captured step (train/graph.py) passes it
            fn(ps, sts, torch.tensor(lr, device="cuda") if lr_tensor else lr, 0.9, 0.95, 1e-8, 0.1, scale)
            runs.append((ps, sts))
        (pk, sk), (params, states) = runs
        for a, b in zip(pk, params):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        flips = total = 0
        for a, b in zip(sk, states):
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(a[k].float(), b[k].float(), rtol=2 ** -7, atol=1e-30)
                flips += int((a[k] != b[k]).sum())
                total += a[k].numel()
        assert flips <= 1e-3 * total, f"step {step}: {flips} of {total} BF16 moments differ"
    assert adamw._kernel(pk, sk) is adamw_triton  # and the optimizer takes the kernel for such parameters


def test_chunked_loss_weight_gradient_accumulates_in_fp32():
    """On CUDA the head's weight gradient is summed over the chunks in the GEMM's FP32 accumulator
    (addmm into the FP32 buffer): it equals the FP32 sum of the chunks' products far closer than
    rounding each chunk's product to BF16 would (about 1e-3 relative)."""
    from moeforge.model.head import _chunked_loss_and_grads, _softmax_grad

    g = torch.Generator(device="cuda").manual_seed(3)
    h = torch.randn(1000, 256, device="cuda", generator=g).bfloat16()
    w = 0.05 * torch.randn(5000, 256, device="cuda", generator=g)
    t = torch.randint(0, 5000, (1000,), device="cuda", generator=g)
    _, grad_w, _, _ = _chunked_loss_and_grads(h, w, t, 300, torch.bfloat16)
    ref = torch.zeros_like(grad_w, dtype=torch.float64)
    for s in range(0, 1000, 300):
        hc = h[s:s + 300]
        gc, _ = _softmax_grad(hc @ w.bfloat16().T, t[s:s + 300], torch.ones(hc.shape[0], device="cuda"), torch.bfloat16)
        ref += gc.double().T @ hc.double()
    assert (grad_w.double() - ref).norm() <= 1e-4 * ref.norm()


def _random_micro_batches(cfg, counts: list[int], device: str = "cuda") -> list[list[torch.Tensor]]:
    """For each step, counts[i] micro-batches of 2 random windows of 128 tokens (+1 target)."""
    gen = torch.Generator(device=device).manual_seed(0)
    return [[torch.randint(0, cfg.model.vocab_size, (2, 129), device=device, generator=gen) for _ in range(n)]
            for n in counts]


def _training_start(cfg, device, precision: str, init: dict | None):
    """(model, optimizer, MoE layers, init): a training model loaded with the state dict `init` (None:
    its own initialisation, returned as init for the next run to start from)."""
    model = build_train_model(cfg, device, precision, None)
    if init is None:
        init = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(init)
    return model, build_optimizer(model, cfg), model.moe_layers(), init


@pytest.mark.parametrize("extra", [["train.precision=bf16"],
                                   ["train.precision=bf16", "train.adam_moments=bf16", "train.compile=true"],
                                   ["train.precision=fp8"]])
def test_cuda_graph_step_matches_the_eager_step(extra):
    """train.cuda_graph: two eager warm-up steps, then the captured step replayed, against eager steps
    from the same weights on the same data for 6 steps with a changing lr. Each step's losses (new
    data every step, so a stale replay would show) and the final weights agree to FP32 rounding of
    the lr arithmetic (the captured optimizer reads the lr from a device scalar): 1e-4 relative."""
    from moeforge.train.graph import GraphedStep, one_process_step
    from moeforge.train.schedule import lr_at

    cfg = load_config("tiny", None, ["train.optimizer=adamw", "train.batch_size=4", "train.micro_batch_size=2",
                                     "train.seq_len=128", "train.loss_chunk=100", "train.warmup_steps=3",
                                     "train.cuda_graph=true", *extra])
    device, precision = torch.device("cuda"), cfg.train.precision
    data = _random_micro_batches(cfg, [2] * 6)
    init, runs = None, []
    for graphed in (False, True):
        model, optimizer, moe, init = _training_start(cfg, device, precision, init)
        losses = []
        if graphed:
            step = GraphedStep(one_process_step(model, optimizer, moe, cfg, device, precision), optimizer, cfg, device)
            losses = [step(data[i], i, lr_at(i, cfg.train))[0] for i in range(6)]
            assert step.graph is not None and len(step.graphs) == 1 and step.calls == 6
        else:
            for i in range(6):
                losses.append(forward_backward(model, iter(data[i]), 2, cfg.train.mtp_lambda, cfg, device, precision))
                optimizer_update(model, optimizer, moe, cfg, i, None)
        runs.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    (loss_e, w_e), (loss_g, w_g) = runs
    assert len(set(loss_g[:, 0].tolist())) == 6  # every replay computed its own step
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-4, atol=1e-6)
    for a, b in zip(w_g, w_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-7)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_cuda_graph_step_with_the_cpu_ema_and_a_changing_number_of_micro_batches(precision):
    """The captured step with the CPU parameter EMA (two graphs sharing a pool, the optimizer's wait
    for the EMA's copy between them) while the number of micro-batches changes (1, 2, then 3, as a
    batch ramp does: one eager step for each new number, then a capture): 9 steps against eager ones
    on the same data; the losses, the weights and the EMA agree to the captured lr's FP32 rounding
    (1e-4 relative), and every replay computed its own step."""
    from moeforge.train.ema import CPUEMA
    from moeforge.train.graph import GraphedStep, one_process_step
    from moeforge.train.schedule import lr_at

    cfg = load_config("tiny", None, ["train.optimizer=adamw", "train.micro_batch_size=2", "train.seq_len=128",
                                     "train.loss_chunk=100", "train.warmup_steps=3", "train.cuda_graph=true",
                                     f"train.precision={precision}"])
    device = torch.device("cuda")
    counts = [1, 1, 1, 1, 2, 2, 2, 3, 3]
    data = _random_micro_batches(cfg, counts)
    init, runs = None, []
    for graphed in (False, True):
        model, optimizer, moe, init = _training_start(cfg, device, precision, init)
        ema = CPUEMA(model, 0.8)
        losses = []
        if graphed:
            step = GraphedStep(one_process_step(model, optimizer, moe, cfg, device, precision), optimizer, cfg, device)
            for i, ws in enumerate(data):
                losses.append(step(ws, i, lr_at(i, cfg.train), ema)[0])
                if i in (3, 6, 8):  # replayed (captured at steps 2, 5 and 8)
                    assert len(step.graphs) == 2 and step.key[2] == tuple(tuple(w.shape) for w in ws)
                if i in (4, 7):  # the first step of a new number ran eagerly, the old graphs freed
                    assert step.graphs == []
        else:
            for i, ws in enumerate(data):
                losses.append(forward_backward(model, iter(ws), len(ws), cfg.train.mtp_lambda, cfg, device, precision))
                optimizer_update(model, optimizer, moe, cfg, i, None, ema)
        runs.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()], ema.state_dict()))
        ema.close()
    (loss_e, w_e, ema_e), (loss_g, w_g, ema_g) = runs
    assert len(set(loss_g[:, 0].tolist())) == len(counts)
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-4, atol=1e-6)
    for a, b in zip(w_g, w_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-7)
    assert ema_g.keys() == ema_e.keys()
    for name in ema_e:
        a, b = ema_g[name], ema_e[name]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-7)
    moved = sum(float((ema_e[n] - init[n].float().cpu()).abs().sum()) for n in ema_e if n in init)
    assert moved > 0  # the average followed the weights


@pytest.mark.parametrize("extra", [[], ["train.ema_decay=0.9", "train.micro_batch_size=2", "train.batch_size_start=2",
                                        "train.batch_ramp_steps=8"]])
def test_training_with_cuda_graph(tmp_path, extra):
    """`moeforge train` with train.cuda_graph on the tiny preset: the logged losses of the steps (2
    eager, then replayed; with the batch ramp from 1 to 3 micro-batches one eager step for each new
    number) follow the eager run's (1e-4 relative), the checkpoint's optimizer state holds the lr as a
    number, and the checkpointed CPU EMA is the eager run's."""
    import json

    from moeforge.train import checkpoint as ckpt
    from moeforge.train.trainer import Trainer

    steps = 8 if extra else 5
    losses, emas = [], []
    for graph in (False, True):
        out = tmp_path / f"graph_{graph}"
        cfg = load_config("tiny", None, ["train.optimizer=adamw", f"train.steps={steps}", "train.log_every=1",
                                         f"train.checkpoint_every={steps}", "train.eval_every=0", f"train.out={out}",
                                         f"train.cuda_graph={str(graph).lower()}", *extra])
        trainer = Trainer(cfg, progress=False)
        assert (trainer.graphed is not None) == graph
        trainer.train()
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses.append([r["loss"] for r in recs if "loss" in r and "step" in r])
        parts = ckpt.load_checkpoint(ckpt.resolve_checkpoint(out), ("optimizer.pt", "state.pt"))
        assert all(isinstance(g["lr"], float) for g in parts["optimizer.pt"]["param_groups"])
        emas.append(parts["state.pt"].get("ema"))
    assert len(losses[1]) == steps
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-6)
    if extra:
        assert [r["batch_size"] for r in recs if "batch_size" in r] == [2, 2, 2, 4, 4, 4, 6, 6]
        for name, b in emas[0].items():
            torch.testing.assert_close(emas[1][name], b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-7)


def test_auto_switches_compile_and_capture_on_a_gpu(tmp_path, capsys):
    """train.compile and train.cuda_graph "auto" (the `small` preset's): on a GPU the blocks are
    compiled and the step captured; a run trains, evaluates and samples (decoding with the blocks'
    own forward)."""
    from moeforge.train.trainer import Trainer

    cfg = load_config("tiny", None, ["train.optimizer=adamw", "train.steps=4", "train.eval_every=4",
                                     "train.eval_batches=2", "train.sample_tokens=8", f"train.out={tmp_path}",
                                     "train.compile=auto", "train.cuda_graph=auto"])
    trainer = Trainer(cfg, progress=False)
    assert trainer.graphed is not None
    assert all(hasattr(b.forward, "__wrapped__") for b in trainer.model.layers)  # apply_compile's wrapper
    result = trainer.train()
    assert math.isfinite(result.val_loss) and result.sample.startswith("def ")
    assert "| compiled blocks | each step replayed as one CUDA graph |" in capsys.readouterr().out


def test_fp8_weight_prefetch_moves_the_weight_quantisation_out_of_the_forward(monkeypatch):
    """train.fp8_weight_prefetch: after the first step the forward quantises no weight (the optimizer
    step did, for it), and 3 FP8 steps give the losses and weights of the same steps without it
    (1e-4 relative, as eager against captured steps: the GPU's FP8 step is not bitwise reproducible
    run to run)."""
    from moeforge.fp8 import cache, kernels

    real = kernels.quant_block_operand
    counting = {"on": False, "n": 0}

    def counted(*args, **kwargs):
        counting["n"] += counting["on"]
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "quant_block_operand", counted)
    device = torch.device("cuda")
    runs = {}
    for prefetch in (False, True):
        cfg = load_config("tiny", None, ["train.optimizer=adamw", "train.batch_size=2", "train.micro_batch_size=2",
                                         "train.seq_len=128", f"train.fp8_weight_prefetch={str(prefetch).lower()}"])
        torch.manual_seed(0)
        model = build_train_model(cfg, device, "fp8", None)
        optimizer = build_optimizer(model, cfg)
        g = torch.Generator().manual_seed(1)
        windows = [torch.randint(0, cfg.model.vocab_size, (2, 129), generator=g) for _ in range(3)]
        losses, in_forward = [], []
        for step, window in enumerate(windows):
            counting.update(on=True, n=0)
            losses.append(forward_backward(model, iter([window]), 1, 0.3, cfg, device, "fp8")[0].item())
            counting["on"] = False
            in_forward.append(counting["n"])
            optimizer_update(model, optimizer, model.moe_layers(), cfg, step, None)
        runs[prefetch] = (losses, in_forward, [p.detach().clone() for p in model.parameters()])
        cache.drop_prefetched()
    (l_off, f_off, w_off), (l_on, f_on, w_on) = runs[False], runs[True]
    assert f_off[0] > 0 and f_off == [f_off[0]] * 3 and f_on == [f_off[0], 0, 0]
    torch.testing.assert_close(torch.tensor(l_on), torch.tensor(l_off), rtol=1e-4, atol=1e-6)
    for a, b in zip(w_on, w_off):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("graph", [False, True])
def test_trainer_queues_a_step_without_a_host_sync(tmp_path, graph):
    """The training loop queues step n + 1 before it reads step n's record: the queuing (data, forward,
    backward, optimizer, the copy of the step's numbers to the host) runs under
    set_sync_debug_mode('error'), eager and as a captured step; the record read afterwards holds
    the step's numbers and its time from the markers on the device's timeline."""
    import math

    from moeforge.train.trainer import Trainer

    cfg = load_config("tiny", None, ["train.optimizer=adamw", f"train.out={tmp_path}", "train.eval_every=0",
                                     "train.checkpoint_every=0", f"train.cuda_graph={str(graph).lower()}"])
    trainer = Trainer(cfg, progress=False)
    for _ in range(3):  # warm-up (and the capture)
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = trainer._launch_step()
        second = trainer._launch_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    records = [trainer._finish_step(first), trainer._finish_step(second)]
    assert [r["step"] for r in records] == [4, 5]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0
    trainer.close()


@pytest.mark.parametrize("k", [1, 6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_permutation_kernels_match_torch(k, dtype):
    """moe_triton's kernels against the torch ops they replace: spread_sum is the FP32 sum of each
    row's copies in copy order rounded once (to the bit; weighted, within the rounding of fused
    multiply-adds), and within rounding of torch's sum;
    gather_scaled is PyTorch's product (to the bit); row_dots within FP32 summation order."""
    from moeforge.model.moe_triton import gather_scaled, row_dots, spread_sum

    torch.manual_seed(0)
    M, D = 1000, 2048 + 72
    g = torch.randn(M * k, D, device="cuda").to(dtype)
    inverse = torch.randperm(M * k, device="cuda")
    w = torch.rand(M * k, device="cuda").to(dtype)
    copies = g.index_select(0, inverse).view(M, k, D)
    tol = dict(rtol=2 ** -7, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    for weights in (None, w):
        out = spread_sum(g, inverse, k, weights)
        acc = torch.zeros(M, D, device="cuda")
        for c in range(k):
            v = copies[:, c].float()
            acc = acc + (v if weights is None else v * weights.view(M, k)[:, c:c + 1].float())
        assert out.dtype == dtype
        if weights is None:
            assert torch.equal(out, acc.to(dtype))
        else:  # the kernel's multiply-adds may be fused (one rounding instead of two)
            torch.testing.assert_close(out, acc.to(dtype), **tol)
    torch.testing.assert_close(spread_sum(g, inverse, k), copies.sum(1), **tol)
    src = torch.randn(M, D, device="cuda").to(dtype)
    index = torch.randint(0, M, (M * k,), device="cuda")
    assert torch.equal(gather_scaled(src, index, w), src.index_select(0, index) * w[:, None])
    dots = row_dots(src, g, inverse, k)
    ref = (src.double().unsqueeze(1) * copies.double()).sum(-1)
    torch.testing.assert_close(dots.double(), ref, rtol=1e-5, atol=1e-4)


def test_cuda_combine_matches_the_torch_ops():
    """LocalDispatcher.combine on CUDA (_CombineRows, Triton) against the torch ops it runs when traced
    (BF16 expert outputs, FP32 gate weights): the experts' output gradient to the bit; the output and
    the gate weights' gradient are the exact sums rounded once to BF16 (the torch ops round each
    product first)."""
    from moeforge.model.moe import LocalDispatcher, permute_rows

    torch.manual_seed(0)
    T, K, D, E = 500, 6, 512, 16
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).cuda()
    disp = LocalDispatcher()
    _, _, ctx = disp.start(torch.zeros(T, D, device="cuda"), indices, E).finish()
    order, inverse = ctx
    y = torch.randn(T * K, D, device="cuda").to(torch.bfloat16)
    w = torch.rand(T, K, device="cuda")
    g = torch.randn(T, D, device="cuda").to(torch.bfloat16)
    outs = []
    for fast in (True, False):
        yi, wi = y.clone().requires_grad_(), w.clone().requires_grad_()
        if fast:
            out = disp.combine(yi, wi, ctx, T)
        else:
            y_tok = permute_rows(yi, inverse, order).view(T, K, D)
            out = (y_tok * wi.unsqueeze(-1).to(yi.dtype)).sum(1)
        out.backward(g)
        outs.append((out, yi.grad, wi.grad))
    (o, dy, dw), (o_r, dy_r, dw_r) = outs
    assert torch.equal(dy, dy_r)
    # exact sums (FP64) of the same terms: the kernels sum in FP32 and round once to BF16
    y_tok = y.double().index_select(0, inverse).view(T, K, D)
    wb = w.to(torch.bfloat16).double()
    o_exact = (y_tok * wb.unsqueeze(-1)).sum(1)
    dw_exact = (g.double().unsqueeze(1) * y_tok).sum(-1)
    torch.testing.assert_close(o.double(), o_exact, rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(dw.double(), dw_exact, rtol=2 ** -8, atol=1e-4)
    # and the torch ops, which round each product to BF16 first, are farther from them
    for a, b in ((o, o_r), (dw, dw_r)):
        assert (a.float() - b.float()).norm() <= 2 ** -7 * b.float().norm()


@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_dispatch_gather_backward(compiled):
    """The dispatched rows' gather (SpreadRows.gather): its backward on eager CUDA is spread_sum (each
    token's K copy gradients summed in FP32 in copy order, rounded once: to the bit), and traced it is
    the gather and sum over K; the two within BF16 rounding of each other."""
    from moeforge.model.moe import LocalDispatcher

    torch.manual_seed(0)
    T, K, D, E = 700, 6, 2048 + 64, 16
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).cuda()
    x = torch.randn(T, D, device="cuda").to(torch.bfloat16).requires_grad_()
    rows, _, ctx = LocalDispatcher().start(x, indices, E).finish()
    g = torch.randn(T * K, D, device="cuda").to(torch.bfloat16)

    def run(r):
        return r.gather()

    (torch.compile(run, fullgraph=True) if compiled else run)(rows).backward(g)
    order, inverse = ctx
    copies = g.float().index_select(0, inverse).view(T, K, D)
    acc = copies[:, 0]
    for c in range(1, K):
        acc = acc + copies[:, c]
    if not compiled:
        assert torch.equal(x.grad, acc.to(torch.bfloat16))
    torch.testing.assert_close(x.grad.float(), copies.double().sum(1).float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("experts,groups,kept_groups,k", [(16, 4, 2, 4), (64, 1, 1, 6), (256, 8, 4, 8),
                                                          (160, 1, 1, 6), (64, 8, 3, 5), (12, 1, 1, 12)])
def test_router_selection_kernel_matches_topk(experts, groups, kept_groups, k):
    """route_triton's selection against the reference's three torch.topk calls (Router.select): with
    distinct scores the same experts in the same order; with ties (scores on a grid of 1/8, no
    groups) the same chosen scores, each expert once. Under torch.compile the whole router is one
    graph (fullgraph): its scores within rounding of the eager ones, its selection the reference's
    on those scores, its gates the formula's."""
    from conftest import small_cfg
    from moeforge.model.moe import Router
    from moeforge.model.route_triton import route_topk

    cfg = small_cfg(hidden_size=64, n_routed_experts=experts, n_group=groups, topk_group=kept_groups,
                    num_experts_per_tok=k)
    torch.manual_seed(0)
    router = Router(cfg).cuda()
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.normal_(std=0.1)
    choice = torch.rand(5003, experts, device="cuda") + torch.randn(experts, device="cuda")
    assert torch.equal(route_topk(choice, groups, kept_groups, k), router.select(choice))
    assert route_topk(choice[:0], groups, kept_groups, k).shape == (0, k)
    if groups == 1:
        tied = (torch.rand(4099, experts, device="cuda") * 8).floor() / 8
        got = route_topk(tied, 1, 1, k)
        assert (got.sort(dim=1).values.diff(dim=1) > 0).all()  # no expert twice
        assert torch.equal(tied.gather(1, got), tied.gather(1, router.select(tied)))
    x = torch.randn(3000, 64, device="cuda")
    weights, indices, scores = torch.compile(router, fullgraph=True)(x)
    ref_scores = router(x)[2]
    # Inductor's sigmoid may round differently from ATen's: the selection is checked on its own scores
    torch.testing.assert_close(scores, ref_scores, rtol=1e-6, atol=1e-6)
    assert torch.equal(indices, router.select(scores + router.e_score_correction_bias))
    gates = scores.gather(1, indices)
    if cfg.norm_topk_prob:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    torch.testing.assert_close(weights, gates * cfg.routed_scaling_factor, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_decoding_with_a_cuda_graph_matches_the_static_step(preset):
    """generate.Decoder under BF16 autocast: "auto" captures the one-token step as a CUDA graph and
    replays it. Sampling 24 tokens for 12 rows (two prompts of different lengths, so left-padded,
    temperature 1, the same generator seed) with the graph and with the same step run eagerly
    ("static") gives the same tokens, and the last logits agree bit for bit: a replay runs the
    kernels the eager step runs, on the same inputs. The plain eager step (int positions, only the
    written cache attended) agrees to BF16 rounding."""
    from moeforge.generate import Decoder, sample_rows

    cfg = load_config(preset, None, [])
    torch.manual_seed(0)
    model = build_model(cfg.model, "cuda").eval()
    rows = [[5, 17, 300, 42]] * 6 + [[9, 8]] * 6
    got = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert Decoder(model, 2, 8).mode == "graph"
        for mode in ("static", "auto"):
            gen = torch.Generator(device="cuda").manual_seed(0)
            got[mode] = sample_rows(model, rows, 24, 1.0, 1.0, gen, stop_id=None, mode=mode)
        prompt = torch.tensor([[0] * (4 - len(r)) + r for r in rows], device="cuda")
        start = torch.tensor([4 - len(r) for r in rows], device="cuda")
        logits = {}
        for mode in ("eager", "static", "graph"):
            dec = Decoder(model, len(rows), 16, mode)
            dec.prefill(prompt, start)
            for t in range(10):
                out = dec.step(got["static"][0][:, t]).clone()
            logits[mode] = out
            if mode == "graph":
                assert dec._graph.graph is not None
    assert torch.equal(got["auto"][0], got["static"][0]) and got["auto"][1].all()
    assert got["auto"][0].unique().numel() > 10  # sampled tokens, not one repeated
    assert torch.equal(logits["graph"], logits["static"])
    assert float((logits["eager"] - logits["static"]).abs().max()) <= 0.03 * float(logits["static"].abs().max())


def _perturb_in_place(model) -> None:
    """Change every weight in place (same storage), as an optimizer step does."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5 * p.std().clamp(min=0.02))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_a_reused_decoding_graph_reads_the_weights_of_the_moment(preset):
    """sample_rows keeps its captured decoder for the next call (generate.reused_decoder). Its graph
    casts the weights at every replay (autocast's cache is off during the capture), so after the
    weights change in place the kept graph decodes what a new static decoder decodes with the new
    weights: the same greedy tokens, for other prompts than the first call's."""
    from moeforge import generate as gen
    from moeforge.generate import sample_rows

    cfg = load_config(preset, None, [])
    torch.manual_seed(0)
    model = build_model(cfg.model, "cuda").eval()
    first = [[5, 17, 300, 42]] * 6 + [[9, 8]] * 6
    second = [[7, 7, 1]] * 4 + [[3, 300, 5, 9, 11]] * 8
    gen.release_decoder()

    def decode(rows, mode):
        # (an autocast context per call, as GRPO has per step: autocast's cache of cast weights,
        # which eager forwards use, lives as long as its context and does not see in-place changes)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return sample_rows(model, rows, 24, 0.0, 1.0, None, stop_id=None, mode=mode)[0]

    decode(first, "graph")
    decoder = gen._kept[0][1]
    assert decoder._graph.graph is not None
    before = decode(second, "graph")
    _perturb_in_place(model)
    after = decode(second, "graph")
    assert gen._kept[0][1] is decoder
    gen.release_decoder()
    want = decode(second, "static")
    gen.release_decoder()
    assert torch.equal(after, want) and not torch.equal(after, before)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_compiled_decoding_matches_the_static_step_and_follows_the_weights(preset):
    """Decoder "compiled": the static step through torch.compile (Inductor), captured as a CUDA graph
    under BF16 autocast. Fed the same tokens, its logits agree with the static step's to BF16
    rounding (Inductor fuses and reorders) in at least 6 of 8 rows (in a row whose router scores
    tie within that rounding another expert may be chosen); decoding again after the weights changed
    in place, it agrees with a static decoder of the new weights, and with its own first logits in
    no row."""
    from moeforge.generate import Decoder

    cfg = load_config(preset, None, [])
    torch.manual_seed(0)
    model = build_model(cfg.model, "cuda").eval()
    prompt = torch.tensor([[0, 0, 9, 8], [5, 17, 300, 42]] * 4, device="cuda")
    start = torch.tensor([2, 0] * 4, device="cuda")
    feed = torch.randint(0, cfg.model.vocab_size, (8, 10), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # (captured where the step computes in BF16)
        compiled = Decoder(model, 8, 32, "compiled")

    def last_logits(dec):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # (a context per call: above)
            dec.prefill(prompt, start)
            for t in range(10):
                out = dec.step(feed[:, t])
            return out.clone()

    def close(a, b):  # rows within BF16 rounding of each other (relative RMS error of a row below 10%)
        return ((a - b).float().norm(dim=-1) <= 0.1 * b.float().norm(dim=-1)).sum().item()

    c1, s1 = last_logits(compiled), last_logits(Decoder(model, 8, 32, "static"))
    assert compiled._graph.graph is not None
    _perturb_in_place(model)
    c2, s2 = last_logits(compiled), last_logits(Decoder(model, 8, 32, "static"))
    # (a row may pick other experts where two routing scores are within rounding of each other)
    assert close(c1, s1) >= 6 and close(c2, s2) >= 6 and close(c2, c1) == 0, (close(c1, s1), close(c2, s2))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_speculative_decoding_with_a_cuda_graph_matches_the_static_step(monkeypatch, preset):
    """generate_speculative under BF16 autocast: "auto" captures the device-side step (the main
    model on the newest token and the draft, the MTP module, the next draft) as a CUDA graph. Its
    tokens and counts equal the same step's run eagerly ("static"), with the random MTP module's
    drafts and with drafts from a table that is right at two slots of three (kept and rejected
    drafts, one after the other), through a stop token too. Sampled (two graphs, the draws between
    them eager), the same seed gives the same tokens and counts as "static". The same for 12 rows of
    four prompt lengths decoded together (sample_rows(speculative=True)), greedy and sampled."""
    from moeforge import generate as gen

    cfg = load_config(preset, None, ["model.num_nextn_predict_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, "cuda").eval()
    prompt = [5, 17, 300, 42, 9, 8]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = {m: gen.generate_speculative(model, prompt, 40, mode=m) for m in ("static", "auto")}
        assert plain["auto"] == plain["static"] and len(plain["auto"][0]) == 40
        sampled = {m: gen.generate_speculative(model, prompt, 40, temperature=1.0, top_p=0.9, seed=3, mode=m)
                   for m in ("static", "auto")}
        assert sampled["auto"] == sampled["static"] and len(sampled["auto"][0]) == 40
        assert 0 < sampled["auto"][1]["accepted"], sampled["auto"][1]
        greedy = gen.generate(model, prompt, 60, temperature=0.0)
        table = torch.tensor([t if slot % 3 else (t + 1) % cfg.model.vocab_size
                              for slot, t in enumerate(prompt + greedy + [0] * 40)], device="cuda")
        monkeypatch.setattr(gen, "_device_draft", lambda model, h1, slot: table.index_select(0, slot.view(1)))
        drafted = {m: gen.generate_speculative(model, prompt, 40, mode=m) for m in ("static", "graph")}
        stop = drafted["static"][0][25]
        stopped = {m: gen.generate_speculative(model, prompt, 40, stop_id=stop, mode=m) for m in ("static", "graph")}
        monkeypatch.undo()
        rows = [prompt, prompt[:2], [7, 7, 7, 300], prompt[3:]] * 3  # left-padded rows, each at its own slot
        batched = {m: gen.sample_rows(model, rows, 30, 0.0, 1.0, None, stop_id=stop, mode=m, speculative=True)
                   for m in ("static", "auto")}
        sampled_rows = {m: gen.sample_rows(model, rows, 30, 1.0, 0.9, torch.Generator(device="cuda").manual_seed(1),
                                           stop_id=None, mode=m, speculative=True) for m in ("static", "auto")}
    for runs in (batched, sampled_rows):
        assert torch.equal(runs["auto"][0], runs["static"][0]) and torch.equal(runs["auto"][1], runs["static"][1])
    assert drafted["graph"] == drafted["static"], drafted
    assert 0 < drafted["graph"][1]["accepted"] < drafted["graph"][1]["drafts"]
    assert stopped["graph"] == stopped["static"] and stopped["graph"][0][-1] == stop
