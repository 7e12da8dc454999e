"""One optimizer step's building blocks, shared by the trainer and `moeforge bench`.

The model of this rank in the one construction order (build_train_model); the optimizer; the
forward and backward over a step's micro-batches (forward_backward); clipping, AdamW, the
routing-bias update and the EMA (optimizer_update). None of them synchronises the host.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.distributed.tensor import DTensor

from .. import parallel
from ..config import Config, ParallelConfig
from ..errors import MoeforgeError
from ..fp8 import FP8Recipe, convert_to_fp8, weight_cache
from ..fp8.cache import prefetch_weights
from ..model import build_model, init_weights, initial_values
from ..model.attention import document_ids, document_mask
from ..model.head import set_loss_chunk
from ..parallel import pipeline
from .adamw import AdamWBF16Moments
from .muon import Muon
from .balance import update_routing_bias
from .schedule import batch_size_at, bias_update_speed_at, lr_at
from .speed import apply_compile, apply_recompute, compile_on, graph_on


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoeforgeError("train.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if name == "auto" else name


def amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision: BF16 over FP32 master weights (also around the FP8 GEMMs
    on GPU); None for FP32 runs."""
    return torch.bfloat16 if precision == "bf16" or (precision == "fp8" and device.type == "cuda") else None


def autocast(device: torch.device, precision: str):
    dtype = amp_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# With train.optimizer=muon these matrices stay on AdamW: the embedding, the output head and every
# router's gate (matched at the end of the name, which pipeline stages prefix).
ADAMW_MATRICES = ("embed.weight", "head.weight", "gate.weight")


def uses_muon(name: str, p: torch.Tensor) -> bool:
    """Whether train.optimizer=muon updates this parameter with Muon (train/muon.py)."""
    return p.ndim >= 2 and not any(name == m or name.endswith("." + m) for m in ADAMW_MATRICES)


def optimizer_groups(model: torch.nn.Module, keep=None, optimizer: str = "adamw") -> list[list[str]]:
    """Parameter names of the optimizer's groups, in its order. AdamW: matrices (weight decay), then
    vectors (norms, no decay). Muon: Muon's matrices, then AdamW's matrices, then vectors.
    Concatenated, they index a single-process optimizer state dict."""
    named = [(n, p) for n, p in model.named_parameters() if keep is None or keep(n)]
    vectors = [n for n, p in named if p.ndim < 2]
    if optimizer == "muon":
        return ([n for n, p in named if uses_muon(n, p)],
                [n for n, p in named if p.ndim >= 2 and not uses_muon(n, p)], vectors)
    return [n for n, p in named if p.ndim >= 2], vectors


def build_optimizer(model: torch.nn.Module, cfg: Config, keep=None) -> torch.optim.Optimizer:
    """The optimizer over optimizer_groups (train.optimizer). keep(name) -> bool: the parameters this
    rank updates (ZeRO-1 owners); default all."""
    t = cfg.train
    params = dict(model.named_parameters())
    groups = [[params[n] for n in names] for names in optimizer_groups(model, keep, t.optimizer)]
    if t.optimizer == "muon":
        if any(isinstance(p, DTensor) for p in params.values()):
            raise MoeforgeError("train.optimizer=muon: needs whole matrices, not FSDP shards "
                                "(parallel.sharding=none|zero1, or train.optimizer=adamw)")
        muon, matrices, vectors = groups
        scale = t.muon_lr / t.lr if t.muon_lr else 1.0  # Muon's lr relative to the scheduled one
        return Muon([{"params": muon, "weight_decay": t.weight_decay, "muon": True, "lr_scale": scale},
                     {"params": matrices, "weight_decay": t.weight_decay},
                     {"params": vectors, "weight_decay": 0.0}],
                    lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, momentum=t.muon_momentum)
    decay, no_decay = groups
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.adam_moments == "bf16":  # the moments in BF16 (train/adamw.py): 12 instead of 16 bytes per parameter
        return AdamWBF16Moments(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    # The fused kernel (one pass over each parameter on CPU and GPU) is several times faster than the
    # op-by-op update at small sizes; it computes the same update.
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=True)


