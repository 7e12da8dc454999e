"""Model semantics: routing, balancing, MTP targets, the fast paths against their references."""

import math

import pytest
import torch

from conftest import small_cfg
from moeforge.config import ModelConfig, load_config
from moeforge.model import build_model, count_parameters
from moeforge.model.layers import RMSNorm, rope_frequencies, softmax_scale
from moeforge.model.moe import LocalDispatcher, MoE, Router, grouped_mm, grouped_mm_reference, sequence_balance_loss
from moeforge.model.mtp import IGNORE_INDEX, shift_tokens
from moeforge.train.balance import update_routing_bias


def make_router(cfg: ModelConfig) -> Router:
    torch.manual_seed(0)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.5)
    return r


def test_bias_changes_selection_not_gate_values():
    """The routing bias only re-ranks experts; a selected expert's gate is its unbiased score."""
    cfg = small_cfg(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    r = make_router(cfg)
    x = torch.randn(64, cfg.hidden_size)
    w0, i0, s0 = r(x)
    r.e_score_correction_bias[3] = 10.0  # huge bias: expert 3 always selected
    w1, i1, s1 = r(x)
    assert torch.equal(s0, s1)  # scores untouched
    assert (i1 == 3).any(dim=1).all()
    assert not torch.equal(i0, i1)
    # gates are the unbiased sigmoid scores of the selected experts, exactly
    assert torch.equal(w1, s1.gather(1, i1))


def test_gates_normalised_and_scaled():
    cfg = small_cfg(n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)
    w, _, _ = make_router(cfg)(torch.randn(16, cfg.hidden_size))
    torch.testing.assert_close(w.sum(-1), torch.full((16,), 2.5))


def test_group_limit_holds():
    """Every token's experts come from at most topk_group groups, the ones with the best top-2 sums."""
    cfg = small_cfg(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    r = make_router(cfg)
    r.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(256, cfg.hidden_size)
    _, idx, scores = r(x)
    groups = idx // 4
    assert max(len(set(g.tolist())) for g in groups) <= 2
    biased = (scores + r.e_score_correction_bias).view(256, 4, 4)
    best = biased.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    for t in range(256):
        assert set(groups[t].tolist()) <= set(best[t].tolist())


def test_softmax_scoring():
    cfg = small_cfg(scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    _, _, s = make_router(cfg)(torch.randn(8, cfg.hidden_size))
    torch.testing.assert_close(s.sum(-1), torch.ones(8))


def test_bias_update_drives_skewed_router_to_balance():
    """With a router skewed toward a few experts, repeated gamma updates reduce max/mean load."""
    cfg = small_cfg(n_group=1, topk_group=1, n_routed_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        moe.gate.weight[:2] += 0.2  # experts 0 and 1 attract most tokens (inputs share a mean direction)
    x = torch.randn(4, 64, cfg.hidden_size) + 0.5

    def imbalance():
        moe.train()
        moe(x)
        return update_routing_bias([moe], gamma=0.05).mean().item()

    start = imbalance()
    for _ in range(200):
        last = imbalance()
    assert start > 3.0
    assert last < 1.6
    assert moe.gate.e_score_correction_bias[:2].max() < moe.gate.e_score_correction_bias[2:].min()


def test_balance_loss_matches_formula():
    """Direct loop implementation of eqs. 17-20 (per sequence, then averaged)."""
    torch.manual_seed(0)
    B, S, E, K = 3, 10, 8, 2
    scores = torch.rand(B * S, E)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * S)])
    expect = 0.0
    for b in range(B):
        sc, ix = scores[b * S:(b + 1) * S], idx[b * S:(b + 1) * S]
        total = 0.0
        for i in range(E):
            f = E / (K * S) * sum(int(i in ix[t].tolist()) for t in range(S))
            P = sum(float(sc[t, i] / sc[t].sum()) for t in range(S)) / S
            total += f * P
        expect += total / B
    got = sequence_balance_loss(scores, idx, B, E)
    assert math.isclose(float(got), expect, rel_tol=1e-5)


@pytest.mark.parametrize("d_in, d_out", [(8, 16), (6, 7)])  # torch's kernel (aligned) and the fallback
def test_grouped_mm_matches_per_expert_reference(d_in, d_out):
    """Grouped GEMM equals a loop of per-expert matmuls, including an expert with no tokens (FP32, 1e-5)."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    offsets = counts.cumsum(0).to(torch.int32)
    x, w = torch.randn(10, d_in), torch.randn(4, d_out, d_in).transpose(1, 2)  # weights stored [E, out, in]
    torch.testing.assert_close(grouped_mm(x, w, offsets), grouped_mm_reference(x, w, offsets), rtol=1e-5, atol=1e-5)


def test_moe_dispatch_matches_token_loop():
    """Sorted dispatch + grouped GEMM + combine equals the per-expert reference, values and gradients (FP32, 1e-5)."""
    cfg = small_cfg()
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    y, _ = moe(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    y_ref = moe.forward_reference(x)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_dispatch_and_combine_gather_only_paths_match_indexing():
    """LocalDispatcher's gather-only dispatch and combine (custom backward) against plain indexing and
    index_add_ with autograd: same copies, same combined output, same gradients of the tokens, the
    expert outputs and the gate weights (FP32; the sums run in another order: 1e-6)."""
    torch.manual_seed(0)
    T, K, D, E = 37, 3, 8, 5
    x = torch.randn(T, D, requires_grad=True)
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.rand(T, K, requires_grad=True)
    disp = LocalDispatcher()
    rows, counts, ctx = disp.dispatch(x, indices, E)
    order = indices.flatten().argsort(stable=True)
    assert torch.equal(counts, torch.bincount(indices.flatten(), minlength=E))
    assert torch.equal(indices.flatten()[order], indices.flatten().sort(stable=True).values)
    ref_rows = x[order // K]
    torch.testing.assert_close(rows, ref_rows, rtol=0, atol=0)
    y = torch.randn(T * K, D, requires_grad=True)  # expert outputs in the sorted layout
    out = disp.combine(rows * y, weights, ctx, T)
    ref_out = torch.zeros(T, D).index_add_(0, order // K, ref_rows * y * weights.flatten()[order].unsqueeze(-1))
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    g = torch.randn(T, D)
    grads = torch.autograd.grad(out, (x, y, weights), g)
    ref_grads = torch.autograd.grad(ref_out, (x, y, weights), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_shift_tokens_mtp_targets():
    """Depth k at position i sees token t_{i+k} and predicts t_{i+k+1}; positions past the window are ignored."""
    tokens = torch.arange(10).view(1, 10)  # t_i = i
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    for k in (1, 2):
        ahead = shift_tokens(inputs, k, 0)
        tgt = shift_tokens(targets, k, IGNORE_INDEX)
        S = inputs.shape[1]
        for i in range(S):
            if i + k < S:
                assert ahead[0, i] == i + k and tgt[0, i] == i + k + 1
            else:
                assert tgt[0, i] == IGNORE_INDEX


def test_mtp_shares_embedding_and_head():
    model = build_model(small_cfg(num_nextn_predict_layers=2))
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("mtp.") and ("embed" in n or "head" in n) for n in names)
    out = model.losses(torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12)))
    assert out["mtp"].shape == (2,)
    out["mtp"].sum().backward()
    assert model.embed.weight.grad is not None and model.head.weight.grad is not None


def test_cached_decoding_matches_full_forward():
    """Absorbed MLA with the latent cache gives the same logits as the training form (FP32, 1e-4)."""
    cfg = small_cfg(q_lora_rank=0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tokens = torch.randint(0, 128, (2, 12))
    full = model(tokens)
    caches = model.new_caches(2, 12)
    step = [model(tokens[:, :5], caches, 0)]
    for pos in range(5, 12):
        step.append(model(tokens[:, pos:pos + 1], caches, pos))
    torch.testing.assert_close(torch.cat(step, dim=1), full, rtol=1e-4, atol=1e-4)


def test_meta_device_671b_counts():
    cfg = load_config("v3-671b").model
    counts = count_parameters(build_model(cfg, "meta"))
    assert 670e9 < counts["main"] < 672e9  # report: 671B
    assert 36e9 < counts["active"] < 38e9  # report: 37B activated
    assert 11e9 < counts["mtp"] < 12e9  # report: 11.5B unique MTP parameters


def test_yarn_scale_and_frequencies():
    cfg = load_config("v3-671b").model
    # 1/sqrt(192) * (0.1 * ln 40 + 1)^2
    assert math.isclose(softmax_scale(cfg), 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel_tol=1e-12)
    inv, mag = rope_frequencies(cfg)
    plain = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert mag == 1.0
    assert math.isclose(float(inv[0]), float(plain[0]), rel_tol=1e-6)  # fastest frequency kept
    assert math.isclose(float(inv[-1]), float(plain[-1] / 40), rel_tol=1e-6)  # slowest interpolated by the factor


@pytest.mark.parametrize("bad, msg", [
    ("model.topk_group=5", "topk_group"),
    ("model.num_experts_per_tok=99", "num_experts_per_tok"),
    ("model.n_group=3", "n_group"),
    ("model.qk_rope_head_dim=5", "qk_rope_head_dim"),
    ("train.micro_batch_size=5", "micro_batch_size"),
    ("train.seq_len=99999", "seq_len"),
    ("model.scoring_func=relu", "scoring_func"),
])
def test_config_validation_names_field(bad, msg):
    from moeforge.errors import MoeforgeError

    with pytest.raises(MoeforgeError, match=msg):
        load_config("tiny", overrides=[bad])


def test_hf_config_both_rope_forms():
    base = {"hidden_size": 64, "num_attention_heads": 2, "q_lora_rank": None, "n_routed_experts": 8,
            "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "vocab_size": 100}
    yarn = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    a = ModelConfig.from_hf_dict({**base, "rope_theta": 10000, "rope_scaling": {"type": "yarn", **yarn}})
    b = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000, **yarn}})
    assert a == b and a.q_lora_rank == 0 and a.rope_scaling["factor"] == 40


def test_initial_values_are_the_single_device_initialisation():
    """initial_values(cfg) yields each persistent tensor once, with the values build_model gives it
    (the same seed, the same draws, on the CPU generator), and a stream missing one is refused."""
    from moeforge.errors import MoeforgeError
    from moeforge.model import initial_values
    from moeforge.parallel import load_full_state_dict

    cfg = small_cfg(num_nextn_predict_layers=1)
    torch.manual_seed(5)
    model = build_model(cfg, "cpu")
    torch.manual_seed(5)
    values = list(initial_values(cfg))
    state = model.state_dict()
    assert sorted(n for n, _ in values) == sorted(state)
    for name, v in values:
        assert torch.equal(v, state[name]), name
    other = build_model(cfg, "cpu", init=False)
    load_full_state_dict(other, iter(values), None)  # taken one (name, value) at a time
    assert all(torch.equal(t, state[n]) for n, t in other.state_dict().items())
    with pytest.raises(MoeforgeError, match="missing"):
        load_full_state_dict(other, iter(values[:-1]), None)


def test_zero_init_clears_exactly_the_residual_writers_and_the_head():
    """train.zero_init: 'proj' zeroes wo and every w2 (dense, shared, routed, MTP block), 'head' the
    head; every other tensor keeps the value it has without the setting (same draws), in the
    single-device build and in the stream parallel ranks slice (initial_values); unknown parts are a
    config error."""
    from moeforge.errors import MoeforgeError
    from moeforge.model import initial_values
    from moeforge.train.step import build_train_model

    cfg = small_cfg(num_nextn_predict_layers=1)
    torch.manual_seed(3)
    plain = dict(initial_values(cfg))
    torch.manual_seed(3)
    zeroed = dict(initial_values(cfg, zero=["proj", "head"]))
    cleared = {n for n, v in zeroed.items() if not torch.equal(v, plain[n])}
    assert all(not zeroed[n].any() for n in cleared)
    expect = {n for n in plain if n == "head.weight" or n.endswith((".attn.wo.weight", ".w2.weight", "experts.w2"))}
    assert cleared == expect
    assert any(n.startswith("mtp.") for n in cleared) and any(n.endswith("shared_experts.w2.weight") for n in cleared)
    assert any(n.endswith("ffn.w2.weight") for n in cleared) and any(n.endswith("ffn.experts.w2") for n in cleared)
    torch.manual_seed(3)
    only_head = dict(initial_values(cfg, zero=["head"]))
    assert {n for n, v in only_head.items() if not torch.equal(v, plain[n])} == {"head.weight"}

    full = load_config(None, None, ["train.zero_init=proj,head"])
    full.model = cfg
    torch.manual_seed(3)
    model = build_train_model(full, torch.device("cpu"), "fp32", None)
    assert all(torch.equal(t, zeroed[n]) for n, t in model.state_dict().items() if n in zeroed)
    with pytest.raises(MoeforgeError, match="train.zero_init: unknown part 'bias'"):
        load_config(None, None, ["train.zero_init=proj,bias"])


def test_evaluation_token_losses_match_full_logits():
    """model(tokens, targets=...) (what evaluation calls) gives the per-target cross-entropy of the full
    logits, 0 at ignored targets, for several chunk sizes, also when the chunk does not divide the
    scored positions."""
    cfg = small_cfg()
    model = build_model(cfg, "cpu").eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (3, 20), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (3, 20), generator=g)
    targets[0, :7] = IGNORE_INDEX
    targets[2, 5] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(tokens)
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none",
                                                ignore_index=IGNORE_INDEX).view_as(targets)
        for chunk in (0, 7, 64):
            model.head.loss_chunk = chunk
            got = model(tokens, targets=targets)
            assert got.shape == targets.shape and torch.all(got[targets == IGNORE_INDEX] == 0)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_causal_attention_with_narrower_values_matches_the_formula():
    """attention() on the CPU pads v to the query/key head dim for the flash kernel; the output and
    all three gradients equal softmax(q k^T * scale + causal mask) v computed directly (FP64)."""
    from moeforge.model.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 17, 24, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(2, 3, 17, 16, generator=g).requires_grad_()
    out = attention(q, k, v, 0.3)
    assert out.shape == (2, 3, 17, 16)
    causal = torch.ones(17, 17, dtype=torch.bool).tril()
    s = (q.double() @ k.double().transpose(-1, -2) * 0.3).masked_fill(~causal, float("-inf"))
    ref = s.softmax(-1) @ v.double()
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_rmsnorm_returns_the_dtype_its_linears_compute_in():
    """Without autocast the norm keeps its input's dtype; under BF16 autocast an FP32 input (the
    residual stream) comes out in BF16, rounded once from the FP32 result, the value autocast's
    Linear would have cast it to."""
    torch.manual_seed(0)
    norm = RMSNorm(256)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 256) * 3
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    y = norm(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = norm(x)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, y.to(torch.bfloat16))
    # the gradient reaches the FP32 input in FP32, equal to that of the FP32 norm
    xb = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm(xb).float().sum().backward()
    xf = x.clone().requires_grad_()
    norm(xf).sum().backward()
    assert xb.grad.dtype == torch.float32
    torch.testing.assert_close(xb.grad, xf.grad)
