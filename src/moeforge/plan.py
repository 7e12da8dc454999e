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
Muon 4 (its momentum) for the matrices it updates, AdamW's 8 for the rest. Not counted here: FP8
weight copies, communication buffers and the CUDA context.

Activations (activation_memory): the bytes one micro-batch's forward keeps for its backward,
counted by running the model's training forward (`losses`) on fake tensors (no memory, no
arithmetic) and adding up the storages autograd saves, each once, parameters left out, per decoder
layer, MTP module, output head with its loss, and the rest (the embedding). That is exact for an eager step on a CPU
(tests compare it with real tensors); on a GPU it is an estimate (its attention and loss kernels
are other ones), above what a compiled step or an FP8 one (FP8-saved Linear inputs) keeps;
docs/plan.md compares it with a measured peak. Under a pipeline, in_flight_peaks replays the
schedule's action order to find how many micro-batches' stages a rank holds at once.

Compute: training FLOPs per token (train/metrics.py: 6 x activated matmul parameters + causal
attention, MTP included) x tokens, run at an assumed MFU of a datasheet peak, gives GPU-hours,
days on the given GPUs and, with a price, the cost. DeepSeek-V3's report gives 2,664K H800
GPU-hours for 14.8T pre-training tokens; with this FLOP count that is 40.7% of the 989 TFLOP/s
BF16 peak (docs/plan.md).
"""

from __future__ import annotations

import contextlib
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
from .parallel.pipeline import StageModule, mtp_mode, num_stages, rank_stages, stage_layout, stage_rank
from .parallel.zero1 import assign_owners
from .train.metrics import flops_per_token
from .train.step import check_pipeline_sharding, optimizer_groups

__all__ = ["RankMemory", "model_state_memory", "ActivationCount", "activation_memory", "stage_activations",
           "rank_activations", "in_flight_peaks",
           "ComputePlan", "compute_plan", "format_count", "parse_count"]

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
class ActivationCount:
    """What one micro-batch's forward saves for backward, in bytes (activation_memory). Each part's
    bytes include `*_expert_copies`: the routed experts' weights cast to the compute dtype (the
    grouped GEMMs keep them for backward), which under expert parallelism a rank holds for its E/ep
    experts only (rank_activations)."""

    sequences: int
    seq_len: int
    counted_as: str  # "fp32" or "bf16" (BF16 autocast)
    layers: tuple[int, ...]  # per decoder layer, in order: what its forward saves (without recomputation)
    layer_expert_copies: tuple[int, ...]
    mtp: int  # the MTP modules (their projections, norms and blocks)
    mtp_expert_copies: int
    head: int  # the output head and the loss (the MTP depths' included)
    rest: int  # the embedding and whatever runs outside the layers, MTP modules and head
    # train.recompute=full: each block keeps only its input (block_input bytes) and its backward
    # rebuilds what `layers` counts, one block at a time
    recompute_full: bool
    block_input: int

    def forwards(self, ep: int = 1) -> list[int]:
        """Per decoder layer, what its forward saves, the experts' weight copies for E/ep experts."""
        return [_local(b, c, ep) for b, c in zip(self.layers, self.layer_expert_copies)]

    def kept(self, ep: int = 1) -> list[int]:
        """Per decoder layer, the bytes kept from forward to backward (forwards, or with
        recompute_full each block's input)."""
        return [self.block_input] * len(self.layers) if self.recompute_full else self.forwards(ep)

    def recomputed(self, ep: int = 1) -> int:
        """With recompute_full, the largest block's activations, rebuilt in its backward; else 0."""
        return max(self.forwards(ep), default=0) if self.recompute_full else 0

    @property
    def total(self) -> int:
        """One process: every layer's kept bytes, the MTP modules, head, loss and embedding."""
        return sum(self.kept()) + self.mtp + self.head + self.rest


def _local(saved: int, copies: int, ep: int) -> int:
    """Bytes saved with the experts' weight copies (`copies` of them) held for E/ep experts."""
    return saved - copies + copies // ep