def forward_backward(model, windows, n_micro: int, lam: float, cfg: Config, device: torch.device,
                     precision: str) -> torch.Tensor:
    """Forward and backward over a step's micro-batches (windows: n_micro token tensors [b, S + 1],
    this rank's rows). Gradients accumulate in .grad; returns the means of (main loss, weighted MTP
    loss, balance loss) as a device tensor [3] (no host sync)."""
    t, m = cfg.train, cfg.model
    sums = torch.zeros(3, device=device)
    with step_weight_cache(cfg, precision, n_micro):
        for i, window in enumerate(windows):
            window = window.to(device, non_blocking=True)
            parallel.set_gradient_sync(model, i == n_micro - 1)  # FSDP: reduce on the last micro-batch only
            inputs = window[:, :-1]
            mask = document_mask(document_ids(inputs, m.eos_token_id)) if t.document_mask else None
            with autocast(device, precision):
                out = model.losses(inputs, window[:, 1:], mask=mask)
            mtp = out["mtp"].sum() * (lam / m.num_nextn_predict_layers) if out["mtp"].numel() else out["main"] * 0
            loss = out["main"] + mtp + t.balance_alpha * out["balance"]
            (loss / n_micro).backward()
            sums += torch.stack([out["main"], mtp, out["balance"]]).detach().float() / n_micro
    return sums


def step_weight_cache(cfg: Config, precision: str, n_micro: int):
    """The scope of one step's forward and backward passes, in which FP8 weights are quantised once
    (train.fp8_weight_cache; only worth it with more than one micro-batch)."""
    return weight_cache(precision == "fp8" and cfg.train.fp8_weight_cache and n_micro > 1)


PREFETCH = "fp8_weight_prefetch"  # set on a model whose FP8 weights optimizer_update quantises ahead


def optimizer_update(model, optimizer, moe_layers, cfg: Config, step: int, pctx, ema=None, zero1=None,
                     lr: torch.Tensor | None = None, gamma: float | None = None):
    """Clip to the global gradient norm, AdamW with the scheduled lr (ZeRO-1: on this rank's
    parameters, then every parameter from its owner), routing-bias update from the step's global
    counts, EMA. Returns (grad norm tensor, lr, per-layer imbalance tensor); no host sync.
    lr, gamma: a device scalar the optimizer reads as its lr and the bias update speed, instead of
    the schedule's values at `step` (a captured step, train/graph.py)."""
    t = cfg.train
    grad_norm = parallel.global_grad_norm(model, pctx)  # the single-process gradient's, under any layout
    if t.grad_clip > 0:
        coef = parallel.clip_coefficient(grad_norm, t.grad_clip)
        if any(isinstance(p, DTensor) for p in model.parameters()):
            parallel.scale_gradients(model, coef)
        else:
            # The fused AdamW kernel divides the gradients by `grad_scale` as it reads them (the hook
            # torch's GradScaler uses): clipping costs no extra pass over the gradients.
            optimizer.grad_scale = 1.0 / coef
    if lr is None:
        lr = lr_at(step, t)
    for group in optimizer.param_groups:  # (Muon's matrices may have their own peak lr)
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    if ema is not None:
        ema.before_optimizer_step()
    optimizer.step()
    model.zero_grad(set_to_none=True)  # (all of them: under ZeRO-1 the optimizer holds only its own)
    if zero1 is not None:
        zero1.broadcast_updates()
    if ema is not None:
        ema.update(step + 1)
    ratio = update_routing_bias(moe_layers, bias_update_speed_at(step, t) if gamma is None else gamma,
                                reduce=parallel.moe_count_reduce(pctx))  # global counts
    if getattr(model, PREFETCH, False):  # the next forward's FP8 weights, quantised now (fp8/cache.py)
        prefetch_weights()
    return grad_norm, lr, ratio


