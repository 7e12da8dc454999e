"""Time the routing counts (tokens per expert) of one MoE layer on its own routing decisions.

    python benchmarks/routing_counts.py [--preset bench] [--layers 2] [--sequences 8] [--repeat 50]

Routes random tokens through the first layers of the preset's model (initialised as for training),
takes the first MoE layer's choices, prints how uneven they are, and times every way of counting
them, eagerly and, on a GPU, compiled: over all tokens (the dispatcher's `expert_counts`) and per
sequence (the balance loss's f_i, `sequence_balance_loss`). All variants are checked to give the
same counts as bincount.

In the compiled bench step a kernel of 0.8 ms a layer fused a scatter_add of ones; it was the
balance loss's per-sequence count as an FP32 scatter_add into [sequences, experts], which
`sequence_balance_loss` now counts in integers (docs/performance.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from moeforge.config import load_config
from moeforge.model import build_model
from moeforge.model.moe import MoE, expert_counts, sequence_expert_counts


def count_variants(n: int) -> dict:
    """Ways to count how often each of n experts occurs in flat choices [N] (int64) -> [n]."""
    def scatter(dtype):
        return lambda flat, order: torch.zeros(n, dtype=dtype, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=dtype))

    return {
        "scatter_add, int64 (expert_counts)": lambda flat, order: expert_counts(flat, n),
        "scatter_add, int32": scatter(torch.int32),
        "scatter_add, fp32": scatter(torch.float32),
        "compare and sum": lambda flat, order: (flat.unsqueeze(1) == torch.arange(n, device=flat.device)).sum(0),
        # the dispatcher sorts the choices anyway (order): count from the sorted keys
        "searchsorted of the dispatcher's sorted order": lambda flat, order: torch.diff(
            torch.searchsorted(flat[order], torch.arange(n + 1, device=flat.device))),
        "histc": lambda flat, order: torch.histc(flat.float(), bins=n, min=0, max=n - 1),
    }


def sequence_count_variants(n: int, batch: int) -> dict:
    """Ways to count each sequence's choices of n experts, from flat choices [batch * S * K] -> [batch, n]."""
    def fp32_scatter(flat, order):  # sequence_balance_loss until 2026-11-30
        counts = torch.zeros(batch, n, device=flat.device)
        rows = flat.view(batch, -1)
        return counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=counts.dtype))

    return {"per sequence: scatter_add, fp32 [sequences, E]": fp32_scatter,
            "per sequence: int64 over sequences x E (sequence_expert_counts)":
                lambda flat, order: sequence_expert_counts(flat.view(batch, -1), batch, n)}


def sequence_counts(flat: torch.Tensor, n: int, batch: int) -> torch.Tensor:
    """Per-sequence counts by bincount (the check)."""
    offset = torch.arange(batch, device=flat.device).unsqueeze(1) * n
    return torch.bincount((flat.view(batch, -1) + offset).flatten(), minlength=batch * n).view(batch, n)


def routed_choices(preset: str, layers: int, sequences: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The first MoE layer's expert choices [tokens * K] for random tokens, and the expert count."""
    cfg = load_config(preset, None, [f"model.num_hidden_layers={layers}"])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, device)
    model.train()
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    seen = []
    hook = moe.gate.register_forward_hook(lambda mod, args, out: seen.append(out[1].flatten()))
    tokens = torch.randint(0, cfg.model.vocab_size, (sequences, cfg.train.seq_len + 1), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        model.losses(tokens[:, :-1], tokens[:, 1:])
    hook.remove()
    return seen[0], cfg.model.n_routed_experts


def _time_ms(fn, repeat: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1e3 * (time.perf_counter() - t0) / repeat


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--layers", type=int, default=2, help="layers of the model routed through (the first MoE layer counts)")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=50)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flat, n = routed_choices(a.preset, a.layers, a.sequences, device)
    order = flat.argsort(stable=True)
    ref = torch.bincount(flat, minlength=n)
    print(f"{a.preset}, {flat.numel():,} choices over {n} experts on {device}: busiest expert "
          f"{float(ref.max() / ref.float().mean()):.2f}x the mean, {int((ref == 0).sum())} without tokens")
    modes = {"eager": lambda f: f}
    if device.type == "cuda":
        modes["compiled"] = torch.compile
    results: dict[str, dict[str, float]] = {}
    seq_ref = sequence_counts(flat, n, a.sequences)
    variants = [(name, fn, ref) for name, fn in count_variants(n).items()]
    variants += [(name, fn, seq_ref) for name, fn in sequence_count_variants(n, a.sequences).items()]
    for name, fn, expect in variants:
        for mode, wrap in modes.items():
            f = wrap(fn)
            counts = f(flat, order)
            if not torch.equal(counts.long(), expect):
                raise SystemExit(f"{name} ({mode}) counted differently from bincount")
            results.setdefault(name, {})[mode] = _time_ms(lambda: f(flat, order), a.repeat, device)
        print(f"{name:64s} " + "  ".join(f"{m} {1e3 * ms:8.1f} us" for m, ms in results[name].items()))
    return results


if __name__ == "__main__":
    main()
