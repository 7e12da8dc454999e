"""`moeforge bench`: training-step throughput, MFU, peak memory and where the time goes.

What one measurement does: build the model exactly as the trainer does (precision, recomputation,
compilation, chunked loss), feed it random tokens (no data on disk needed), run `warmup` full
optimizer steps (compilation and autotuning happen here), then time `steps` steps back to back with
one host synchronisation at the end. Reported:
- tokens/s and model TFLOP/s (FLOPs per token from train.metrics.flops_per_token: 6 x activated
  matmul parameters + causal attention, MTP included; docs/performance.md), MFU against the
  datasheet dense BF16 peak of the GPU (stated in the output);
- the spread of the timed steps (shortest, median, longest), from a marker after each step on the
  device timeline (CUDA events; no extra synchronisation), so that a noisy measurement shows;
- peak memory (torch.cuda.max_memory_allocated over the timed steps), and the memory still
  allocated after them next to moeforge plan's weights + optimizer state for this rank (docs/plan.md);
- the GPU's SM clock, power draw and the reasons its clock was held down (power cap, thermal)
  during the timed steps, sampled by nvidia-smi in the background (gpu_state.py): a GPU at its
  power cap runs the same code slower, and this tells that spread from a change in the code;
- whether a step synchronises the host (one extra step under torch.cuda.set_sync_debug_mode);
- the time split by part, from one extra step timed by hooks (CUDA events): attention (MLA),
  MoE (router, dispatch, experts, shared experts), dense FFNs, head + loss, optimizer (clip, AdamW,
  bias update), the rest (embedding, norms between blocks, residual adds, MTP projections). With
  compiled blocks, attention and FFN are one compiled graph and are reported together as "blocks".
`--vs hf` then measures transformers' DeepseekV3ForCausalLM with the same config, batch, sequence
length and precision (FP32 master weights, BF16 autocast, fused AdamW) in the same process.

Under torchrun (`torchrun --nproc-per-node N -m moeforge bench parallel.ep=E ...`) the same step
runs expert / data parallel: the batch is global, tokens/s counts all ranks, MFU is per GPU, and
memory, the steps' spread and the time split are rank 0's. The expert all-to-all reads its split sizes on the host (one
sync per MoE layer), which the sync check then reports.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from . import parallel
from .config import Config
from .errors import MoeforgeError
from .gpu_state import GPUMonitor, describe
from .model.attention import MLA
from .model.head import OutputHead
from .model.moe import MoE
from .model.transformer import Block
from .train.ema import CPUEMA
from .train.graph import GRAPH_WARMUP, GraphedStep, check_graph_step, one_process_step
from .train.metrics import PEAK_BF16, Clock, flops_per_token, peak_flops
from .train.schedule import lr_at
from .train.speed import compile_on, graph_on
from .train.step import (autocast, build_optimizer, build_train_model, check_memory, forward_backward,
                         optimizer_update, resolve_device, resolve_precision)


@dataclass
class BenchResult:
    name: str
    tokens_per_s: float
    step_ms: float
    tflops: float
    mfu: float | None
    peak_mem_gib: float | None
    host_syncs: str = "not checked"
    step_ms_spread: tuple[float, float, float] | None = None  # (shortest, median, longest) timed step
    split_ms: dict[str, float] = field(default_factory=dict)
    ranks: int = 1
    gpu_state: dict | None = None  # SM clock, power, throttle reasons during the timed steps (gpu_state.py)
    # GiB allocated between steps (after the last timed one), and moeforge plan's weights + optimizer
    # state for this rank: what stays allocated once the step's gradients and activations are freed
    resident_gib: float | None = None
    planned_resident_gib: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parts(model: torch.nn.Module, compiled: bool) -> list[tuple[str, torch.nn.Module]]:
    """(part name, module) pairs whose forward and backward are timed; no module nests in another."""
    if compiled:
        parts = [("blocks", m) for m in model.modules() if isinstance(m, Block)]
    else:
        parts = []
        for m in model.modules():
            if isinstance(m, MLA):
                parts.append(("attention", m))
            elif isinstance(m, Block):
                parts.append(("moe" if isinstance(m.ffn, MoE) else "dense", m.ffn))
    parts += [("head+loss", m) for m in model.modules() if isinstance(m, OutputHead)]
    return parts


class _PartTimer:
    """Forward and backward hooks that record a (start, end) marker pair per call of each part."""

    def __init__(self, parts, clock: Clock):
        self.clock, self.spans, self.handles, self.open = clock, [], [], {}
        for name, module in parts:
            key = id(module)

            def start(m, *args, _k=key, _n=name):
                self.open[_k] = (_n, self.clock.mark())

            def end(m, *args, _k=key):
                name_, t0 = self.open.pop(_k)
                self.spans.append((name_, t0, self.clock.mark()))

            self.handles += [module.register_forward_pre_hook(start), module.register_forward_hook(end),
                             module.register_full_backward_pre_hook(start), module.register_full_backward_hook(end)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, a, b in self.spans:
            out[name] = out.get(name, 0.0) + self.clock.ms(a, b)
        return out


def _check_host_syncs(run_step, device: torch.device) -> str:
    """Run one step with CUDA's sync debug mode set to error: 'none' or the first synchronising call."""
    if device.type != "cuda":
        return "not checked (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_step()
        return "none"
    except RuntimeError as e:
        return "yes: " + str(e).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _random_windows(cfg: Config, n: int, device: torch.device, pctx=None) -> list[torch.Tensor]:
    """n global micro-batches of random tokens (the same on every rank), this rank's rows of each."""
    t = cfg.train
    g = torch.Generator().manual_seed(t.seed)
    return [parallel.data_shard(torch.randint(0, cfg.model.vocab_size, (t.micro_batch, t.seq_len + 1), generator=g),
                                pctx).to(device) for _ in range(n)]


