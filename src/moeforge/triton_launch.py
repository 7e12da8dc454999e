"""Launching Triton kernels with little host time.

Triton's JIT entry point re-binds and re-specialises every argument on every call: tens of
microseconds of host time per launch, which made the FP8 Linear host-bound and would dominate an
optimizer that launches one kernel per parameter. After the first launch of a specialisation,
`launch` calls the compiled kernel directly (Triton and Gluon kernels, host TMA descriptors among
the arguments included: the warp-specialised grouped GEMM's host time per call went from about 490
to 200 us, docs/fp8.md).
"""

from __future__ import annotations

import importlib.util
import os

import torch

FAST = os.environ.get("MOEFORGE_TRITON_FASTLAUNCH", "1") != "0"
AVAILABLE = importlib.util.find_spec("triton") is not None


def eager_triton(t: torch.Tensor) -> bool:
    """Whether moeforge's own Triton kernels run for t: on CUDA, with Triton installed, and not while
    torch.compile traces (there the torch ops stay, for Inductor to fuse)."""
    return t.is_cuda and AVAILABLE and not torch.compiler.is_compiling()


_COMPILED: dict = {}


def _other_key(a):
    """What Triton specialises on for an argument that is not a tensor, float or int: a host TMA
    descriptor's dtype, block shape and shared-memory layout (not its address, shape or strides,
    which the launcher reads on every launch); anything else by value."""
    block = getattr(a, "block_shape", None)
    if block is not None:
        return ("desc", a.base.dtype, tuple(block), getattr(a, "layout", None))
    return (type(a), a)


def _constexpr_tail(kernel, n_args: int, consts: dict, opts: dict) -> tuple:
    """The values of the kernel's parameters after its n_args positional arguments, in signature
    order, for the fast path's call by position: each from consts, else from the launch options (a
    Gluon kernel may declare num_warps as a constexpr), else its default. Raises ValueError for a name
    the kernel does not have or a parameter without a value. (A kernel without `params`, a stand-in
    in tests, takes consts' values in the order given.)"""
    params = getattr(kernel, "params", None)
    if params is None:
        return tuple(consts.values())
    rest = params[n_args:]
    unknown = consts.keys() - {p.name for p in rest}
    if unknown:
        raise ValueError(f"{getattr(kernel, '__name__', kernel)} has no constexpr parameter(s) {sorted(unknown)}")
    values = []
    for p in rest:
        if p.name in consts or p.name in opts:
            values.append(consts[p.name] if p.name in consts else opts[p.name])
        elif p.has_default:
            values.append(p.default)
        else:
            raise ValueError(f"{getattr(kernel, '__name__', kernel)}: no value for parameter {p.name!r}")
    return tuple(values)


def launch(kernel, grid, args: tuple, consts: dict, num_warps: int, num_stages: int = 3,
           options: dict | None = None) -> None:
    """kernel[grid](*args, **consts): `args` are the leading parameters, by position; `consts` the
    constexpr parameters after them, by name (those left out take their defaults). options: further
    launch options (e.g. maxnreg)."""
    opts = {"num_warps": num_warps, "num_stages": num_stages, **(options or {})}
    if not FAST:
        kernel[grid](*args, **{**consts, **opts})
        return
    # What Triton specialises on: a tensor's dtype and 16-byte alignment; an int's value (a superset:
    # Triton specialises ints on ==1 and %16 only); a float's type only (floats are never specialised,
    # so a learning rate that changes every step makes no new entry); a TMA descriptor's dtype, block
    # and layout. Built inline: this runs on every launch.
    sig = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                else float if isinstance(a, float) else (type(a), a) if isinstance(a, int) else _other_key(a)
                for a in args)
    key = (kernel, tuple(opts.items()), tuple(consts.items()), sig)
    entry = _COMPILED.get(key)
    if entry is None:
        tail = _constexpr_tail(kernel, len(args), consts, opts)  # (checked before the first compilation)
        _COMPILED[key] = (kernel[grid](*args, **{**consts, **opts}), tail)
    else:
        compiled, tail = entry
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)
