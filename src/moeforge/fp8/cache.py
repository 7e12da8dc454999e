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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from typing import Any

_entries: dict | None = None


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


def cached(owner: object, key: Hashable, make: Callable[[], Any]) -> Any:
    """make(), or what it returned for the same (owner, key) earlier in the open scope."""
    if _entries is None or owner is None:
        return make()
    slot = (id(owner), key)
    hit = _entries.get(slot)
    if hit is None or hit[0] is not owner:
        hit = _entries[slot] = (owner, make())
    return hit[1]