def wants_weight_prefetch(cfg: Config, device: torch.device, precision: str, pctx) -> bool:
    """train.fp8_weight_prefetch applies: FP8 GEMMs on a GPU, one process (a sharded or pipelined
    model's weights are not whole between steps), and eager steps (a captured step would replay its
    prefetch into buffers its forward never reads)."""
    t = cfg.train
    return (t.fp8_weight_prefetch and precision == "fp8" and device.type == "cuda" and pctx is None
            and not graph_on(cfg, device, pctx))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on `device` (CPU: MemAvailable of /proc/meminfo); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(device: torch.device, cfg: Config) -> None:
    """Refuse, before allocating anything, a single-process model whose weights, gradients and
    optimizer state alone (moeforge plan's model states) exceed the device's free memory
    (activations come on top)."""
    from ..plan import model_state_memory  # (plan.py builds on this module)

    free = available_memory(device)
    (states,) = model_state_memory(dataclasses.replace(cfg, parallel=ParallelConfig()), 1)
    if free is not None and states.total > free:
        raise MoeforgeError(f"the model has {states.params / 1e9:.2f}B parameters: training needs "
                            f"{states.total / 2**30:.1f} GiB for weights, gradients and optimizer state, but "
                            f"{device.type} has {free / 2**30:.1f} GiB free (choose a smaller preset, e.g. "
                            f"--preset tiny, or shard it over GPUs with torchrun)")


def build_train_model(cfg: Config, device: torch.device, precision: str, pctx) -> torch.nn.Module:
    """The model of this rank, initialised as the single-process model would be (with pp > 1: still
    on the meta device; split_train_pipeline materialises this rank's stages).

    Construction order: meta (no memory) -> FP8 (swap Linear/Experts classes) -> expert parallel (keep this rank's E/ep experts) ->
    FSDP (shard) -> to_empty (memory for this rank's pieces only) -> weights. Slicing and sharding
    must come before to_empty, or every rank would first allocate the whole model.
    """
    model = build_model(cfg.model, "meta")  # (callers check_memory first, for one process)
    if precision == "fp8":  # swaps module classes only: parameters and their names stay the same
        convert_to_fp8(model, FP8Recipe(norm_output=cfg.train.fp8_norm_output,
                                         accumulate_wgrad=cfg.train.fp8_accumulate_wgrad))
    t = cfg.train
    apply_recompute(model, t.recompute_parts)  # wraps block forwards / marks parts: no parameters touched
    set_loss_chunk(model, t.loss_chunk)
    if pctx is None:
        model = model.to_empty(device=device)
        if t.init_from:
            parallel.load_full_state_dict(model, start_values(cfg), None)
            for m in model.moe_layers():
                m.tokens_per_expert.zero_()
        else:
            init_weights(model, zero=t.zero_init_parts)
        setattr(model, PREFETCH, wants_weight_prefetch(cfg, device, precision, pctx))
        return apply_compile(model) if compile_on(cfg, device, pctx) else model
    if pctx.pp > 1:
        check_pipeline_layout(cfg, pctx)
        # Pipeline: the model stays on the meta device (with this rank's ep slice of the experts);
        # split_train_pipeline gives memory and weights to this rank's stages only.
        parallel.apply_expert_parallel(model, pctx)
        return apply_compile(model) if compile_on(cfg, device, pctx) else model
    model = shard_model(model, pctx, device, precision)
    # Weights: the single-process initialisation (same seed on every rank), drawn one full tensor at a
    # time on the CPU and sliced for this rank. Every rank still draws every value (time grows with the
    # whole model); large runs load a checkpoint instead (resume), which is sliced the same way.
    parallel.load_full_state_dict(model, start_values(cfg), pctx)
    return apply_compile(model) if compile_on(cfg, device, pctx) else model


