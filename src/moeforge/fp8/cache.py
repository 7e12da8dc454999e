"""Quantised weights reused across the micro-batches of one optimizer step.

With gradient accumulation every micro-batch's forward (and the reference's backward) quantises the
same unchanged weights again. Inside `weight_cache()` the first quantisation of a weight is kept and
later ones return it; leaving the scope drops everything. The trainer opens the scope around one
step's forward and backward passes only, where no weight can change: the optimizer step, a
checkpoint load or any other write to a weight happens outside it, so nothing stale is ever read.

Entries are keyed by the module that owns the weight (object identity, not storage address: a
storage can be freed and reused inside a step, e.g. by FSDP's re-sharding). The cost is memory: the
cached codes (GPU: 1 byte per weight, 2 with the transposed copy for Dgrad, plus scales; the CPU
reference keeps its dequantised FP32 copy, 4 bytes) stay until the step's last backward, where
without the cache each would be freed after its layer's backward.

Prefetching (`prefetch_weights`, train.fp8_weight_prefetch): every quantisation a training forward
asked for (one that computes gradients, its weights given as `tensors`) is remembered with its
owner; right after the optimizer step, `prefetch_weights()` runs them all again, and the next
forward takes each result once instead of quantising in place. The GPU does the same work, but launched after AdamW's kernels,
where the host is ahead of the GPU, instead of between the forward's short kernels, where the FP8
forward waits for the host (docs/performance.md). A prefetched result is used only if none of its
weights was written in place since (their version counters; the optimizer writes before the
prefetch), and each is taken once, so it is freed where it was before: the forward codes after
their GEMM, W^T's with the layer's backward.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

_entries: dict | None = None
# owner -> {key: (make, tensors)}: the quantisations training forwards asked for (kept with the owner)
_makers: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
# owner -> {key: (versions of tensors when made, result)}: made by prefetch_weights, taken once
_ready: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def weight_cache(enabled: bool = True):
    """Reuse quantised weights within this scope (nested scopes share the outer one)."""
    global _entries
    if not enabled or _entries is not None:
        yield
        return
    _entries = {}
    try:
        yield
    finally:
        _entries = None


def cached(owner: object, key: Hashable, make: Callable[[], Any], tensors: Sequence[torch.Tensor] = ()) -> Any:
    """make(), or what it returned for the same (owner, key) earlier in the open scope, or what
    prefetch_weights made for it since the weights `tensors` last changed. tensors: the weights make()
    reads, given by a training forward only (what prefetch_weights remembers)."""
    if owner is None:
        return make()
    if tensors:
        _makers.setdefault(owner, {})[key] = (make, tuple(tensors))
    slot = (id(owner), key)
    if _entries is not None:
        hit = _entries.get(slot)
        if hit is not None and hit[0] is owner:
            return hit[1]
    value = _take_ready(owner, key, tensors)
    if value is None:
        value = make()
    if _entries is not None:
        _entries[slot] = (owner, value)
    return value


def _versions(tensors) -> tuple:
    return tuple(t._version for t in tensors)


def _take_ready(owner, key, tensors):
    ready = _ready.get(owner)
    if not ready or key not in ready:
        return None
    versions, value = ready.pop(key)
    return value if versions == _versions(tensors) else None


def prefetch_weights() -> None:
    """Run the quantisations the training forwards asked for since the last call, now, for the next
    forward to take (see the module's notes); results not taken by then are dropped."""
    todo = list(_makers.items())
    _makers.clear()
    _ready.clear()
    for owner, makers in todo:
        _ready[owner] = {key: (_versions(tensors), make()) for key, (make, tensors) in makers.items()}


def drop_prefetched() -> None:
    """Forget the prefetched results (their memory) and what to prefetch."""
    _ready.clear()
    _makers.clear()
