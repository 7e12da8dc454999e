"""Hugging Face import/export (moeforge.hf) against transformers' DeepseekV3ForCausalLM.

Logit parity is checked in FP32 with a tolerance of 1e-4 (logits are O(1) here): both sides compute
the same function in FP32 and differ only in summation order (matmul blocking, SDPA vs. explicit
softmax, grouped GEMM vs. per-expert loops), which costs ~1e-6. A wrong name mapping, transposed
weight, swapped norm, mis-rotated RoPE pair or wrong YaRN factor changes logits by O(0.1-1).
Everything runs on CPU with tiny random models; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeforge import hf
from moeforge.config import ModelConfig
from moeforge.errors import MoeforgeError
from moeforge.model import build_model
from moeforge.model.mtp import shift_tokens

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-4  # FP32, same math; see the module docstring
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}  # mscale != mscale_all_dim: cos/sin get a factor != 1 too


def tiny(**kw) -> dict:
    """Shared tiny shapes (HF field names, so they feed both ModelConfig and DeepseekV3Config)."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
                topk_group=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                max_position_embeddings=128, rope_theta=10000.0, initializer_range=0.1, num_nextn_predict_layers=0,
                eos_token_id=1)
    base.update(kw)
    return base


def hf_model(seed: int = 0, **kw) -> DeepseekV3ForCausalLM:
    """A transformers model with random weights, random norm weights and a random routing bias."""
    d = tiny(**kw)
    if d["q_lora_rank"] == 0:
        d["q_lora_rank"] = None
    rope = d.pop("rope_scaling", None)
    if rope is not None:
        d["rope_scaling"] = dict(rope)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(num_key_value_heads=d["num_attention_heads"], **d)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b).abs() * 0.1)
    return model


def our_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**tiny(**kw)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.copy_(torch.randn(moe.n_experts).abs() * 0.1)
    return model.eval()


