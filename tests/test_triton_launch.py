"""triton_launch.launch's cache of compiled kernels, with a stand-in for a Triton kernel: the first
launch of a specialisation goes through the JIT entry point (keywords, options), later ones call the
compiled kernel with every argument by position, and what Triton specialises on (a tensor's dtype and
alignment, an int's value, a TMA descriptor's dtype, block and layout) picks the entry."""

from types import SimpleNamespace

import pytest
import torch

from moeforge import triton_launch


class FakeKernel:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.calls)

        return jit


class FakeCompiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("compiled", grid, args))


def desc(t, block, layout):
    return SimpleNamespace(base=t, block_shape=block, layout=layout)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(triton_launch, "FAST", True)
    monkeypatch.setattr(triton_launch, "_COMPILED", {})


def test_second_launch_calls_the_compiled_kernel(fast):
    k = FakeKernel()
    x = torch.zeros(64)
    d = desc(torch.zeros(256, 128, dtype=torch.float8_e4m3fn), [128, 128], "swizzle128")
    consts = {"BLOCK": 32, "num_warps": 4, "FLAG": False}
    triton_launch.launch(k, (3,), (x, 7, 0.5, d), consts, 4, options={"maxnreg": 168})
    assert k.calls[-1] == ("jit", (3,), (x, 7, 0.5, d),
                           {"BLOCK": 32, "num_warps": 4, "FLAG": False, "num_stages": 3, "maxnreg": 168})
    d2 = desc(torch.zeros(512, 128, dtype=torch.float8_e4m3fn), [128, 128], "swizzle128")  # another address and shape
    triton_launch.launch(k, (5, 2), (x, 7, 1.5, d2), consts, 4, options={"maxnreg": 168})
    assert k.calls[-1] == ("compiled", (5, 2, 1), (x, 7, 1.5, d2, 32, 4, False))


@pytest.mark.parametrize("change", ["int", "dtype", "align", "block", "layout", "desc dtype", "const", "option"])
def test_a_new_specialisation_is_compiled(fast, change):
    k = FakeKernel()
    x = torch.zeros(64)
    q = torch.zeros(256, 128, dtype=torch.float8_e4m3fn)
    args = [x, 7, desc(q, [128, 128], "swizzle128")]
    consts, options = {"BLOCK": 32}, {"maxnreg": 168}
    triton_launch.launch(k, (1,), tuple(args), consts, 4, options=options)
    if change == "int":
        args[1] = 8
    elif change == "dtype":
        args[0] = x.to(torch.float16)
    elif change == "align":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "block":
        args[2] = desc(q, [64, 128], "swizzle128")
    elif change == "layout":
        args[2] = desc(q, [128, 128], "swizzle64")
    elif change == "desc dtype":
        args[2] = desc(q.view(torch.uint8), [128, 128], "swizzle128")
    elif change == "const":
        consts = {"BLOCK": 64}
    else:
        options = {"maxnreg": 128}
    triton_launch.launch(k, (1,), tuple(args), consts, 4, options=options)
    assert [c[0] for c in k.calls] == ["jit", "jit"]


def test_without_the_fast_path_every_launch_goes_through_the_jit(monkeypatch):
    monkeypatch.setattr(triton_launch, "FAST", False)
    k = FakeKernel()
    for _ in range(2):
        triton_launch.launch(k, (1,), (torch.zeros(4), 3), {"B": 1}, 8, num_stages=2)
    assert [c[0] for c in k.calls] == ["jit", "jit"] and k.calls[0][3] == {"B": 1, "num_warps": 8, "num_stages": 2}


def param(name, constexpr=True, default=None, has_default=False):
    return SimpleNamespace(name=name, is_constexpr=constexpr, default=default, has_default=has_default)


class FakeKernelWithParams(FakeKernel):
    """A kernel with a signature: x, n, then constexprs A, num_warps (declared, as a Gluon kernel may),
    B (default 5) and C (default True)."""

    __name__ = "fake_kernel"
    params = [param("x", False), param("n", False), param("A"), param("num_warps"),
              param("B", default=5, has_default=True), param("C", default=True, has_default=True)]


def test_constexprs_are_passed_by_position_in_signature_order(fast):
    """Constexprs given by name in any order, defaults left out and num_warps from the launch options
    reach the compiled kernel in the signature's order."""
    k = FakeKernelWithParams()
    x = torch.zeros(8)
    for _ in range(2):
        triton_launch.launch(k, (2,), (x, 3), {"C": False, "A": 7}, 4)
    assert k.calls[0] == ("jit", (2,), (x, 3), {"C": False, "A": 7, "num_warps": 4, "num_stages": 3})
    assert k.calls[1] == ("compiled", (2, 1, 1), (x, 3, 7, 4, 5, False))


@pytest.mark.parametrize("consts, message", [({"A": 1, "D": 2}, "no constexpr parameter"),
                                             ({"B": 1}, "no value for parameter 'A'")])
def test_an_unknown_or_missing_constexpr_is_an_error(fast, consts, message):
    k = FakeKernelWithParams()
    with pytest.raises(ValueError, match=message):
        triton_launch.launch(k, (1,), (torch.zeros(8), 3), consts, 4)
    assert k.calls == []  # nothing compiled or launched
