"""Hugging Face checkpoints: import and export in the layout of DeepSeek's V3 release.

On disk (the release, and what transformers reads and writes) every tensor has its own name:

    embed.weight                      <-> model.embed_tokens.weight
    norm.weight / head.weight         <-> model.norm.weight / lm_head.weight
    layers.{i}.attn_norm / ffn_norm   <-> model.layers.{i}.input_layernorm / post_attention_layernorm
    layers.{i}.attn.wq_a / q_norm / wq_b / wq / wkv_a / kv_norm / wkv_b / wo
        <-> model.layers.{i}.self_attn.q_a_proj / q_a_layernorm / q_b_proj / q_proj
            / kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj / o_proj
    layers.{i}.ffn.w1 / w3 / w2 (dense), ffn.shared_experts.w1 / w3 / w2
        <-> mlp.gate_proj / up_proj / down_proj, mlp.shared_experts.gate_proj / up_proj / down_proj
    layers.{i}.ffn.gate.weight / e_score_correction_bias <-> mlp.gate.weight / e_score_correction_bias
    layers.{i}.ffn.experts.w1[e] / w3[e] / w2[e]   (stacked [E, I, D] / [E, D, I] here)
        <-> mlp.experts.{e}.gate_proj.weight / up_proj.weight / down_proj.weight
    mtp.{k}.enorm / hnorm / eh_proj / norm <-> model.layers.{L+k}.enorm / hnorm / eh_proj / shared_head.norm
    mtp.{k}.block.*                        <-> model.layers.{L+k}.* (the names of a normal layer)

with L = num_hidden_layers. The release also stores the MTP layers' copies of the shared embedding
and head (model.layers.{L+k}.embed_tokens.weight, .shared_head.head.weight): export writes them,
import ignores them (moeforge's MTP modules use the main embedding and head).

Import also accepts the experts of a layer fused as transformers keeps them in memory
(mlp.experts.gate_up_proj [E, 2I, D] = cat(gate, up) and mlp.experts.down_proj [E, D, I]), and FP8
weights (float8 tensors with a companion `<name>_scale_inv` holding one FP32 scale per 128 x 128
block, ragged edges allowed), which are dequantised: w[i, j] * scale_inv[i // 128, j // 128].

Public API: `load`, `save`, `convert`, and the pure name mappings `state_dict_to_hf` / `hf_to_state_dict`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .config import ModelConfig
from .errors import MoeforgeError
from .fp8.stored import dequantize_blocks
from .model import Transformer, build_model

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
EXPORT_MARK = "exported_by"  # key in config.json that identifies a folder written by save/convert
DEFAULT_BLOCK = (128, 128)  # FP8 scale block of DeepSeek-V3's release
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))

# ---- names inside one block (relative to layers.{i}. / model.layers.{i}.) ----
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_EXPERT_NAMES = {"ffn.experts.w1": "gate_proj", "ffn.experts.w3": "up_proj", "ffn.experts.w2": "down_proj"}
_MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
              "norm.weight": "shared_head.norm.weight"}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "head.weight": "lm_head.weight"}
_MTP_DUPLICATES = {"embed.weight": "embed_tokens.weight", "head.weight": "shared_head.head.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


# --------------------------------------------------------------------------------------
# name mapping
# --------------------------------------------------------------------------------------
def _split(cfg: ModelConfig, name: str) -> tuple[str, str]:
    """Our name -> (HF prefix of its block or MTP module, name relative to the block), or ("", name) at the top."""
    parts = name.split(".")
    if parts[0] == "layers":
        return f"model.layers.{parts[1]}.", ".".join(parts[2:])
    if parts[0] == "mtp":
        return f"model.layers.{cfg.num_hidden_layers + int(parts[1])}.", ".".join(parts[2:])
    return "", name


def _hf_names(cfg: ModelConfig, name: str) -> list[str]:
    """HF names of one of our (non-expert) tensors: the primary name, then the release's MTP duplicates."""
    prefix, rest = _split(cfg, name)
    if not prefix:
        if name not in _TOP_NAMES:
            raise ValueError(f"no Hugging Face name for parameter '{name}'")
        dups = [f"model.layers.{cfg.num_hidden_layers + k}.{_MTP_DUPLICATES[name]}"
                for k in range(cfg.num_nextn_predict_layers)] if name in _MTP_DUPLICATES else []
        return [_TOP_NAMES[name]] + dups
    if name.startswith("mtp.") and not rest.startswith("block."):
        return [prefix + _MTP_NAMES[rest]]
    if rest.startswith("block."):
        rest = rest[len("block."):]
    if rest not in _BLOCK_NAMES:
        raise ValueError(f"no Hugging Face name for parameter '{name}'")
    return [prefix + _BLOCK_NAMES[rest]]


