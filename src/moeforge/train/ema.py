"""An exponential moving average of the parameters kept in CPU memory (report §3.2.3).

    ema <- decay * ema + (1 - decay) * theta        after every optimizer step

or, with `every` = k > 1, ema <- decay^k * ema + (1 - decay^k) * theta after every k-th step (the
same horizon, for models whose CPU-side update takes longer than a step; docs/performance.md).

DeepSeek-V3 keeps this EMA in CPU memory and updates it asynchronously, so it costs neither GPU
memory nor step time. Here, after optimizer.step(): on CUDA a side stream copies the parameters
into pinned CPU buffers (waiting on the step's kernels on the GPU, not on the host), and a worker
thread folds them into the FP32 average once the copy is done. The copy overlaps the next step's
forward and backward; only the next optimizer step waits (on the GPU) for it to finish reading
the parameters. On a CPU the copy is a plain clone and the update runs in the worker thread.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn


class CPUEMA:
    def __init__(self, model: nn.Module, decay: float, every: int = 1):
        self.decay, self.every = decay ** every, every
        self.params = {n: p for n, p in model.named_parameters()}
        self.ema = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in self.params.items()}
        cuda = any(p.is_cuda for p in self.params.values())
        self.staging = {n: torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=cuda)
                        for n, p in self.params.items()}
        self.stream = torch.cuda.Stream() if cuda else None
        self.copied = None  # CUDA event: the staging buffers hold the parameters of the last update
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeforge-ema")
        self.pending: Future | None = None

    def before_optimizer_step(self) -> None:
        """The optimizer must not overwrite the parameters while the last copy still reads them:
        make the compute stream wait for it (on the GPU; the host does not block)."""
        if self.copied is not None:
            torch.cuda.current_stream().wait_event(self.copied)

    def update(self, step: int | None = None) -> None:
        """Fold the current parameters into the average (asynchronously). Call after optimizer.step();
        step: the number of optimizer steps taken, so that only every `every`-th step updates."""
        if step is not None and step % self.every:
            return
        if self.pending is not None:
            self.pending.result()  # the worker is done with the staging buffers (one step ago)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())  # after the optimizer step's kernels
            with torch.cuda.stream(self.stream):
                for n, p in self.params.items():
                    self.staging[n].copy_(p.detach(), non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record(self.stream)
        else:
            for n, p in self.params.items():
                self.staging[n].copy_(p.detach())
        self.pending = self.pool.submit(self._fold, self.copied)

    def _fold(self, copied) -> None:
        if copied is not None:
            copied.synchronize()  # blocks the worker thread only
        for n, avg in self.ema.items():
            avg.mul_(self.decay).add_(self.staging[n].float(), alpha=1 - self.decay)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average by parameter name (FP32, CPU), after any update in flight."""
        self.wait()
        return {n: t.clone() for n, t in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.wait()
        missing = set(self.ema) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[0]}")
        for n, t in state.items():
            if n in self.ema:
                self.ema[n].copy_(t)

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()