def tokens(seq: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, seq), generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------
# transformers -> moeforge
# --------------------------------------------------------------------------------------
PARITY_CASES = {
    "q_lora-dense1": dict(),
    "no_q_lora-groups-yarn": dict(q_lora_rank=0, n_group=4, topk_group=2, rope_scaling=YARN),
    "groups-all_moe": dict(n_group=4, topk_group=2, first_k_dense_replace=0),
    "3layers-dense2-yarn": dict(num_hidden_layers=3, first_k_dense_replace=2, rope_scaling=YARN),
    "no_q_lora-2groups-yarn": dict(q_lora_rank=0, n_group=2, topk_group=1, num_experts_per_tok=3, rope_scaling=YARN),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_load_transformers_checkpoint_matches_logits(case, tmp_path):
    ref = hf_model(**PARITY_CASES[case])
    ref.save_pretrained(tmp_path)
    model = hf.load(tmp_path)
    tok = tokens(48)  # longer than YaRN's original 32 positions
    with torch.no_grad():
        want, got = ref(tok).logits, model(tok)
    assert want.abs().max() > 0.5  # logits are O(1): the tolerance is meaningful
    diff = max_diff(want, got)
    print(f"{case}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_load_drops_mtp_layers_that_save_pretrained_did_not_write(tmp_path):
    """transformers' save_pretrained keeps num_nextn_predict_layers=1 but writes no MTP weights."""
    ref = hf_model(num_nextn_predict_layers=1)
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match="MTP"):
        model = hf.load(tmp_path)
    assert model.cfg.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    with pytest.raises(MoeforgeError, match=r"missing .*model\.layers\.2\."):
        hf.load(tmp_path, mtp=1)  # asking for it explicitly: it is missing


def test_load_fused_expert_layout(tmp_path):
    """transformers' in-memory layout (gate_up_proj [E, 2I, D], down_proj [E, D, I]) loads too."""
    ref = hf_model(n_group=4, topk_group=2)
    ref.save_pretrained(tmp_path / "split")
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    ref.config.to_json_file(str(fused / "config.json"))
    a, b = hf.load(fused), hf.load(tmp_path / "split")
    assert_same_state(a.state_dict(), b.state_dict())
    tok = tokens()
    with torch.no_grad():
        assert max_diff(ref(tok).logits, a(tok)) <= TOL


# --------------------------------------------------------------------------------------
# moeforge -> transformers
# --------------------------------------------------------------------------------------
REVERSE_CASES = {
    "q_lora-groups-yarn-mtp2": dict(n_group=4, topk_group=2, rope_scaling=YARN, num_nextn_predict_layers=2),
    "no_q_lora-all_moe-mtp1": dict(q_lora_rank=0, first_k_dense_replace=0, num_nextn_predict_layers=1),
}


def _load_with_transformers(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)


@pytest.mark.parametrize("case", REVERSE_CASES)
def test_export_loads_in_transformers_with_same_logits(case, tmp_path):
    model = our_model(**REVERSE_CASES[case])
    hf.save(model, tmp_path / "out")
    ref, info = _load_with_transformers(tmp_path / "out")
    assert isinstance(ref, DeepseekV3ForCausalLM)
    assert not info["missing_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    # transformers' main model has no MTP layers: the only keys it does not use are theirs
    L, D = model.cfg.num_hidden_layers, model.cfg.num_nextn_predict_layers
    mtp_prefixes = tuple(f"model.layers.{L + k}." for k in range(D))
    assert info["unexpected_keys"] and all(k.startswith(mtp_prefixes) for k in info["unexpected_keys"])
    tok = tokens()
    with torch.no_grad():
        diff = max_diff(ref(tok).logits, model(tok))
    print(f"{case}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_exported_mtp_layers_match_transformers_mtp(tmp_path):
    """transformers' MtpModel reads the release's MTP layout (enorm, hnorm, eh_proj, shared_head.norm, block).

    DeepseekV3 only registers the MTP key pattern of the 61-layer release (model.layers.61.*), so the
    test points it at our tiny model's layer numbers; then each depth must compute what ours does.
    """
    modeling_layers = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(modeling_layers, "MtpModel"):
        pytest.skip("this transformers has no MtpModel")
    model = our_model(n_group=4, topk_group=2, rope_scaling=YARN, num_nextn_predict_layers=2)
    hf.save(model, tmp_path / "out")
    ref, _ = _load_with_transformers(tmp_path / "out")
    L = model.cfg.num_hidden_layers
    ref._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.({L}|{L + 1})\..*"]
    mtp = modeling_layers.MtpModel.from_pretrained(ref)  # raises if any MTP weight is missing
    assert len(mtp.layers) == 2
    tok = tokens()
    with torch.no_grad():
        h_ref = ref(tok, output_hidden_states=True).hidden_states[-1]  # normalised, as ours
        h, _, cos, sin = model.hidden(tok)
        assert max_diff(h_ref, h) <= TOL
        positions = torch.arange(tok.shape[1])[None]
        for k in range(2):
            ahead = shift_tokens(tok, k + 1, 0)
            h_ref = mtp.forward_layer(k, h_ref, positions, None, input_ids=ahead)
            h, _ = model.mtp[k](h, model.embed(ahead), cos, sin)
            diff = max_diff(mtp._project_to_logits(h_ref), model.head(h))
            print(f"MTP depth {k + 1}: max |logit diff| = {diff:.2e}")
            assert diff <= TOL


# --------------------------------------------------------------------------------------
# round trips and the pure mappings
# --------------------------------------------------------------------------------------
def test_round_trip_is_bit_identical_with_mtp_and_shards(tmp_path):
    model = our_model(n_group=4, topk_group=2, num_nextn_predict_layers=2, rope_scaling=YARN)
    out = tmp_path / "out"
    hf.save(model, out, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert "model.layers.3.shared_head.head.weight" in index["weight_map"]  # release's MTP copies
    assert "model.layers.2.embed_tokens.weight" in index["weight_map"]
    loaded = hf.load(out)
    assert loaded.cfg == model.cfg
    assert_same_state(model.state_dict(), loaded.state_dict())
    # saving again over a previous export replaces it; nothing is left behind
    hf.save(loaded, out)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert_same_state(model.state_dict(), hf.load(out).state_dict())


def test_round_trip_bf16_keeps_routing_bias_fp32(tmp_path):
    model = our_model(num_nextn_predict_layers=1)
    hf.save(model, tmp_path / "bf16", dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    with safe_open(str(next((tmp_path / "bf16").glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight").dtype == torch.bfloat16
    loaded = hf.load(tmp_path / "bf16", dtype=torch.bfloat16)
    want = {k: (v if k.endswith("e_score_correction_bias") else v.bfloat16()) for k, v in model.state_dict().items()}
    assert_same_state(want, loaded.state_dict())


def test_pure_mappings_are_inverse():
    model = our_model(n_group=4, topk_group=2, num_nextn_predict_layers=2)
    tensors = hf.state_dict_to_hf(model)
    L = model.cfg.num_hidden_layers
    assert torch.equal(tensors["model.layers.1.mlp.experts.5.up_proj.weight"], model.layers[1].ffn.experts.w3[5])
    assert torch.equal(tensors[f"model.layers.{L + 1}.shared_head.norm.weight"], model.mtp[1].norm.weight)
    assert torch.equal(tensors[f"model.layers.{L + 1}.mlp.gate.e_score_correction_bias"],
                       model.mtp[1].block.ffn.gate.e_score_correction_bias)
    assert torch.equal(tensors[f"model.layers.{L}.self_attn.q_a_layernorm.weight"], model.mtp[0].block.attn.q_norm.weight)
    assert_same_state(model.state_dict(), hf.hf_to_state_dict(tensors, model.cfg))
    # ignored: MTP layers beyond the config, rotary buffers
    extra = dict(tensors, **{"model.rotary_emb.inv_freq": torch.ones(4)})
    fewer = ModelConfig(**{**tiny(n_group=4, topk_group=2), "num_nextn_predict_layers": 1})
    sd = hf.hf_to_state_dict(extra, fewer)
    assert not any(k.startswith("mtp.1.") for k in sd) and "mtp.0.eh_proj.weight" in sd


# --------------------------------------------------------------------------------------
# FP8
# --------------------------------------------------------------------------------------
def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block FP8 (e4m3) quantisation as in DeepSeek's release: scale_inv = amax / 448 per 128x128 block."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(nr * block, nc * block)
    padded[:rows, :cols] = w
    blocks = padded.view(nr, block, nc, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)  # [nr, nc]
    q = (blocks / scale[:, None, :, None]).view(nr * block, nc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale.float()


def dequant_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            out[sl] = q[sl].float() * scale[i, j]
    return out


@pytest.fixture()
def fp8_folder(tmp_path):
    """A release-like folder: every projection (attention, dense, shared and routed experts, MTP) in FP8.

    hidden 72 and intermediate 200: a dense gate_proj is 200 x 72, i.e. ragged 128-blocks in both dims.
    """
    model = our_model(hidden_size=72, intermediate_size=200, num_nextn_predict_layers=1)
    out = tmp_path / "fp8"
    hf.save(model, out)
    tensors = {}
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    expected = {}
    for k in list(tensors):
        if k.endswith("_proj.weight") or k.endswith("_proj_with_mqa.weight"):
            q, s = quantize_fp8(tensors[k])
            tensors[k], tensors[k + "_scale_inv"] = q, s
            expected[k] = dequant_reference(q, s)
    for p in out.iterdir():
        p.unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[: len(names) // 2]}, str(out / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[len(names) // 2:]}, str(out / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= len(names) // 2)}-of-00002.safetensors"
                                            for i, k in enumerate(names)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = model.cfg.to_hf_dict()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(config))
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (200, 72)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)
    return out, expected


def test_fp8_import_dequantises_exactly(fp8_folder):
    path, expected = fp8_folder
    model = hf.load(path)
    exported = hf.state_dict_to_hf(model)
    assert len(expected) > 20
    for k, want in expected.items():
        assert torch.equal(exported[k], want), k


def test_convert_dequantises_release(fp8_folder, tmp_path):
    path, expected = fp8_folder
    hf.convert(path, tmp_path / "fp32", dtype=torch.float32, max_shard_bytes=100_000)
    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "float32"
    index = json.loads((tmp_path / "fp32" / "model.safetensors.index.json").read_text())
    assert not any(k.endswith("_scale_inv") for k in index["weight_map"])
    assert "model.layers.2.shared_head.head.weight" in index["weight_map"]
    assert_same_state(hf.load(path).state_dict(), hf.load(tmp_path / "fp32").state_dict())
    hf.convert(path, tmp_path / "bf16")  # default bf16
    loaded = hf.load(tmp_path / "bf16", dtype=torch.bfloat16)
    exported = hf.state_dict_to_hf(loaded)
    for k, want in expected.items():
        assert torch.equal(exported[k], want.bfloat16()), k


def test_dequantize_rejects_wrong_scale_shape():
    with pytest.raises(MoeforgeError, match=r"scale_inv of shape \[2, 1\]"):
        hf.dequantize_fp8(torch.zeros(200, 72).to(torch.float8_e4m3fn), torch.ones(1, 1), name="w")


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path):
    model = our_model(num_nextn_predict_layers=1)
    out = tmp_path / "ckpt"
    hf.save(model, out)
    return out


def _rewrite(folder, change):
    """Apply change(dict of tensors) to a single-shard export."""
    shard = next(folder.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(shard))
    index = {"metadata": {}, "weight_map": {k: shard.name for k in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(MoeforgeError, match=r"missing 1 tensor\(s\): model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        hf.load(saved)


def test_missing_expert_is_named(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.2.mlp.experts.3.down_proj.weight"))  # the MTP block's
    with pytest.raises(MoeforgeError, match=r"model\.layers\.2\.mlp\.experts\.3\.down_proj\.weight"):
        hf.load(saved)


def test_unexpected_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.0.self_attn.mystery.weight": torch.zeros(2)}))
    with pytest.raises(MoeforgeError, match=r"unexpected tensor\(s\): model\.layers\.0\.self_attn\.mystery"):
        hf.load(saved)


def test_wrong_shape_is_named(saved):
    _rewrite(saved, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(MoeforgeError, match=r"'model\.norm\.weight' has shape \[7\]"):
        hf.load(saved)


def test_ignored_extras_load(saved):
    """MTP layers beyond num_nextn_predict_layers and rotary inv_freq buffers are ignored."""
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        t["model.layers.3.enorm.weight"] = torch.ones(64)
    _rewrite(saved, add)
    hf.load(saved)


def test_v2_checkpoint_without_routing_bias(saved):
    """DeepSeek-V2 (topk_method greedy) has no routing bias: it loads with a zero one; V3 must have it."""
    _rewrite(saved, lambda t: [t.pop(k) for k in list(t) if k.endswith("e_score_correction_bias")])
    with pytest.raises(MoeforgeError, match="e_score_correction_bias"):
        hf.load(saved)
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "topk_method": "greedy"}))
    model = hf.load(saved)
    assert all(not m.gate.e_score_correction_bias.any() for m in model.moe_layers())
    (saved / "config.json").write_text(json.dumps({**config, "topk_method": "group_limited_greedy", "n_group": 4,
                                                   "topk_group": 2}))
    with pytest.raises(MoeforgeError, match="group_limited_greedy"):
        hf.load(saved)


def test_save_warns_for_softmax_scoring(tmp_path):
    with pytest.warns(UserWarning, match="sigmoid"):
        hf.save(our_model(scoring_func="softmax"), tmp_path / "out")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MoeforgeError, match="no config.json"):
        hf.load(tmp_path)
    with pytest.raises(MoeforgeError, match="no such folder"):
        hf.load(tmp_path / "nope")


def test_bad_config_is_named(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(MoeforgeError, match=r"config\.json: not valid JSON"):
        hf.load(saved)
    (saved / "config.json").write_text(json.dumps({**ModelConfig(**tiny()).to_hf_dict(), "n_group": 3}))
    with pytest.raises(MoeforgeError, match=r"config\.json: model\.n_group"):
        hf.load(saved)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_is_named(saved, damage):
    shard = next(saved.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(b"\x07" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(MoeforgeError, match=rf"{shard.name}.*safetensors"):
        hf.load(saved)


def test_index_naming_missing_file(saved):
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoeforgeError, match="model-00009-of-00009.safetensors.*does not exist"):
        hf.load(saved)


def test_save_refuses_to_overwrite_user_files(tmp_path):
    model = our_model()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(MoeforgeError, match="not a previous moeforge export"):
        hf.save(model, user)
    assert os.listdir(user) == ["notes.txt"] and (user / "notes.txt").read_text() == "precious"
    # a transformers folder is not ours either
    hf_model().save_pretrained(tmp_path / "theirs")
    before = sorted(os.listdir(tmp_path / "theirs"))
    with pytest.raises(MoeforgeError, match="refusing"):
        hf.save(model, tmp_path / "theirs")
    assert sorted(os.listdir(tmp_path / "theirs")) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoeforgeError, match="not a folder"):
        hf.save(model, tmp_path / "file")
    # an empty folder is fine; no temporary folders are left behind
    (tmp_path / "empty").mkdir()
    hf.save(model, tmp_path / "empty")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_exported_files_get_the_umask_mode(tmp_path):
    """Every file of an export is readable as the umask allows (safetensors alone wrote its own 0600)."""
    old = os.umask(0o022)
    try:
        hf.save(our_model(), tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert any(name.endswith(".safetensors") for name in modes) and set(modes.values()) == {0o644}, modes


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = our_model()
    hf.save(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        hf.save(our_model(seed=5), tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # temporary folder removed
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # old export intact
