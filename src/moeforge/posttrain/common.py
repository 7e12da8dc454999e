"""What every post-training stage (GRPO, SFT) does around its own loss: open the starting checkpoint
(or, with --resume, the run's newest one), build a fresh AdamW, and save checkpoints in the
trainer's format.

A post-training run reads a trained checkpoint and writes a run folder of its own (metrics.jsonl,
checkpoints/). Its checkpoints keep the starting checkpoint's config, so `moeforge generate`,
`eval`, `convert` and another post-training stage read them like any other. Their state.pt holds
what a resume needs besides the weights and the AdamW state: the step, the stage's settings, what
else defines the run (`PostRun.run`: the starting checkpoint, and the stage's data, task or number
of ranks) and the stage's progress (its random states and counters).

Under torchrun the model is a replica on every rank, or (`moeforge sft --ep --sharding`) sliced and
sharded over the ranks as the trainer's is (load_model). Then every rank writes its own pieces of
each checkpoint, as the trainer's distributed checkpoints (parallel/dcp.py), which load under any
layout and in one process.

A resumed run continues from the newest checkpoint of OUT/checkpoints: the same model, AdamW state
and progress, so on CPU it computes what the uninterrupted run would have, bit for bit (tested).
It must be opened with the same --checkpoint, the same run entries and the same settings, except
MAY_CHANGE; metrics.jsonl is appended to, after dropping the records of steps past that checkpoint
(written before the run stopped, and written again by the resumed run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import Config, ParallelConfig
from ..data import Tokenizer, load_tokenizer
from ..errors import MoeforgeError
from ..model import build_model
from ..train import checkpoint as ckpt
from ..train.graph import portable_optimizer_state
from ..train.metrics import MetricsSink, is_run_metrics, trim_metrics
from ..train.step import available_memory, build_optimizer, shard_model
from .settings import SHARDINGS

if TYPE_CHECKING:
    from ..parallel.mesh import ParallelContext

__all__ = ["MAY_CHANGE", "PostRun", "open_run", "load_model", "build_adamw", "checkpoint_due", "init_data_parallel",
           "check_layout", "all_reduce_sum", "all_gather_objects"]

# The settings a resumed run may change: how long it runs and how often it evaluates and saves (and
# keep_checkpoints, how many checkpoints it keeps). Every other setting shapes what the remaining
# steps compute, so a resume takes the saved value or nothing.
MAY_CHANGE = ("steps", "eval_every", "checkpoint_every", "keep_checkpoints")

# How a --resume error names each compared entry of PostRun.run ("start" and "start_manifest" are
# not compared: they follow from --checkpoint when the run began).
_RUN_ENTRIES = {"checkpoint": "--checkpoint '{}'", "data": "--data '{}'",
                "data_sha256": "--data contents of SHA-256 {:.16}", "task": "--task {}",
                "ranks": "{} data-parallel rank(s)"}


@dataclass
class PostRun:
    """A post-training run, opened by open_run: its model (the starting checkpoint's, or on --resume
    the newest checkpoint's), config and tokenizer, and what its checkpoints record."""

    out: Path
    stage: str  # "sft", "grpo": the key of the stage's settings in state.pt
    model: torch.nn.Module
    cfg: Config  # the starting checkpoint's, kept by every checkpoint of the run
    tok: Tokenizer
    run: dict  # what defines the run besides its settings (module doc)
    resumed: dict | None = None  # on --resume: the newest checkpoint's state.pt and optimizer.pt
    resumed_from: Path | None = None  # on --resume: that checkpoint
    pctx: ParallelContext | None = None  # under torchrun, when the stage passed it: the model's layout
    restart: bool = False  # a new run where an earlier one stopped before its first checkpoint
    # one process: checkpoints written in the background (train/checkpoint.py BackgroundSaves)
    saves: ckpt.BackgroundSaves | None = field(default=None, repr=False)

    @property
    def sharded(self) -> bool:
        """Whether this rank holds only part of the model: routed experts sliced over ep, or FSDP shards."""
        return self.pctx is not None and (self.pctx.ep > 1 or self.pctx.sharding in ("zero2", "full"))

    @property
    def step(self) -> int:
        """The step the run starts after: 0, or the resumed checkpoint's."""
        return self.resumed["state.pt"]["step"] if self.resumed else 0

    @property
    def progress(self) -> dict | None:
        """The resumed checkpoint's progress (the stage's random states and counters), None for a new run."""
        return self.resumed["state.pt"]["progress"] if self.resumed else None

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """On --resume: the AdamW state (moments and step counts) as the checkpoint has it, in this
        run's layout whatever layout wrote it."""
        if self.resumed:
            ckpt.load_into(self.resumed_from, self.resumed, self.model, optimizer, self.pctx, weights=False)

    def metrics(self, lead: bool) -> MetricsSink | None:
        """The run's metrics.jsonl, opened to append, on the rank that writes (`lead`; None elsewhere);
        on --resume without the records past the resumed checkpoint."""
        if not lead:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        trim_metrics(self.out / "metrics.jsonl", -1 if self.restart else self.step)  # (restart: the earlier
        # run's records go; they belong to no checkpoint)
        return MetricsSink(self.out, tensorboard=False)

    def save(self, step: int, optimizer: torch.optim.Optimizer, settings, keep: int, **progress) -> Path | None:
        """OUT/checkpoints/step_N in the trainer's format (atomic, the newest `keep` kept), with the
        starting checkpoint's config and, in state.pt, all a resume needs (module doc; `progress`:
        rank 0's). A sharded model (self.sharded): every rank calls it and writes its own pieces, in
        step. Otherwise rank 0 writes model.pt and optimizer.pt from CPU copies in a background thread
        (save_in_background; one process or data parallel); another rank's call writes nothing (None)."""
        state = {"step": step, self.stage: dataclasses.asdict(settings), "run": self.run, "progress": progress}
        root = self.out / "checkpoints"
        if self.sharded:
            return ckpt.save_distributed(root, step, self.cfg, self.model, optimizer, self.pctx, state, keep)
        if self.pctx is not None and not self.pctx.is_main:
            return None
        states = (self.model.state_dict(), portable_optimizer_state(optimizer.state_dict()))
        if self.saves is None:
            self.saves = ckpt.BackgroundSaves()
        return ckpt.save_in_background(self.saves, root, step, self.cfg, *states, state, keep,
                                       available_memory(torch.device("cpu")))

    def wait_for_checkpoints(self, report: bool = True) -> None:
        """Return once every checkpoint started is on disk (report: raise MoeforgeError for one that
        failed; False on a path that is raising already)."""
        if self.saves is not None:
            self.saves.wait(report)

    def starting_model(self, device: str | None, precision: str = "fp32") -> torch.nn.Module:
        """The model the run started from, read again from its starting checkpoint, which must still
        hold what it held then: the same manifest (which lists the SHA-256 of every file). A sliced or
        sharded run's (self.sharded) in the run's layout (load_model)."""
        path = Path(self.run["start"])
        if not (path / "manifest.json").is_file():
            raise MoeforgeError(f"--resume: the run's starting checkpoint '{path}' is gone (the run needs that model)")
        if _manifest_digest(path) != self.run["start_manifest"]:
            raise MoeforgeError(f"--resume: the run's starting checkpoint '{path}' has changed since the run began")
        if self.sharded:
            return load_model(path, device, self.pctx, precision)[0]
        return ckpt.load_trained_model(path, device)[0]


def open_run(checkpoint: str | Path, out: str | Path, device: str | None, stage: str, settings, run: dict,
             resume: bool = False, pctx=None, precision: str = "fp32") -> PostRun:
    """The post-training run of stage `stage` in `out`, with `settings` (the stage's dataclass) and
    `run` (the entries that define it besides its settings and --checkpoint: data, task, ranks).
    pctx: init_data_parallel's context, to build the model in its layout (load_model; precision
    "bf16": FSDP gathers BF16 weights); None: one process, or a replica loaded whole on every rank.

    A new run: the starting checkpoint's model, after checking that `out` can be a new run folder (a
    second run there would mix its metrics and checkpoints with the first's). resume: the newest
    checkpoint of OUT/checkpoints, after checking that it was made with the same --checkpoint, run
    entries and settings (but MAY_CHANGE), and that --steps goes past it. Nothing is written yet."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoeforgeError(f"--out '{out}' exists and is not a folder")
    run = {"checkpoint": str(Path(checkpoint).expanduser().resolve()), **run}
    if resume:
        return _resume(out, device, stage, settings, run, pctx, precision)
    restart = (out / "metrics.jsonl").exists()
    if restart and (ckpt.list_checkpoints(out / "checkpoints") or not is_run_metrics(out / "metrics.jsonl")):
        raise MoeforgeError(f"--out '{out}' already holds a run (metrics.jsonl); pass --resume to continue it "
                            f"or choose a new folder")
    # (else an earlier run in `out` stopped before its first checkpoint: nothing to resume, start again)
    start = ckpt.resolve_checkpoint(checkpoint)
    model, cfg = load_model(start, device, pctx, precision)
    run.update(start=str(start.resolve()), start_manifest=_manifest_digest(start))
    return PostRun(out, stage, model, cfg, load_tokenizer(cfg.train.tokenizer or None), run, pctx=pctx,
                   restart=restart)


def load_model(path: Path, device: str | None, pctx, precision: str = "fp32") -> tuple[torch.nn.Module, Config]:
    """(model in eval mode, config) of a checkpoint. pctx None: the whole model on `device`. Under
    torchrun, this rank's part of it in the layout of pctx, built as the trainer builds its model
    (meta -> experts sliced over ep -> FSDP -> memory for this rank's pieces -> weights): a
    single-process checkpoint's tensors are sliced on the way in, a distributed one's pieces
    resharded, so that no rank holds more of the model than its part (but a single-process
    checkpoint is read whole on each rank's host)."""
    if pctx is None:
        model, cfg = ckpt.load_trained_model(path, device)
        return _fp8(model, cfg, precision), cfg
    cfg = ckpt.load_checkpoint_config(path)
    experts = cfg.model.n_routed_experts
    if experts % pctx.ep:
        raise MoeforgeError(f"--ep {pctx.ep} does not divide the model's {experts} routed experts")
    model = shard_model(_fp8(build_model(cfg.model, "meta"), cfg, precision), pctx, pctx.device, precision)
    ckpt.load_into(path, ckpt.load_checkpoint(path, ("model.pt",)), model, None, pctx)
    return model.eval(), cfg


def _fp8(model: torch.nn.Module, cfg: Config, precision: str) -> torch.nn.Module:
    """precision "fp8": the model's Linears and experts switched to FP8 (fp8.convert_to_fp8, with the
    checkpoint's training settings for the recipe); the parameters stay the same, so do checkpoints."""
    if precision != "fp8":
        return model
    from ..fp8 import FP8Recipe, convert_to_fp8

    return convert_to_fp8(model, FP8Recipe(norm_output=cfg.train.fp8_norm_output,
                                           accumulate_wgrad=cfg.train.fp8_accumulate_wgrad))


def _resume(out: Path, device: str | None, stage: str, settings, run: dict, pctx, precision: str) -> PostRun:
    root = out / "checkpoints"
    found = ckpt.list_checkpoints(root)
    if not found:
        raise MoeforgeError(f"--resume: no checkpoint under '{root}' (a run that stopped before its first "
                            f"checkpoint starts again without --resume)")
    path = found[-1]
    parts = ckpt.load_checkpoint(path, ("optimizer.pt", "state.pt"))
    state = parts["state.pt"]
    if not isinstance(state.get(stage), dict) or "run" not in state or "progress" not in state:
        raise MoeforgeError(f"--resume: checkpoint '{path}' is not one a `moeforge {stage}` run can resume from")
    for key, given in run.items():
        saved = state["run"].get(key)
        if saved != given:
            what = _RUN_ENTRIES[key]
            raise MoeforgeError(f"--resume: the run in '{out}' was made with {what.format(str(saved))}, "
                                f"not with {what.format(str(given))}")
    defaults = dataclasses.asdict(type(settings)())  # (settings added since the run began: their defaults)
    for name, given in dataclasses.asdict(settings).items():
        saved = state[stage].get(name, defaults[name])
        if name not in MAY_CHANGE and saved != given:
            raise MoeforgeError(f"--resume: the run in '{out}' was made with --{name.replace('_', '-')} {saved}, "
                                f"not {given} (a resumed run may change --steps and how often it evaluates and saves)")
    if settings.steps <= state["step"]:
        raise MoeforgeError(f"--resume: the run in '{out}' has done {state['step']} steps already; pass --steps "
                            f"above {state['step']} to continue it")
    model, cfg = load_model(path, device, pctx, precision)
    return PostRun(out, stage, model, cfg, load_tokenizer(cfg.train.tokenizer or None), state["run"], parts, path, pctx)


def _manifest_digest(path: Path) -> str:
    """The SHA-256 of a checkpoint's manifest.json: it names the checkpoint's contents."""
    return ckpt.file_sha256(path / "manifest.json")


def build_adamw(model: torch.nn.Module, cfg: Config, **train) -> tuple[torch.optim.Optimizer, Config]:
    """A fresh AdamW (FP32 moments, no weight decay; train/step.py's parameter groups) whatever the model
    was pre-trained with, and the config it follows: cfg with that optimizer and the given train.*
    fields (lr, and for a schedule warmup_steps, steps, schedule, min_lr_ratio)."""
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="adamw", adam_moments="fp32",
                                                                 weight_decay=0.0, **train))
    return build_optimizer(model, run_cfg), run_cfg


def checkpoint_due(step: int, settings) -> bool:
    """Whether a run saves a checkpoint after `step`: every settings.checkpoint_every steps (0: never)
    and after the last."""
    every = settings.checkpoint_every
    return step == settings.steps or bool(every and step % every == 0)


def init_data_parallel(device: str | None, per_step: int | None = None, flag: str = "",
                       layout: ParallelConfig | None = None):
    """(ParallelContext or None, this rank's device, rank, ranks): under torchrun every rank joins the
    process group (gloo on CPU, nccl on cuda:LOCAL_RANK); one process: (None, device, 0, 1).
    layout: how the ranks hold the model, its ep and sharding (check_layout; `moeforge sft --ep
    --sharding`); default: every rank a replica of the whole model. rank, ranks: this rank's place
    among the dp x ep data ranks (all of them), which split each step's items. per_step: those items
    (examples, prompts), given by the command-line flag `flag`; they must split evenly (None: no such
    items, e.g. rejection sampling splits its prompts by whole chunks)."""
    from ..parallel.mesh import init_distributed

    layout = layout or ParallelConfig()
    check_layout(layout)
    ctx = init_distributed(layout, device or "auto")
    if ctx is None:
        return None, device, 0, 1
    if per_step is not None and per_step % ctx.data_ranks:
        split = f" (dp {ctx.dp} x ep {ctx.ep})" if ctx.ep > 1 else ""
        raise MoeforgeError(f"{flag} {per_step} does not split evenly over the {ctx.data_ranks} data-parallel "
                            f"ranks{split}")
    return ctx, str(ctx.device), ctx.data_rank, ctx.data_ranks


def check_layout(layout: ParallelConfig) -> None:
    """A layout post-training can run, for the world size torchrun set (one process: WORLD_SIZE unset):
    --ep dividing the ranks, --sharding none | zero2 | full, and neither without torchrun (they
    spread the model over processes; one process holds it whole)."""
    from ..parallel.mesh import world_size_from_env

    if layout.sharding not in SHARDINGS:
        raise MoeforgeError(f"--sharding: expected {', '.join(SHARDINGS)}, got {layout.sharding!r}")
    if layout.ep < 1:
        raise MoeforgeError(f"--ep: must be at least 1, got {layout.ep}")
    world = world_size_from_env()
    asked = [flag for flag, on in ((f"--ep {layout.ep}", layout.ep > 1),
                                   (f"--sharding {layout.sharding}", layout.sharding != "none")) if on]
    if world <= 1 and asked:
        raise MoeforgeError(f"{' '.join(asked)}: expert parallelism and FSDP sharding spread the model over several "
                            f"processes; launch with torchrun --nproc-per-node N (one process takes --ep 1 --sharding none)")
    if world > 1 and world % layout.ep:
        raise MoeforgeError(f"--ep {layout.ep} does not divide the {world} ranks torchrun started")


def all_reduce_sum(values: list[float], ctx, device) -> list[float]:
    """The sums of `values` over the data-parallel ranks (FP64; the values themselves for one process)."""
    if ctx is None:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ctx.dp_ep_group)
    return t.tolist()


def all_gather_objects(obj, ctx) -> list:
    """Every data-parallel rank's `obj` (anything picklable), in rank order ([obj] for one process)."""
    if ctx is None:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj, group=ctx.dp_ep_group)
    return gathered