class _Losses(nn.Module):
    """model.losses as a module's forward (for torch.func.functional_call)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs, targets):
        return self.model.losses(inputs, targets)


@contextlib.contextmanager
def _fp32_grouped_mm(precision: str):
    """For an FP32 count: the experts' grouped GEMM as a matmul of the same rows (x @ w[0]: it saves x
    as torch's grouped GEMM does, the weight being a parameter), since the grouped GEMM's shape
    function takes BF16 only, though its CPU kernel runs FP32."""
    if precision != "fp32":
        yield
        return
    from .model import moe

    real = moe.grouped_mm
    moe.grouped_mm = lambda x, w, offsets: x @ w[0]
    try:
        yield
    finally:
        moe.grouped_mm = real


def _saved_bytes(cfg: Config, sequences: int, precision: str) -> dict[str, list[int]]:
    """{part: [bytes saved for backward, of which the experts' weight copies]} of one forward of
    `sequences` windows on fake CPU tensors; parts "layer i", "mtp", "head", "rest"."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .model.head import set_loss_chunk
    from .model.moe import Experts

    model = build_model(cfg.model, "meta")
    set_loss_chunk(model, cfg.train.loss_chunk)
    part = ["rest"]
    named = ([(f"layer {i}", m) for i, m in enumerate(model.layers)] + [("mtp", m) for m in model.mtp]
             + [("head", model.head)])
    for name, module in named:
        module.register_forward_pre_hook(lambda m, a, _n=name: part.__setitem__(0, _n))
        module.register_forward_hook(lambda m, a, o: part.__setitem__(0, "rest"))
    parts = {name: [0, 0] for name, _ in named} | {"mtp": [0, 0], "head": [0, 0], "rest": [0, 0]}
    # storages by id, each id with its storage object held in `keep` (an id is unique while it lives)
    seen: set = set()
    copies: set = set()  # the experts' weights cast for their GEMMs
    keep: list = []
    for m in model.modules():
        if isinstance(m, Experts):
            def dense_weights(dtype, _real=m.dense_weights):
                ws = _real(dtype)
                for w in ws:
                    keep.append(w.untyped_storage())
                    copies.add(id(keep[-1]))
                return ws
            m.dense_weights = dense_weights  # (this model is built for the count only)
    with FakeTensorMode():
        state = {f"model.{n}": torch.empty(p.shape, dtype=p.dtype, requires_grad=p.requires_grad)
                 for n, p in model.named_parameters()}
        state.update({f"model.{n}": torch.zeros(b.shape, dtype=b.dtype) for n, b in model.named_buffers()})
        keep.extend(t.untyped_storage() for t in state.values())
        params = {id(st) for st, t in zip(keep[-len(state):], state.values()) if t.requires_grad}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            key = id(storage)
            if key not in seen and key not in params:
                seen.add(key)
                keep.append(storage)
                parts[part[0]][0] += storage.nbytes()
                if key in copies:
                    parts[part[0]][1] += storage.nbytes()
            return t

        tokens = torch.zeros(sequences, cfg.train.seq_len + 1, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _fp32_grouped_mm(precision), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            torch.func.functional_call(_Losses(model), state, (tokens[:, :-1], tokens[:, 1:]))
    return parts


def activation_memory(cfg: Config, sequences: int) -> ActivationCount:
    """The bytes one micro-batch of `sequences` windows of train.seq_len tokens keeps for its
    backward on one GPU (module doc), in the run's precision: FP32, or BF16 autocast for bf16, auto
    (a GPU's default) and fp8 (counted as BF16: FP8-saved Linear inputs take less). With
    train.recompute=full each block keeps only its input, and its backward rebuilds its activations
    (ActivationCount.recomputed); with expert_casts the experts' weight copies are not kept.
    Raises MoeforgeError for the other parts of selective recomputation, whose saved tensors this
    count does not see."""
    t = cfg.train
    parts = t.recompute_parts
    if [p for p in parts if p not in ("full", "expert_casts")]:
        raise MoeforgeError(f"activations: not counted with selective recomputation (train.recompute={t.recompute}); "
                            f"`moeforge bench` measures them on a GPU")
    if sequences < 1:
        raise MoeforgeError(f"activations: need at least one sequence per micro-batch, got {sequences}")
    counted_as = "fp32" if t.precision == "fp32" else "bf16"
    saved = _saved_bytes(cfg, sequences, counted_as)
    residual = sequences * t.seq_len * cfg.model.hidden_size * 4  # a block's input: the FP32 residual stream
    if "expert_casts" in parts:  # counted with the copies (recast_in_backward's hooks would hide the
        # experts' other saved tensors from this count), then taken out
        saved = {name: [b - c, 0] for name, (b, c) in saved.items()}
    layers = [saved[f"layer {i}"] for i in range(cfg.model.num_hidden_layers)]
    full = parts == ["full"]
    return ActivationCount(sequences, t.seq_len, counted_as, tuple(b for b, _ in layers), tuple(c for _, c in layers),
                           saved["mtp"][0], saved["mtp"][1], saved["head"][0], saved["rest"][0], full, residual)


def stage_activations(cfg: Config, count: ActivationCount, ep: int = 1) -> list[int]:
    """Per pipeline stage (stage_layout's; one stage for pp 1), the bytes one micro-batch leaves on it:
    its layers, the embedding on the first stage, the MTP modules, the head and the loss on the last,
    the experts' weight copies for E/ep experts. Under expert parallelism a rank's experts are
    counted as receiving as many rows as its own tokens send (balanced routing)."""
    layers = count.kept(ep)
    mtp = _local(count.mtp, count.mtp_expert_copies, ep)
    layout = stage_layout(cfg.model, cfg.parallel) if cfg.parallel.pp > 1 else [list(range(len(layers)))]
    out = [sum(layers[i] for i in stage) for stage in layout]
    out[0] += count.rest
    out[-1] += mtp + count.head
    return out


def rank_activations(cfg: Config, count: ActivationCount, ep: int = 1) -> list[int]:
    """Per pipeline rank, the bytes of one micro-batch's activations on its stages (stage_activations),
    plus, with recomputation, the largest block rebuilt in its backward."""
    per_stage, extra = stage_activations(cfg, count, ep), count.recomputed(ep)
    if cfg.parallel.pp == 1:
        return [per_stage[0] + extra]
    return [sum(per_stage[s] for s in rank_stages(r, cfg.parallel)) + extra for r in range(cfg.parallel.pp)]


def _schedule_order(pcfg, n_micro: int) -> dict[int, list]:
    """torch's action order of the schedule on every pipeline rank ({rank: [action or None]}), built
    from stand-in stages (no process group, no model): what the runtime would execute."""
    from torch.distributed.pipelining import (ScheduleDualPipeV, ScheduleInterleaved1F1B,
                                              ScheduleZBVZeroBubble)
    from torch.distributed.pipelining.stage import _PipelineStageBase

    class _Stage(_PipelineStageBase):  # what the schedules read of a stage to plan their order
        def __init__(self, index: int):
            self.stage_index, self.num_stages = index, num_stages(pcfg)
            self.group_size, self.group_rank = pcfg.pp, stage_rank(index, pcfg)
            self.submod, self.has_backward, self.dw_builder = nn.Identity(), True, None

        is_first = property(lambda self: self.stage_index == 0)
        is_last = property(lambda self: self.stage_index == self.num_stages - 1)

        def _create_grad_recv_info(self, *args, **kwargs):
            pass

        _prepare_forward_infra = _prepare_backward_infra = _create_grad_recv_info

    cls = {"interleaved1f1b": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble,
           "dualpipev": ScheduleDualPipeV}[pcfg.schedule]
    schedule = cls([_Stage(s) for s in rank_stages(0, pcfg)], n_micro, loss_fn=lambda *a: None, scale_grads=False)
    return schedule.pipeline_order


def in_flight_peaks(cfg: Config, per_stage: list[int], n_micro: int) -> list[tuple[int, int]] | None:
    """Per pipeline rank, (the most activation bytes alive at once, micro-batch stages alive then) when
    its schedule runs n_micro micro-batches, one micro-batch on stage s leaving per_stage[s] bytes
    from its forward to its last backward action (its full backward, or with a split backward its
    weight pass: an upper bound, as the input pass frees part). 1F1B: rank r holds up to
    min(n_micro, pp - r) micro-batches. The other schedules from torch's own action order
    (_schedule_order) for at most 4 x pp micro-batches: their peak comes in the warm-up, within the
    first 2 x pp (pp 4, 8, 16: the same peak for 2, 4, 6 and 8 x pp), and the order of thousands
    takes torch minutes to build. None where that order cannot be built."""
    pcfg = cfg.parallel
    if pcfg.pp == 1:
        return [(per_stage[0], 1)]
    if pcfg.schedule == "1f1b":
        return [(per_stage[r] * min(n_micro, pcfg.pp - r), min(n_micro, pcfg.pp - r)) for r in range(pcfg.pp)]
    try:
        order = _schedule_order(pcfg, min(n_micro, 4 * pcfg.pp))
    except Exception:  # noqa: BLE001 - a torch whose schedules plan differently: not modelled
        return None
    from torch.distributed.pipelining.schedules import _ComputationType as Kind

    frees = {Kind.FULL_BACKWARD, Kind.BACKWARD_WEIGHT}
    peaks = []
    for r in range(pcfg.pp):
        alive: set = set()
        peak = (0, 0)
        for action in order[r]:
            for a in (action.sub_actions or (action,)) if action is not None else ():
                key = (a.stage_index, a.microbatch_index)
                if a.computation_type == Kind.FORWARD:
                    alive.add(key)
                    held = sum(per_stage[s] for s, _ in alive)
                    peak = max(peak, (held, len(alive)))
                elif a.computation_type in frees:
                    alive.discard(key)
        peaks.append(peak)
    return peaks


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
