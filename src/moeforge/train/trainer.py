"""The training loop: one trainer for pre-training (and later post-training losses).

Per optimizer step: n micro-batches (gradient accumulation) -> loss = main + lambda/D * sum(MTP)
+ alpha * balance -> clip -> AdamW with the scheduled lr -> routing-bias update from the step's
expert loads. Metrics go to the console, OUT/metrics.jsonl and TensorBoard; checkpoints to
OUT/checkpoints/step_N (atomic, last N kept); `resume` continues bit-identically on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data import PackedLoader, default_cache_dir, iter_eval_batches, load_tokenizer, prepare_data
from ..errors import MoeforgeError
from ..fp8.cache import drop_prefetched
from ..generate import generate
from ..model import build_model, count_parameters
from ..model.mtp import IGNORE_INDEX
from .. import parallel
from ..parallel import pipeline
from . import checkpoint as ckpt
from .balance import imbalance_stats
from .ema import CPUEMA
from .graph import GraphedStep, check_graph_step, one_process_step, portable_optimizer_state
from .metrics import Clock, MetricsSink, flops_per_token, peak_flops, trim_metrics
from .schedule import batch_size_at, lr_at, mtp_lambda_at
from .speed import compile_on, graph_on
from .step import (autocast, available_memory, build_optimizer, build_train_model, check_memory, forward_backward,
                   optimizer_update, resolve_device, resolve_precision, split_train_pipeline, step_weight_cache)

LN2 = math.log(2)
# more passes over the training tokens than this: the run says so at its start (on the default corpus
# the `small` preset's former 5,000 steps, 58 passes, ended at 1.60 bits per byte where 900 steps, 10
# passes, reach 0.83; docs/training.md)
MAX_PASSES = 20


def passes_note(steps: int, tokens_per_step: int, train_tokens: int) -> str | None:
    """A one-line note when `steps` of `tokens_per_step` would read the training tokens more than
    MAX_PASSES times, else None."""
    passes = steps * tokens_per_step / max(train_tokens, 1)
    if passes <= MAX_PASSES:
        return None
    return (f"note: {steps:,} steps of {tokens_per_step:,} tokens read the {train_tokens:,} training tokens "
            f"{passes:.0f} times; the validation loss will likely rise long before the end (overfitting): "
            f"fewer steps (--steps) or more data (--data)")


FP8_MIN_WIDTH = 2048  # the narrowest hidden size at which an FP8 step was measured faster than BF16


def fp8_width_note(hidden: int) -> str | None:
    """A one-line note for an FP8 run on the GPU kernels whose hidden size is below FP8_MIN_WIDTH,
    where quantising the activations costs more than the FP8 GEMMs save, else None."""
    if hidden >= FP8_MIN_WIDTH:
        return None
    return (f"note: at hidden size {hidden:,} FP8 is likely slower than BF16 (measured: 0.83-0.85x BF16's "
            f"tokens/s at 768, the `small` preset, 1.08-1.14x at {FP8_MIN_WIDTH:,}, the `bench` preset; "
            f"docs/fp8.md); --precision bf16 for speed")


@torch.no_grad()
def evaluate(model, tokens, token_bytes: torch.Tensor, seq_len: int, batch_size: int, device, precision,
             max_batches: int | None = None, shard: tuple[int, int] | None = None, reduce=None,
             stride: int = 0) -> dict[str, float]:
    """Mean next-token loss and bits per byte. Bits per byte counts only targets that stand for
    bytes of text (special tokens such as the EOS separator have 0 bytes and are left out), so it
    does not depend on the tokenizer. stride > 0: overlapping windows (iter_eval_batches).

    shard=(rank, ranks): this rank evaluates its share of the rows of every batch (padded with
    ignored rows so that every rank runs the same forwards, as expert parallelism needs), and
    `reduce` sums the four totals over the ranks (an all-reduce)."""
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats (byte targets), nats (all), tokens, bytes
    for inputs, targets in iter_eval_batches(tokens, seq_len, batch_size, max_batches, stride):
        if shard is not None:
            rank, ranks = shard
            rows = -(-inputs.shape[0] // ranks)
            pad = rows * ranks - inputs.shape[0]
            inputs = torch.nn.functional.pad(inputs, (0, 0, 0, pad))[rank * rows:(rank + 1) * rows]
            targets = torch.nn.functional.pad(targets, (0, 0, 0, pad), value=IGNORE_INDEX)[rank * rows:(rank + 1) * rows]
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, precision):
            loss = model(inputs, targets=targets)  # [B, S], 0 at ignored targets
        valid = targets != IGNORE_INDEX
        nbytes = token_bytes[targets.clamp_min(0)] * valid
        sums += torch.stack([(loss * (nbytes > 0)).sum(dtype=torch.float64), (loss * valid).sum(dtype=torch.float64),
                             valid.sum(dtype=torch.float64), nbytes.sum(dtype=torch.float64)])
    model.train(was_training)
    if reduce is not None:
        sums = reduce(sums)
    nats, nats_all, n_tokens, n_bytes = sums.tolist()
    if n_tokens == 0:
        raise MoeforgeError("the evaluation data is empty")
    return {"loss": nats_all / n_tokens, "bpb": nats / LN2 / max(1, n_bytes), "tokens": int(n_tokens),
            "bytes": int(n_bytes)}


def xz_bits_per_byte(text: str) -> float:
    """The baseline a language model should beat: `xz -9` (LZMA preset 9) on the same text."""
    import lzma

    data = text.encode("utf-8")
    return 8 * len(lzma.compress(data, preset=9)) / max(1, len(data))


def _check_not_foreign(out: Path) -> None:
    """A new run may start in a folder that holds no checkpoint only if what the run would write there
    (config.toml, metrics.jsonl) is absent or an earlier run's of moeforge that never saved one: a
    user's own file of either name is never overwritten."""
    from .metrics import is_run_metrics

    for name, ours in (("config.toml", _is_run_config), ("metrics.jsonl", is_run_metrics)):
        path = out / name
        if path.exists() and not ours(path):
            raise MoeforgeError(f"--out '{out}' holds a {name} that is not a moeforge run's; choose another --out "
                                f"(nothing was written)")