def _time_steps(run_step, steps: int, warmup: int, device: torch.device,
                peak_from_start: bool = False) -> tuple:
    """(seconds for `steps` steps after `warmup` steps, peak GiB during them, the (shortest, median,
    longest) step in ms, the GPU's clock and power state during them (gpu_state.GPUMonitor; None on a
    CPU), GiB allocated after the last step (None on a CPU)). With peak_from_start the peak covers
    the warm-up too: a captured step allocates its memory once, while it is captured. The steps are
    timed by markers on the device timeline between them (CUDA events, recorded without waiting;
    wall time on a CPU)."""
    if device.type == "cuda" and peak_from_start:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        run_step()
    _synchronize(device)
    if device.type == "cuda" and not peak_from_start:
        torch.cuda.reset_peak_memory_stats(device)
    clock = Clock(device)
    with GPUMonitor(device) as monitor:
        t0 = time.perf_counter()
        marks = [clock.mark()]
        for _ in range(steps):
            run_step()
            marks.append(clock.mark())
        _synchronize(device)
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    resident = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    each = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
    return dt, peak, (min(each), statistics.median(each), max(each)), monitor.state(), resident


def _result(name: str, cfg: Config, dt: float, steps: int, peak_gib, device: torch.device, ranks: int = 1) -> BenchResult:
    """Global tokens/s; model TFLOP/s and MFU per GPU."""
    t = cfg.train
    tokens = steps * t.batch_size * t.seq_len
    tps = tokens / dt
    flops = tps * flops_per_token(cfg.model, t.seq_len) / ranks
    peak = peak_flops(device)
    return BenchResult(name, tps, 1e3 * dt / steps, flops / 1e12, flops / peak if peak else None, peak_gib,
                       ranks=ranks)


def check_graph_bench(cfg: Config, device: torch.device, pctx, warmup: int) -> None:
    """train.cuda_graph in the benchmark: what the trainer refuses, and too few warm-up steps to
    leave the capture out of the timed ones."""
    check_graph_step(cfg, device, pctx)
    if warmup < GRAPH_WARMUP + 1:
        raise MoeforgeError(f"bench with train.cuda_graph: --warmup must be at least {GRAPH_WARMUP + 1} "
                            f"({GRAPH_WARMUP} eager steps, then the capture), got {warmup}")