def _expert_names(cfg: ModelConfig, name: str) -> tuple[str, str] | None:
    """For a stacked expert tensor: (HF prefix 'model.layers.{i}.mlp.experts.', projection name); else None."""
    prefix, rest = _split(cfg, name)
    if rest.startswith("block."):
        rest = rest[len("block."):]
    if rest in _EXPERT_NAMES:
        return prefix + "mlp.experts.", _EXPERT_NAMES[rest]
    return None


def _export_items(cfg: ModelConfig, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs for one of our tensors; views, no copies."""
    experts = _expert_names(cfg, name)
    if experts is not None:
        prefix, proj = experts
        for e in range(tensor.shape[0]):
            yield f"{prefix}{e}.{proj}.weight", tensor[e]
    else:
        for hf_name in _hf_names(cfg, name):
            yield hf_name, tensor


def state_dict_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's persistent state under the release's names (views of the model's tensors, experts split)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for hf_name, t in _export_items(model.cfg, name, tensor.detach()):
            out[hf_name] = t
    return out


# ---- import plan: for each of our tensors, the HF pieces that fill it ----
# A piece is (HF name, index into our tensor, index into the HF tensor or None).
Piece = tuple[str, tuple, tuple | None]


def _expected_state(cfg: ModelConfig) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shapes and dtypes of the model's persistent state (built on the meta device: free)."""
    return {k: (v.shape, v.dtype) for k, v in build_model(cfg, "meta").state_dict().items()}


def _plan(cfg: ModelConfig, keys: Iterable[str], shapes: Mapping[str, torch.Size] | None = None,
          where: str = "checkpoint", allow_missing_bias: bool = False) -> dict[str, list[Piece]]:
    """Map the checkpoint's tensor names onto ours; raise on missing and unexpected tensors.

    `shapes` (HF name -> shape) lets the plan check the fused expert layout; `allow_missing_bias`
    lets checkpoints without a routing bias (DeepSeek-V2) load with a zero bias (pieces == []).
    """
    keys = set(keys)
    expected = _expected_state(cfg)
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    plan: dict[str, list[Piece]] = {}
    used: set[str] = set()
    missing: list[str] = []
    for name, (shape, _) in expected.items():
        experts = _expert_names(cfg, name)
        if experts is None:
            hf_names = _hf_names(cfg, name)
            primary = hf_names[0]
            used.update(hf_names[1:])  # MTP copies of embedding and head: ignored
            if primary in keys:
                plan[name] = [(primary, (), None)]
                used.add(primary)
            elif allow_missing_bias and name.endswith("e_score_correction_bias"):
                plan[name] = []
            else:
                missing.append(primary)
            continue
        prefix, proj = experts
        per_expert = [f"{prefix}{e}.{proj}.weight" for e in range(shape[0])]
        fused = prefix + ("down_proj" if proj == "down_proj" else "gate_up_proj")
        if all(n in keys for n in per_expert):
            plan[name] = [(n, (e,), None) for e, n in enumerate(per_expert)]
            used.update(per_expert)
        elif fused in keys:
            if proj == "down_proj":
                src = [(e,) for e in range(shape[0])]
            else:
                inter = shape[1]
                if shapes is not None and fused in shapes and tuple(shapes[fused][:2]) != (shape[0], 2 * inter):
                    raise MoeforgeError(f"{where}: '{fused}' has shape {list(shapes[fused])}, expected "
                                        f"[{shape[0]}, {2 * inter}, {shape[2]}] (gate and up projections fused)")
                half = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
                src = [(e, half) for e in range(shape[0])]
            plan[name] = [(fused, (e,), s) for e, s in enumerate(src)]
            used.add(fused)
        else:
            missing.extend(n for n in per_expert if n not in keys)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MoeforgeError(f"{where}: missing {len(missing)} tensor(s): {', '.join(missing[:5])}{more}")
    unexpected = []
    for key in sorted(keys - used):
        base = key[: -len("_scale_inv")] if key.endswith("_scale_inv") else key
        if base in used and base != key:
            continue  # FP8 scale of a tensor we read
        if base.endswith("inv_freq"):
            continue  # rotary buffers some exporters write
        m = _LAYER_RE.match(base)
        if m and int(m.group(1)) >= L + D:
            continue  # MTP layers beyond the ones we build
        unexpected.append(key)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise MoeforgeError(f"{where}: {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:5])}{more}")
    return plan


# --------------------------------------------------------------------------------------
# FP8
# --------------------------------------------------------------------------------------
def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                   name: str = "tensor") -> torch.Tensor:
    """FP32 weight[..., i, j] * scale_inv[..., i // block[0], j // block[1]] (ragged last blocks allowed)."""
    if weight.dim() < 2:
        raise MoeforgeError(f"{name}: FP8 tensor of shape {list(weight.shape)}; block scales need a matrix")
    rows, cols = weight.shape[-2:]
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    if tuple(scale_inv.shape) != (*weight.shape[:-2], nr, nc):
        raise MoeforgeError(f"{name}: FP8 weight of shape {list(weight.shape)} needs a scale_inv of shape "
                            f"{[*weight.shape[:-2], nr, nc]} ({block[0]}x{block[1]} blocks), got {list(scale_inv.shape)}")
    return dequantize_blocks(weight, scale_inv, block)