def start_values(cfg: Config):
    """(name, tensor) for every weight and routing bias a new run starts from: the single-process
    initialisation (model.initial_values), or with train.init_from that checkpoint's weights (read whole
    on the CPU; the trainer has checked that its model config is this run's)."""
    if not cfg.train.init_from:
        return initial_values(cfg.model, zero=cfg.train.zero_init_parts)
    from .checkpoint import load_trained_model

    model, _ = load_trained_model(cfg.train.init_from, "cpu")
    return iter(model.state_dict().items())


def shard_model(model: torch.nn.Module, pctx, device: torch.device, precision: str) -> torch.nn.Module:
    """This rank's part of the meta-device `model` under the layout of pctx (no pipeline), with memory
    but no values yet: the routed experts sliced over ep (all-to-all dispatch), FSDP2 sharding
    (parallel.sharding=zero2|full; BF16 all-gathers with precision "bf16"), then memory for this
    rank's pieces only. Slicing and sharding must come before to_empty, or every rank would first
    allocate the whole model. The caller loads the weights (parallel.load_full_state_dict, or a
    checkpoint: checkpoint.load_into)."""
    parallel.apply_expert_parallel(model, pctx)
    parallel.apply_fsdp(model, pctx, bf16=precision == "bf16")
    model = model.to_empty(device=device)
    for moe in model.moe_layers():  # (not persistent: no checkpoint sets them)
        moe.tokens_per_expert.zero_()
    return model


def check_pipeline_sharding(pcfg) -> None:
    """FSDP inside pipeline stages: parallel.sharding=full (parameters gathered again for backward)
    only with the schedules that run each backward whole. zbv and dualpipev split a backward into
    its input and weight gradients, and torch's stages (2.11-2.13) look up the weights for the second
    part among the stage's parameters as they are then, resharded, not the gathered ones the forward
    used: those micro-batches' weight gradients would be lost."""
    if pcfg.pp > 1 and pcfg.sharding == "full" and pcfg.schedule in pipeline.V_SCHEDULES:
        raise MoeforgeError(f"parallel.sharding=full: not supported with parallel.schedule={pcfg.schedule} "
                            f"(split backward); use parallel.sharding=zero2, or schedule 1f1b or interleaved1f1b")


def check_pipeline_layout(cfg: Config, pctx) -> None:
    """What the trainer supports with parallel.pp > 1, checked before any model memory exists."""
    check_pipeline_sharding(cfg.parallel)
    t = cfg.train
    for n_micro in sorted({batch_size_at(step, t) // t.micro_batch for step in range(max(1, t.steps))}):
        pipeline.validate_micro_batches(cfg.parallel, n_micro)


def split_train_pipeline(model, cfg: Config, pctx, precision: str, device: torch.device):
    """This rank's pipeline stages of the meta-device `model` (build_train_model), with memory and the
    single-process initial weights for them alone (sharded by FSDP2 inside each stage under
    parallel.sharding=zero2|full), and the schedule factory (parallel/pipeline.py). The rest of
    `model` stays on the meta device."""
    stages, factory = pipeline.split_pipeline(model, cfg.parallel, pctx, micro_batch=cfg.train.micro_batch // pctx.data_ranks,
                                              seq_len=cfg.train.seq_len, amp_dtype=amp_dtype(device, precision))
    parallel.apply_fsdp_stages([st.submod for st in stages], pctx)  # (sharding=zero2|full; before to_empty)
    pipeline.stage_modules(stages).to_empty(device=device)  # the stages share the model's modules
    parallel.load_full_state_dict(model, start_values(cfg), pctx, owned=set(pipeline.stage_state_dict(stages)))
    for moe in pipeline.moe_layers(stages).values():
        moe.tokens_per_expert.zero_()
    return stages, factory
