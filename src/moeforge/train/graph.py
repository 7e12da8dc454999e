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
    """The step GraphedStep captures, for the trainer and the benchmark: (windows, lam, gamma, lr) ->
    (loss sums, gradient norm, per-layer imbalance). No step number is needed: the lr and gamma are
    given, and nothing else the captured step runs reads it (no EMA, no ZeRO-1)."""

    def step_fn(windows, lam, gamma, lr):
        sums = forward_backward(model, iter(windows), len(windows), lam, cfg, device, precision)
        grad_norm, _, ratio = optimizer_update(model, optimizer, moe_layers, cfg, 0, None, lr=lr, gamma=gamma)
        return sums, grad_norm, ratio

    return step_fn


class GraphedStep:
    """step_fn(windows, lam, gamma, lr) -> tuple of device tensors: one optimizer step over the
    micro-batches `windows` (device token tensors [b, S + 1]) with the learning rate `lr` (a 0-dim
    device tensor). Called as graphed(windows, step, lr) (windows on any device, lr the schedule's
    number for `step`) it runs step_fn eagerly for the first `warmup` calls, then from a captured
    graph, and returns copies of the step's tensors."""

    def __init__(self, step_fn, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
                 warmup: int = GRAPH_WARMUP):
        self.step_fn, self.optimizer, self.cfg, self.device = step_fn, optimizer, cfg, device
        self.warmup = warmup
        self.calls = 0
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.key = None  # (lambda, gamma, shapes) of the captured graph
        self.graph = None
        self.inputs: list[torch.Tensor] = []
        self.outputs = None

    def __call__(self, windows: list[torch.Tensor], step: int, lr: float) -> tuple:
        t = self.cfg.train
        lam, gamma = mtp_lambda_at(step, t), bias_update_speed_at(step, t)
        self.lr.fill_(lr)
        for group in self.optimizer.param_groups:  # (a loaded state dict may have reset it)
            if "capturable" in group:  # torch's AdamW: its step count and lr stay on the device
                group["capturable"] = True
        self.calls += 1
        if self.calls <= self.warmup:
            return self.step_fn([w.to(self.device, non_blocking=True) for w in windows], lam, gamma, self.lr)
        key = (lam, gamma, tuple(tuple(w.shape) for w in windows))
        if key != self.key:
            self._capture(windows, key)
        for buf, w in zip(self.inputs, windows):
            buf.copy_(w, non_blocking=True)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)

    def _capture(self, windows: list[torch.Tensor], key) -> None:
        self.graph = self.outputs = None
        self.inputs = [torch.empty(w.shape, dtype=w.dtype, device=self.device) for w in windows]
        for buf, w in zip(self.inputs, windows):
            buf.copy_(w)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph keeps a pool of its own
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.step_fn(self.inputs, key[0], key[1], self.lr)
        except torch.OutOfMemoryError:
            raise  # (reported as the trainer reports any out-of-memory)
        except RuntimeError as e:
            raise MoeforgeError(f"train.cuda_graph: the step could not be captured "
                                f"({str(e).splitlines()[0][:200]}); set train.cuda_graph=false") from e
        self.graph, self.outputs, self.key = graph, outputs, key


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