def _make_getter(raw: Callable[[str], torch.Tensor], keys: set[str], block: tuple[int, int],
                 where: str) -> Callable[[str], torch.Tensor]:
    """A reader of HF tensors by name that dequantises FP8 ones, caching the last tensor (fused experts)."""
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name in cache:
            return cache[name]
        t = raw(name)
        if t.dtype in FP8_DTYPES:
            scale_name = name + "_scale_inv"
            if scale_name not in keys:
                raise MoeforgeError(f"{where}: FP8 tensor '{name}' has no '{scale_name}' to dequantise it with")
            t = dequantize_fp8(t, raw(scale_name), block, f"{where}: '{name}'")
        cache.clear()
        cache[name] = t
        return t

    return get


def _fill(dst: torch.Tensor, pieces: list[Piece], get: Callable[[str], torch.Tensor], name: str, where: str) -> None:
    if not pieces:  # a routing bias the checkpoint does not have (DeepSeek-V2): zero
        dst.zero_()
        return
    for hf_name, dst_idx, src_idx in pieces:
        src = get(hf_name)
        if src_idx is not None:
            src = src[src_idx]
        target = dst[dst_idx]
        if src.shape != target.shape:
            raise MoeforgeError(f"{where}: '{hf_name}' has shape {list(src.shape)}, but the config needs "
                                f"{list(target.shape)} for {name}")
        target.copy_(src)


