"""What every post-training stage (GRPO, SFT) does around its own loss: open the starting checkpoint,
build a fresh AdamW, and save checkpoints in the trainer's format.

A post-training run reads a trained checkpoint and writes a run folder of its own (metrics.jsonl,
checkpoints/). Its checkpoints keep the starting checkpoint's config, so `moeforge generate`,
`eval`, `convert` and another post-training stage read them like any other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import Config
from ..data import load_tokenizer
from ..errors import MoeforgeError
from ..train import checkpoint as ckpt
from ..train.graph import portable_optimizer_state
from ..train.step import build_optimizer

__all__ = ["open_run", "build_adamw", "save_run_checkpoint", "init_data_parallel", "all_reduce_sum"]


def open_run(checkpoint: str | Path, out: str | Path, device: str | None):
    """(model, config, tokenizer) of the starting checkpoint, after checking that `out` can be a new run
    folder (a post-training run does not resume: a second run there would mix its metrics and
    checkpoints with the first's). Nothing is written yet."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoeforgeError(f"--out '{out}' exists and is not a folder")
    if (out / "metrics.jsonl").exists():
        raise MoeforgeError(f"--out '{out}' already holds a run (metrics.jsonl); choose a new folder")
    model, cfg = ckpt.load_trained_model(checkpoint, device)
    return model, cfg, load_tokenizer(cfg.train.tokenizer or None)


def build_adamw(model: torch.nn.Module, cfg: Config, **train) -> tuple[torch.optim.Optimizer, Config]:
    """A fresh AdamW (FP32 moments, no weight decay; train/step.py's parameter groups) whatever the model
    was pre-trained with, and the config it follows: cfg with that optimizer and the given train.*
    fields (lr, and for a schedule warmup_steps, steps, schedule, min_lr_ratio)."""
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="adamw", adam_moments="fp32",
                                                                 weight_decay=0.0, **train))
    return build_optimizer(model, run_cfg), run_cfg


def save_run_checkpoint(out: Path, step: int, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, keep: int) -> Path:
    """OUT/checkpoints/step_N in the trainer's format (atomic, the newest `keep` kept), with the
    starting checkpoint's config `cfg`."""
    return ckpt.save_checkpoint(Path(out) / "checkpoints", step, cfg, model.state_dict(),
                                portable_optimizer_state(optimizer.state_dict()), state, keep)


def init_data_parallel(device: str | None, per_step: int | None = None, flag: str = ""):
    """(ParallelContext or None, this rank's device, rank, ranks): under torchrun every rank joins the
    process group as a data-parallel replica of the whole model (parallel.dp = the world size; gloo
    on CPU, nccl on cuda:LOCAL_RANK); one process: (None, device, 0, 1). per_step: the items each
    step splits over the ranks (examples, prompts), given by the command-line flag `flag`; they must
    split evenly (None: no such items, e.g. rejection sampling splits its prompts by whole chunks)."""
    from ..config import ParallelConfig
    from ..parallel.mesh import init_distributed

    ctx = init_distributed(ParallelConfig(), device or "auto")
    if ctx is None:
        return None, device, 0, 1
    if per_step is not None and per_step % ctx.world_size:
        raise MoeforgeError(f"{flag} {per_step} does not split evenly over the {ctx.world_size} data-parallel ranks")
    return ctx, str(ctx.device), ctx.rank, ctx.world_size


def all_reduce_sum(values: list[float], ctx, device) -> list[float]:
    """The sums of `values` over the data-parallel ranks (FP64; the values themselves for one process)."""
    if ctx is None:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ctx.dp_ep_group)
    return t.tolist()