def captures_step(cfg: Config, device: torch.device, pctx, warmup: int) -> bool:
    """Whether the benchmark captures the step: graph_on, and for train.cuda_graph="auto" only with
    enough warm-up steps to leave the capture out of the timed ones."""
    return graph_on(cfg, device, pctx) and (cfg.train.cuda_graph is True or warmup > GRAPH_WARMUP)


def bench_moeforge(cfg: Config, steps: int, warmup: int, split: bool = True, pctx=None,
                   name: str = "moeforge") -> BenchResult:
    """pctx: the ParallelContext of a torchrun launch (None: one process)."""
    t = cfg.train
    if pctx is not None and (pctx.pp > 1 or t.ema_decay > 0):
        raise MoeforgeError("bench under torchrun: expert / data parallelism only (parallel.pp=1, no train.ema_decay)")
    device = pctx.device if pctx is not None else resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    if t.cuda_graph is True:
        check_graph_bench(cfg, device, pctx, warmup)
    graph = captures_step(cfg, device, pctx, warmup)
    t = dataclasses.replace(t, cuda_graph=graph)  # ("auto" decided: the FP8 weight prefetch follows it)
    cfg = dataclasses.replace(cfg, train=t)
    torch.manual_seed(t.seed)
    if pctx is None:
        check_memory(device, cfg)
    model = build_train_model(cfg, device, precision, pctx)
    model.train()
    zero1 = parallel.Zero1(model, pctx) if pctx is not None and pctx.sharding == "zero1" else None
    optimizer = build_optimizer(model, cfg, keep=zero1.owns if zero1 else None)
    moe_layers = model.moe_layers()
    ema = CPUEMA(model, t.ema_decay, t.ema_every) if t.ema_decay > 0 else None
    n_micro = t.batch_size // t.micro_batch
    windows = _random_windows(cfg, n_micro, device, pctx)
    step = [0]
    graphed = None
    if graph:  # the whole step captured once and replayed (train/graph.py)
        graphed = GraphedStep(one_process_step(model, optimizer, moe_layers, cfg, device, precision),
                              optimizer, cfg, device)

    def run_step(timer_clock=None):
        marks = {}
        if graphed is not None:
            sums = graphed(windows, step[0], lr_at(step[0], t), ema)[0]
            step[0] += 1
            return sums, marks
        sums = forward_backward(model, iter(windows), n_micro, t.mtp_lambda, cfg, device, precision)
        parallel.sync_gradients(model, pctx)  # (no-op for one process and for FSDP)
        if timer_clock is not None:
            marks["opt0"] = timer_clock.mark()
        optimizer_update(model, optimizer, moe_layers, cfg, step[0], pctx, ema, zero1)
        if timer_clock is not None:
            marks["opt1"] = timer_clock.mark()
        step[0] += 1
        return sums, marks

    dt, peak, spread, gpu, resident = _time_steps(run_step, steps, warmup, device, peak_from_start=graphed is not None)
    if pctx is not None:  # the slowest rank's time is the step's
        dt_t = torch.tensor([dt], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(dt_t, op=torch.distributed.ReduceOp.MAX)
        dt = float(dt_t)
    res = _result(name, cfg, dt, steps, peak, device, pctx.world_size if pctx is not None else 1)
    res.step_ms_spread, res.gpu_state = spread, gpu
    if device.type == "cuda":
        from .plan import model_state_memory

        mine = model_state_memory(cfg, pctx.world_size if pctx is not None else 1)[pctx.rank if pctx is not None else 0]
        res.resident_gib, res.planned_resident_gib = resident, (mine.weights + mine.optimizer) / 2**30
    res.host_syncs = _check_host_syncs(run_step, device)
    if split and graphed is None:  # (a replayed graph runs no hooks)
        res.split_ms = _split(model, run_step, device, compiled=compile_on(cfg, device, pctx))
    if ema is not None:
        ema.close()
    return res


def _split(model, run_step, device: torch.device, compiled: bool) -> dict[str, float]:
    clock = Clock(device)
    timer = _PartTimer(_parts(model, compiled), clock)
    try:
        _synchronize(device)
        t0 = clock.mark()
        _, marks = run_step(clock)
        t1 = clock.mark()
        _synchronize(device)
    finally:
        timer.remove()
    out = timer.totals()
    out["optimizer"] = clock.ms(marks["opt0"], marks["opt1"])
    total = clock.ms(t0, t1)
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out


def bench_hf(cfg: Config, steps: int, warmup: int) -> BenchResult:
    """transformers' DeepseekV3ForCausalLM, same shapes, batch, precision and optimizer settings."""
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError as e:
        raise MoeforgeError(f"--vs hf needs transformers with DeepseekV3 ({e})") from None
    from .hf import hf_config

    t = cfg.train
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    if precision == "fp8":
        raise MoeforgeError("--vs hf: transformers has no FP8 training path to compare with; use --precision bf16")
    d = hf_config(cfg.model)
    torch.manual_seed(t.seed)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{"num_key_value_heads": d["num_attention_heads"], **d}))
    model.train()
    optimizer = build_optimizer(model, cfg)
    n_micro = t.batch_size // t.micro_batch
    windows = _random_windows(cfg, n_micro, device)

    def run_step():
        for w in windows:
            with autocast(device, precision):
                loss = model(input_ids=w[:, :-1], labels=w[:, :-1]).loss  # (labels are shifted inside)
            (loss / n_micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dt, peak, spread, gpu, _ = _time_steps(run_step, steps, warmup, device)
    res = _result("transformers", cfg, dt, steps, peak, device)
    res.step_ms_spread, res.gpu_state = spread, gpu
    return res


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe_peak(device: torch.device) -> str:
    if device.type != "cuda":
        return "MFU: not computed on a CPU"
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(device)
    if peak is None:
        return f"MFU: no datasheet peak known for {name} (known: {', '.join(PEAK_BF16)})"
    return f"MFU against the datasheet dense BF16 peak of {name}: {peak / 1e12:.0f} TFLOP/s"


def report_numbers(out: dict, json_path: str | None = None, digits: int = 2) -> None:
    """Print a benchmark script's named numbers, one aligned `name: value` per line, and write them
    to json_path as JSON when given."""
    width = max(map(len, out), default=0)
    for k, v in out.items():
        print(f"{k:>{width}}: {v:.{digits}f}" if isinstance(v, float) else f"{k:>{width}}: {v}")
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)


