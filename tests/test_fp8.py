"""FP8 reference: quantisation rules and the three FP8 GEMMs of a Linear and of the routed experts."""

import math

import pytest
import torch

from conftest import input_grads_trainable_and_frozen
from moeforge.errors import MoeforgeError
from moeforge.fp8 import FP8_MAX, convert_to_fp8, dequantize, fake_quantize, quantize
from moeforge.fp8.linear import FP8Experts, FP8Linear, FP8Recipe, _FP8GroupedFn
from moeforge.model.head import OutputHead
from moeforge.model.moe import Experts, grouped_mm_reference

E4M3_REL = 2.0 ** -4  # round-to-nearest with 3 mantissa bits: relative error <= half an ulp = 2^-4


def quantize_loop(x: torch.Tensor, block):
    """Tile by tile with Python loops: the independent reference for the vectorised quantize."""
    br, bc = block
    M, N = x.shape
    scales = torch.zeros(math.ceil(M / br), math.ceil(N / bc))
    q = torch.zeros(M, N)
    for i in range(0, M, br):
        for j in range(0, N, bc):
            tile = x[i:i + br, j:j + bc]
            s = max(float(tile.abs().max()), 1e-4) / FP8_MAX
            scales[i // br, j // bc] = s
            q[i:i + br, j:j + bc] = (tile / s).to(torch.float8_e4m3fn).float()
    return q, scales


@pytest.mark.parametrize("block, shape", [((1, 128), (3, 300)), ((128, 128), (200, 72)), ((128, 128), (72, 260)),
                                          ((1, 128), (4, 128))])
def test_quantize_matches_tile_loop_with_ragged_edges(block, shape):
    """Vectorised quantisation equals a per-tile loop: scales = amax/448 per block, same FP8 bytes."""
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[1])  # very different magnitudes per column
    q, s = quantize(x, block)
    q_ref, s_ref = quantize_loop(x, block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(q.float(), q_ref)


def test_exact_round_trip_of_representable_values():
    """Values that are E4M3 numbers times a power-of-two scale, with the block max at 448, come back exactly."""
    torch.manual_seed(0)
    codes = torch.randint(0, 256, (4, 256), dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = torch.nan_to_num(codes, nan=0.0).clamp(-448, 448)
    codes[:, 0], codes[:, 128] = 448.0, -448.0  # each 1x128 tile has amax exactly 448
    x = codes * 2.0 ** -7
    q, s = quantize(x, (1, 128))
    assert torch.equal(s, torch.full((4, 2), 2.0 ** -7))
    assert torch.equal(dequantize(q, s, (1, 128)), x)


def test_zero_tile_and_errors():
    x = torch.zeros(2, 256)
    x[1, :128] = 5.0
    q, s = quantize(x, (1, 128))
    assert torch.all(s[0] == 1e-4 / 448) and torch.isfinite(s).all()  # floored amax: no division by zero
    assert torch.equal(dequantize(q, s), x)
    for bad in (float("inf"), float("nan")):
        y = torch.ones(2, 128)
        y[0, 3] = bad
        with pytest.raises(MoeforgeError, match="inf or NaN"):
            quantize(y)
    with pytest.raises(MoeforgeError, match="block"):
        quantize(torch.ones(2, 128), (64, 64))


def test_pow2_scales():
    torch.manual_seed(0)
    x = torch.randn(8, 384) * 7
    _, s = quantize(x, (1, 128), pow2_scales=True)
    _, s_exact = quantize(x, (1, 128))
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    assert torch.all(s >= s_exact) and torch.all(s < 2 * s_exact)  # rounded up, never overflowing


def fp8_error_bound(a_abs, b_abs):
    """|fp8(a) fp8(b) - a b| <= ((1+e)^2 - 1) |a||b| per product, summed: the E4M3 rounding budget."""
    return ((1 + E4M3_REL) ** 2 - 1) * (a_abs @ b_abs) + 1e-6


@pytest.mark.parametrize("save_fp8_inputs", [True, False])
def test_fp8_linear_three_gemms(save_fp8_inputs):
    """Fprop, Dgrad and Wgrad each equal the GEMM of the quantised operands with the recipe's tiling
    (1x128 along K for x, along N for dy, along T for both Wgrad operands; 128x128 for W) exactly
    (FP32 accumulation, 1e-5), and stay within the E4M3 rounding bound of the FP32 GEMMs."""
    torch.manual_seed(0)
    T, K, N = 150, 260, 140
    lin = FP8Linear(K, N, bias=False)
    lin.recipe = FP8Recipe(save_fp8_inputs=save_fp8_inputs)
    x = torch.randn(T, K, requires_grad=True)
    y = lin(x)
    g = torch.randn(T, N)
    y.backward(g)
    W = lin.weight.detach()
    xd = x.detach()
    # exact emulation of the FP8 GEMMs, built from the tile-loop reference
    fq = lambda t, blk: (lambda q, s: q * s.repeat_interleave(blk[0], 0)[: t.shape[0]].repeat_interleave(blk[1], 1)[:, : t.shape[1]])(*quantize_loop(t, blk))  # noqa: E731
    torch.testing.assert_close(y.detach(), fq(xd, (1, 128)) @ fq(W, (128, 128)).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, fq(g, (1, 128)) @ fq(W, (128, 128)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight.grad, fq(g.T.contiguous(), (1, 128)) @ fq(xd.T.contiguous(), (1, 128)).T,
                               rtol=1e-5, atol=1e-5)
    # and close to full precision, within what E4M3 rounding explains
    assert torch.all((y.detach() - xd @ W.T).abs() <= fp8_error_bound(xd.abs(), W.abs().T))
    assert torch.all((x.grad - g @ W).abs() <= fp8_error_bound(g.abs(), W.abs()))
    assert torch.all((lin.weight.grad - g.T @ xd).abs() <= fp8_error_bound(g.abs().T, xd.abs()) + 1e-5)


def _saved_dtypes(fn):
    """The dtypes and shapes of the tensors autograd keeps for backward while fn() runs."""
    kept = []

    def pack(t):
        kept.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, kept


def test_fp8_saved_inputs_are_fp8_and_change_no_gradient():
    """FP8Recipe.save_fp8_inputs keeps x for backward only as FP8 codes (x^T's Wgrad operand, made
    in the forward from x itself) and gives bit-identical gradients to keeping x: Linear and experts."""
    torch.manual_seed(0)
    x = torch.randn(150, 260)
    g = torch.randn(150, 140)
    w = torch.randn(140, 260)
    counts = torch.tensor([130, 0, 7, 13])
    offsets = counts.cumsum(0).to(torch.int32)
    w_store = torch.randn(4, 80, 260)
    g_e = torch.randn(150, 80)
    grads = {}
    for save in (True, False):
        recipe = FP8Recipe(save_fp8_inputs=save)
        lin = FP8Linear(260, 140, bias=False)
        lin.recipe = recipe
        with torch.no_grad():
            lin.weight.copy_(w)
        xi = x.clone().requires_grad_()
        y, kept = _saved_dtypes(lambda: lin(xi))
        y.backward(g)
        big = [(dt, shape) for dt, shape in kept if shape in ((150, 260), (260, 150))]
        assert big and all(dt == (torch.float8_e4m3fn if save else torch.float32) for dt, _ in big), big
        xe = x.clone().requires_grad_()
        we = w_store.clone().requires_grad_()
        ye = _FP8GroupedFn.apply(xe, offsets, recipe, None, None, we)
        ye.backward(g_e)
        grads[save] = (xi.grad, lin.weight.grad, xe.grad, we.grad)
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("save_fp8_inputs", [True, False])
def test_fp8_experts_with_frozen_weights(save_fp8_inputs):
    """Frozen expert weights: the FP8 experts still give the input gradient (the same as with
    trainable weights) and no weight gradient."""
    torch.manual_seed(0)
    counts = torch.tensor([130, 0, 7, 13])
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(150, 96)
    g = torch.randn(150, 80)
    w_store = torch.randn(4, 80, 96)
    recipe = FP8Recipe(save_fp8_inputs=save_fp8_inputs)
    dxs = input_grads_trainable_and_frozen(lambda xi, wi: _FP8GroupedFn.apply(xi, offsets, recipe, None, None, wi),
                                           x, w_store, g)
    assert torch.equal(dxs[0], dxs[1])


def test_fp8_grouped_gemm_matches_per_expert_fp8_linear():
    """The FP8 grouped GEMM of the experts equals, expert by expert, FP8 GEMMs of that expert's tokens:
    output, input gradient and weight gradient (Wgrad tiles run along each expert's own tokens)."""
    torch.manual_seed(0)
    counts = torch.tensor([130, 0, 7, 40])
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 96, requires_grad=True)
    w_store = torch.randn(4, 80, 96, requires_grad=True)  # [E, out, in], as Experts stores it
    y = _FP8GroupedFn.apply(x, offsets, FP8Recipe(), None, None, w_store)
    g = torch.randn_like(y)
    y.backward(g)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        lin = FP8Linear(96, 80, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w_store[e])
        xe = x.detach()[start:end].clone().requires_grad_()
        if end > start:
            ye = lin(xe)
            ye.backward(g[start:end])
            torch.testing.assert_close(y[start:end].detach(), ye.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x.grad[start:end], xe.grad, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(w_store.grad[e], lin.weight.grad, rtol=1e-5, atol=1e-5)
        else:
            assert torch.all(w_store.grad[e] == 0)
        start = end
    # and the output is the FP32 grouped GEMM up to E4M3 rounding
    ref = grouped_mm_reference(x.detach(), w_store.detach().transpose(1, 2), offsets)
    assert (y.detach() - ref).abs().max() < 0.15 * ref.abs().max()


@pytest.mark.parametrize("counts", [[300, 0, 128, 1, 255, 0], [0, 0, 0], [1000]])
def test_expert_groups_tiles_restart_at_every_group(counts):
    """The grouped GEMMs' row groups: offsets, and each tile height's tiles counted cumulatively
    (ceil(rows / block) per group), the same from the counts, from the offsets and from group_layout."""
    from moeforge.fp8.groups import Groups, group_layout

    c = torch.tensor(counts)
    offsets = torch.tensor([sum(counts[:i + 1]) for i in range(len(counts))], dtype=torch.int32)
    from_counts, from_offsets = Groups.from_counts(c), Groups(offsets.long())
    for block in (128, 64):
        expected = torch.tensor([sum(-(-n // block) for n in counts[:i + 1]) for i in range(len(counts))],
                                dtype=torch.int32)
        for groups in (from_counts, from_offsets):
            assert groups.offsets.dtype == torch.int32 and torch.equal(groups.offsets, offsets)
            assert groups.tiles(block).dtype == torch.int32 and torch.equal(groups.tiles(block), expected)
        tiles, offs = group_layout(offsets, block)
        assert torch.equal(tiles, expected) and torch.equal(offs, offsets)
        assert group_layout(from_counts, block)[0] is from_counts.tiles(block)  # counted once, then reused


def test_fp8_gate_and_up_in_one_grouped_gemm_equal_two():
    """Gate and up (w1, w3) as one grouped GEMM: x is quantised once and the outputs, weight gradients
    and input gradient equal those of two separate FP8 GEMMs. A gate of 72 rows is padded to 128, so
    each weight keeps its own 128x128 blocks and dy its own 1x128 tiles."""
    torch.manual_seed(0)
    offsets = torch.tensor([130, 130, 137, 177], dtype=torch.int32)
    x = torch.randn(177, 96, requires_grad=True)
    w1, w3 = torch.randn(4, 72, 96, requires_grad=True), torch.randn(4, 72, 96, requires_grad=True)
    y = _FP8GroupedFn.apply(x, offsets, FP8Recipe(), None, None, w1, w3)
    assert y.shape == (177, 128 + 72) and torch.all(y[:, 72:128] == 0)
    g1, g3 = torch.randn(177, 72), torch.randn(177, 72)
    (y[:, :72] * g1 + y[:, 128:] * g3).sum().backward()
    xs = x.detach().clone().requires_grad_()
    a, b = w1.detach().clone().requires_grad_(), w3.detach().clone().requires_grad_()
    y1 = _FP8GroupedFn.apply(xs, offsets, FP8Recipe(), None, None, a)
    y3 = _FP8GroupedFn.apply(xs, offsets, FP8Recipe(), None, None, b)
    (y1 * g1 + y3 * g3).sum().backward()
    assert torch.equal(y[:, :72], y1) and torch.equal(y[:, 128:], y3)
    assert torch.equal(w1.grad, a.grad) and torch.equal(w3.grad, b.grad)
    torch.testing.assert_close(x.grad, xs.grad, rtol=1e-5, atol=1e-5)  # one FP32 sum over both, not two


def test_fp8_feedforward_is_two_fp8_linears_in_one_gemm():
    """The FP8 SwiGLU FFN (dense layers, shared experts) runs gate and up as one FP8 GEMM over
    [w1; w3]: its output and weight gradients equal those of the FFN built from three FP8Linears, the
    input gradient up to the order of one FP32 sum (one Dgrad over both instead of two added).
    A gate of 200 rows is padded to 256, so each weight keeps its own 128x128 blocks."""
    from moeforge.fp8.linear import FP8FeedForward
    from moeforge.model.layers import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(96, 200)
    for w in ffn.parameters():
        torch.nn.init.normal_(w, std=0.1)
    ref = FeedForward(96, 200)
    ref.load_state_dict(ffn.state_dict())
    for name in ("w1", "w2", "w3"):  # the plain FFN of three FP8Linears
        getattr(ref, name).__class__ = FP8Linear
    ffn.__class__ = FP8FeedForward
    for name in ("w1", "w2", "w3"):
        getattr(ffn, name).__class__ = FP8Linear
    x = torch.randn(3, 50, 96)
    dy = torch.randn(3, 50, 96)
    outs = []
    for m in (ffn, ref):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        outs.append((y, xi.grad, [getattr(m, n).weight.grad for n in ("w1", "w2", "w3")]))
    (y, dx, dws), (y_r, dx_r, dws_r) = outs
    assert torch.equal(y, y_r)
    assert all(torch.equal(a, b) for a, b in zip(dws, dws_r))
    torch.testing.assert_close(dx, dx_r, rtol=1e-5, atol=1e-5)
    assert not torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("cols", [2 * 72, 128 + 72])
def test_fused_swiglu_matches_autograd(cols):
    """The experts' SwiGLU over the fused gate/up output: same values and gradient as autograd's."""
    from moeforge.fp8.linear import _SwiGLU

    torch.manual_seed(0)
    gu = torch.randn(50, cols, requires_grad=True)
    dh = torch.randn(50, 72)
    h = _SwiGLU.apply(gu, 72)
    h.backward(dh)
    ref_in = gu.detach().clone().requires_grad_()
    ref = torch.nn.functional.silu(ref_in[:, :72]) * ref_in[:, -72:]
    ref.backward(dh)
    torch.testing.assert_close(h, ref, rtol=0, atol=0)
    torch.testing.assert_close(gu.grad, ref_in.grad, rtol=1e-6, atol=1e-6)


def test_fp8_reference_ignores_autocast():
    """Under BF16 autocast the emulated FP8 GEMMs still multiply in FP32 (an FP8 GEMM's accumulator):
    the Linear returns the FP32 product rounded once to BF16, the dtype nn.Linear returns under
    autocast (and its bias added in BF16, as there); the grouped experts, whose rows the dispatch
    casts, keep their input's dtype."""
    torch.manual_seed(0)
    lin = FP8Linear(256, 130, bias=False)
    biased = FP8Linear(256, 130)
    x = torch.randn(20, 256)
    w = torch.randn(3, 64, 256)  # [E, out, in]
    offsets = torch.tensor([5, 5, 20], dtype=torch.int32)
    plain = lin(x), _FP8GroupedFn.apply(x, offsets, FP8Recipe(), None, None, w)
    with torch.autocast("cpu", torch.bfloat16):
        cast = lin(x), _FP8GroupedFn.apply(x, offsets, FP8Recipe(), None, None, w)
        with_bias, reference = biased(x), torch.nn.functional.linear(x, biased.weight, biased.bias)
    assert cast[0].dtype == torch.bfloat16 and torch.equal(cast[0], plain[0].to(torch.bfloat16))
    assert cast[1].dtype == torch.float32 and torch.equal(cast[1], plain[1])
    assert with_bias.dtype == reference.dtype == torch.bfloat16


def test_convert_to_fp8_keeps_parameters_and_precision_sensitive_parts():
    from moeforge.config import load_config
    from moeforge.model import build_model

    cfg = load_config("tiny", overrides=["model.num_nextn_predict_layers=1"]).model
    model = build_model(cfg, "meta")
    names_before = [n for n, _ in model.named_parameters()]
    convert_to_fp8(model)
    assert [n for n, _ in model.named_parameters()] == names_before  # checkpoints are precision-independent
    assert type(model.head) is OutputHead and type(model.embed) is torch.nn.Embedding
    assert isinstance(model.layers[0].attn.wkv_a, FP8Linear)
    assert isinstance(model.layers[1].ffn.experts, FP8Experts) and isinstance(model.mtp[0].eh_proj, FP8Linear)
    assert not any(isinstance(m, Experts) and not isinstance(m, FP8Experts) for m in model.modules())


def test_fp8_recipe_sets_the_dtype_of_the_norms_in_front_of_fp8_gemms():
    """FP8Recipe.norm_output (train.fp8_norm_output): under BF16 autocast the blocks' attention and FFN
    norms and the MTP module's input norms return FP32 ("fp32", the default) or BF16 ("bf16"), the
    same values but for the one rounding; the norms in front of the BF16 head return BF16 either way."""
    from moeforge.config import load_config
    from moeforge.model import build_model

    cfg = load_config("tiny", overrides=["model.num_nextn_predict_layers=1"]).model
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    outs = {}
    for norm_output in ("fp32", "bf16"):
        model = convert_to_fp8(build_model(cfg), FP8Recipe(norm_output=norm_output))
        fronts = [model.layers[0].attn_norm, model.layers[1].ffn_norm, model.mtp[0].enorm, model.mtp[0].hnorm]
        for norm in fronts + [model.norm, model.mtp[0].norm]:
            norm.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", torch.bfloat16):
            outs[norm_output] = [norm(x) for norm in fronts]
            assert model.norm(x).dtype == model.mtp[0].norm(x).dtype == torch.bfloat16
    assert all(y.dtype == torch.float32 for y in outs["fp32"])
    assert all(y.dtype == torch.bfloat16 for y in outs["bf16"])
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(outs["fp32"], outs["bf16"]))
    with pytest.raises(ValueError, match="norm_output"):
        FP8Recipe(norm_output="fp16")


@pytest.mark.parametrize("shape, block, pow2", [((3, 200), (1, 128), False), ((2, 130, 300), (128, 128), False),
                                                 ((257, 128), (1, 128), True), ((5,), (1, 128), False)])
def test_fake_quantize_is_dequantize_of_quantize(shape, block, pow2):
    """fake_quantize (scales broadcast over the blocks) is bit for bit dequantize(quantize(x)): ragged
    blocks, batches, 1-D rows, zero tiles and power-of-two scales included."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g) * torch.logspace(-4, 3, shape[-1])
    if x.dim() > 1:
        x[..., :1, :128] = 0.0  # an all-zero tile
    want = dequantize(*quantize(x, block, pow2), block)
    got = fake_quantize(x, block, pow2)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_fp8_hf_export_import_gives_the_emulated_fp8_logits(tmp_path):
    """save(fp8=True) writes the release's layout (E4M3 weights + 128x128 weight_scale_inv +
    quantization_config); loading it and converting to FP8 gives exactly the logits of the emulated
    FP8 model it came from (re-quantising a dequantised block reproduces its bytes and scale)."""
    import json

    from safetensors import safe_open

    from moeforge import hf
    from moeforge.config import ModelConfig
    from moeforge.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, hidden_size=160, intermediate_size=192, moe_intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=2, q_lora_rank=136, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=64)  # ragged blocks
    model = convert_to_fp8(build_model(cfg)).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        expect = model(tokens)
    hf.save(model, tmp_path / "fp8", fp8=True)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(next((tmp_path / "fp8").glob("*.safetensors")), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_a_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_a_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and w.shape == (136, 160) and s.shape == (2, 2)
        assert f.get_tensor("lm_head.weight").dtype == torch.float32  # the head stays in full precision
    loaded = convert_to_fp8(hf.load(tmp_path / "fp8")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expect)


def test_fp8_checkpoint_kept_in_fp8(tmp_path):
    """hf.load(keep_fp8=True) of an FP8 folder keeps every FP8 weight as E4M3 codes + block scales (the
    bytes of the file) and computes exactly what the dequantising load computes: the same logits and
    the same greedy decoding through the latent cache (which reads wkv_b's weight directly)."""
    from moeforge import hf
    from moeforge.config import ModelConfig
    from moeforge.fp8.stored import FP8StoredExperts, FP8StoredLinear
    from moeforge.generate import generate
    from moeforge.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, hidden_size=160, intermediate_size=192, moe_intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=2, q_lora_rank=136, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=64,
                      num_nextn_predict_layers=1)  # ragged blocks, MTP
    hf.save(convert_to_fp8(build_model(cfg)), tmp_path / "fp8", fp8=True)
    dense = hf.load(tmp_path / "fp8")
    kept = hf.load(tmp_path / "fp8", keep_fp8=True)
    stored = [m for m in kept.modules() if isinstance(m, (FP8StoredLinear, FP8StoredExperts))]
    assert len(stored) == sum(1 for m in dense.modules() if type(m) in (torch.nn.Linear, Experts))
    assert type(kept.head) is OutputHead and kept.head.weight.dtype == torch.float32  # saved in full precision
    assert kept.layers[1].ffn.experts.w1.dtype == torch.float8_e4m3fn
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    assert nbytes(kept) < 0.6 * nbytes(dense)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(kept(tokens), dense(tokens))
    prompt = tokens[0, :5].tolist()
    assert generate(kept, prompt, 8, temperature=0) == generate(dense, prompt, 8, temperature=0)


@pytest.mark.slow
def test_tiny_model_trains_in_fp8_within_2_percent_of_fp32(tmp_path, data_dir, mf_env, tiny_overrides, one_thread):
    """`train.precision=fp8` (emulated FP8 GEMMs on CPU) against FP32, same model, data and seed:
    the mean training loss of the last 50 of 250 steps differs by less than 2% (the issue's bound).

    At lr 1e-3. At the tiny preset's 2e-3 this small model's 250-step run is chaotic: a change at
    the level of FP32 rounding (the loss's softmax computed in another order) moved the final loss by
    1.2% for FP32 alone, and FP8 against FP32 ranged from -7.5% to +3.7% over seeds. At 1e-3 the FP8
    gap measured -0.4%, +0.7% and -0.4% for seeds 1, 3 and 1234."""
    from moeforge.config import load_config
    from moeforge.train import Trainer

    def run(precision: str) -> list[float]:
        cfg = load_config("tiny", overrides=tiny_overrides + [
            f"train.data={data_dir}", f"train.out={tmp_path / precision}", f"train.precision={precision}",
            "train.steps=250", "train.warmup_steps=20", "train.checkpoint_every=0", "train.eval_every=0",
            "train.lr=1e-3"])
        trainer = Trainer(cfg, progress=False)
        assert (precision == "fp8") == any(isinstance(m, FP8Linear) for m in trainer.model.modules())
        losses = [trainer.train_step()["loss"] for _ in range(cfg.train.steps)]
        trainer.close()
        return losses

    fp32, fp8 = run("fp32"), run("fp8")
    tail32, tail8 = sum(fp32[-50:]) / 50, sum(fp8[-50:]) / 50
    assert tail32 < fp32[0] - 1.0  # both really trained
    assert abs(tail8 - tail32) / tail32 < 0.02, (tail32, tail8)


def test_weight_cache_quantises_each_weight_once_per_step(monkeypatch):
    """Two micro-batches of an FP8 MoE model inside fp8.weight_cache: the same gradients as without it
    (to the bit), and each weight (Linear and expert stack) is quantised once instead of once per
    forward and once more per backward. Outside the scope nothing is kept."""
    from moeforge.config import load_config
    from moeforge.fp8 import linear as fp8_linear
    from moeforge.fp8 import weight_cache
    from moeforge.model import build_model

    cfg = load_config("tiny", overrides=["model.num_hidden_layers=2", "model.vocab_size=256"]).model
    torch.manual_seed(0)
    model = convert_to_fp8(build_model(cfg))
    batches = [torch.randint(0, cfg.vocab_size, (2, 17)) for _ in range(2)]
    weight_calls = []
    real = fp8_linear.fake_quantize

    def counting(x, block, *args, **kwargs):
        if tuple(block) == (128, 128):
            weight_calls.append(x.shape)
        return real(x, block, *args, **kwargs)

    monkeypatch.setattr(fp8_linear, "fake_quantize", counting)

    def grads(cache: bool):
        model.zero_grad(set_to_none=True)
        weight_calls.clear()
        with weight_cache(cache):
            for b in batches:
                model.losses(b[:, :-1], b[:, 1:])["main"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(weight_calls)

    plain, n_plain = grads(False)
    reused, n_reused = grads(True)
    n_weights = sum(1 for m in model.modules() if isinstance(m, FP8Linear)) + 3 * sum(
        1 for m in model.modules() if isinstance(m, FP8Experts))
    assert n_reused == n_weights and n_plain == 2 * 2 * n_weights  # (forward + backward) x micro-batches
    assert plain.keys() == reused.keys() and all(torch.equal(plain[k], reused[k]) for k in plain)
    from moeforge.fp8 import cache

    assert cache._entries is None


def test_weight_prefetch_runs_the_training_quantisations_once_after_the_update():
    """fp8.cache's prefetch: the quantisations training forwards asked for (weights given) are run by
    prefetch_weights and each result taken once by the next forward instead of quantising; one whose
    weight was written in place since is made again; an evaluation forward (no weights given) is
    neither remembered nor served; the owner's entries go with it."""
    import gc

    from moeforge.fp8 import cache

    cache.drop_prefetched()
    owner, w = torch.nn.Linear(2, 2), torch.ones(3)
    made = []

    def make():
        made.append(w.clone())
        return w.sum().item()

    assert cache.cached(owner, "k", make, (w,)) == 3.0 and len(made) == 1  # a training forward: remembered
    assert cache.cached(owner, "eval", make) == 3.0 and len(made) == 2  # evaluation: not remembered
    w.mul_(2)  # "the optimizer step" (an in-place write)
    cache.prefetch_weights()
    assert len(made) == 3  # only the training one, run now, with the new weights
    assert cache.cached(owner, "k", make, (w,)) == 6.0 and len(made) == 3  # taken, not made again
    assert cache.cached(owner, "k", make, (w,)) == 6.0 and len(made) == 4  # taken once: made now
    cache.prefetch_weights()  # remembers the call just before
    w.add_(1)  # written after the prefetch: its result is stale
    assert cache.cached(owner, "k", make, (w,)) == 9.0 and len(made) == 6
    cache.prefetch_weights()
    del owner
    gc.collect()
    assert len(cache._ready) == 0 and len(cache._makers) == 0
    cache.drop_prefetched()


def test_fp8_linear_input_quantised_once_for_consecutive_readers():
    """gpu.quantised_input (the GPU path's input quantisation, here with a recording stand-in for the
    Triton quantiser): two Linears reading the same tensor one after the other (attention's wq and
    wkv_a) share one quantisation, through different view objects; anything that could change the
    codes quantises again (an in-place write, another view, other scale rounding or padding, x^T codes
    asked for that were not made); and nothing is held once the input is freed."""
    import gc

    from moeforge.fp8 import gpu

    calls = []

    def quant(x2, p2, rows=True, cols=False, red_pad=512, red_pad_t=512):
        calls.append((x2.data_ptr(), p2, cols, red_pad, red_pad_t))
        return torch.empty(1), (torch.empty(1) if cols else None)

    x = torch.randn(2, 3, 256)
    pads = (512, 512)
    first = gpu.quantised_input(x.reshape(-1, 256), False, True, quant, pads)
    again = gpu.quantised_input(x.reshape(-1, 256), False, True, quant, pads)
    assert len(calls) == 1 and again[0] is first[0] and again[1] is first[1]
    rows_only = gpu.quantised_input(x.reshape(-1, 256), False, False, quant, pads)
    assert len(calls) == 1 and rows_only[0] is first[0] and rows_only[1] is None
    gpu.quantised_input(x.reshape(-1, 256), True, True, quant, pads)  # power-of-two scales: other codes
    assert len(calls) == 2
    gpu.quantised_input(x.reshape(-1, 256), True, True, quant, (128, 512))  # other padding
    assert len(calls) == 3 and calls[-1][3:] == (128, 512)
    x.add_(1.0)  # written in place since
    gpu.quantised_input(x.reshape(-1, 256), True, True, quant, pads)
    assert len(calls) == 4
    gpu.quantised_input(x[:1].reshape(-1, 256), True, True, quant, pads)  # another view of the same memory
    assert len(calls) == 5
    y = torch.randn(6, 256)
    gpu.quantised_input(y, False, False, quant, pads)
    gpu.quantised_input(y, False, True, quant, pads)  # x^T codes were not made
    assert len(calls) == 7 and calls[-1][2]
    del y
    gc.collect()
    assert gpu._last_input[0] is None


def _grad_to_accumulate_in_a_backward(w, owner=None, how="backward"):
    """What fp8.gpu.grad_to_accumulate returns for w inside the backward of a Function that takes w, run
    as `how` says."""
    from moeforge.fp8.gpu import grad_to_accumulate

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.w = w
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(grad_to_accumulate(ctx.w, owner))
            return g, None

    x = torch.randn(3, requires_grad=True)
    out = Probe.apply(x, w).sum()
    if how == "backward":
        out.backward()
    elif how == "backward, inputs=[x]":
        out.backward(inputs=[x])
    elif how == "autograd.grad":
        torch.autograd.grad(out, [x])
    elif how == "create_graph":
        out.backward(create_graph=True)
    return seen[0]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_grad_to_accumulate_only_where_autograd_would_do_nothing_else():
    """The experts' Wgrad adds into w.grad itself (and hands autograd no gradient) only for a leaf
    Parameter with a plain contiguous FP32 .grad of its shape and no hooks, in a .backward() that
    writes w.grad and builds no graph, and not inside an FSDP-sharded module; everywhere else the
    gradient goes back to autograd (a zero-bubble pipeline's weight pass runs torch.autograd.grad)."""
    from moeforge.fp8.gpu import grad_to_accumulate

    def param(grad="fp32"):
        w = torch.nn.Parameter(torch.randn(2, 4, 8, dtype=torch.bfloat16 if grad == "bf16" else torch.float32))
        if grad in ("fp32", "bf16"):
            w.grad = torch.randn_like(w)
        elif grad == "strided":
            w.grad = torch.randn(2, 8, 4).transpose(1, 2)
        return w

    probe = _grad_to_accumulate_in_a_backward
    w = param()
    assert probe(w) is w.grad
    assert probe(w, owner=torch.nn.Linear(1, 1)) is w.grad
    for how in ("backward, inputs=[x]", "autograd.grad", "create_graph"):
        assert probe(param(), how=how) is None, how
    with torch.no_grad():
        assert grad_to_accumulate(param()) is None  # not inside a backward
    assert probe(param(grad=None)) is None  # first micro-batch: autograd stores it
    assert probe(param(grad="bf16")) is None
    assert probe(param(grad="strided")) is None
    frozen = param()
    frozen.requires_grad_(False)
    assert probe(frozen) is None
    hooked = param()
    hooked.register_post_accumulate_grad_hook(lambda p: None)
    assert probe(hooked) is None
    hooked = param()
    hooked.register_hook(lambda g: g)
    assert probe(hooked) is None
    FSDPExperts = type("FSDPExperts", (torch.nn.Module,), {})  # the class name fully_shard gives a module
    assert probe(param(), owner=FSDPExperts()) is None


@pytest.mark.parametrize("value", [True, False])
def test_train_fp8_accumulate_wgrad_reaches_the_experts_recipe(value):
    """train.fp8_accumulate_wgrad is the recipe's accumulate_wgrad in the model the trainer builds."""
    from moeforge.config import load_config
    from moeforge.train.step import build_train_model

    cfg = load_config("tiny", overrides=[f"train.fp8_accumulate_wgrad={str(value).lower()}"])
    model = build_train_model(cfg, torch.device("cpu"), "fp8", None)
    experts = [m for m in model.modules() if isinstance(m, FP8Experts)]
    assert experts and all(m.recipe.accumulate_wgrad is value for m in experts)
