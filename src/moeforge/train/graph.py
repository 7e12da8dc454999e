"""train.cuda_graph: the whole optimizer step as one CUDA graph, captured once and replayed.

A step of a small model can spend longer in the host's Python and kernel launches than the GPU
spends on its kernels: with FP8, every GEMM runs between compiled graphs and launches its own
quantisers, so the `small` preset's FP8 step took 231 ms run eagerly and 129 ms replayed (H200,
docs/performance.md). Replaying a captured graph costs one launch: forward and backward over the
step's micro-batches, clipping, the optimizer and the routing-bias update run without the host.

What may change between replays without a new capture:
- the tokens, copied into the graph's input buffers (`GraphedStep.__call__`);
- the learning rate, a device scalar that the optimizer reads (param_groups' lr is that tensor).
Python values that a capture freezes are the step's MTP weight lambda and the bias update speed
gamma; both are piecewise constant (schedule.py), and the step is captured again when either
changes. Everything else a step depends on lives on the device already (AdamW's step counts, the
clipping coefficient, the routing counters): the step has no host synchronisation (bench checks).

The first `warmup` calls run eagerly (compilation, autotuning, lazily created optimizer state),
then the step is captured and replayed from then on. Results are those of the eager step up to the
learning rate's and the decay factor's last bits (the optimizer computes them from the device
scalar in FP32; tests/test_speed_gpu.py compares the two runs).

A batch-size ramp (train.batch_size_start) changes the number of micro-batches: each new number runs
one step eagerly (its kernels' first launches, e.g. gradient accumulation's, compile outside a
capture), with the previous graph freed first, and is captured on its next step.

The CPU parameter EMA (train.ema_decay, ema.py) copies the parameters to host memory on a side stream
after each optimizer step, and that copy overlaps the next step's forward and backward; only the
next optimizer step waits for it. With the EMA the step is captured as two graphs sharing one memory
pool, forward and backward, then the update, and between their replays the compute stream waits for
the copy; the next copy starts after the second. Without it, one graph.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import MoeforgeError
from .schedule import bias_update_speed_at, mtp_lambda_at
from .speed import graph_refusal
from .step import forward_backward, optimizer_update


def check_graph_step(cfg: Config, device: torch.device, pctx=None) -> None:
    """Refuse, for train.cuda_graph=true, the settings a captured step cannot run (one clear line each)."""
    why = graph_refusal(cfg, device, pctx)
    if why:
        raise MoeforgeError(f"train.cuda_graph: {why}; set train.cuda_graph=false")


GRAPH_WARMUP = 2  # eager steps before the capture


def one_process_step(model, optimizer, moe_layers, cfg: Config, device: torch.device, precision: str):
    """The step GraphedStep captures, for the trainer and the benchmark, as its two stages:
    grads(windows, lam, gamma, lr) -> the loss sums (forward and backward over the micro-batches) and
    update(sums, lam, gamma, lr) -> (loss sums, gradient norm, per-layer imbalance) (clipping,
    AdamW, the routing-bias update). No step number is needed: the lr and gamma are given, and nothing
    else the captured step runs reads it (the EMA is updated outside it, by GraphedStep; no ZeRO-1)."""

    def grads(windows, lam, gamma, lr):
        return forward_backward(model, iter(windows), len(windows), lam, cfg, device, precision)

    def update(sums, lam, gamma, lr):
        grad_norm, _, ratio = optimizer_update(model, optimizer, moe_layers, cfg, 0, None, lr=lr, gamma=gamma)
        return sums, grad_norm, ratio

    return grads, update


class GraphedStep:
    """One optimizer step over the micro-batches `windows` (device token tensors [b, S + 1]) with the
    learning rate `lr` (a 0-dim device tensor), as the two stages of one_process_step (grads, update).
    Called as graphed(windows, step, lr, ema) (windows on any device, lr the schedule's number for
    `step`, ema None or the run's CPUEMA) it runs the stages eagerly for the first `warmup` calls and
    for the first step of every other number of micro-batches, else from captured graphs, and
    returns copies of the step's tensors (update's outputs)."""

    def __init__(self, stages, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
                 warmup: int = GRAPH_WARMUP):
        self.grads, self.update = stages
        self.optimizer, self.cfg, self.device = optimizer, cfg, device
        self.warmup = warmup
        self.calls = 0
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.key = None  # (lambda, gamma, shapes, with an EMA) of the captured graphs
        self.graphs: list[torch.cuda.CUDAGraph] = []  # one, or two with an EMA (sharing a pool)
        self.warm: set = set()  # the window shapes that have run eagerly
        self.inputs: list[torch.Tensor] = []
        self.outputs = None

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        return self.graphs[0] if self.graphs else None

    def __call__(self, windows: list[torch.Tensor], step: int, lr: float, ema=None) -> tuple:
        t = self.cfg.train
        lam, gamma = mtp_lambda_at(step, t), bias_update_speed_at(step, t)
        self.lr.fill_(lr)
        for group in self.optimizer.param_groups:  # (a loaded state dict may have reset it)
            if "capturable" in group:  # torch's AdamW: its step count and lr stay on the device
                group["capturable"] = True
        self.calls += 1
        shapes = tuple(tuple(w.shape) for w in windows)
        if self.calls <= self.warmup or shapes not in self.warm:
            if self.graphs:  # a new number of micro-batches: the old graphs' memory back first
                self.graphs, self.outputs, self.key = [], None, None
                torch.cuda.empty_cache()
            self.warm.add(shapes)
            ws = [w.to(self.device, non_blocking=True) for w in windows]
            return self._stages(ws, lam, gamma, ema, step)
        key = (lam, gamma, shapes, ema is not None)
        if key != self.key:
            self._capture(windows, key)
        for buf, w in zip(self.inputs, windows):
            buf.copy_(w, non_blocking=True)
        self.graphs[0].replay()
        if ema is not None:
            ema.before_optimizer_step()
            self.graphs[1].replay()
            ema.update(step + 1)
        return tuple(o.clone() for o in self.outputs)

    def _stages(self, windows, lam, gamma, ema=None, step: int = 0) -> tuple:
        """Both stages one after the other (with an EMA: its wait and update around the optimizer, as
        optimizer_update does them in an eager step)."""
        sums = self.grads(windows, lam, gamma, self.lr)
        if ema is not None:
            ema.before_optimizer_step()
        out = self.update(sums, lam, gamma, self.lr)
        if ema is not None:
            ema.update(step + 1)
        return out

    def _capture(self, windows: list[torch.Tensor], key) -> None:
        self.graphs, self.outputs = [], None
        self.inputs = [torch.empty(w.shape, dtype=w.dtype, device=self.device) for w in windows]
        for buf, w in zip(self.inputs, windows):
            buf.copy_(w)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graphs keep a pool of their own
        lam, gamma, _, split = key
        graphs = [torch.cuda.CUDAGraph() for _ in range(2 if split else 1)]
        try:
            if split:  # replayed in this order, as graphs that share a pool must be
                with torch.cuda.graph(graphs[0], capture_error_mode="thread_local"):
                    sums = self.grads(self.inputs, lam, gamma, self.lr)
                with torch.cuda.graph(graphs[1], pool=graphs[0].pool(), capture_error_mode="thread_local"):
                    outputs = self.update(sums, lam, gamma, self.lr)
            else:
                with torch.cuda.graph(graphs[0], capture_error_mode="thread_local"):
                    outputs = self._stages(self.inputs, lam, gamma)
        except torch.OutOfMemoryError:
            raise  # (reported as the trainer reports any out-of-memory)
        except RuntimeError as e:
            raise MoeforgeError(f"train.cuda_graph: the step could not be captured "
                                f"({str(e).splitlines()[0][:200]}); set train.cuda_graph=false") from e
        self.graphs, self.outputs, self.key = graphs, outputs, key


def portable_optimizer_state(state: dict) -> dict:
    """An optimizer state dict as an eager run writes it: the lr a number, torch's AdamW not
    `capturable` (so that a checkpoint does not depend on train.cuda_graph)."""
    groups = []
    for g in state["param_groups"]:
        g = dict(g)
        if isinstance(g.get("lr"), torch.Tensor):
            g["lr"] = float(g["lr"])
        if g.get("capturable"):
            g["capturable"] = False
        groups.append(g)
    return {**state, "param_groups": groups}