def format_result(r: BenchResult) -> str:
    ranks = f" on {r.ranks} ranks" if r.ranks > 1 else ""
    per = " per GPU" if r.ranks > 1 else ""
    step = f"{r.step_ms:.1f} ms/step"
    if r.step_ms_spread is not None and r.step_ms_spread[0] != r.step_ms_spread[-1]:
        lo, mid, hi = r.step_ms_spread
        step += f" (steps {lo:.1f}-{hi:.1f}, median {mid:.1f})"
    parts = [f"{r.name}: {r.tokens_per_s:,.0f} tokens/s{ranks}", step, f"{r.tflops:.1f} TFLOP/s{per}"]
    if r.mfu is not None:
        parts.append(f"MFU {100 * r.mfu:.1f}%")
    if r.peak_mem_gib is not None:
        parts.append(f"peak memory {r.peak_mem_gib:.2f} GiB")
    lines = [" | ".join(parts)]
    if r.gpu_state is not None:
        lines.append(f"  GPU during the timed steps: {describe(r.gpu_state)}")
    if r.resident_gib is not None and r.planned_resident_gib is not None:
        lines.append(f"  allocated between steps: {r.resident_gib:.2f} GiB (moeforge plan: weights + optimizer state "
                     f"{r.planned_resident_gib:.2f} GiB)")
    if r.name.startswith("moeforge"):
        lines.append(f"  host syncs inside a step: {r.host_syncs}")
    if r.split_ms:
        total = r.split_ms["total"]
        items = [f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in r.split_ms.items() if k != "total"]
        lines.append(f"  time split of one step ({total:.1f} ms, hooks): " + ", ".join(items))
    return "\n".join(lines)
