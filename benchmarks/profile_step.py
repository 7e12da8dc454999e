"""Profile one training step of a preset: the kernels that take the most time, and where they come from.

    python benchmarks/profile_step.py [--preset bench] [--rows 30] [--by-source N] [--gaps N] [--fanout N]
        [key=value ...]

The model and step are `moeforge bench`'s (random tokens); two warm-up steps run first. Also printed:
the wall time of a step (median of 3, synchronised around each) against the sum of the profiled
step's kernel times; when the wall time is much larger, the GPU waits for the host.

--by-source N also prints the step's kernel time by the moeforge source line that launched it (the
innermost frame in moeforge's own code on the launching thread; `-` for kernels launched outside
any, such as autograd's backward of compiled graphs), then the N largest (line, kernel) pairs. Each
kernel is joined to its launch by the profiler's correlation id. On a CPU, where there are no
kernels, the same is done with the self time of the CPU operators.

--fanout N runs one more forward and walks its autograd graph for the forward outputs that feed more
than one backward node: the autograd engine sums their gradients with a kernel of its own (outside
any compiled graph), one sum fewer than the consumers. Printed: the bytes those sums read and write
per step, then the N largest outputs with their producer, shape, dtype and consumers. Runs on a
CPU as well (the graph is the same; shrink the preset with overrides).

--gaps N (GPU) profiles one more step with the GPU's activity only and prints the time the GPU sat
idle between its kernels, by the gap's length and by the kernel that ended the gap (what the GPU was
waiting for), the N largest. Recording the host's operators and Python stacks as well (as --by-source
does) slows the host so much that the gaps grow several-fold: on one H200 machine a step profiled
that way showed 64 ms of idle time where the unprofiled step's wall time exceeded its kernels by 13.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import math
import os
import statistics
import tempfile
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from moeforge.config import load_config
from moeforge.train.step import (autocast, build_optimizer, build_train_model, forward_backward,
                                    optimizer_update, resolve_device, resolve_precision)

_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
_FRAME_CATS = ("python_function", "cpu_op")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def attribute_to_source(events: list[dict], on_cpu: bool = False) -> dict[tuple[str, str], list[float]]:
    """Chrome-trace events of a profile with stacks -> {(source frame, kernel name): [ms, count]}.

    A kernel's launch (or, on a CPU, the operator itself) is placed inside the Python frames open on
    its thread at that moment; the innermost frame in moeforge's own code (not its kernel wrappers)
    names the source, `-` where there is none. On a CPU the time is the operator's self time."""
    frames = collections.defaultdict(list)  # per thread, sorted by start; nested as a call stack
    for e in events:
        if e.get("cat") in _FRAME_CATS and e.get("ph") == "X":
            frames[e["tid"]].append(e)
    for v in frames.values():
        v.sort(key=lambda e: (e["ts"], -e["dur"]))
    if on_cpu:
        starts = {tid: [f["ts"] for f in v] for tid, v in frames.items()}
        work = [(e, e, (e["dur"] - _children_time(e, frames[e["tid"]], starts[e["tid"]])) / 1e3) for e in events
                if e.get("cat") == "cpu_op" and e.get("ph") == "X"]
    else:
        launches = {e["args"]["correlation"]: e for e in events
                    if e.get("cat") in _LAUNCH_CATS and "correlation" in e.get("args", {})}
        work = [(k, launches.get(k.get("args", {}).get("correlation")), k["dur"] / 1e3)
                for k in events if k.get("cat") == "kernel"]
    queries = collections.defaultdict(list)
    for i, (_, anchor, _) in enumerate(work):
        if anchor is not None:
            queries[anchor["tid"]].append(i)
    source = ["-"] * len(work)
    for tid, idx in queries.items():
        fs, j, stack = frames.get(tid, []), 0, []
        for i in sorted(idx, key=lambda i: work[i][1]["ts"]):
            anchor = work[i][1]
            t, t_end = anchor["ts"], anchor["ts"] + (anchor["dur"] if on_cpu else 0)
            while j < len(fs) and fs[j]["ts"] <= t:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] < fs[j]["ts"]:
                    stack.pop()
                stack.append(fs[j])
                j += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < t:
                stack.pop()
            for f in reversed(stack):  # innermost first
                name = f["name"]
                if (f["ts"] + f["dur"] >= t_end and "moeforge/" in name
                        and not any(w in name for w in ("fp8/kernels.py", "fp8/gluon_gemm.py", "triton_launch.py"))):
                    source[i] = name[name.index("moeforge/"):]
                    break
    out: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for (item, _, ms), src in zip(work, source):
        slot = out[(src, item["name"])]
        slot[0] += max(ms, 0.0)
        slot[1] += 1
    return out


