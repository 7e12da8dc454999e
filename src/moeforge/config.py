"""Configuration: flat dataclasses, presets as TOML files, key=value overrides, validation.

ModelConfig's field names are those of Hugging Face's DeepseekV3Config, so a config.json maps
onto it one to one (see `ModelConfig.from_hf_dict`). TrainConfig holds everything about a run.
All validation lives here: a bad value fails when the config is built, with one line naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import MoeforgeError

PRESET_DIR = "presets"


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture. Names follow transformers' DeepseekV3Config."""

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768  # dense SwiGLU FFN of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 128  # each routed / shared expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # MLA
    q_lora_rank: int = 0  # 0: plain query projection (DeepSeek-V2-Lite); HF writes None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeekMoE
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    # multi-token prediction depth D
    num_nextn_predict_layers: int = 1
    # positions, norms, init
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 0

    # ---- derived quantities (not fields, so they can never disagree with the fields) ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Map a DeepseekV3 (or V2) config.json onto ModelConfig; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        if d.get("q_lora_rank") is None:
            kw["q_lora_rank"] = 0
        if d.get("n_group") is None:
            kw["n_group"] = 1
        if d.get("topk_group") is None:
            kw["topk_group"] = 1
        if isinstance(d.get("eos_token_id"), list):
            kw["eos_token_id"] = d["eos_token_id"][0]
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        # YaRN: DeepSeek's own files write `rope_scaling`; newer transformers write
        # `rope_parameters` (which also carries rope_theta and names the type `rope_type`).
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        if isinstance(rope, dict):
            rope = dict(rope)
            if "rope_theta" in rope:
                kw.setdefault("rope_theta", rope.pop("rope_theta"))
            rtype = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
            kw["rope_scaling"] = None if rtype == "default" else {"type": rtype, **rope}
        cfg = cls(**kw)
        if d.get("original_max_position_embeddings") and cfg.rope_scaling is not None:
            cfg.rope_scaling.setdefault("original_max_position_embeddings", d["original_max_position_embeddings"])
        validate_model(cfg)
        return cfg

    def to_hf_dict(self) -> dict:
        """config.json in the layout of DeepSeek's release (loadable by transformers)."""
        d = dataclasses.asdict(self)
        d["q_lora_rank"] = self.q_lora_rank or None
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            moe_layer_freq=1,
            topk_method="noaux_tc",
            attention_bias=False,
            attention_dropout=0.0,
            rope_interleave=True,
            torch_dtype="float32",
        )
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        return d


