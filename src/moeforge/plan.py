"""Plan a training run before starting it: model-state memory per GPU, and compute time and cost.

Memory: for a parallel layout (parallel.pp / ep / dp / sharding / schedule, as `train` takes them),
the bytes every rank keeps for the whole run: FP32 master weights, FP32 gradients and the
optimizer's state. They are counted from the model built on the meta device and cut exactly as
training cuts it:
- pipeline stages: the parameters of the StageModules a pipeline rank holds (parallel/pipeline.py's
  layout and placement; with zbv/dualpipev the embedding and the head share rank 0);
- expert parallelism: E/ep routed experts per rank (parallel/expert.py);
- ZeRO-1: each parameter's optimizer state on its one owner, chosen by the same greedy assignment
  as parallel/zero1.py (non-expert parameters over dp x ep ranks, routed experts over dp);
- FSDP2 (zero2, full): every parameter, gradient and optimizer state sharded along dim 0 over the
  same groups as torch.chunk cuts it (ceil(rows / ranks) rows per rank, the last ranks' shorter).
  FSDP2 stores each shard padded to the full ceil(rows / ranks) rows, so a rank with a short shard
  holds up to that padding more; the first rank, whose shards are full, is exact.
Optimizer state per element: AdamW 8 bytes (two FP32 moments) or 4 (train.adam_moments=bf16);
Muon 4 (its momentum) for the matrices it updates, AdamW's 8 for the rest. Not counted:
activations (they depend on micro-batch, recomputation and schedule; `moeforge bench` measures
them on one GPU), FP8 weight copies, communication buffers and the CUDA context.

Compute: training FLOPs per token (train/metrics.py: 6 x activated matmul parameters + causal
attention, MTP included) x tokens, run at an assumed MFU of a datasheet peak, gives GPU-hours,
days on the given GPUs and, with a price, the cost. DeepSeek-V3's report gives 2,664K H800
GPU-hours for 14.8T pre-training tokens; with this FLOP count that is 40.7% of the 989 TFLOP/s
BF16 peak (docs/plan.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import Config
from .errors import MoeforgeError
from .model import build_model
from .parallel.expert import expert_names
from .parallel.mesh import resolve_layout
from .parallel.pipeline import StageModule, mtp_mode, num_stages, rank_stages, stage_layout
from .parallel.zero1 import assign_owners
from .train.metrics import flops_per_token
from .train.step import check_pipeline_sharding, optimizer_groups

__all__ = ["RankMemory", "model_state_memory", "ComputePlan", "compute_plan", "format_count", "parse_count"]

WEIGHT_BYTES = GRAD_BYTES = 4  # FP32 master weights and gradients


@dataclass(frozen=True)
class RankMemory:
    """One rank's model states: elements held and bytes of each kind."""

    pp_rank: int
    dp_rank: int
    ep_rank: int
    params: int  # parameter elements this rank stores (after expert slicing and FSDP sharding)
    weights: int  # bytes
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def _pipeline_rank_modules(model: nn.Module, cfg: Config) -> list[nn.Module]:
    """Per pipeline rank, what its optimizer updates: the model, or (pp > 1) its StageModules in one
    ModuleList, as the trainer builds it (the same names, so ZeRO-1 picks the same owners)."""
    pcfg = cfg.parallel
    if pcfg.pp == 1:
        return [model]
    layout, mode, n = stage_layout(cfg.model, pcfg), mtp_mode(cfg.model, pcfg), num_stages(pcfg)
    return [nn.ModuleList(StageModule(model, s, n, layout[s], mode) for s in rank_stages(r, pcfg))
            for r in range(pcfg.pp)]


def _optimizer_bytes_per_element(model: nn.Module, cfg: Config) -> dict[str, int]:
    t = cfg.train
    if t.optimizer == "muon":
        muon, matrices, vectors = optimizer_groups(model, None, "muon")
        return {**{n: 4 for n in muon}, **{n: 8 for n in (*matrices, *vectors)}}
    per = 4 if t.adam_moments == "bf16" else 8
    return {n: per for n, _ in model.named_parameters()}