def idle_gaps(events: list[dict]) -> tuple[float, dict[str, float], dict[str, list[float]]]:
    """The GPU's idle time between the first and the last kernel of a profiled step (no kernel, copy or
    memset running on any stream): (idle ms, idle ms by the gap's length, {name of the kernel that
    ended the gap: [idle ms, gaps]}). A gap belongs to the kernel the GPU was waiting for."""
    marks = sorted((e["ts"], e["ts"] + e["dur"], e["name"] if e["cat"] == "kernel" else "(a copy or memset)")
                   for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X")
    buckets = {"under 5 us": 0.0, "5-50 us": 0.0, "50-500 us": 0.0, "500 us and more": 0.0}
    by_next: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    total, end = 0.0, None
    for t0, t1, name in marks:
        if end is not None and t0 > end:
            us = t0 - end
            total += us
            label = ("under 5 us" if us < 5 else "5-50 us" if us < 50 else "50-500 us" if us < 500
                     else "500 us and more")
            buckets[label] += us / 1e3
            by_next[name][0] += us / 1e3
            by_next[name][1] += 1
        end = t1 if end is None else max(end, t1)
    return total / 1e3, buckets, by_next


def _children_time(op: dict, frames: list[dict], starts: list[float]) -> float:
    """Time of the CPU operators directly inside op (microseconds): its self time is the rest."""
    end, covered, t = op["ts"] + op["dur"], op["ts"], 0.0
    for j in range(bisect.bisect_left(starts, op["ts"]), len(frames)):
        f = frames[j]
        if f["ts"] >= end:
            break
        if f is not op and f["cat"] == "cpu_op" and f["ts"] >= covered and f["ts"] + f["dur"] <= end:
            t += f["dur"]
            covered = f["ts"] + f["dur"]
    return t


def trace_events(prof) -> list[dict]:
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    os.remove(path)
    return events


def print_gaps(events: list[dict], rows: int) -> None:
    idle, buckets, by_next = idle_gaps(events)
    print(f"\nGPU idle between the kernels of a step profiled on the GPU only: {idle:.1f} ms; by the gap's "
          "length: " + ", ".join(f"{k} {v:.1f} ms" for k, v in buckets.items()))
    print(f"the {rows} kernels the GPU waited for longest:")
    for name, (ms, n) in sorted(by_next.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{ms:9.2f} ms  {n:5d} gaps  {name[:110]}")


def print_by_source(events: list[dict], rows: int, on_cpu: bool) -> None:
    table = attribute_to_source(events, on_cpu)
    total = sum(ms for ms, _ in table.values())
    by_source: dict[str, float] = collections.defaultdict(float)
    for (source, _), (ms, _) in table.items():
        by_source[source] += ms
    what = "CPU operator self time" if on_cpu else "kernel time"
    print(f"\n{what} by the moeforge source line that launched it ({total:.1f} ms in all):")
    for source, ms in sorted(by_source.items(), key=lambda kv: -kv[1]):
        if ms >= 0.001 * total:
            print(f"{ms:9.2f} ms  {source}")
    print(f"\nthe {rows} largest (source line, {'operator' if on_cpu else 'kernel'}) pairs:")
    print(f"{'ms':>9}  {'calls':>5}  source  ::  name")
    for (source, name), (ms, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{ms:9.2f}  {n:5d}  {source}  ::  {name[:90]}")


def gradient_fanout(root) -> list[tuple[str, int, tuple, torch.dtype, list[str]]]:
    """The autograd graph below root (a grad_fn): every (producer node, output) whose gradient comes
    from more than one backward node, as (producer name, output index, shape, dtype, consumer names),
    the largest (elements x consumers) first. Gradient accumulators of leaves are left out."""
    consumers: dict[tuple, list[str]] = collections.defaultdict(list)
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, idx in node.next_functions:
            if nxt is not None and type(nxt).__name__ != "AccumulateGrad":
                consumers[(nxt, idx)].append(type(node).__name__)
                stack.append(nxt)
    out = []
    for (node, idx), names in consumers.items():
        if len(names) > 1:
            meta = node._input_metadata[idx]
            out.append((type(node).__name__, idx, tuple(meta.shape), meta.dtype, sorted(names)))
    return sorted(out, key=lambda r: -math.prod(r[2]) * (len(r[4]) - 1))


def print_fanout(rows_found, rows: int) -> None:
    sums = sum((len(c) - 1) * math.prod(shape) * torch.empty((), dtype=dt).element_size() * 3
               for _, _, shape, dt, c in rows_found)
    print(f"\nforward outputs whose gradients the autograd engine sums: {len(rows_found)}, "
          f"{sum(len(c) - 1 for *_, c in rows_found)} sums, {sums / 2**20:.1f} MiB read and written by them")
    for name, idx, shape, dt, cons in rows_found[:rows]:
        print(f"  {name}[{idx}] {list(shape)} {str(dt).replace('torch.', '')} <- {', '.join(cons)}")


def kernel_time_ms(events) -> float:
    """The device time of a profiled step's kernels, from `key_averages()`: the operators on the CPU
    side are left out (with CPU activity on, a launching operator carries its kernels' time too),
    and so are user annotations, whose span on the GPU's timeline (e.g. the optimizer's
    `Optimizer.step#...` region) covers kernels that are counted already."""
    return sum(e.self_device_time_total for e in events
               if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--by-source", type=int, default=0, metavar="N",
                    help="also print kernel time by the source line that launched it, and the N largest pairs")
    ap.add_argument("--gaps", type=int, default=0, metavar="N",
                    help="also profile a step on the GPU only and print its idle time between kernels, by "
                         "the kernel the GPU waited for (N largest); GPU only")
    ap.add_argument("--fanout", type=int, default=0, metavar="N",
                    help="also list the forward outputs whose gradients autograd sums outside the graphs (N largest)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.preset, None, a.overrides)
    t = cfg.train
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    model = build_train_model(cfg, device, precision, None)
    optimizer = build_optimizer(model, cfg)
    n_micro = t.batch_size // t.micro_batch
    windows = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch, t.seq_len + 1), device=device)
               for _ in range(n_micro)]

    def step(i: int) -> None:
        forward_backward(model, iter(windows), n_micro, t.mtp_lambda, cfg, device, precision)
        optimizer_update(model, optimizer, model.moe_layers(), cfg, i, None)

    for i in range(2):
        step(i)
    walls = []
    for i in range(2, 5):
        _sync(device)
        t0 = time.perf_counter()
        step(i)
        _sync(device)
        walls.append(time.perf_counter() - t0)
    on_cpu = device.type != "cuda"
    activities = [ProfilerActivity.CPU] if on_cpu else [ProfilerActivity.CUDA]
    stacks = bool(a.by_source)
    if stacks and not on_cpu:
        activities.append(ProfilerActivity.CPU)  # the launches and the Python frames around them
    with profile(activities=activities, with_stack=stacks) as prof:
        step(5)
        _sync(device)
    events = prof.key_averages()
    sort_key = "self_cpu_time_total" if on_cpu else "cuda_time_total"
    print(events.table(sort_by=sort_key, row_limit=a.rows, max_name_column_width=70))
    wall_ms = 1e3 * statistics.median(walls)
    if on_cpu:
        print(f"step wall time {wall_ms:.1f} ms (median of 3)")
    else:
        kernels_ms = kernel_time_ms(events)
        print(f"step wall time {wall_ms:.1f} ms (median of 3); kernels of one step {kernels_ms:.1f} ms "
              f"({100 * kernels_ms / wall_ms:.0f}% of the wall time)")
    if a.by_source:
        print_by_source(trace_events(prof), a.by_source, on_cpu)
    if a.fanout:
        with autocast(device, precision):
            out = model.losses(windows[0][:, :-1], windows[0][:, 1:])
        print_fanout(gradient_fanout((out["main"] + out["balance"]).grad_fn), a.fanout)
    if a.gaps and not on_cpu:
        with profile(activities=[ProfilerActivity.CUDA]) as gap_prof:
            step(6)
            _sync(device)
        print_gaps(trace_events(gap_prof), a.gaps)


if __name__ == "__main__":
    main()
