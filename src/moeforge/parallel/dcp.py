"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own pieces.

What DCP sees is the single-process state described piece by piece. It gets one key per parameter
or buffer ("model/<name>") and per AdamW moment ("optim/<name>/exp_avg", ...), each either:
- a DTensor whose global shape is the single-process tensor's. FSDP's shards (Shard(0) over dp x ep)
  are used as they are. Routed experts sliced over ep are wrapped as DTensors over the (dp, ep) mesh
  with placements (Replicate, Shard(0)). Experts that FSDP also shards over dp are first gathered over
  dp, since a shard of a slice has no plain DTensor placement;
- or a plain tensor, which every rank holds in full (replicated parameters, one process).

DCP deduplicates the replicas when saving and reshards when loading. So a checkpoint saved under one
layout loads under any other, or in one process without a process group (eval, generate, convert),
and no rank ever holds the whole model. Loading fills the same views in place; views that are
copies are written back into the parameters.

Only the data is saved: the AdamW hyperparameters come from the config, and the trainer sets the
learning rate every step.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from .expert import _copy_into, expert_names, is_expert_key

MOMENTS = ("exp_avg", "exp_avg_sq")


def _views(model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx, create_moments: set[str] | None,
           owned: set[str] | None = None) -> tuple[dict, list[Callable[[], None]]]:
    """(the DCP state dict of this rank, write-backs to run after a load). create_moments (a load):
    the parameters whose optimizer state the checkpoint holds, created here (zeros) where the
    optimizer has none yet so that DCP can fill them; None (a save): only the state that exists.
    owned: the state-dict names this rank holds (a pipeline rank: its stages'); None: all."""
    routed = expert_names(model) if ctx is not None else set()
    writeback: list[Callable[[], None]] = []

    def view(name: str, t: torch.Tensor, expert: bool) -> torch.Tensor:
        if ctx is None or not expert or ctx.ep == 1:
            return t  # full, replicated, or an FSDP DTensor whose global shape is the full one
        mesh = ctx.mesh["dp", "ep"]
        if isinstance(t, DTensor):  # FSDP shard (over dp) of this rank's ep slice
            local = t.full_tensor()
            writeback.append(lambda: _copy_into(t, local))
        else:
            local = t
        dt = DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False)
        if not isinstance(t, DTensor):  # (from_local shares the storage; copy back should it not)
            writeback.append(lambda: None if dt.to_local().data_ptr() == t.data_ptr() else t.copy_(dt.to_local()))
        return dt

    state = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point() and (owned is None or name in owned):
            state[f"model/{name}"] = view(name, t.data if isinstance(t, nn.Parameter) else t,
                                          is_expert_key(name))
    if optimizer is not None:
        by_id = {id(p): (n, p) for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            muon = group.get("muon", False)  # Muon's matrices (train/muon.py): their own state, no step
            for p in group["params"]:
                name, _ = by_id[id(p)]
                st = optimizer.state.get(p)
                if not st:
                    # no step taken yet, or a parameter that never had a gradient (SFT's MTP modules):
                    # no state to save, and none to load
                    if create_moments is None or name not in create_moments:
                        continue
                    local = p.data.to_local() if isinstance(p.data, DTensor) else p.data
                    dtype = getattr(optimizer, "moment_dtype", None)  # BF16 moments (train/adamw.py)
                    st = ({k: torch.zeros_like(p.data) for k in optimizer.matrix_state} if muon else
                          {"step": torch.zeros((), dtype=torch.float32, device=local.device),
                           **{k: torch.zeros_like(p.data, dtype=dtype) for k in MOMENTS}})
                    optimizer.state[p] = st
                for k in (optimizer.matrix_state if muon else MOMENTS):
                    state[f"optim/{name}/{k}"] = view(name, st[k], name in routed or is_expert_key(name))
                if not muon:
                    state[f"optim/{name}/step"] = st["step"]
    return state, writeback


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx,
         owned: set[str] | None = None) -> None:
    """Every rank calls it (collective); the folder holds the DCP files of all ranks."""
    state, _ = _views(model, optimizer, ctx, create_moments=None, owned=owned)
    with warnings.catch_warnings():  # one process without a process group is a supported use
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(state, checkpoint_id=str(path))


def async_save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx, group,
               owned: set[str] | None = None):
    """save() in the background (collective: every rank calls it): this rank's pieces are copied to
    CPU memory before it returns, so training may go on changing the originals; DCP then writes them
    from a thread of its own, coordinating the ranks over `group` (ParallelContext.checkpoint_group).
    Returns a future whose result() returns once every rank's pieces and the checkpoint's metadata
    are written (or raises what failed on any rank)."""
    state, _ = _views(model, optimizer, ctx, create_moments=None, owned=owned)
    response = dcp.async_save(state, checkpoint_id=str(path), process_group=group)
    staging = getattr(response, "staging_completion", None)  # (torch versions that stage asynchronously)
    if staging is not None:
        staging.result()
    return getattr(response, "upload_completion", response)


@torch.no_grad()
def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx,
         owned: set[str] | None = None, weights: bool = True) -> None:
    """Fill this rank's model (and optimizer) from a DCP checkpoint saved under any layout.
    weights=False: the optimizer's state alone (the model holds its weights already)."""
    state, writeback = _views(model, optimizer, ctx, create_moments=_with_optimizer_state(path), owned=owned)
    if not weights:
        state = {k: v for k, v in state.items() if k.startswith("optim/")}
    with warnings.catch_warnings():  # one process without a process group is a supported use, not a mistake
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(path))
    for fn in writeback:
        fn()


def _with_optimizer_state(path: Path) -> set[str]:
    """The parameters whose optimizer state a DCP checkpoint holds (keys "optim/<name>/<moment>")."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len("optim/"):].rsplit("/", 1)[0] for k in keys if k.startswith("optim/")}


def has_optimizer_state(path: Path) -> bool:
    """Whether a DCP checkpoint holds AdamW moments (one saved before any step has none)."""
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return any(k.startswith("optim/") for k in meta.state_dict_metadata)