def hf_to_state_dict(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map HF-named tensors (release or fused-expert layout, FP8 allowed) onto a moeforge state dict.

    Strict: every tensor of `cfg`'s model must be there (MTP modules included), and every tensor given
    must be used, except the MTP copies of embedding and head, rotary inv_freq buffers and MTP layers
    beyond cfg.num_nextn_predict_layers. FP8 tensors come back dequantised in FP32, the rest in
    their own dtype (the routing bias always in FP32).
    """
    keys = set(tensors)
    plan = _plan(cfg, keys, {k: v.shape for k, v in tensors.items()}, where="state dict")
    get = _make_getter(tensors.__getitem__, keys, DEFAULT_BLOCK, "state dict")
    expected = _expected_state(cfg)
    out = {}
    for name, pieces in plan.items():
        shape, _ = expected[name]
        bias = name.endswith("e_score_correction_bias") or not pieces
        out[name] = torch.empty(shape, dtype=torch.float32 if bias else get(pieces[0][0]).dtype)
        _fill(out[name], pieces, get, name, "state dict")
    return out


# --------------------------------------------------------------------------------------
# reading a folder
# --------------------------------------------------------------------------------------
def _dtype(d: torch.dtype | str | None) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if d not in names:
        raise MoeforgeError(f"unknown dtype '{d}' (expected fp32, bf16 or fp16)")
    return names[d]


def _read_config(folder: Path) -> dict:
    if not folder.exists():
        raise MoeforgeError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise MoeforgeError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise MoeforgeError(f"{folder}: no {CONFIG_NAME} (not a Hugging Face model folder)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeforgeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise MoeforgeError(f"{path}: expected a JSON object")
    return d


def _config_from_hf(d: dict, where: str) -> ModelConfig:
    """ModelConfig from a config.json dict, refusing what the model cannot represent."""
    model_type, archs = d.get("model_type"), d.get("architectures") or []
    known_archs = {"DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"}
    if model_type not in (None, "deepseek_v3", "deepseek_v2", "kimi_k2") and not known_archs & set(archs):
        raise MoeforgeError(f"{where}: model_type '{model_type}' is not a DeepSeek-V2/V3 model")
    if d.get("moe_layer_freq", 1) != 1:
        raise MoeforgeError(f"{where}: moe_layer_freq={d['moe_layer_freq']} is not supported (every layer after "
                            "first_k_dense_replace must be MoE)")
    if d.get("topk_method") == "group_limited_greedy" and (d.get("n_group") or 1) > 1:
        raise MoeforgeError(f"{where}: topk_method 'group_limited_greedy' (groups scored by their best expert) is "
                            "not supported; moeforge scores a group by its top-2 experts (noaux_tc)")
    if d.get("num_key_value_heads") not in (None, d.get("num_attention_heads")):
        raise MoeforgeError(f"{where}: num_key_value_heads={d['num_key_value_heads']} differs from "
                            f"num_attention_heads={d.get('num_attention_heads')} (MLA has one key per head)")
    if d.get("rope_interleave") is False:
        raise MoeforgeError(f"{where}: rope_interleave=false is not supported (rotary pairs are interleaved)")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise MoeforgeError(f"{where}: {key}=true is not supported")
    d = dict(d)
    rope = d.get("rope_parameters")
    if isinstance(rope, dict):  # transformers 5 may add keys our validation does not know
        d["rope_parameters"] = {k: v for k, v in rope.items() if k != "partial_rotary_factor" or v == 1.0}
    if isinstance(d.get("rope_scaling"), dict) and "rope_type" in d["rope_scaling"] and "type" in d["rope_scaling"]:
        d["rope_scaling"] = {k: v for k, v in d["rope_scaling"].items() if k != "rope_type"}
    try:
        return ModelConfig.from_hf_dict(d)
    except MoeforgeError as e:
        raise MoeforgeError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise MoeforgeError(f"{where}: invalid config ({e})") from None


class _Folder:
    """The safetensors files of a model folder, opened lazily with safe_open (memory-mapped, tensor by tensor)."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.folder = folder
        self.stack = stack
        self.handles: dict[str, object] = {}
        self.where: dict[str, str] = {}  # tensor name -> file name
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as e:
                raise MoeforgeError(f"{index}: not a valid safetensors index ({e!r})") from None
            for fname in sorted(set(weight_map.values())):
                if not (folder / fname).is_file():
                    raise MoeforgeError(f"{index}: lists '{fname}', which does not exist")
                keys = set(self._open(fname).keys())
                listed = {k for k, f in weight_map.items() if f == fname}
                if listed - keys:
                    raise MoeforgeError(f"{folder / fname}: lacks '{sorted(listed - keys)[0]}', which {INDEX_NAME} "
                                        "places there")
            self.where = dict(weight_map)
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise MoeforgeError(f"{folder}: no *.safetensors files")
            for fname in files:
                for k in self._open(fname).keys():
                    if k in self.where:
                        raise MoeforgeError(f"{folder}: tensor '{k}' is in both {self.where[k]} and {fname}")
                    self.where[k] = fname

    def _open(self, fname: str):
        if fname not in self.handles:
            path = self.folder / fname
            try:
                self.handles[fname] = self.stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as e:  # SafetensorError, OSError, ...: the file is damaged
                raise MoeforgeError(f"{path}: not a readable safetensors file ({_oneline(e)})") from None
        return self.handles[fname]

    def keys(self) -> set[str]:
        return set(self.where)

    def shapes(self) -> dict[str, torch.Size]:
        out = {}
        for k, f in self.where.items():
            try:
                out[k] = torch.Size(self._open(f).get_slice(k).get_shape())
            except Exception as e:
                raise MoeforgeError(f"{self.folder / f}: cannot read '{k}' ({_oneline(e)})") from None
        return out

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype of a tensor ("F8_E4M3", "BF16", ...) without reading it."""
        return self._open(self.where[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        fname = self.where[name]
        try:
            return self._open(fname).get_tensor(name)
        except Exception as e:
            raise MoeforgeError(f"{self.folder / fname}: cannot read '{name}' ({_oneline(e)})") from None


def _oneline(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _fp8_block(d: dict) -> tuple[int, int]:
    qc = d.get("quantization_config") or {}
    block = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
        return int(block[0]), int(block[1])
    return DEFAULT_BLOCK


def _mtp_layers_present(cfg: ModelConfig, keys: set[str]) -> int:
    """How many of the config's MTP modules the checkpoint holds (counting until the first absent one from the end)."""
    n = cfg.num_nextn_predict_layers
    layers = {int(m.group(1)) for k in keys if (m := _LAYER_RE.match(k))}
    while n > 0 and cfg.num_hidden_layers + n - 1 not in layers:
        n -= 1
    return n


def _resolve(folder: Path, d: dict, keys: set[str], mtp: int | None) -> ModelConfig:
    where = str(folder)
    cfg = _config_from_hf(d, f"{folder / CONFIG_NAME}")
    if mtp is None:
        present = _mtp_layers_present(cfg, keys)
        if present < cfg.num_nextn_predict_layers:
            warnings.warn(f"{where}: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
                          f"checkpoint holds {present} MTP layer(s) (transformers' save_pretrained drops them); "
                          f"loading with {present}", stacklevel=3)
            cfg = replace(cfg, num_nextn_predict_layers=present)
    else:
        if mtp < 0:
            raise MoeforgeError(f"mtp must be >= 0, got {mtp}")
        cfg = replace(cfg, num_nextn_predict_layers=mtp)
    return cfg


def _allow_missing_bias(d: dict) -> bool:
    """DeepSeek-V2 checkpoints route without a bias (topk_method greedy): a zero bias is the same function."""
    return d.get("topk_method", "noaux_tc") != "noaux_tc" or d.get("model_type") == "deepseek_v2"


def _open_source(folder: Path, stack: ExitStack, mtp: int | None):
    """What load and convert share: (config.json dict, ModelConfig, tensor plan, tensor getter, files)."""
    d = _read_config(folder)
    files = _Folder(folder, stack)
    keys = files.keys()
    cfg = _resolve(folder, d, keys, mtp)
    plan = _plan(cfg, keys, files.shapes(), where=str(folder), allow_missing_bias=_allow_missing_bias(d))
    return d, cfg, plan, _make_getter(files.get, keys, _fp8_block(d), str(folder)), files


def _fp8_pieces(plan: dict[str, list[Piece]], files: _Folder) -> set[str]:
    """Our names whose every piece is a whole FP8 E4M3 tensor with its scale (release layout: kept in FP8)."""
    keys = files.keys()
    return {name for name, pieces in plan.items()
            if pieces and all(src_idx is None and f"{hf_name}_scale_inv" in keys
                              and files.dtype_name(hf_name) == "F8_E4M3" for hf_name, _, src_idx in pieces)}


def _fill_fp8(module_state: dict[str, torch.Tensor], name: str, pieces: list[Piece], files: _Folder, where: str) -> None:
    """Copy FP8 codes and their block scales as they are (no dequantisation) into a kept tensor."""
    codes, scales = module_state[name], module_state[f"{name}_scale_inv"]
    for hf_name, dst_idx, _ in pieces:
        for src, dst, what in ((files.get(hf_name), codes[dst_idx], hf_name),
                               (files.get(f"{hf_name}_scale_inv"), scales[dst_idx], f"{hf_name}_scale_inv")):
            if src.shape != dst.shape:
                raise MoeforgeError(f"{where}: '{what}' has shape {list(src.shape)}, but the config needs "
                                    f"{list(dst.shape)} for {name}")
            dst.copy_(src)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
         mtp: int | None = None, keep_fp8: bool = False) -> Transformer:
    """Build a moeforge Transformer from a Hugging Face DeepSeek-V3 (or V2) folder.

    path: a folder with config.json and *.safetensors (one file, or shards listed in
    model.safetensors.index.json). Tensors are read one at a time (memory-mapped) and copied into
    a model built on the meta device and materialised on `device` in `dtype` (the routing bias
    stays FP32). FP8 tensors are dequantised with their `_scale_inv` blocks.
    mtp: number of MTP modules to build; None = as many as config.json says, or fewer when the
    checkpoint holds none for the last ones (transformers' save_pretrained drops MTP layers; a
    warning says so); MTP layers beyond that number are ignored.
    keep_fp8: weights stored in FP8 (E4M3 with block scales, release layout) stay in FP8 in memory
    (moeforge.fp8.stored: dequantised when their module runs; for inference, not trainable).
    Returns the model in eval mode. Raises MoeforgeError for any problem with the folder.
    """
    folder = Path(path)
    dtype = _dtype(dtype)
    with ExitStack() as stack:
        d, cfg, plan, get, files = _open_source(folder, stack, mtp)
        kept: set[str] = set()

        def keep(model: Transformer) -> None:
            nonlocal kept
            if keep_fp8:
                from .fp8.stored import keep_in_fp8

                kept = keep_in_fp8(model, _fp8_pieces(plan, files), _fp8_block(d))

        model = _empty_model(cfg, device, dtype, before_materialising=keep)
        state = model.state_dict()
        with torch.no_grad():
            for name, pieces in plan.items():
                if name in kept:
                    _fill_fp8(state, name, pieces, files, str(folder))
                else:
                    _fill(state[name], pieces, get, name, str(folder))
    return model.eval()