def _is_run_config(path: Path) -> bool:
    """Whether a config.toml is a moeforge config (one a run wrote)."""
    from ..config import load_config

    try:
        load_config(None, str(path), [])
    except MoeforgeError:
        return False
    return True


def validation_text(data_path: str | None) -> str:
    """The held-out documents, concatenated, as the evaluation reads them (without separators)."""
    from ..data.corpus import plan_split

    return "".join(plan_split(data_path).val_documents())


@dataclass
class TrainResult:
    step: int
    val_loss: float | None
    val_bpb: float | None
    sample: str
    out: Path


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        t = cfg.train
        self.out = Path(t.out)
        self.ckpt_root = self.out / "checkpoints"
        if self.out.exists() and not self.out.is_dir():
            raise MoeforgeError(f"--out '{self.out}' exists and is not a folder")
        # The tokenizer decides the separator id, which is part of the model config: set it before
        # comparing with a checkpoint's config.
        self.tokenizer = load_tokenizer(t.tokenizer or None)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise MoeforgeError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                                f"vocabulary ({self.tokenizer.vocab_size})")
        cfg.model.eos_token_id = self.tokenizer.eos_id
        existing = ckpt.list_checkpoints(self.ckpt_root)
        resume_from = None
        if resume:
            if not existing:
                raise MoeforgeError(f"--resume: no checkpoint under '{self.ckpt_root}'")
            resume_from = existing[-1]
            saved = ckpt.load_checkpoint_config(resume_from)
            diff = ckpt.config_differences(saved, cfg)
            if diff:
                raise MoeforgeError(f"checkpoint '{resume_from}' was made with another model config ({diff[0]})")
            done = int(ckpt.STEP_RE.match(resume_from.name).group(1))
            if t.steps < done:  # (equal: nothing to train; the run is validated again, its checkpoint rewritten)
                raise MoeforgeError(f"--resume: the run in '{self.out}' has done {done} steps already, more than "
                                    f"--steps {t.steps}; pass --steps above {done} to continue it")
        elif existing:
            raise MoeforgeError(f"'{self.out}' already holds checkpoints; pass --resume to continue or choose another --out")
        else:
            _check_not_foreign(self.out)
        build_cfg = cfg  # a resumed run's weights come from its own checkpoint, not from train.init_from
        if t.init_from and resume_from is None:
            start = ckpt.resolve_checkpoint(t.init_from)
            diff = ckpt.config_differences(ckpt.load_checkpoint_config(start), cfg)
            if diff:
                raise MoeforgeError(f"train.init_from: checkpoint '{start}' has another model config ({diff[0]})")
        elif t.init_from:
            build_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, init_from=""))

        # None for one process; under torchrun the mesh (pp x dp x ep) and this rank's place in it.
        self.pctx = parallel.init_distributed(cfg.parallel, t.device)
        parallel.check_batch_sizes(t.micro_batch, self.pctx)
        self.is_main = self.pctx is None or self.pctx.is_main  # rank 0 alone writes files and logs
        self.device = self.pctx.device if self.pctx is not None else resolve_device(t.device)
        self.precision = resolve_precision(t.precision, self.device)
        if self.pctx is None:  # before the data is prepared: a model that cannot fit fails at once
            check_memory(self.device, cfg)
        self.progress = progress and self.is_main
        if t.cuda_graph is True:
            check_graph_step(cfg, self.device, self.pctx)
        seed_everything(t.seed)

        self.data = prepare_data(t.data or None, self.tokenizer, default_cache_dir())
        self.loader = PackedLoader(self.data.train, t.seq_len, t.seed, self.tokenizer.eos_id, t.fim_rate,
                                   self.tokenizer.fim_ids)

        self.model = build_train_model(build_cfg, self.device, self.precision, self.pctx)
        # Pipeline parallelism: this rank's stages reference the model's own modules; the optimizer,
        # clipping and the routing-bias update see only them (the rest of self.model is unused here).
        self.stages = self.pipe = None
        self.updated = self.model  # what this rank's optimizer updates: the model, or its pipeline stages
        if self.pctx is not None and self.pctx.pp > 1:
            self.stages, self.pipe = split_train_pipeline(self.model, build_cfg, self.pctx, self.precision, self.device)
            self.updated = pipeline.stage_modules(self.stages)
            self.moe_layer_names = list(pipeline.moe_layers(self.stages))
            self.moe_layers = list(pipeline.moe_layers(self.stages).values())
        else:
            self.moe_layers = self.model.moe_layers()
        # ZeRO-1: the AdamW state of `updated` partitioned over the ranks that replicate it (a stage's)
        # (one process ignores the layout: a ZeRO-1 run's checkpoint resumes there with the whole state)
        zero1 = cfg.parallel.sharding == "zero1" and self.pctx is not None
        self.zero1 = parallel.Zero1(self.updated, self.pctx) if zero1 else None
        self.optimizer = build_optimizer(self.updated, cfg, keep=self.zero1.owns if self.zero1 else None)
        self.ema = None
        if t.ema_decay > 0:
            p = self.pctx
            if p is not None and (p.ep > 1 or p.pp > 1 or cfg.parallel.sharding not in ("none", "zero1")):
                raise MoeforgeError("train.ema_decay: the CPU parameter EMA needs whole parameters on rank 0: "
                                    "one process, or data parallelism with parallel.sharding=none|zero1 "
                                    "(not expert or pipeline parallelism, zero2 or full)")
            if self.is_main:  # replicated parameters: rank 0 alone keeps (and saves) the average
                self.ema = CPUEMA(self.model, t.ema_decay, t.ema_every)
        # checkpoints written in the background: in one process unless false, under torchrun if true
        self.saves = ckpt.BackgroundSaves() if (t.async_checkpoint is True or (
            t.async_checkpoint == "auto" and self.pctx is None)) else None
        self.graphed = None
        if graph_on(cfg, self.device, self.pctx):  # one process: the model is what the optimizer updates
            self.graphed = GraphedStep(one_process_step(self.model, self.optimizer, self.moe_layers, cfg, self.device,
                                                        self.precision), self.optimizer, cfg, self.device)
        self.step, self.tokens_seen = 0, 0
        if resume_from is not None:
            self._load(resume_from)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(cfg.to_toml())
            # metrics.jsonl continues the checkpointed run: drop records past its step (from a run that was
            # stopped after its last checkpoint), or all of them when starting afresh.
            trim_metrics(self.out / "metrics.jsonl", self.step)
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.clock = Clock(self.device)  # times each step on the device's timeline (tokens/s)
        self.peak = peak_flops(self.device)

    def _speed_summary(self) -> str:
        """What the start line says of the speed switches as this run decided them (train.compile and
        train.cuda_graph "auto" included) and of the FP8 GEMMs: kernels or the exact emulation."""
        parts = []
        if self.precision == "fp8":
            from ..fp8 import gpu

            if gpu.kernels_on(self.device):
                parts.append("FP8 GEMMs on the GPU kernels")
            elif self.device.type != "cuda":
                parts.append("FP8 GEMMs emulated exactly")
            else:
                parts.append("FP8 GEMMs emulated exactly (" + ("MOEFORGE_FP8_GPU=0" if not gpu.ENABLED else
                                                               "the FP8 kernels need an SM90 GPU and Triton") + ")")
        if compile_on(self.cfg, self.device, self.pctx):
            parts.append("compiled blocks")
        if self.graphed is not None:
            parts.append("each step replayed as one CUDA graph")
        return "".join(f" | {p}" for p in parts)

    # ---- checkpoints ----
    def _state(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def save(self) -> Path:
        """One process: model.pt and optimizer.pt. Under torchrun every rank writes its own pieces
        with torch.distributed.checkpoint (dcp/), which loads under any other layout or in one
        process; a pipeline rank writes its stages' pieces. Rank 0 completes the checkpoint. Written
        in the background where self.saves is set (train.async_checkpoint)."""
        keep = self.cfg.train.keep_checkpoints
        if self.pctx is not None:
            return ckpt.save_distributed(self.ckpt_root, self.step, self.cfg, self.model, self.optimizer, self.pctx,
                                         self._state() if self.is_main else None, keep, self._owned_names(),
                                         saves=self.saves)
        states = (self.model.state_dict(), portable_optimizer_state(self.optimizer.state_dict()), self._state())
        if self.saves is None:
            return ckpt.save_checkpoint(self.ckpt_root, self.step, self.cfg, *states, keep)
        # train.async_checkpoint: the states as they are now, written while the next steps train
        return ckpt.save_in_background(self.saves, self.ckpt_root, self.step, self.cfg, *states, keep,
                                       available_memory(torch.device("cpu")))

    def wait_for_checkpoints(self, report: bool = True) -> None:
        """Return once every checkpoint started is on disk (report: raise MoeforgeError for one that failed)."""
        if self.saves is not None:
            self.saves.wait(report)

    def _owned_names(self) -> set[str] | None:
        """Pipeline: the state-dict names of this rank's stages (None: the whole model is this rank's)."""
        return set(pipeline.stage_state_dict(self.stages)) if self.stages is not None else None

    def _load(self, path: Path) -> None:
        parts = ckpt.load_checkpoint(path, map_location=self.device)
        ckpt.load_into(path, parts, self.model, self.optimizer, self.pctx, optimizer_kind=self.cfg.train.optimizer,
                       owned=self._owned_names())
        state = parts["state.pt"]
        self.step, self.tokens_seen = state["step"], state["tokens"]
        if self.ema is not None:
            # A run that starts its EMA at a resume begins the average at the resumed weights.
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema.close()
                self.ema = CPUEMA(self.model, self.cfg.train.ema_decay, self.cfg.train.ema_every)
        self.loader.load_state_dict(state["loader"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([r.cpu() for r in rng["cuda"]])

    # ---- pipeline parallelism: gathers over the pipeline group ----
    def _pipeline_full_state_dict(self) -> dict | None:
        """The single-process model state dict on rank 0 (collective over all ranks): each stage's
        expert slices are first gathered over ep; then the ranks of rank 0's pipeline group (data
        rank 0 of every stage) send their stages to rank 0."""
        import torch.distributed as dist

        local = {k: parallel.full_tensor(v, parallel.is_expert_key(k), self.pctx).detach().cpu()
                 for k, v in pipeline.stage_state_dict(self.stages).items()}
        if self.pctx.data_rank != 0:
            return None
        parts = [None] * self.pctx.pp if self.is_main else None
        dist.gather_object(local, parts, dst=0, group=self.pctx.pp_group)
        if not self.is_main:
            return None
        merged = {}
        for part in parts:
            merged.update(part)
        keys = list(build_model(self.cfg.model, "meta").state_dict())  # the single model's names and order
        missing = [k for k in keys if k not in merged]
        if missing:
            raise MoeforgeError(f"pipeline checkpoint: no stage holds {len(missing)} tensors (first: {missing[0]})")
        return {k: merged[k] for k in keys}

    def _single_device_model(self) -> torch.nn.Module | None:
        """Rank 0: a single-device copy of the whole model (eval mode); other ranks: None. Collective."""
        if self.stages is not None:
            state = self._pipeline_full_state_dict()
        else:
            state = parallel.full_state_dict(self.model, self.pctx)
        if not self.is_main:
            return None
        model = build_model(self.cfg.model, self.device, init=False)
        model.load_state_dict(state)
        model.eval()
        return model

    def _pipeline_balance_stats(self, local: dict) -> dict:
        """Load statistics over all MoE layers of the model (each pp rank measured its own layers)."""
        import torch.distributed as dist

        ratios = [local[f"imbalance/layer{i}"] for i in range(len(self.moe_layer_names))]
        parts = [None] * self.pctx.pp
        dist.all_gather_object(parts, list(zip(self.moe_layer_names, ratios)), group=self.pctx.pp_group)
        found = dict(pair for part in parts for pair in part)

        def order(name: str) -> tuple:
            p = name.split(".")
            return (p[0] == "mtp", int(p[1]) if len(p) > 1 and p[1].isdigit() else 0, name)

        return imbalance_stats([found[n] for n in sorted(found, key=order)])

    def _pipeline_step(self, n_micro: int, lam: float) -> torch.Tensor:
        """Forward and backward of the step's micro-batches through the pipeline schedule; returns
        [main, weighted MTP, balance] (means over micro-batches, the same on every pp rank)."""
        t, m = self.cfg.train, self.cfg.model
        # Every rank reads the same global micro-batches, in the single-process order, and keeps its
        # data rank's rows of each (the pipeline splits the concatenation back into micro-batches).
        window = torch.cat([parallel.data_shard(self.loader.next_batch(t.micro_batch), self.pctx)
                            for _ in range(n_micro)]).to(self.device)
        with step_weight_cache(self.cfg, self.precision, n_micro):
            out = pipeline.pipeline_train_step(self.stages, self.pipe, window[:, :-1], window[:, 1:], n_micro=n_micro,
                                               mtp_lambda=lam, balance_alpha=t.balance_alpha,
                                               document_mask=t.document_mask)
        K = m.num_nextn_predict_layers
        mtp = out["mtp"].sum() * (lam / K) if K else out["main"] * 0
        return torch.stack([out["main"], mtp, out["balance"]]).float().to(self.device)

    # ---- one optimizer step ----
    def train_step(self) -> dict:
        """One optimizer step; returns its record (the host waits for the GPU when the record is read)."""
        return self._finish_step(self._launch_step())

    def _launch_step(self) -> dict:
        """Queue one optimizer step's work without waiting for the device (the step has no host
        sync); returns what _finish_step turns into its record. The device's numbers stay tensors."""
        t = self.cfg.train
        self.model.train()
        batch = batch_size_at(self.step, t)
        n_micro = batch // t.micro_batch
        lam = mtp_lambda_at(self.step, t)
        cuda = self.device.type == "cuda"
        start = self.clock.mark()
        if self.graphed is not None:  # one process: the captured step (train/graph.py)
            lr = lr_at(self.step, t)
            sums, grad_norm, ratio = self.graphed([self.loader.next_batch(t.micro_batch) for _ in range(n_micro)],
                                                  self.step, lr, self.ema)
        else:
            if self.stages is not None:
                sums = self._pipeline_step(n_micro, lam)
            else:
                windows = (parallel.data_shard(self.loader.next_batch(t.micro_batch), self.pctx)
                           for _ in range(n_micro))
                sums = forward_backward(self.model, windows, n_micro, lam, self.cfg, self.device, self.precision)
            if self.pctx is not None:
                parallel.sync_gradients(self.updated, self.pctx)  # all-reduce (sharding=none; FSDP reduced in backward)
                sums = self.pctx.all_reduce_mean_dp_ep(sums)  # mean of per-rank means = global mean: all ranks log it
            grad_norm, lr, ratio = optimizer_update(self.updated, self.optimizer, self.moe_layers, self.cfg,
                                                    self.step, self.pctx, self.ema, self.zero1)
        self.step += 1
        self.tokens_seen += batch * t.seq_len
        # the step's numbers in one buffer, copied to the host without waiting (reading them with
        # .tolist() would wait for everything queued after them too, i.e. the next step)
        numbers = torch.cat([sums.reshape(-1).double(), torch.as_tensor(grad_norm, device=sums.device).reshape(1).double(),
                             ratio.reshape(-1).double().to(sums.device)])
        host = torch.empty(numbers.shape, dtype=numbers.dtype, pin_memory=cuda)
        host.copy_(numbers, non_blocking=cuda)
        return {"step": self.step, "tokens": self.tokens_seen, "batch_size": batch, "lam": lam, "lr": lr,
                "numbers": host, "start": start, "end": self.clock.mark()}

    def _finish_step(self, p: dict) -> dict:
        """A launched step's record: waits for its numbers. tokens_per_s (and TFLOP/s, MFU) come from
        the step's own time: on a GPU between markers on the device's timeline around its work
        (the time from the previous step's end, or from its launch when the GPU was idle, to its
        end), so a step read while the next one already runs is timed alone; on a CPU the host's
        time from its launch to the end of its launch, where its work has run."""
        t, m = self.cfg.train, self.cfg.model
        self.clock.wait(p["end"])  # the step's work and the copy of its numbers are done
        dt = self.clock.ms(p["start"], p["end"]) / 1e3
        main, mtp, bal, grad_norm, *ratio = p["numbers"].tolist()
        balance_stats = imbalance_stats(ratio)
        if self.stages is not None:  # each pp rank updated its own layers; log the whole model's loads
            balance_stats = self._pipeline_balance_stats(balance_stats)
        lam = p["lam"]
        rec = {"step": p["step"], "loss": main}
        if m.num_nextn_predict_layers:
            rec["mtp_loss"] = mtp / lam if lam else float("nan")  # mean over depths, before the weight
        rec = {**rec, "balance_loss": bal, "lr": p["lr"], "grad_norm": grad_norm, "tokens": p["tokens"],
               "batch_size": p["batch_size"], **balance_stats}
        rec["tokens_per_s"] = p["batch_size"] * t.seq_len / dt
        rec["tflops"] = rec["tokens_per_s"] * self.flops_per_token / 1e12
        if self.peak:
            rec["mfu"] = rec["tokens_per_s"] * self.flops_per_token / self.peak
        if self.device.type == "cuda":
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return rec

    def _must_read_before_next(self, step: int, total: int) -> bool:
        """Whether step `step`'s record must be handled before the next step is queued: its
        evaluation or checkpoint needs the weights as that step left them, and the run ends there."""
        t = self.cfg.train
        return step >= total or _due(t.eval_every, step) or _due(t.checkpoint_every, step)

    # ---- the run ----
    def train(self, steps: int | None = None) -> TrainResult:
        """The loop. Each step's record (loss, norms, loads: numbers on the device) is read after the
        next step has been queued, so the host never waits for the device with an empty queue and a
        step's launches overlap the one before; steps that evaluate or save a checkpoint, and the
        last one, are read before anything else is queued."""
        t = self.cfg.train
        total = steps if steps is not None else t.steps
        sink = MetricsSink(self.out) if self.is_main else _NullSink()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True, disable=None)
        log = bar.write if bar is not None and not bar.disable else (lambda msg: print(msg, flush=True))
        if not self.is_main:
            log = lambda msg: None  # noqa: E731
        n_params = count_parameters(build_model(self.cfg.model, "meta"))  # the whole model, not this rank's part
        log(f"model: {n_params['total'] / 1e6:.2f}M parameters ({n_params['active'] / 1e6:.2f}M active, "
            f"MTP {n_params['mtp'] / 1e6:.2f}M) | device {self.device} | precision {self.precision}"
            f"{self._speed_summary()} | data: {self.data.description}")
        if note := passes_note(total, t.batch_size * t.seq_len, int(self.data.train_meta["num_tokens"])):
            log(note)
        if self.precision == "fp8" and (note := fp8_width_note(self.cfg.model.hidden_size)):
            from ..fp8 import gpu

            if gpu.kernels_on(self.device):  # (the CPU's emulation is slow at any width: the start line says so)
                log(note)
        if summary := parallel_summary(self.cfg, self.pctx):
            log(summary)

        def handle(rec: dict, interrupted: bool = False) -> None:
            """Check, evaluate, record, log and checkpoint one step (interrupted: record and log only)."""
            if not math.isfinite(rec["loss"]):
                raise MoeforgeError(f"the loss became {rec['loss']} at step {rec['step']}; lower train.lr or check the data")
            step = rec["step"]
            if _due(t.eval_every, step) and step < total and not interrupted:
                val = self.validate(t.eval_batches)
                rec["val_loss"], rec["val_bpb"] = val["loss"], val["bpb"]
                log(f"step {step}: val loss {val['loss']:.4f}, {val['bpb']:.4f} bits/byte")
            sink.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if step % t.log_every == 0 or step == total:
                log(format_record(rec))
            if _due(t.checkpoint_every, step) and step < total and not interrupted:
                self.save()

        def salvage(p: dict) -> None:
            """Keep the record of a complete step when the run stops before it was read."""
            try:
                handle(self._finish_step(p), interrupted=True)
            except Exception:  # noqa: BLE001 (the device failed too: the first error is the one to report)
                pass

        val = None
        pending = None  # the launched step whose record is not read yet
        try:
            try:
                while self.step < total or pending is not None:
                    launched = None
                    if self.step < total and (pending is None or not self._must_read_before_next(pending["step"], total)):
                        try:
                            launched = self._launch_step()
                        except BaseException:  # Ctrl-C, out of memory, ...: the step before is complete
                            done, pending = pending, None
                            if done is not None:
                                salvage(done)
                            raise
                    done, pending = pending, launched
                    if done is not None:
                        handle(self._finish_step(done))
            except KeyboardInterrupt:  # while a step was read: the one queued after it completes
                if pending is not None:
                    salvage(pending)
                raise
            drop_prefetched()  # the FP8 weights quantised for a step that will not come (train.fp8_weight_prefetch)
            path = self.save()
            val = self.validate(None)
            sink.write({"step": self.step, "val_loss": val["loss"], "val_bpb": val["bpb"], "tokens": self.tokens_seen,
                        "val_whole": True})
        except BaseException:
            self.wait_for_checkpoints(report=False)  # a save in flight completes; the run's error is the one to report
            raise
        finally:
            if bar is not None:
                bar.close()
            sink.close()
        self.wait_for_checkpoints()  # (the final one was written while the whole split was evaluated)
        sample = self.sample()
        return TrainResult(self.step, val["loss"], val["bpb"], sample, path)

    def validate(self, max_batches: int | None) -> dict[str, float]:
        t = self.cfg.train
        if self.stages is not None:
            # Pipeline: rank 0 evaluates a single-device copy of the gathered model; every rank gets the result.
            import torch.distributed as dist

            model = self._single_device_model()
            res = [evaluate(model, self.data.val, self.tokenizer.token_bytes, t.seq_len, t.micro_batch, self.device,
                            self.precision, max_batches, stride=t.eval_stride) if self.is_main else None]
            dist.broadcast_object_list(res, src=0)
            return res[0]
        shard = reduce = None
        if self.pctx is not None and self.pctx.data_ranks > 1:  # each data rank evaluates its share of the rows
            shard, reduce = (self.pctx.data_rank, self.pctx.data_ranks), self.pctx.all_reduce_sum_dp_ep
        return evaluate(self.model, self.data.val, self.tokenizer.token_bytes, t.seq_len, t.micro_batch,
                        self.device, self.precision, max_batches, shard=shard, reduce=reduce, stride=t.eval_stride)

    def sample(self, prompt: str = "def ") -> str:
        n = self.cfg.train.sample_tokens
        if n == 0:
            return ""
        model = self.model
        if self.pctx is not None:
            # Decoding branches on sampled tokens, which every rank of an all-to-all would have to agree
            # on (and a pipeline rank holds only its stages): rank 0 samples from a single-device copy
            # instead; the other ranks return "".
            model = self._single_device_model()
            if not self.is_main:
                return ""
        ids = generate(model, self.tokenizer.encode(prompt), n, temperature=0.8, top_p=0.95,
                       seed=self.cfg.train.seed, stop_id=self.tokenizer.eos_id)
        return prompt + self.tokenizer.decode(ids)

    def close(self) -> None:
        """Wait for a checkpoint still being written; leave the process group (torchrun runs)."""
        try:
            self.wait_for_checkpoints()
        finally:
            if self.ema is not None:
                self.ema.close()
            if self.pctx is not None:
                self.pctx.destroy()
                self.pctx = None


def parallel_summary(cfg: Config, pctx) -> str:
    """The layout line of the log ("" for a plain single-process run)."""
    p = cfg.parallel
    if pctx is None:
        asked = [f"parallel.{k}={getattr(p, k)}" for k in ("pp", "ep", "dp") if getattr(p, k) > 1]
        return f"parallel: single process ({', '.join(asked)} ignored: not launched by torchrun)" if asked else ""
    m = cfg.model
    reach = parallel.max_ranks_per_token(m.n_routed_experts, m.n_group, m.topk_group, m.num_experts_per_tok, pctx.ep)
    if pctx.pp > 1:
        layout = pipeline.stage_layout(m, p)
        return (f"parallel: {pctx.world_size} ranks = pp {pctx.pp} x dp {pctx.dp} x ep {pctx.ep} | schedule {p.schedule} | "
                f"sharding {p.sharding} | {len(layout)} stages of {','.join(str(len(s)) for s in layout)} layers")
    return (f"parallel: {pctx.world_size} ranks = pp {pctx.pp} x dp {pctx.dp} x ep {pctx.ep} | sharding {p.sharding} | "
            f"{cfg.train.micro_batch // pctx.data_ranks} sequences per rank per micro-batch | "
            f"a token reaches <= {reach} of {pctx.ep} ep ranks")


class _NullSink:
    """Ranks other than 0 write no metrics."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _due(every: int, step: int) -> bool:
    """Whether a periodic action (evaluation, checkpoint; every 0: never) falls on `step`."""
    return bool(every) and step % every == 0


def format_record(rec: dict) -> str:
    parts = [f"step {rec['step']}", f"loss {rec['loss']:.4f}"]
    if "mtp_loss" in rec:
        parts.append(f"mtp {rec['mtp_loss']:.4f}")
    parts += [f"bal {rec['balance_loss']:.3f}", f"lr {rec['lr']:.2e}", f"gnorm {rec['grad_norm']:.2f}",
             f"imb {rec.get('imbalance', 1.0):.2f}", f"{rec['tokens_per_s']:.0f} tok/s", f"{rec['tflops']:.3f} TFLOP/s"]
    if "mfu" in rec:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    if "peak_mem_gb" in rec:
        parts.append(f"mem {rec['peak_mem_gb']:.1f} GiB")
    return " | ".join(parts)
