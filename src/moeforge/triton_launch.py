"""Launching Triton kernels with little host time.

Triton's JIT entry point re-binds and re-specialises every argument on every call: tens of
microseconds of host time per launch, which made the FP8 Linear host-bound and would dominate an
optimizer that launches one kernel per parameter. After the first launch of a specialisation,
`launch` calls the compiled kernel directly.
"""

from __future__ import annotations

import os

import torch

FAST = os.environ.get("MOEFORGE_TRITON_FASTLAUNCH", "1") != "0"
_COMPILED: dict = {}


def launch(kernel, grid, args: tuple, consts: dict, num_warps: int, num_stages: int = 3) -> None:
    """kernel[grid](*args, **consts): `consts` are the trailing constexpr parameters, in order."""
    if not FAST:
        kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        return
    # What Triton specialises on: a tensor's dtype and 16-byte alignment; an int's value (a superset:
    # Triton specialises ints on ==1 and %16 only); a float's type only (floats are never specialised,
    # so a learning rate that changes every step makes no new entry). Built inline: this runs on
    # every launch.
    sig = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                else float if isinstance(a, float) else (type(a), a) for a in args)
    key = (kernel, num_warps, num_stages, tuple(consts.items()), sig)
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
    else:
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *consts.values())