def _empty_model(cfg: ModelConfig, device, dtype: torch.dtype, before_materialising=None) -> Transformer:
    """meta -> dtype -> (before_materialising(model): module swaps) -> to_empty on device."""
    model = build_model(cfg, "meta")
    if dtype != torch.float32:
        model.to(dtype)
        for moe in model.moe_layers():  # the routing bias and expert counts stay FP32
            moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.float()
            moe.tokens_per_expert = moe.tokens_per_expert.float()
    if before_materialising is not None:  # after the dtype cast, which would also cast FP8 buffers
        before_materialising(model)
    model = model.to_empty(device=device)
    for moe in model.moe_layers():
        moe.tokens_per_expert.zero_()
    return model


# --------------------------------------------------------------------------------------
# writing a folder
# --------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (folders: where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # e.g. Windows cannot open folders
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


class _ShardWriter:
    """Collects tensors (copied to CPU in the target dtype) and writes them as safetensors shards of bounded size."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.names: set[str] = set()
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> None:
        if name in self.names:
            raise ValueError(f"tensor '{name}' written twice")
        self.names.add(name)
        dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * dtype.itemsize
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        copy = torch.empty(tensor.shape, dtype=dtype, device="cpu")
        copy.copy_(tensor.detach())  # own storage: no sharing between the tensors of a file
        self.pending[name] = copy
        self.pending_bytes += nbytes
        self.total += nbytes

    def _tmp_name(self, i: int) -> Path:
        return self.folder / f"shard-{i:05d}.partial"

    def _flush(self) -> None:
        if not self.pending:
            return
        path = self._tmp_name(len(self.shards) + 1)
        save_file(self.pending, str(path), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; the folder's other files get the umask's mode
        _fsync(path)
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp_name(i), self.folder / fname)
            weight_map.update((k, fname) for k in names)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(self.folder / INDEX_NAME, index)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _is_previous_export(folder: Path) -> bool:
    names = [p.name for p in folder.iterdir()]
    if CONFIG_NAME not in names:
        return False
    if not all(n in (CONFIG_NAME, INDEX_NAME, SINGLE_NAME, *TOKENIZER_NAMES) or SHARD_RE.fullmatch(n) for n in names):
        return False
    if not all((folder / n).is_file() and not (folder / n).is_symlink() for n in names):
        return False
    try:
        return EXPORT_MARK in json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _check_destination(dst: Path) -> None:
    if dst.is_symlink():
        raise MoeforgeError(f"{dst}: is a symbolic link; refusing to replace it")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise MoeforgeError(f"{dst}: exists and is not a folder")
    if any(dst.iterdir()) and not _is_previous_export(dst):
        raise MoeforgeError(f"{dst}: folder is not empty and is not a previous moeforge export; refusing to overwrite it")


def _write_atomically(dst: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run write(tmp) on a temporary sibling folder, fsync, then move it to dst (replacing a previous export)."""
    dst = Path(dst).absolute()
    _check_destination(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync(tmp)
        _check_destination(dst)  # again: the folder may have changed while we wrote
        if dst.exists() and not any(dst.iterdir()):
            dst.rmdir()
        if dst.exists():  # a previous export: swap it out, then delete it
            old = dst.parent / f".{dst.name}.old-{tag}"
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
        _fsync(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for an export: cfg.to_hf_dict() plus what transformers 5 reads (dtype, rope_parameters)."""
    d = cfg.to_hf_dict()
    d["torch_dtype"] = d["dtype"] = _dtype_name(dtype)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        scaling = {k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}
        rope = {"rope_type": cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type", "yarn")),
                "rope_theta": cfg.rope_theta, **scaling}
    d["rope_parameters"] = rope  # transformers 5's name; `rope_scaling` + `rope_theta` stay for older readers
    d[EXPORT_MARK] = f"moeforge {__version__}"
    return d


FP8_PROJECTIONS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj", "eh_proj")
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]}


def _fp8_eligible(name: str, t: torch.Tensor) -> bool:
    """The Linear weights DeepSeek-V3 keeps in FP8: projections of attention, FFNs, experts and MTP;
    not the embedding, output head, router or norms."""
    return t.dim() == 2 and name.endswith(".weight") and name.rsplit(".", 2)[-2] in FP8_PROJECTIONS


TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json")  # an export's tokenizer (save's `tokenizer`)


def _write_tokenizer(folder: Path, path: str | os.PathLike, context: int) -> None:
    """The model's tokenizer beside its weights, as transformers' AutoTokenizer reads it: the
    tokenizer.json as it is (moeforge's tokenizers are the `tokenizers` library's files) and the
    tokenizer_config.json beside it (an imported model's own, with its chat template), or one naming
    the fast tokenizer class, the end-of-text token and moeforge's chat template for this tokenizer
    (posttrain/chat.py), with which apply_chat_template gives the ids moeforge's SFT trains on."""
    from .data.tokenizer import load_tokenizer
    from .posttrain.chat import CHAT_TEMPLATES, ChatTemplate

    tok = load_tokenizer(path)
    shutil.copyfile(tok.path, folder / TOKENIZER_NAMES[0])
    own = Path(tok.path).parent / TOKENIZER_NAMES[1]
    if own.is_file():
        shutil.copyfile(own, folder / TOKENIZER_NAMES[1])
        return
    _write_json(folder / TOKENIZER_NAMES[1], {"tokenizer_class": "PreTrainedTokenizerFast",
                                               "eos_token": tok.eos_token,
                                               "model_max_length": context,
                                               "chat_template": CHAT_TEMPLATES[ChatTemplate(tok).name]})


def save(model: Transformer, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
         dtype: torch.dtype | str | None = None, fp8: bool = False,
         tokenizer: str | os.PathLike | None = None) -> None:
    """Write `model` as a Hugging Face DeepSeek-V3 folder (config.json, safetensors shards, index;
    with `tokenizer`, a tokenizer.json file, also tokenizer.json and tokenizer_config.json).

    Tensors are written in `dtype` (None: as they are), except the routing bias, which stays FP32
    as in the release. MTP modules go to model.layers.{L+k} with the release's copies of the
    embedding and head. The folder is written next to `path` under a temporary name, fsynced and
    renamed into place; an existing non-empty `path` is only replaced if it is a previous export.
    With `fp8`, the Linear weights are written as the official release has them: float8_e4m3fn
    plus an FP32 `<name>_scale_inv` per 128x128 block, and a `quantization_config` in config.json.
    """
    dtype = _dtype(dtype)
    if max_shard_bytes <= 0:
        raise MoeforgeError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    cfg = model.cfg
    if cfg.scoring_func != "sigmoid":
        warnings.warn("transformers' DeepseekV3 always scores experts with a sigmoid; this model uses "
                      f"{cfg.scoring_func!r} and will not compute the same function there", stacklevel=2)
    tensors = state_dict_to_hf(model)
    main_dtype = dtype or model.embed.weight.dtype

    def write(tmp: Path) -> None:
        from .fp8 import quantize

        writer = _ShardWriter(tmp, max_shard_bytes)
        for name, t in tensors.items():
            if fp8 and _fp8_eligible(name, t):
                q, scale_inv = quantize(t.detach().float(), (128, 128))
                writer.add(name, q, None)
                writer.add(f"{name}_scale_inv", scale_inv, None)
            else:
                writer.add(name, t, None if name.endswith("e_score_correction_bias") else dtype)
        writer.finish()
        config = hf_config(cfg, main_dtype)
        if fp8:
            config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        _write_json(tmp / CONFIG_NAME, config)
        if tokenizer is not None:
            _write_tokenizer(tmp, tokenizer, cfg.max_position_embeddings)

    _write_atomically(path, write)


def import_run(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A moeforge run folder from a Hugging Face DeepSeek-V3 (or V2) folder, so that every command that
    takes --checkpoint (generate, eval, sft, grpo, score, sft-data --teacher, convert) reads it:
    OUT/checkpoints/step_0000000 holds the weights in FP32 (FP8 ones dequantised, as `load` reads
    them) and a config whose model part comes from config.json; OUT/tokenizer.json is the folder's
    tokenizer, which that config names (the default tokenizer when the folder has none and the
    default fits the vocabulary). `out` must be new or empty; it is written under a temporary name
    and renamed, so a failure leaves nothing. Returns the checkpoint folder."""
    from .config import Config
    from .data.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer
    from .train.checkpoint import save_checkpoint

    src, out = Path(src), Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeforgeError(f"{out}: exists and is not an empty folder; refusing to write a run there")
    model = load(src, "cpu", torch.float32)
    cfg = Config(model=model.cfg)
    cfg.train.seq_len = min(cfg.train.seq_len, cfg.model.max_position_embeddings)
    has_tokenizer = (src / "tokenizer.json").is_file()
    tok = Tokenizer(src / "tokenizer.json" if has_tokenizer else DEFAULT_TOKENIZER_PATH)
    if tok.vocab_size > cfg.model.vocab_size:
        which = f"'{src / 'tokenizer.json'}'" if has_tokenizer else "moeforge's default tokenizer (the folder has none)"
        raise MoeforgeError(f"{which} has {tok.vocab_size} tokens, more than the model's vocab_size "
                            f"{cfg.model.vocab_size}")
    if has_tokenizer:
        cfg.train.tokenizer = str(out / "tokenizer.json")
    cfg.model.eos_token_id = tok.eos_id  # (as a run with this tokenizer sets it: `train --init` compares it)

    def write(tmp: Path) -> None:
        if has_tokenizer:
            for name in TOKENIZER_NAMES:  # (the tokenizer_config.json too: an export carries it on)
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
        save_checkpoint(tmp / "checkpoints", 0, cfg, model.state_dict(), {}, {"step": 0, "tokens": 0}, 1)

    _write_atomically(out, write)
    return out / "checkpoints" / "step_0000000"


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | str = torch.bfloat16,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Dequantise a Hugging Face DeepSeek-V3 folder (e.g. the official FP8 release) into a clean one.

    Reads `src` as `load` does (FP8 weights dequantised with their 128x128 scales, fused experts
    accepted, names and shapes checked against config.json) and writes `dst` as `save` does, in
    `dtype` (bf16 or fp32; the routing bias stays FP32): per-expert tensors, MTP layers with their
    embedding / head copies, sharded safetensors with an index, written atomically. It streams
    tensor by tensor and never builds the model, so it works for the 671B release in little memory.
    config.json is the source's without its quantization_config and auto_map (remote code), with
    the new dtype and the number of MTP layers actually written.
    """
    src, dtype = Path(src), _dtype(dtype)
    with ExitStack() as stack:
        d, cfg, plan, get, _ = _open_source(src, stack, None)
        expected = _expected_state(cfg)

        def write(tmp: Path) -> None:
            writer = _ShardWriter(tmp, max_shard_bytes)
            for name, pieces in plan.items():
                out_dtype = torch.float32 if name.endswith("e_score_correction_bias") else dtype
                experts = _expert_names(cfg, name)
                if experts is None:  # one tensor, maybe with MTP copies
                    t = torch.zeros(expected[name][0], dtype=out_dtype)
                    _fill(t, pieces, get, name, str(src))
                    for hf_name, view in _export_items(cfg, name, t):
                        writer.add(hf_name, view, out_dtype)
                else:  # one expert at a time
                    prefix, proj = experts
                    shape = expected[name][0][1:]
                    for src_name, (e,), src_idx in pieces:
                        t = torch.empty(shape, dtype=out_dtype)
                        _fill(t, [(src_name, (), src_idx)], get, f"{name}[{e}]", str(src))
                        writer.add(f"{prefix}{e}.{proj}.weight", t, out_dtype)
            writer.finish()
            out = {k: v for k, v in d.items() if k not in ("quantization_config", "auto_map")}
            out["torch_dtype"] = out["dtype"] = _dtype_name(dtype)
            if "num_nextn_predict_layers" in out or cfg.num_nextn_predict_layers:
                out["num_nextn_predict_layers"] = cfg.num_nextn_predict_layers
            out.pop("num_mtp_layers", None)
            out[EXPORT_MARK] = f"moeforge {__version__}"
            _write_json(tmp / CONFIG_NAME, out)

        _write_atomically(dst, write)