@dataclass
class TrainConfig:
    """One training run: optimisation, schedules, data, logging, checkpoints."""

    steps: int = 1000
    seq_len: int = 256
    batch_size: int = 16  # global: sequences per optimizer step
    micro_batch_size: int = 0  # 0: no gradient accumulation (= batch_size)
    batch_size_start: int = 0  # >0: ramp the batch size from this value ...
    batch_ramp_steps: int = 0  # ... to batch_size over this many steps (DeepSeek-V3 grew its batch)
    # AdamW (DeepSeek-V3: 0.9 / 0.95 / 0.1, clip 1.0)
    optimizer: str = "adamw"  # adamw | muon: Muon for the blocks' matrices, AdamW for the rest (train/muon.py)
    muon_momentum: float = 0.95
    muon_lr: float = 0.0  # >0: Muon's peak lr (scheduled like lr); 0: train.lr, as for the AdamW parameters
    lr: float = 2.2e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "wsd"  # "wsd": warmup, constant, cosine decay (DeepSeek-V3); "cosine": warmup then cosine
    decay_start: float = 0.67  # wsd: fraction of steps after which the cosine decay starts
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # initialisation: parts that start at zero instead of normal(0, model.initializer_range), comma list
    # of proj (matrices writing into the residual stream: wo and every w2) and head (docs/training.md)
    zero_init: str = ""
    # DeepSeekMoE balancing and MTP
    bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free bias update
    bias_update_stop: float = 0.97  # fraction of steps after which gamma is 0 (paper: last 500B of 14.8T tokens)
    balance_alpha: float = 0.0001  # complementary sequence-wise balance loss weight
    mtp_lambda: float = 0.3  # MTP loss weight ...
    mtp_lambda_late: float = 0.1  # ... and after `mtp_lambda_switch` of the steps (paper: 10T of 14.8T tokens)
    mtp_lambda_switch: float = 0.68
    # numerics and placement
    precision: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16 | fp8 (DeepSeek-V3's FP8 GEMMs)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1234
    # speed and memory (train/speed.py, model/head.py); none of them changes the function computed
    # torch.compile each decoder block (regional compilation); "auto": on a CUDA device where it applies
    # (train/speed.py compile_on)
    compile: bool | str = False
    recompute: str = ""  # parts recomputed in backward: comma list of norm, mla_up, swiglu, expert_casts; or full
    loss_chunk: int = 0  # >0: cross-entropy over this many tokens at a time (logits never in full)
    ema_decay: float = 0.0  # >0: keep an EMA of the parameters in CPU memory, updated off the step
    ema_every: int = 1  # update the EMA every this many steps (with decay ** ema_every)
    document_mask: bool = False  # attention stays within the documents packed into a sequence (EOS-separated)
    fp8_weight_cache: bool = True  # fp8: quantise each weight once per step, not once per micro-batch
    fp8_weight_prefetch: bool = True  # fp8, one GPU: quantise the weights right after the optimizer step
    # fp8: fp32 | bf16: the dtype of the norms in front of FP8 GEMMs (fp8.FP8Recipe; this one changes the rounding)
    fp8_norm_output: str = "fp32"
    fp8_accumulate_wgrad: bool = True  # fp8, GPU: the experts' Wgrad adds into the micro-batches' .grad itself
    adam_moments: str = "fp32"  # fp32 | bf16: AdamW's two moments stored in BF16 (DeepSeek-V3's memory saver)
    # capture the whole optimizer step as one CUDA graph, replay it (train/graph.py); "auto": where a
    # captured step can run (one process, CUDA, AdamW, ...: graph.graph_on), else eager steps
    cuda_graph: bool | str = False
    # a checkpoint or run folder whose weights (routing biases included) a new run starts from instead of
    # the initialisation: continued pre-training (`moeforge train --init`); its model config must be this one
    init_from: str = ""
    # data
    data: str = ""  # "" = the embedded default corpus
    tokenizer: str = ""  # "" = the default tokenizer shipped with moeforge
    fim_rate: float = 0.0  # fill-in-the-middle rate (DeepSeek-V3: 0.1)
    # logging, evaluation and checkpoints
    out: str = "runs/default"
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 20
    eval_stride: int = 0  # 0 < N < seq_len: overlapping evaluation windows every N tokens (more context per target)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # checkpoints written in the background (train/checkpoint.py): "auto" in one process (a thread
    # writes a CPU copy), in step under torchrun; true: under torchrun too (DCP's asynchronous save);
    # false: always in step
    async_checkpoint: bool | str = "auto"
    sample_tokens: int = 64

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def zero_init_parts(self) -> list[str]:
        """'proj,head' -> ['proj', 'head']; '' or 'none' -> []."""
        return _comma_list(self.zero_init)

    @property
    def recompute_parts(self) -> list[str]:
        """'norm,swiglu' -> ['norm', 'swiglu']; '' or 'none' -> []."""
        return _comma_list(self.recompute)


RECOMPUTE_PARTS = ("norm", "mla_up", "swiglu", "expert_casts", "full")
ZERO_INIT_PARTS = ("proj", "head")  # model/transformer.py zero_initialised


def _comma_list(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip() and p.strip() != "none"]


@dataclass
class ParallelConfig:
    """Layout over torch.distributed ranks: world size = pp x dp x ep (DeepSeek-V3: no tensor parallelism).

    Expert parallelism folds into data parallelism: attention and dense parts are data parallel over
    all dp x ep ranks of a pipeline stage; routed experts are sharded over ep and replicated over dp.
    """

    pp: int = 1  # pipeline stages (ranks); DualPipeV puts two stages on each
    ep: int = 1  # expert-parallel ranks
    dp: int = 0  # data-parallel replicas of the experts; 0: world size / (pp x ep)
    schedule: str = "1f1b"  # pipeline schedule: 1f1b | interleaved1f1b | zbv | dualpipev
    layout: str = ""  # decoder layers per pipeline stage, e.g. "3,3,2,2"; "": as even as possible
    sharding: str = "none"  # data parallel: none (replicated, all-reduce) | zero1 (AdamW state partitioned) | zero2 | full (FSDP2)
    dispatch_fp8: bool = False  # send dispatched activations in FP8 with 1x128 scales
    overlap_dispatch: bool = True  # compute the shared experts while the dispatched tokens travel


SECTIONS = ("model", "train", "parallel")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        return dict_to_toml(self.to_dict())


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    root = resources.files("moeforge") / PRESET_DIR
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def read_preset(name: str) -> dict:
    path = resources.files("moeforge") / PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise MoeforgeError(f"unknown preset '{name}' (choose from: {', '.join(preset_names())})")
    return tomllib.loads(path.read_text())


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MoeforgeError(f"config file '{p}' does not exist")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MoeforgeError(f"config file '{p}' is not valid TOML: {e}") from None


def _coerce(name: str, text: str, typ: Any) -> Any:
    """Parse an override's text by the type of the field it sets."""
    t = str(typ)
    try:
        if t in ("int", "<class 'int'>"):
            return int(text)
        if t in ("float", "<class 'float'>"):
            return float(text)
        if t in ("bool", "<class 'bool'>", "bool | str"):
            low = text.lower()
            if t == "bool | str" and low == "auto":
                return "auto"
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if "dict" in t:
            return None if text.lower() in ("none", "null", "") else json.loads(text)
        return text
    except (ValueError, json.JSONDecodeError):
        what = "true, false or auto" if t == "bool | str" else t.replace('<class ', '').rstrip('>')
        raise MoeforgeError(f"{name}: cannot parse '{text}' as {what}") from None


def _apply(section_obj: Any, section: str, values: dict, from_text: bool = False) -> None:
    types = {f.name: f.type for f in fields(section_obj)}
    for key, value in values.items():
        if key not in types:
            raise MoeforgeError(f"unknown setting '{section}.{key}'")
        if from_text:
            value = _coerce(f"{section}.{key}", value, types[key])
        setattr(section_obj, key, value)


def load_config(preset: str | None = None, path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset, then TOML file, then key=value overrides, each on top of the last; validated."""
    cfg = Config()
    layers = []
    if preset:
        layers.append(read_preset(preset))
    if path:
        layers.append(read_toml(path))
    for data in layers:
        for section, values in data.items():
            if section not in SECTIONS or not isinstance(values, dict):
                raise MoeforgeError(f"unknown config section '{section}' (expected [model], [train], [parallel])")
            _apply(getattr(cfg, section), section, values)
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Set `section.name=value` items (value parsed by the field's type), then validate."""
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise MoeforgeError(f"override '{item}' must look like SECTION.NAME=VALUE with SECTION model, train or parallel")
        _apply(getattr(cfg, section), section, {name: value}, from_text=True)
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    for section in SECTIONS:
        _apply(getattr(cfg, section), section, d.get(section, {}))
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------
# validation: one line per problem, naming the field
# --------------------------------------------------------------------------------------
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise MoeforgeError(msg)


def _check_types(obj: Any, section: str) -> None:
    for f in fields(obj):
        v = getattr(obj, f.name)
        t = str(f.type)
        ok = {
            "int": isinstance(v, int) and not isinstance(v, bool),
            "float": isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": isinstance(v, bool),
            "str": isinstance(v, str),
            "bool | str": isinstance(v, bool) or v == "auto",  # a switch: true, false or "auto"
        }.get(t, v is None or isinstance(v, dict))
        expected = "true, false or \"auto\"" if t == "bool | str" else t.split(' ')[0]
        _check(ok, f"{section}.{f.name}: expected {expected}, got {v!r}")
        if t == "float":
            _check(math.isfinite(v), f"{section}.{f.name}: must be finite, got {v!r}")


def validate_model(m: ModelConfig) -> None:
    _check_types(m, "model")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"):
        _check(getattr(m, name) > 0, f"model.{name}: must be positive, got {getattr(m, name)}")
    for name in ("q_lora_rank", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
        _check(getattr(m, name) >= 0, f"model.{name}: must be >= 0, got {getattr(m, name)}")
    _check(m.qk_rope_head_dim % 2 == 0, f"model.qk_rope_head_dim: must be even (rotary pairs), got {m.qk_rope_head_dim}")
    _check(m.first_k_dense_replace <= m.num_hidden_layers,
           f"model.first_k_dense_replace: {m.first_k_dense_replace} exceeds num_hidden_layers={m.num_hidden_layers}")
    _check(m.n_routed_experts % m.n_group == 0,
           f"model.n_group: {m.n_group} does not divide n_routed_experts={m.n_routed_experts}")
    _check(m.topk_group <= m.n_group, f"model.topk_group: {m.topk_group} exceeds n_group={m.n_group}")
    _check(m.num_experts_per_tok <= m.n_routed_experts,
           f"model.num_experts_per_tok: {m.num_experts_per_tok} exceeds n_routed_experts={m.n_routed_experts}")
    per_group = m.n_routed_experts // m.n_group
    _check(m.num_experts_per_tok <= m.topk_group * per_group,
           f"model.num_experts_per_tok: {m.num_experts_per_tok} exceeds the {m.topk_group * per_group} experts "
           f"in topk_group={m.topk_group} groups")
    _check(m.n_group == 1 or per_group >= 2,
           f"model.n_group: groups need at least 2 experts (a group scores by its top-2), got {per_group}")
    _check(m.scoring_func in ("sigmoid", "softmax"), f"model.scoring_func: expected sigmoid or softmax, got {m.scoring_func!r}")
    _check(m.hidden_act == "silu", f"model.hidden_act: only 'silu' (SwiGLU) is supported, got {m.hidden_act!r}")
    _check(m.routed_scaling_factor > 0, f"model.routed_scaling_factor: must be positive, got {m.routed_scaling_factor}")
    _check(m.rms_norm_eps > 0, f"model.rms_norm_eps: must be positive, got {m.rms_norm_eps}")
    _check(m.initializer_range > 0, f"model.initializer_range: must be positive, got {m.initializer_range}")
    _check(m.rope_theta > 0, f"model.rope_theta: must be positive, got {m.rope_theta}")
    _check(not m.tie_word_embeddings, "model.tie_word_embeddings: DeepSeek-V3 unties them; true is not supported")
    _check(0 <= m.eos_token_id < m.vocab_size, f"model.eos_token_id: {m.eos_token_id} is outside the vocabulary")
    if m.rope_scaling is not None:
        rs = m.rope_scaling
        _check(rs.get("type", rs.get("rope_type")) == "yarn",
               f"model.rope_scaling: only YaRN scaling is supported, got type {rs.get('type', rs.get('rope_type'))!r}")
        _check(isinstance(rs.get("factor"), (int, float)) and rs["factor"] >= 1,
               f"model.rope_scaling: 'factor' must be a number >= 1, got {rs.get('factor')!r}")
        _check(isinstance(rs.get("original_max_position_embeddings"), int) and rs["original_max_position_embeddings"] > 0,
               "model.rope_scaling: needs a positive integer 'original_max_position_embeddings'")
        unknown = set(rs) - {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}
        _check(not unknown, f"model.rope_scaling: unknown keys {sorted(unknown)}")


def validate_train(t: TrainConfig, m: ModelConfig) -> None:
    _check_types(t, "train")
    for name in ("steps", "seq_len", "batch_size", "log_every", "keep_checkpoints"):
        _check(getattr(t, name) > 0, f"train.{name}: must be positive, got {getattr(t, name)}")
    for name in ("micro_batch_size", "batch_size_start", "batch_ramp_steps", "warmup_steps", "eval_every",
                 "eval_batches", "eval_stride", "checkpoint_every", "sample_tokens"):
        _check(getattr(t, name) >= 0, f"train.{name}: must be >= 0, got {getattr(t, name)}")
    _check(t.seq_len <= m.max_position_embeddings,
           f"train.seq_len: {t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    _check(t.batch_size % t.micro_batch == 0,
           f"train.micro_batch_size: {t.micro_batch} does not divide train.batch_size={t.batch_size}")
    if t.batch_size_start:
        _check(t.batch_size_start <= t.batch_size and t.batch_size_start % t.micro_batch == 0,
               f"train.batch_size_start: must be a multiple of the micro batch ({t.micro_batch}) and <= batch_size")
    _check(t.lr > 0, f"train.lr: must be positive, got {t.lr}")
    _check(0 <= t.seed < 2**32, f"train.seed: must be from 0 to {2**32 - 1} (the random generators' range), got {t.seed}")
    _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.schedule in ("wsd", "cosine"), f"train.schedule: expected wsd or cosine, got {t.schedule!r}")
    for name in ("decay_start", "bias_update_stop", "mtp_lambda_switch", "fim_rate"):
        _check(0 <= getattr(t, name) <= 1, f"train.{name}: must be in [0, 1], got {getattr(t, name)}")
    _check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2: must be in [0, 1)")
    for name in ("weight_decay", "grad_clip", "bias_update_speed", "balance_alpha", "mtp_lambda", "mtp_lambda_late"):
        _check(getattr(t, name) >= 0, f"train.{name}: must be >= 0, got {getattr(t, name)}")
    _check(t.precision in ("auto", "fp32", "bf16", "fp8"),
           f"train.precision: expected auto, fp32, bf16 or fp8, got {t.precision!r}")
    _check(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
           f"train.device: expected auto, cpu or cuda, got {t.device!r}")
    bad = [p for p in t.zero_init_parts if p not in ZERO_INIT_PARTS]
    _check(not bad, f"train.zero_init: unknown part {bad[0]!r} (choose from {', '.join(ZERO_INIT_PARTS)})" if bad else "")
    parts = t.recompute_parts
    bad = [p for p in parts if p not in RECOMPUTE_PARTS]
    _check(not bad, f"train.recompute: unknown part {bad[0]!r} (choose from {', '.join(RECOMPUTE_PARTS)})" if bad else "")
    _check("full" not in parts or len(parts) == 1, "train.recompute: 'full' already recomputes every part; give it alone")
    _check(not {"expert_casts", "swiglu"} <= set(parts),
           "train.recompute: expert_casts and swiglu do not combine (the routed experts' SwiGLU would be kept); "
           "choose one")
    _check(t.compile is not True or parts in ([], ["full"]),
           "train.compile: can be combined with train.recompute=full only (selective parts run eagerly)")
    _check(t.loss_chunk >= 0, f"train.loss_chunk: must be >= 0, got {t.loss_chunk}")
    _check(0 <= t.ema_decay < 1, f"train.ema_decay: must be in [0, 1), got {t.ema_decay}")
    _check(t.ema_every >= 1, f"train.ema_every: must be >= 1, got {t.ema_every}")
    _check(t.fp8_norm_output in ("fp32", "bf16"),
           f"train.fp8_norm_output: expected fp32 or bf16, got {t.fp8_norm_output!r}")
    _check(t.adam_moments in ("fp32", "bf16"), f"train.adam_moments: expected fp32 or bf16, got {t.adam_moments!r}")
    _check(t.optimizer in ("adamw", "muon"), f"train.optimizer: expected adamw or muon, got {t.optimizer!r}")
    _check(t.muon_lr >= 0, f"train.muon_lr: must be >= 0, got {t.muon_lr}")
    _check(0 <= t.muon_momentum < 1, f"train.muon_momentum: must be in [0, 1), got {t.muon_momentum}")
    _check(t.optimizer == "adamw" or t.adam_moments == "fp32",
           "train.adam_moments=bf16: only with train.optimizer=adamw")


def validate_parallel(p: ParallelConfig, m: ModelConfig) -> None:
    """Checks that need no world size; the mesh checks the rest when the processes exist."""
    _check_types(p, "parallel")
    for name in ("pp", "ep"):
        _check(getattr(p, name) >= 1, f"parallel.{name}: must be >= 1, got {getattr(p, name)}")
    _check(p.dp >= 0, f"parallel.dp: must be >= 0 (0 = the rest of the world), got {p.dp}")
    _check(p.schedule in ("1f1b", "interleaved1f1b", "zbv", "dualpipev"),
           f"parallel.schedule: expected 1f1b, interleaved1f1b, zbv or dualpipev, got {p.schedule!r}")
    _check(p.sharding in ("none", "zero1", "zero2", "full"),
           f"parallel.sharding: expected none, zero1, zero2 or full, got {p.sharding!r}")
    _check(m.n_routed_experts % p.ep == 0,
           f"parallel.ep: {p.ep} does not divide model.n_routed_experts={m.n_routed_experts}")


def validate(cfg: Config) -> None:
    validate_model(cfg.model)
    validate_train(cfg.train, cfg.model)
    validate_parallel(cfg.parallel, cfg.model)
    _check(cfg.train.compile is not True or cfg.parallel.ep == 1,
           "train.compile: not with parallel.ep > 1 (the expert all-to-all splits each block, and the pieces "
           "recompile as the token counts change every step); set train.compile=false")
    _check(cfg.train.optimizer == "adamw" or cfg.parallel.sharding in ("none", "zero1"),
           f"train.optimizer=muon: needs whole matrices, not parallel.sharding={cfg.parallel.sharding} "
           f"(none and zero1 work)")
    _check(cfg.train.adam_moments == "fp32" or cfg.parallel.sharding in ("none", "zero1"),
           f"train.adam_moments=bf16: not supported with parallel.sharding={cfg.parallel.sharding} "
           f"(none and zero1 are)")
    _check("expert_casts" not in cfg.train.recompute_parts or cfg.parallel.sharding in ("none", "zero1"),
           f"train.recompute=expert_casts: not with parallel.sharding={cfg.parallel.sharding} (its cast in the "
           f"backward is not tested against FSDP's resharding; none and zero1 keep whole weights)")


# --------------------------------------------------------------------------------------
# TOML writing (tomllib only reads); enough for our flat sections
# --------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v)} to TOML")


def dict_to_toml(d: dict) -> str:
    out = []
    for section, values in d.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
        out.append("")
    return "\n".join(out)
