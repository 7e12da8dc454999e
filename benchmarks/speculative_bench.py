"""Speculative decoding with the MTP module against plain greedy decoding, on a checkpoint with one.

    python benchmarks/speculative_bench.py --checkpoint RUN [--new-tokens 128] [--prompts FILE] [--device cpu|cuda]
        [--temperature T --top-p P] [--precision auto|bf16|fp32] [--modes auto,eager] [--rows R]

For each of eight code prompts (or the first 16 prompts of an SFT data file, --prompts): greedy decoding (generate.generate, temperature 0) and
generate.generate_speculative, the same number of new tokens, no stop token, each after a short
warm-up. Prints whether the tokens are identical, the drafts kept, the tokens per main-model
forward and the wall times, for each speculative step form in --modes (docs/model.md). Under
--precision auto a GPU decodes in BF16 autocast, as `moeforge generate` does, where both plain and
speculative greedy decoding replay CUDA graphs by default. With --temperature > 0 both sample (speculative
sampling against plain sampling, the same seed): the tokens then differ, and only the speed and the
drafts kept compare.
"""

from __future__ import annotations

import argparse
import time

import torch

from moeforge.data import load_tokenizer
from moeforge.generate import generate, generate_speculative, sample_rows
from moeforge.train.checkpoint import load_trained_model
from moeforge.train.step import autocast, resolve_precision

PROMPTS = ["def ", "import os\n", "class Foo:\n    def __init__(self", "    return ", "for i in range(",
           "# Copyright", "    if not ", '"""Return the']


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", help="a JSONL file of {\"prompt\": ...} objects (moeforge sft-data writes one)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default="auto", help="bf16 (autocast), fp32, or auto (bf16 on a GPU), as generate's")
    ap.add_argument("--modes", default="auto",
                    help="the speculative step forms to time, comma-separated: auto, eager, static, graph "
                         "(generate_speculative's mode; plain decoding always runs its own auto)")
    ap.add_argument("--rows", type=int, default=0,
                    help="> 0: instead, decode all prompts together, each repeated to fill this many rows "
                         "(generate.sample_rows, plain against speculative=True, as score and grpo decode)")
    args = ap.parse_args()
    prompts = PROMPTS
    if args.prompts:
        from moeforge.posttrain.sft import read_examples

        prompts = [prompt for _, prompt, _ in read_examples(args.prompts)][:16]
    model, cfg = load_trained_model(args.checkpoint, args.device)
    tok = load_tokenizer(cfg.train.tokenizer or None)
    device = model.embed.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modes = args.modes.split(",")
    t, p = args.temperature, args.top_p

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    if args.rows:
        return _rows(model, tok, prompts, args, timed)
    plain_s = 0.0
    spec = {m: dict(s=0.0, same=0, kept=0, drafts=0, tokens=0, forwards=0) for m in modes}
    with autocast(device, resolve_precision(args.precision, device)):
        for prompt in prompts:
            ids = tok.encode(prompt)
            generate(model, ids, 4, temperature=t, top_p=p)
            want, took = timed(lambda: generate(model, ids, args.new_tokens, temperature=t, top_p=p))
            plain_s += took
            for m in modes:
                generate_speculative(model, ids, 4, temperature=t, top_p=p, mode=m)
                (got, stats), took = timed(lambda: generate_speculative(model, ids, args.new_tokens, temperature=t,
                                                                          top_p=p, mode=m))
                r = spec[m]
                r["s"] += took
                r["same"] += got == want
                r["kept"], r["drafts"] = r["kept"] + stats["accepted"], r["drafts"] + stats["drafts"]
                r["tokens"], r["forwards"] = r["tokens"] + len(got), r["forwards"] + stats["forwards"] + 1
    how = "greedy" if t <= 0 else f"temperature {t:g}, top-p {p:g}"
    print(f"{len(prompts)} prompts x {args.new_tokens} new tokens ({how}, no stop), {device.type}: "
          f"plain decoding {plain_s:.2f} s ({len(prompts) * args.new_tokens / plain_s:.1f} tokens/s)")
    for m, r in spec.items():
        print(f"  speculative, mode {m}: identical {r['same']}/{len(prompts)}; drafts kept {r['kept']}/{r['drafts']} "
              f"({100 * r['kept'] / max(r['drafts'], 1):.1f}%); {r['tokens']} tokens in {r['forwards']} forwards "
              f"({r['tokens'] / r['forwards']:.2f} a forward); {r['s']:.2f} s ({r['tokens'] / r['s']:.1f} tokens/s, "
              f"{plain_s / r['s']:.2f}x plain)")


def _rows(model, tok, prompts, args, timed) -> None:
    """--rows R: R rows (the prompts repeated) decoded together, plain and speculative, after a warm-up
    of each; prints the time of each, the rows whose tokens are identical and the new tokens a second."""
    device = model.embed.weight.device
    rows = [tok.encode(prompts[i % len(prompts)]) for i in range(args.rows)]
    t, p = args.temperature, args.top_p

    def run(speculative: bool):
        gen = torch.Generator(device=device).manual_seed(0)
        return sample_rows(model, rows, args.new_tokens, t, p, gen, stop_id=None, speculative=speculative)

    with autocast(device, resolve_precision(args.precision, device)):
        run(False), run(True)  # warm-up: compilation, autotuning
        (plain, _), plain_s = timed(lambda: run(False))
        (spec, _), spec_s = timed(lambda: run(True))
    same = sum(torch.equal(a, b) for a, b in zip(plain, spec))
    n = args.rows * args.new_tokens
    how = "greedy" if t <= 0 else f"temperature {t:g}, top-p {p:g}"
    print(f"{args.rows} rows x {args.new_tokens} new tokens ({how}, no stop), {device.type}: plain {plain_s:.2f} s "
          f"({n / plain_s:.1f} tokens/s), speculative {spec_s:.2f} s ({n / spec_s:.1f} tokens/s, "
          f"{plain_s / spec_s:.2f}x); rows identical {same}/{args.rows}")


if __name__ == "__main__":
    main()