def _ep_shape(shape: torch.Size, expert: bool, ep: int) -> tuple[int, ...]:
    return (shape[0] // ep, *shape[1:]) if expert else tuple(shape)


def _fsdp_shard(shape: tuple[int, ...], ranks: int, index: int) -> int:
    """Elements of shard `index` of `ranks`: FSDP2 cuts dim 0 as torch.chunk does (ceil(rows / ranks)
    rows each, the last ones shorter or empty)."""
    if not shape:
        return 1
    per = math.ceil(shape[0] / ranks)
    return max(0, min(per, shape[0] - index * per)) * math.prod(shape[1:])


def model_state_memory(cfg: Config, world_size: int) -> list[RankMemory]:
    """Every rank's model-state memory for `cfg` (its parallel section) on `world_size` ranks, in
    rank order (rank = (pp_rank x dp + dp_rank) x ep + ep_rank, parallel/mesh.py)."""
    pp, dp, ep = resolve_layout(cfg.parallel, world_size)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=dp))
    sharding = cfg.parallel.sharding  # (its values are checked by the config)
    check_pipeline_sharding(cfg.parallel)
    ranks: list[RankMemory] = []
    for pp_rank, module in enumerate(_pipeline_rank_modules(build_model(cfg.model, "meta"), cfg)):
        experts = expert_names(module)
        opt_bytes = _optimizer_bytes_per_element(module, cfg)
        shapes = {n: _ep_shape(p.shape, n in experts, ep) for n, p in module.named_parameters() if p.requires_grad}
        # the two replication groups: non-expert parameters over dp x ep ranks, routed experts over dp
        groups = {False: (dp * ep, [n for n in shapes if n not in experts]),
                  True: (dp, [n for n in shapes if n in experts])}
        owners = {}
        if sharding == "zero1":
            for size, names in groups.values():
                metas = [(n, torch.empty(shapes[n], device="meta")) for n in names]
                owners.update(zip(names, assign_owners(metas, size)))
        for dp_rank in range(dp):
            for ep_rank in range(ep):
                index = {False: dp_rank * ep + ep_rank, True: dp_rank}  # this rank's place in each group
                held = opt = 0
                for n, shape in shapes.items():
                    expert = n in experts
                    if sharding in ("zero2", "full"):
                        local = _fsdp_shard(shape, groups[expert][0], index[expert])
                        held += local
                        opt += local * opt_bytes[n]
                    else:
                        local = math.prod(shape)
                        held += local
                        if sharding == "none" or owners[n] == index[expert]:
                            opt += local * opt_bytes[n]
                ranks.append(RankMemory(pp_rank, dp_rank, ep_rank, held, held * WEIGHT_BYTES, held * GRAD_BYTES, opt))
    return ranks


@dataclass(frozen=True)
class ComputePlan:
    flops_per_token: float
    tokens: float
    gpus: int
    mfu: float
    peak_flops: float  # per GPU, FLOP/s

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def gpu_hours(self) -> float:
        return self.total_flops / (self.peak_flops * self.mfu) / 3600

    @property
    def days(self) -> float:
        return self.gpu_hours / self.gpus / 24

    @property
    def tokens_per_gpu_second(self) -> float:
        return self.peak_flops * self.mfu / self.flops_per_token


def compute_plan(cfg: Config, tokens: float, gpus: int, mfu: float, peak_tflops: float) -> ComputePlan:
    if not tokens > 0:
        raise MoeforgeError(f"--tokens: must be positive, got {tokens:g}")
    if gpus < 1:
        raise MoeforgeError(f"--gpus: must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise MoeforgeError(f"--mfu: a fraction of the peak in (0, 1], got {mfu:g}")
    if not peak_tflops > 0:
        raise MoeforgeError(f"--peak-tflops: must be positive, got {peak_tflops:g}")
    return ComputePlan(flops_per_token(cfg.model, cfg.train.seq_len), tokens, gpus, mfu, peak_tflops * 1e12)


_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def format_count(value: float) -> str:
    """1.48e13 -> '14.8T' (parse_count's suffixes; three significant digits)."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def parse_count(text: str) -> float:
    """'14.8T' -> 1.48e13; plain numbers and 1e12 forms too (K, M, B/G, T suffixes)."""
    s = text.strip().upper()
    scale = _SUFFIX.get(s[-1:], 1.0)
    try:
        return float(s[:-1] if s[-1:] in _SUFFIX else s) * scale
    except ValueError:
        raise MoeforgeError(f"expected a number like 14.8T, 300B or 1e9, got {text!r}") from None
