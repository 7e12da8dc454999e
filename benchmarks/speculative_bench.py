"""Speculative decoding with the MTP module against plain greedy decoding, on a checkpoint with one.

    python benchmarks/speculative_bench.py --checkpoint RUN [--new-tokens 128] [--prompts FILE] [--device cpu|cuda]
        [--temperature T --top-p P]

For each of eight code prompts (or the first 16 prompts of an SFT data file, --prompts): greedy decoding (generate.generate, temperature 0) and
generate.generate_speculative, the same number of new tokens, no stop token, each after a short
warm-up. Prints whether the tokens are identical, the drafts kept, the tokens per main-model
forward and both wall times (docs/model.md). With --temperature > 0 both sample (speculative
sampling against plain sampling, the same seed): the tokens then differ, and only the speed and the
drafts kept compare.
"""

from __future__ import annotations

import argparse
import time

import torch

from moeforge.data import load_tokenizer
from moeforge.generate import generate, generate_speculative
from moeforge.train.checkpoint import load_trained_model

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
    args = ap.parse_args()
    prompts = PROMPTS
    if args.prompts:
        from moeforge.posttrain.sft import read_examples

        prompts = [prompt for _, prompt, _ in read_examples(args.prompts)][:16]
    model, cfg = load_trained_model(args.checkpoint, args.device)
    tok = load_tokenizer(cfg.train.tokenizer or None)
    sync = torch.cuda.synchronize if model.embed.weight.is_cuda else (lambda: None)
    plain_s = spec_s = 0.0
    same = kept = drafts = tokens = forwards = 0
    for prompt in prompts:
        ids = tok.encode(prompt)
        t, p = args.temperature, args.top_p
        generate(model, ids, 4, temperature=t, top_p=p)
        generate_speculative(model, ids, 4, temperature=t, top_p=p)
        sync()
        t0 = time.perf_counter()
        want = generate(model, ids, args.new_tokens, temperature=t, top_p=p)
        sync()
        t1 = time.perf_counter()
        got, stats = generate_speculative(model, ids, args.new_tokens, temperature=t, top_p=p)
        sync()
        t2 = time.perf_counter()
        plain_s, spec_s = plain_s + t1 - t0, spec_s + t2 - t1
        same += got == want
        kept, drafts = kept + stats["accepted"], drafts + stats["drafts"]
        tokens, forwards = tokens + len(got), forwards + stats["forwards"] + 1
    how = "greedy" if args.temperature <= 0 else f"temperature {args.temperature:g}, top-p {args.top_p:g}"
    print(f"{len(prompts)} prompts x {args.new_tokens} new tokens ({how}, no stop): identical {same}/{len(prompts)}; "
          f"drafts kept {kept}/{drafts} ({100 * kept / max(drafts, 1):.1f}%); {tokens} tokens in {forwards} forwards "
          f"({tokens / forwards:.2f} a forward); plain {plain_s:.2f} s, speculative {spec_s:.2f} s "
          f"({plain_s / spec_s:.2f}x)")


if __name__ == "__main__":
    main()
