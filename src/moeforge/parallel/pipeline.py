"""Pipeline parallelism: split a built Transformer into stages and run them with torch's schedules.

The model stays single-device code (model/transformer.py). `split_pipeline` cuts it into stage
modules that *reference* the model's own submodules (no copies: a stage's parameter names are the
single model's names) and wraps the local ones in torch.distributed.pipelining's PipelineStage;
`pipeline_train_step` runs one optimizer step's micro-batches through the chosen schedule.

Stages and placement (n = number of stages, pp = pipeline ranks):
    1f1b             n = pp,   stage s on rank s
    interleaved1f1b  n = 2pp,  stage s on rank s % pp ("loop")
    zbv, dualpipev   n = 2pp,  rank r holds stages r and 2pp-1-r ("V"): the first stage (embedding)
                               and the last stage (final norm, head, MTP) are both on rank 0, so the
                               MTP modules use the very same embedding (DeepSeek-V3 §3.2.3).
What travels between stages (tensors only, static shapes):
    h [B, S, D]            the residual stream
    balance []             running sum of the blocks' sequence-balance losses (FP32, differentiable)
    emb_k [B, S, D] x K    only when MTP is on and the first and last stages are on different ranks:
                           Emb(t_{i+k}) computed by the first stage ("forwarded" MTP embeddings), so the
                           embedding keeps a single owner and its gradient flows back through the pipe.
When the first and last stage share a rank ("shared" MTP embeddings), the last stage looks the
tokens up itself in the shared nn.Embedding; the tokens reach it as the `mtp_tokens` keyword.

The last stage outputs (h, h^1..h^K, balance); the loss function applies the head and computes
main + lambda/K * sum_k MTP_k + alpha * balance, divided by the number of micro-batches, exactly as
the trainer does per micro-batch (schedules run with scale_grads=False: torch would divide a
parameter shared by two local stages twice).

Shape legend: B micro-batch, S sequence, D hidden, K MTP depth, V vocabulary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig, ParallelConfig
from ..errors import MoeforgeError
from ..model.moe import MoE
from ..model.mtp import IGNORE_INDEX, shift_tokens
from ..model.transformer import Transformer

__all__ = [
    "SCHEDULES", "PipeRank", "as_pipe_rank", "StageModule", "PipelineLoss", "ScheduleFactory",
    "num_stages", "stage_rank", "rank_stages", "stage_layout", "validate_micro_batches", "mtp_mode",
    "split_pipeline", "pipeline_train_step", "stage_modules", "named_parameters",
    "stage_state_dict", "load_stage_state_dict", "moe_layers", "clip_grad_norm_",
]

SCHEDULES = ("1f1b", "interleaved1f1b", "zbv", "dualpipev")
V_SCHEDULES = ("zbv", "dualpipev")


# --------------------------------------------------------------------------------------
# placement and layout (pure functions of the configs; no processes needed)
# --------------------------------------------------------------------------------------
def _check_schedule(pcfg: ParallelConfig) -> None:
    if pcfg.schedule not in SCHEDULES:
        raise MoeforgeError(f"parallel.schedule: expected one of {', '.join(SCHEDULES)}, got {pcfg.schedule!r}")
    if pcfg.pp < 1:
        raise MoeforgeError(f"parallel.pp: must be >= 1, got {pcfg.pp}")


def num_stages(pcfg: ParallelConfig) -> int:
    """pp stages for 1f1b; two per rank (2pp) for interleaved1f1b, zbv and dualpipev."""
    _check_schedule(pcfg)
    return pcfg.pp if pcfg.schedule == "1f1b" else 2 * pcfg.pp


def stage_rank(stage: int, pcfg: ParallelConfig) -> int:
    """The pipeline rank that runs `stage`."""
    n, pp = num_stages(pcfg), pcfg.pp
    if not 0 <= stage < n:
        raise ValueError(f"stage {stage} out of range for {n} stages")
    if pcfg.schedule in V_SCHEDULES:
        return stage if stage < pp else n - 1 - stage  # V: down the ranks, then back up
    return stage % pp  # 1f1b (one stage per rank) and interleaved ("loop")


def rank_stages(rank: int, pcfg: ParallelConfig) -> list[int]:
    """The stages of one pipeline rank, in increasing order (the order torch's schedules expect)."""
    return [s for s in range(num_stages(pcfg)) if stage_rank(s, pcfg) == rank]


def stage_layout(cfg: ModelConfig, pcfg: ParallelConfig) -> list[list[int]]:
    """Decoder layer indices of each stage, stage 0 first.

    `parallel.layout` = "3,3,2,2" gives the number of layers per stage; "" splits as evenly as
    possible, giving the extra layers to the middle stages first (the first stage also embeds, the
    last one also runs the head and the MTP modules), then to the first stage, then to the last.
    """
    n, L = num_stages(pcfg), cfg.num_hidden_layers
    if L < n:
        raise MoeforgeError(f"parallel.pp: {n} pipeline stages ({pcfg.schedule}, pp={pcfg.pp}) need at least "
                            f"{n} decoder layers, the model has {L}")
    if pcfg.layout.strip():
        parts = [p.strip() for p in pcfg.layout.split(",")]
        try:
            counts = [int(p) for p in parts]
        except ValueError:
            raise MoeforgeError(f"parallel.layout: expected comma-separated layer counts like '3,3,2,2', "
                                f"got {pcfg.layout!r}") from None
        if len(counts) != n:
            raise MoeforgeError(f"parallel.layout: {len(counts)} entries for {n} pipeline stages "
                                f"({pcfg.schedule}, pp={pcfg.pp}); give one layer count per stage")
        if min(counts) < 1:
            raise MoeforgeError(f"parallel.layout: every stage needs at least one layer, got {pcfg.layout!r}")
        if sum(counts) != L:
            raise MoeforgeError(f"parallel.layout: the counts sum to {sum(counts)}, "
                                f"model.num_hidden_layers is {L}")
    else:
        counts = [L // n] * n
        preference = list(range(1, n - 1)) + [0, n - 1] if n > 1 else [0]
        for s in preference[: L % n]:
            counts[s] += 1
    starts = [sum(counts[:s]) for s in range(n)]
    return [list(range(start, start + c)) for start, c in zip(starts, counts)]


def validate_micro_batches(pcfg: ParallelConfig, n_micro: int) -> None:
    """What torch's schedules need of the number of micro-batches, checked before anything runs.

    1f1b: n >= pp (Schedule1F1B). interleaved1f1b: n divisible by max(1, n // pp) (its rounds).
    dualpipev: n >= 2pp (ScheduleDualPipeV; odd n is fine: the V schedule feeds micro-batches from
    one end, unlike bidirectional DualPipe). zbv: any n >= 1 (with n < 2pp - 1 it is simply not
    bubble-free).
    """
    _check_schedule(pcfg)
    pp, s = pcfg.pp, pcfg.schedule
    if n_micro < 1:
        raise MoeforgeError(f"pipeline: need at least one micro-batch, got {n_micro}")
    if s == "1f1b" and n_micro < pp:
        raise MoeforgeError(f"parallel.schedule=1f1b: {n_micro} micro-batches per step is fewer than the {pp} "
                            f"pipeline stages; raise train.batch_size or lower train.micro_batch_size")
    if s == "dualpipev" and n_micro < 2 * pp:
        raise MoeforgeError(f"parallel.schedule=dualpipev: {n_micro} micro-batches per step is fewer than the "
                            f"{2 * pp} pipeline stages (2 x pp); raise train.batch_size or lower "
                            f"train.micro_batch_size")
    if s == "interleaved1f1b":
        rounds = max(1, n_micro // pp)
        if n_micro % rounds:
            raise MoeforgeError(f"parallel.schedule=interleaved1f1b: {n_micro} micro-batches is not a multiple of "
                                f"its {rounds} rounds (n // pp); use a multiple of pp={pp}")


def mtp_mode(cfg: ModelConfig, pcfg: ParallelConfig) -> str:
    """'none' (no MTP), 'shared' (first and last stage on one rank) or 'forwarded' (see module doc).
    Under FSDP sharding (zero2, full) always 'forwarded': each stage module is the root of its own
    FSDP tree, and one module (the embedding) cannot belong to two of them."""
    if cfg.num_nextn_predict_layers == 0:
        return "none"
    if pcfg.sharding in ("zero2", "full"):
        return "forwarded"
    return "shared" if stage_rank(0, pcfg) == stage_rank(num_stages(pcfg) - 1, pcfg) else "forwarded"


# --------------------------------------------------------------------------------------
# the stage module
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipeRank:
    """Where this process sits in the pipeline: the pipeline process group and the device.

    group=None means the default (world) group; with data/expert parallelism, pass the mesh's
    pipeline group. Ranks below are ranks within that group.
    """

    group: dist.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)


def as_pipe_rank(ctx) -> PipeRank:
    """A PipeRank from itself, or from anything with `pp_group` and `device` (mesh.ParallelContext)."""
    if isinstance(ctx, PipeRank):
        return ctx
    if hasattr(ctx, "pp_group") and hasattr(ctx, "device"):
        return PipeRank(group=ctx.pp_group, device=torch.device(ctx.device))
    raise TypeError(f"expected a PipeRank or a ParallelContext, got {type(ctx).__name__}")


class StageModule(nn.Module):
    """One pipeline stage of a Transformer: [embedding] + its blocks + [final norm, head, MTP modules].

    Holds references to the model's own modules under the model's attribute names (`layers` is a
    ModuleDict keyed by the layer index), so `named_parameters()` yields the single model's names
    and a stage's state_dict is a slice of the model's.

    forward, first stage:  (tokens [B, S]) -> carry
             other stages: (*carry) -> carry (not last) or (h, h^1..h^K, balance) (last)
    carry = (h [B, S, D], balance [], emb_1..emb_K [B, S, D] when MTP embeddings are forwarded).
    """

    def __init__(self, model: Transformer, stage: int, n_stages: int, layer_ids: list[int], mode: str,
                 amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg: ModelConfig = model.cfg
        self.stage, self.n_stages = stage, n_stages
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.mode = mode  # none | shared | forwarded
        self.depth = model.cfg.num_nextn_predict_layers if mode != "none" else 0
        self.amp_dtype = amp_dtype
        self._rope = model.rope  # the model's cos/sin table, built once per device
        if self.is_first or (self.is_last and mode == "shared"):
            self.embed = model.embed  # the same nn.Embedding object: one parameter for both uses
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if self.is_last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def forward(self, *carry: torch.Tensor, mtp_tokens: torch.Tensor | None = None,
                doc_tokens: torch.Tensor | None = None):
        """doc_tokens: the micro-batch's input tokens [B, S] under document masking (train.document_mask):
        every stage builds the mask of the documents it holds (attention.document_mask); None: causal."""
        with self._autocast(carry[0].device):
            return self._forward(*carry, mtp_tokens=mtp_tokens, doc_tokens=doc_tokens)

    def _forward(self, *carry: torch.Tensor, mtp_tokens: torch.Tensor | None = None,
                 doc_tokens: torch.Tensor | None = None):
        mask = None
        if doc_tokens is not None:
            from ..model.attention import document_ids, document_mask

            mask = document_mask(document_ids(doc_tokens, self.cfg.eos_token_id))
        if self.is_first:
            (tokens,) = carry
            h = self.embed(tokens)  # [B, S] -> [B, S, D]
            balance = h.new_zeros((), dtype=torch.float32)
            emb_ahead = ([self.embed(shift_tokens(tokens, k, 0)) for k in range(1, self.depth + 1)]
                         if self.mode == "forwarded" else [])
            if self.mode == "shared" and mtp_tokens is None:
                mtp_tokens = tokens
        else:
            h, balance, *emb_ahead = carry
        S = h.shape[1]
        cos, sin = self._rope(S, h.device)
        for layer in self.layers.values():
            h, b = layer(h, cos, sin, mask=mask)
            balance = balance + b  # same summation order as Transformer.hidden
        if not self.is_last:
            # Pass forwarded embeddings on as copies, not as the received tensors: an output that is
            # also an input (an autograd leaf whose .grad torch reads as the input gradient) would
            # alias the stage's output and input gradients.
            return (h, balance, *(e.clone() for e in emb_ahead))
        carried = h.dtype  # the dtype split_pipeline declares for the outputs (the residual stream's)
        h = self.norm(h)
        outs = [h]
        for k, module in enumerate(self.mtp, start=1):
            if self.mode == "shared":
                if mtp_tokens is None:
                    raise RuntimeError("the last stage needs mtp_tokens (the micro-batch's input tokens)")
                emb = self.embed(shift_tokens(mtp_tokens, k, 0))  # Emb(t_{i+k}), shared embedding
            else:
                emb = emb_ahead[k - 1]
            h, b = module(h, emb, cos, sin, mask)
            balance = balance + b
            outs.append(h)
        # Under autocast the norms return BF16; sent as the residual's dtype (exact), the head rounds back.
        return (*(o.to(carried) for o in outs), balance)


class PipelineLoss:
    """The last stage's loss: head + cross-entropies, weighted like the trainer, / n_micro.

    loss = (main + lambda/K * sum_k MTP_k + alpha * balance) / n_micro for each micro-batch, the
    trainer's objective. `records` collects [main, MTP_1..MTP_K, balance] of each micro-batch.
    Set `n_micro`, `mtp_lambda` and `balance_alpha` before a step (pipeline_train_step does).
    """

    def __init__(self, head: nn.Module | None, depth: int, amp_dtype: torch.dtype | None = None):
        self.head, self.depth, self.amp_dtype = head, depth, amp_dtype
        self.n_micro, self.mtp_lambda, self.balance_alpha = 1, 0.0, 0.0
        self.records: list[torch.Tensor] = []

    def __call__(self, output: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(target.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            h, *h_mtp, balance = output
            main = self.head(h, target)
            mtp = [self.head(hk, shift_tokens(target, k, IGNORE_INDEX))
                   for k, hk in enumerate(h_mtp, start=1)]
            mtp = torch.stack(mtp) if mtp else h.new_zeros(0)
            weighted = mtp.sum() * (self.mtp_lambda / self.depth) if mtp.numel() else main * 0
            loss = main + weighted + self.balance_alpha * balance
        self.records.append(torch.cat([main.reshape(1), mtp, balance.reshape(1)]).detach().float())
        return loss / self.n_micro


class ScheduleFactory:
    """schedule_factory(n_micro) -> the torch schedule for this rank's stages.

    A schedule is built for a given number of micro-batches; the factory keeps the last one and
    builds a new one when the count changes (batch-size ramp). `loss` is the PipelineLoss shared by
    every schedule it builds.
    """

    def __init__(self, stages: list, pcfg: ParallelConfig, loss: PipelineLoss, mode: str, last_rank: int,
                 group: dist.ProcessGroup | None, micro_batch: int, seq_len: int):
        self.stages, self.pcfg, self.loss, self.mode = stages, pcfg, loss, mode
        self.last_rank, self.group = last_rank, group
        self.micro_batch, self.seq_len = micro_batch, seq_len
        self._built: tuple[int, object] | None = None

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def __call__(self, n_micro: int):
        validate_micro_batches(self.pcfg, n_micro)
        if self._built is not None and self._built[0] == n_micro:
            return self._built[1]
        from torch.distributed.pipelining import (Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B,
                                                  ScheduleZBVZeroBubble)

        cls = {"1f1b": Schedule1F1B, "interleaved1f1b": ScheduleInterleaved1F1B,
               "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}[self.pcfg.schedule]
        # scale_grads=False: the loss is already divided by n_micro (the trainer's arithmetic), and
        # torch's per-stage scaling would divide a parameter shared by two local stages twice.
        target = self.stages[0] if self.pcfg.schedule == "1f1b" else self.stages
        schedule = cls(target, n_micro, loss_fn=self.loss, scale_grads=False)
        self._built = (n_micro, schedule)
        return schedule


# --------------------------------------------------------------------------------------
# split and run
# --------------------------------------------------------------------------------------
def split_pipeline(model: Transformer, pcfg: ParallelConfig, rank_ctx, *, micro_batch: int,
                   seq_len: int, amp_dtype: torch.dtype | None = None) -> tuple[list, ScheduleFactory]:
    """Cut `model` into pipeline stages; build this rank's PipelineStage objects and a schedule factory.

    rank_ctx: a PipeRank, or the mesh's ParallelContext (its pp_group and device are used).

    micro_batch, seq_len: the shape of one micro-batch (stages exchange tensors of static shape).
    amp_dtype: torch.bfloat16 to run stages and loss under autocast (the trainer's bf16 precision).
    Returns (stages, schedule_factory): stages are torch PipelineStage objects in increasing stage
    order (stage.submod is the StageModule); schedule_factory(n_micro) gives the schedule.
    The model's modules are shared, not copied: the optimizer, checkpoints and the routing-bias
    update work on the same parameters and buffers (see stage_modules, named_parameters, moe_layers).
    """
    from torch.distributed.pipelining import PipelineStage

    cfg = model.cfg
    _check_schedule(pcfg)
    if not dist.is_initialized():
        raise MoeforgeError("pipeline parallelism needs an initialised torch.distributed process group")
    rank_ctx = as_pipe_rank(rank_ctx)
    if rank_ctx.size != pcfg.pp:
        raise MoeforgeError(f"parallel.pp: {pcfg.pp} does not match the pipeline group's {rank_ctx.size} ranks")
    if micro_batch < 1 or seq_len < 1:
        raise MoeforgeError(f"pipeline: micro_batch and seq_len must be positive, got {micro_batch}, {seq_len}")
    layout = stage_layout(cfg, pcfg)
    n, mode = len(layout), mtp_mode(cfg, pcfg)
    device, dtype = torch.device(rank_ctx.device), model.embed.weight.dtype
    B, S, D = micro_batch, seq_len, cfg.hidden_size

    def meta(shape, dt=dtype, grad=True):  # static shapes: no metadata-inference forward (see note)
        t = torch.empty(shape, dtype=dt, device="meta")
        return t.requires_grad_(grad) if grad else t

    def carry() -> tuple[torch.Tensor, ...]:
        extra = [meta((B, S, D)) for _ in range(cfg.num_nextn_predict_layers)] if mode == "forwarded" else []
        return (meta((B, S, D)), meta((), torch.float32), *extra)

    # Note: with example inputs/outputs given, torch's stages skip "dynamic" metadata inference,
    # which would run a real forward of the first micro-batch and so count its tokens twice in the
    # MoE layers' tokens_per_expert (the routing-bias update's input).
    stages = []
    for s in rank_stages(rank_ctx.rank, pcfg):
        module = StageModule(model, s, n, layout[s], mode, amp_dtype)
        inputs = (meta((B, S), torch.long, grad=False),) if s == 0 else carry()
        if s == n - 1:
            outputs = (*(meta((B, S, D)) for _ in range(1 + cfg.num_nextn_predict_layers)), meta((), torch.float32))
        else:
            outputs = carry()
        stages.append(PipelineStage(module, s, n, device, input_args=inputs, output_args=outputs,
                                    group=rank_ctx.group))
    last = next((st.submod for st in stages if st.is_last), None)
    loss = PipelineLoss(last.head if last is not None else None, cfg.num_nextn_predict_layers, amp_dtype)
    factory = ScheduleFactory(stages, pcfg, loss, mode, stage_rank(n - 1, pcfg), rank_ctx.group, B, S)
    return stages, factory


def pipeline_train_step(stages: list, schedule_factory: ScheduleFactory, inputs: torch.Tensor | None,
                        targets: torch.Tensor | None, *, n_micro: int, mtp_lambda: float,
                        balance_alpha: float, document_mask: bool = False) -> dict[str, torch.Tensor]:
    """Forward and backward of one optimizer step's n_micro micro-batches through the schedule.

    inputs, targets: [n_micro * micro_batch, S], micro-batch i = rows i*B..(i+1)*B (the trainer's
    order). Only the rank with the first stage needs `inputs` and only the rank with the last stage
    needs `targets` (and `inputs` under shared MTP embeddings); others may pass None. document_mask:
    attention within the documents of the tokens (train.document_mask); every rank then needs `inputs`.
    Gradients accumulate into the stage parameters' .grad exactly as the trainer's n_micro
    `(loss / n_micro).backward()` calls do; the caller clips, steps and zeroes them.
    Returns, on every pipeline rank: main [] and balance [] (means over micro-batches), mtp [K]
    (per-depth means, unweighted) and loss [] (the weighted objective's mean).
    """
    f = schedule_factory
    schedule = f(n_micro)
    rows = n_micro * f.micro_batch
    for name, t, why in (("inputs", inputs, "runs the first stage" if f.has_first else
                          "runs the last stage" if f.has_last and f.mode == "shared" else
                          "masks attention to documents" if document_mask else None),
                         ("targets", targets, "runs the last stage" if f.has_last else None)):
        if why is not None:
            if t is None:
                raise MoeforgeError(f"pipeline: this rank {why} and needs {name}")
            if tuple(t.shape) != (rows, f.seq_len):
                raise MoeforgeError(f"pipeline: {name} must be [{rows}, {f.seq_len}] ({n_micro} micro-batches of "
                                    f"{f.micro_batch}), got {list(t.shape)}")
    # torch.distributed.pipelining (2.11) checks every micro-batch's strides against the first stage's
    # contiguous example input; the trainer's windows[:, :-1] views are not contiguous.
    inputs = inputs.contiguous() if inputs is not None else None
    targets = targets.contiguous() if targets is not None else None
    loss = f.loss
    loss.n_micro, loss.mtp_lambda, loss.balance_alpha = n_micro, mtp_lambda, balance_alpha
    loss.records.clear()
    args = (inputs,) if f.has_first else ()
    # Shared MTP embeddings: the last stage looks up Emb(t_{i+k}) itself; every local stage gets the
    # keyword (the first stage ignores it).
    kwargs = {"mtp_tokens": inputs} if f.has_last and f.mode == "shared" else {}
    if document_mask:  # every stage masks attention to the documents of its micro-batch's tokens
        kwargs["doc_tokens"] = inputs
    schedule.step(*args, target=targets if f.has_last else None, return_outputs=False, **kwargs)

    K = loss.depth
    device = stages[0].device
    if f.has_last:
        vec = torch.stack(loss.records).sum(0) / n_micro  # [main, mtp_1..K, balance]
        weighted = vec[1:1 + K].sum() * (mtp_lambda / K) if K else vec.new_zeros(())
        vec = torch.cat([vec, (vec[0] + weighted + balance_alpha * vec[-1]).reshape(1)]).to(device)
    else:
        vec = torch.empty(K + 3, dtype=torch.float32, device=device)
    if dist.get_world_size(f.group) > 1:
        dist.broadcast(vec, group=f.group, group_src=f.last_rank)
    vec = vec.cpu()
    loss.records.clear()
    return {"main": vec[0], "mtp": vec[1:1 + K], "balance": vec[1 + K], "loss": vec[2 + K]}


# --------------------------------------------------------------------------------------
# what the trainer needs around a step
# --------------------------------------------------------------------------------------
def _module(stage) -> nn.Module:
    return getattr(stage, "submod", stage)  # a torch PipelineStage or a StageModule


def stage_modules(stages: list) -> nn.ModuleList:
    """This rank's StageModules as one module (parameters deduplicated): for the optimizer, to_empty."""
    return nn.ModuleList(_module(st) for st in stages)


def named_parameters(stages: list) -> dict[str, nn.Parameter]:
    """This rank's parameters under their single-model names (a shared embedding appears once)."""
    out: dict[str, nn.Parameter] = {}
    for st in stages:
        for name, p in _module(st).named_parameters():
            out.setdefault(name, p)
    return out


def stage_state_dict(stages: list) -> dict[str, torch.Tensor]:
    """This rank's slice of the model's state_dict, under the single model's keys.

    The union over the pipeline ranks is the full model's state_dict (checkpoints stay
    single-model checkpoints); load a slice back with load_stage_state_dict.
    """
    out: dict[str, torch.Tensor] = {}
    for st in stages:
        for k, v in _module(st).state_dict().items():
            out.setdefault(k, v)
    return out


def load_stage_state_dict(stages: list, state: dict[str, torch.Tensor]) -> None:
    """Load this rank's tensors from a (full or sliced) single-model state_dict."""
    for st in stages:
        module = _module(st)
        keys = module.state_dict().keys()
        missing = [k for k in keys if k not in state]
        if missing:
            raise MoeforgeError(f"checkpoint lacks {len(missing)} tensors of pipeline stage "
                                f"{getattr(module, 'stage', '?')} (first: {missing[0]})")
        module.load_state_dict({k: state[k] for k in keys})


def moe_layers(stages: list) -> dict[str, MoE]:
    """This rank's MoE layers by single-model module name, in model order (for the routing-bias update).

    Their tokens_per_expert hold the counts of every micro-batch of the step (each stage runs all
    of them), so update_routing_bias(list(moe_layers(stages).values()), gamma) after the step is
    the single-process update restricted to this rank's layers.
    """
    found: dict[str, MoE] = {}
    for st in stages:
        for name, m in _module(st).named_modules():
            if isinstance(m, MoE):
                found.setdefault(name, m)

    def order(name: str) -> tuple:
        parts = name.split(".")
        return (parts[0] == "mtp", int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0, name)

    return {k: found[k] for k in sorted(found, key=order)}


@torch.no_grad()
def clip_grad_norm_(stages: list, max_norm: float, rank_ctx) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole pipeline: the norm of all ranks' gradients.

    Sums the squared per-parameter norms of this rank (each parameter once), all-reduces over the
    pipeline group, and scales by max_norm / (norm + 1e-6) when that is below 1. Returns the norm.
    (With data/expert parallel sharding, the shards' squares must be summed over those groups too.)
    """
    rank_ctx = as_pipe_rank(rank_ctx)
    grads = [p.grad for p in named_parameters(stages).values() if p.grad is not None]
    device = torch.device(rank_ctx.device)
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        sq += torch.linalg.vector_norm(g.float()).pow(2).to(device)
    if rank_ctx.size > 1:
        dist.all_reduce(sq, group=rank_ctx.group)
    total = sq.sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
    return total
