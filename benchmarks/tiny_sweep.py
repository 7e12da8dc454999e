"""Which tiny model learns the most in a fixed CPU budget? Runs configs side by side, 2 threads each.

Each variant measures its step time over a few steps, sets train.steps so that the whole
schedule (warmup, constant, cosine decay) fits the wall-clock budget, trains, and reports the
validation loss and bits per byte on the whole held-out split.

    PYTHONPATH=src python benchmarks/tiny_sweep.py --round 1 --budget 420 --threads 2 --out results/
    PYTHONPATH=src python benchmarks/tiny_sweep.py --round 2 --budget 0 --device cuda --out results/
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

D128 = ["model.hidden_size=128", "model.intermediate_size=384", "model.moe_intermediate_size=64",
        "model.q_lora_rank=64"]
# Round 1 (time budget): which shape learns most per second.
VARIANTS = {
    "d192": ["model.hidden_size=192", "model.intermediate_size=512", "model.moe_intermediate_size=96",
             "model.q_lora_rank=96"],
    "d128": D128,
    "d128-nomtp": D128 + ["model.num_nextn_predict_layers=0"],
    "d128-L2": D128 + ["model.num_hidden_layers=2"],
    "d256-L2": ["model.hidden_size=256", "model.intermediate_size=768", "model.moe_intermediate_size=128",
                "model.q_lora_rank=128", "model.num_hidden_layers=2"],
}
# Round 3 (fixed tokens = what 2 CPU cores process in 480 s at batch 8, measured per variant):
# vocabulary size, MTP on/off and learning rate. Tokenizers of 4096/2048 come from
# `python -m moeforge.data.tokenizer --vocab-size N --out .sweepdata/tokN.json`.
TOK = ".sweepdata/tok{}.json"
VARIANTS_ROUND3 = {
    "v8192-mtp-lr2e-3": ["train.batch_size=8", "train.steps=470", "train.lr=2e-3"],
    "v8192-lr2e-3": ["train.batch_size=8", "train.steps=720", "train.lr=2e-3", "model.num_nextn_predict_layers=0"],
    "v8192-lr1e-3": ["train.batch_size=8", "train.steps=720", "train.lr=1e-3", "model.num_nextn_predict_layers=0"],
    "v8192-lr3e-3": ["train.batch_size=8", "train.steps=720", "train.lr=3e-3", "model.num_nextn_predict_layers=0"],
    "v4096-mtp-lr2e-3": ["train.batch_size=8", "train.steps=665", "train.lr=2e-3", "model.vocab_size=4096",
                         f"train.tokenizer={TOK.format(4096)}"],
    "v4096-lr2e-3": ["train.batch_size=8", "train.steps=950", "train.lr=2e-3", "model.vocab_size=4096",
                     f"train.tokenizer={TOK.format(4096)}", "model.num_nextn_predict_layers=0"],
    "v4096-lr1e-3": ["train.batch_size=8", "train.steps=950", "train.lr=1e-3", "model.vocab_size=4096",
                     f"train.tokenizer={TOK.format(4096)}", "model.num_nextn_predict_layers=0"],
    "v2048-lr2e-3": ["train.batch_size=8", "train.steps=1020", "train.lr=2e-3", "model.vocab_size=2048",
                     f"train.tokenizer={TOK.format(2048)}", "model.num_nextn_predict_layers=0"],
}
# Round 4: the tiny preset as shipped, trained for 1x..8x its steps: how many tokens it needs to pass xz -9.
VARIANTS_ROUND4 = {f"tiny-x{k}": [f"train.steps={700 * k}"] for k in (1, 2, 4, 8)}
VARIANTS_ROUND4.update({f"tiny-mtp-x{k}": [f"train.steps={700 * k}", "model.num_nextn_predict_layers=1"] for k in (1, 4)})
# Round 5: the shipped shape and step count (so the same CPU time), other optimisation settings.
_R5 = {
    "base": [], "base-seed2": ["train.seed=2"], "base-seed3": ["train.seed=3"],
    "init0.02": ["model.initializer_range=0.02"], "init0.04": ["model.initializer_range=0.04"],
    "init0.08": ["model.initializer_range=0.08"],
    "minlr0": ["train.min_lr_ratio=0"], "decay0.4-minlr0": ["train.decay_start=0.4", "train.min_lr_ratio=0"],
    "cosine-minlr0": ["train.schedule=cosine", "train.min_lr_ratio=0"],
    "lr3e-3-minlr0": ["train.lr=3e-3", "train.min_lr_ratio=0"], "warmup20": ["train.warmup_steps=20"],
    "wd0": ["train.weight_decay=0"], "beta2-0.99": ["train.beta2=0.99"], "gamma0.01": ["train.bias_update_speed=0.01"],
    "rsf1": ["model.routed_scaling_factor=1.0"], "nogroup": ["model.n_group=1", "model.topk_group=1"],
    "init0.02-minlr0": ["model.initializer_range=0.02", "train.min_lr_ratio=0"],
    "init0.02-lr3e-3-minlr0": ["model.initializer_range=0.02", "train.lr=3e-3", "train.min_lr_ratio=0"],
}
VARIANTS_ROUND5 = {name: ["train.steps=700"] + v for name, v in _R5.items()}  # run() starts from 100000 steps
# Rounds 1-5 ran before `tiny` took initialisation std 0.04 from round 5: they start from 0.006.
OLD_INIT = ["model.initializer_range=0.006"]
# Round 6: the preset as shipped now (std 0.04), its learning rate.
VARIANTS_ROUND6 = {name: ["train.steps=700"] + v for name, v in
                   {"base": [], "lr3e-3": ["train.lr=3e-3"], "lr1.5e-3": ["train.lr=1.5e-3"]}.items()}
# Round 7: Muon (train/muon.py) against AdamW at the preset's 700 steps, its learning rate, and
# 900 steps (what the 10-minute budget leaves room for); run with --strides 128 64 to also score
# each final model with overlapping evaluation windows.
_R7 = {"base": [], "muon-lr1e-3": ["train.optimizer=muon", "train.lr=1e-3"],
       "muon-lr2e-3": ["train.optimizer=muon"], "muon-lr4e-3": ["train.optimizer=muon", "train.lr=4e-3"],
       "muon-lr8e-3": ["train.optimizer=muon", "train.lr=8e-3"],
       "base-s900": ["train.steps=900"], "muon-lr4e-3-s900": ["train.optimizer=muon", "train.lr=4e-3", "train.steps=900"]}
VARIANTS_ROUND7 = {name: ["train.steps=700"] + v for name, v in _R7.items()}  # a variant's own steps come later
# Round 8: Muon's settings and, under Muon, the shape (700 steps unless named; the shapes' own CPU
# speed decides afterwards what they cost in the 10-minute budget).
M8 = ["train.optimizer=muon", "train.lr=8e-3"]
_R8 = {"m8": [], "m16": ["train.lr=1.6e-2"], "m32": ["train.lr=3.2e-2"],
       "m16-a2": ["train.lr=2e-3", "train.muon_lr=1.6e-2"], "m16-a8": ["train.lr=8e-3", "train.muon_lr=1.6e-2"],
       "m8-wd0": ["train.weight_decay=0"], "m8-mom0.9": ["train.muon_momentum=0.9"],
       "m8-init0.02": ["model.initializer_range=0.02"], "m8-warm20": ["train.warmup_steps=20"],
       "m8-b4-s1400": ["train.batch_size=4", "train.steps=1400"],
       "m8-seq512-b4": ["train.batch_size=4", "train.seq_len=512"],
       "m8-v4096": ["model.vocab_size=4096", f"train.tokenizer={TOK.format(4096)}"],
       "m8-d192": ["model.hidden_size=192", "model.intermediate_size=512", "model.moe_intermediate_size=96",
                   "model.q_lora_rank=96"],
       "m8-L6": ["model.num_hidden_layers=6"], "m8-decay0.5": ["train.decay_start=0.5"],
       "m8-minlr0": ["train.min_lr_ratio=0"]}
VARIANTS_ROUND8 = {name: ["train.steps=700"] + M8 + v for name, v in _R8.items()}
# Round 9: from round 8's best (Muon at lr 8e-3, momentum 0.9): the AdamW parameters' lr, momentum,
# batch, and the number of steps.
M9 = ["train.optimizer=muon", "train.lr=8e-3", "train.muon_momentum=0.9"]
_R9 = {"m9": [], "m9-mom0.85": ["train.muon_momentum=0.85"], "m9-mom0.8": ["train.muon_momentum=0.8"],
       "m9-a12": ["train.lr=1.2e-2", "train.muon_lr=8e-3"], "m9-a16": ["train.lr=1.6e-2", "train.muon_lr=8e-3"],
       "m9-m6": ["train.muon_lr=6e-3"], "m9-m5-a12": ["train.lr=1.2e-2", "train.muon_lr=5e-3"],
       "m9-b16-s350": ["train.batch_size=16", "train.steps=350"],
       "m9-b16-s350-lr1.2e-2": ["train.batch_size=16", "train.steps=350", "train.lr=1.2e-2"],
       "m9-beta2-0.99": ["train.beta2=0.99"], "m9-decay0.5": ["train.decay_start=0.5"],
       "m9-s850": ["train.steps=850"], "m9-s1400": ["train.steps=1400"], "m9-s2800": ["train.steps=2800"]}
VARIANTS_ROUND9 = {name: ["train.steps=700"] + M9 + v for name, v in _R9.items()}
# Round 10: round 9's gains together (Muon momentum 0.8, AdamW beta2 0.99, Muon lr 5e-3 with the
# AdamW parameters at 1.2e-2), their neighbours, and the steps the CPU budget leaves.
M10 = ["train.optimizer=muon", "train.muon_momentum=0.8", "train.beta2=0.99", "train.muon_lr=5e-3", "train.lr=1.2e-2"]
_R10 = {"c": [], "c-mom0.9": ["train.muon_momentum=0.9"], "c-mom0.7": ["train.muon_momentum=0.7"],
        "c-m6": ["train.muon_lr=6e-3"], "c-m4": ["train.muon_lr=4e-3"], "c-a16": ["train.lr=1.6e-2"],
        "c-a8": ["train.lr=8e-3"], "c-beta2-0.999": ["train.beta2=0.999"], "c-decay0.5": ["train.decay_start=0.5"],
        "c-b16-s350": ["train.batch_size=16", "train.steps=350"],
        "c-b16-s350-m7-a16": ["train.batch_size=16", "train.steps=350", "train.muon_lr=7e-3", "train.lr=1.6e-2"],
        "c-s800": ["train.steps=800"], "c-s850": ["train.steps=850"], "c-b16-s425": ["train.batch_size=16", "train.steps=425"]}
VARIANTS_ROUND10 = {name: ["train.steps=700"] + M10 + v for name, v in _R10.items()}
# Round 11: at the step counts the CPU budget allows, with a second seed: round 10's centre and
# AdamW beta2 0.999 with its neighbours.
M11 = M10 + ["train.beta2=0.999"]
_R11 = {"c999-s850": [], "c999-s850-seed2": ["train.seed=2"], "c-s850-seed2": ["train.beta2=0.99", "train.seed=2"],
        "c999-s850-m4": ["train.muon_lr=4e-3"], "c999-s850-mom0.7": ["train.muon_momentum=0.7"],
        "c999-s850-a16": ["train.lr=1.6e-2"], "c999-s850-m4-a16-mom0.7": ["train.muon_lr=4e-3", "train.lr=1.6e-2",
                                                                        "train.muon_momentum=0.7"],
        "c999-s800": ["train.steps=800"], "c999-s900": ["train.steps=900"], "c999-s950": ["train.steps=950"],
        "c999-s850-warm30": ["train.warmup_steps=30"], "c999-s850-decay0.5": ["train.decay_start=0.5"]}
VARIANTS_ROUND11 = {name: ["train.steps=850"] + M11 + v for name, v in _R11.items()}
# Round 12: seeds of the candidates at 950 steps (round 11 saw 0.04 between two seeds).
_C12 = {"c999": M11, "c99": M10, "c999-m4-a16": M11 + ["train.muon_lr=4e-3", "train.lr=1.6e-2"]}
VARIANTS_ROUND12 = {f"{name}-s950-seed{seed}": ["train.steps=950"] + v + [f"train.seed={seed}"]
                    for name, v in _C12.items() for seed in (1234, 2, 3, 4)}
# Round 13: 880 steps (what 2 CPU cores fit in the 10 minutes with Muon), round 12's best (beta2
# 0.99) and neighbours, with seeds; run with --strides 128 192.
_C13 = {"c99": [], "c99-warm100": ["train.warmup_steps=100"], "c99-m4-a16": ["train.muon_lr=4e-3", "train.lr=1.6e-2"],
        "c99-gamma0.003": ["train.bias_update_speed=0.003"], "c99-wd0.2": ["train.weight_decay=0.2"],
        "c99-mom0.85": ["train.muon_momentum=0.85"]}
VARIANTS_ROUND13 = {f"{name}-s880-seed{seed}": ["train.steps=880"] + M10 + v + [f"train.seed={seed}"]
                    for name, v in _C13.items() for seed in ((1234, 2, 3) if name == "c99" else (1234, 2))}
# Round 14: the preset as shipped after round 13 (Muon, 800 steps) and routing changes, two seeds.
_C14 = {"tiny": [], "top2": ["model.num_experts_per_tok=2"], "nogroup": ["model.n_group=1", "model.topk_group=1"],
        "gamma0.01": ["train.bias_update_speed=0.01"], "rsf1": ["model.routed_scaling_factor=1.0"],
        "beta1-0.8": ["train.beta1=0.8"]}
VARIANTS_ROUND14 = {f"{name}-seed{seed}": ["train.steps=800"] + v + [f"train.seed={seed}"] for name, v in _C14.items() for seed in (1234, 2)}
# Round 15: a smaller vocabulary at equal CPU time. On 2 CPU cores a step of the preset takes 1.26x
# (vocabulary 4096) and 1.36x (2048) as long as at 8192 (the head is most of the work), so each gets
# that many more steps; four seeds each.
_C15 = {"v8192-s800": ["train.steps=800"],
        "v4096-s1000": ["train.steps=1000", "model.vocab_size=4096", f"train.tokenizer={TOK.format(4096)}"],
        "v2048-s1080": ["train.steps=1080", "model.vocab_size=2048", f"train.tokenizer={TOK.format(2048)}"]}
VARIANTS_ROUND15 = {f"{name}-seed{seed}": v + [f"train.seed={seed}"] for name, v in _C15.items() for seed in (1234, 2, 3, 4)}
# Round 16: optimisation and initialisation changes at 880 steps, seeds 1234 and 2. (Three more rows
# of docs/tiny.md, the embedding's and the head's own AdamW lr and 4 Newton-Schulz iterations, ran
# with the optimizer patched in a scratch script; they are not settings and not reproduced here.)
_C16 = {"base": [], "clip0": ["train.grad_clip=0"], "clip2": ["train.grad_clip=2"], "wd0": ["train.weight_decay=0"],
        "beta1-0.95": ["train.beta1=0.95"], "zerohead": ["train.zero_init=head"], "zeroproj": ["train.zero_init=proj"]}
VARIANTS_ROUND16 = {f"{name}-seed{seed}": ["train.steps=880", "train.zero_init=none"] + v + [f"train.seed={seed}"]
                    for name, v in _C16.items() for seed in (1234, 2)}
# Round 17: both zero initialisations together, four seeds, and neighbours of the preset's settings.
ZZ = ["train.zero_init=proj,head"]
_C17 = {"base": (["train.zero_init=none"], (1234, 2, 3, 4)), "zp": (["train.zero_init=proj"], (1234, 2, 3, 4)),
        "zz": (ZZ, (1234, 2, 3, 4)), "zz-m6": (ZZ + ["train.muon_lr=6e-3"], (1234, 2)),
        "zz-init0.06": (ZZ + ["model.initializer_range=0.06"], (1234, 2)), "zz-a16": (ZZ + ["train.lr=1.6e-2"], (1234, 2)),
        "zz-s950": (ZZ + ["train.steps=950"], (1234, 2))}
VARIANTS_ROUND17 = {f"{name}-seed{seed}": ["train.steps=880"] + v + [f"train.seed={seed}"]
                    for name, (v, seeds) in _C17.items() for seed in seeds}
VARIANTS_ROUND8["m8-compile"] = VARIANTS_ROUND8["m8"] + ["train.compile=true"]  # (CPU speed only)
# Round 2 (fixed tokens, about what 2 CPU cores process in 8 minutes): batch size and balancing speed.
VARIANTS_TOKENS = {
    "b16-s250": ["train.batch_size=16", "train.steps=250"],
    "b8-s500": ["train.batch_size=8", "train.steps=500"],
    "b8-s500-lr2e-3": ["train.batch_size=8", "train.steps=500", "train.lr=2e-3"],
    "b4-s1000": ["train.batch_size=4", "train.steps=1000"],
    "b8-s500-g0.01": ["train.batch_size=8", "train.steps=500", "train.bias_update_speed=0.01"],
    "b8-s600-L2": ["train.batch_size=8", "train.steps=600", "model.num_hidden_layers=2"],
    "b8-s850-nomtp": ["train.batch_size=8", "train.steps=850", "model.num_nextn_predict_layers=0"],
    "b8-s500-seq512": ["train.batch_size=4", "train.steps=500", "train.seq_len=512"],
}


def run(name: str, overrides: list[str], budget: float, threads: int, out: Path, device: str,
        stdlib: str | None, strides: tuple[int, ...] = ()) -> None:
    import torch

    use_stdlib(stdlib)
    torch.set_num_threads(threads)
    from moeforge.config import load_config
    from moeforge.train.trainer import Trainer

    cfg = load_config("tiny", overrides=[f"train.out={out}/{name}", "train.eval_every=0", "train.checkpoint_every=0",
                                         "train.steps=100000", f"train.device={device}"] + overrides)
    tr = Trainer(cfg, progress=False)
    start = time.time()
    if budget > 0:  # time mode: fit the whole schedule into the budget
        for _ in range(3):
            tr.train_step()
        cfg.train.steps = max(10, int(budget / ((time.time() - start) / 3)))
    while tr.step < cfg.train.steps and (budget <= 0 or time.time() - start < budget * 1.15):
        tr.train_step()
    wall = time.time() - start
    val = tr.validate(None)
    result = {"variant": name, "steps": tr.step, "planned_steps": cfg.train.steps, "tokens": tr.tokens_seen,
              "wall_s": round(wall, 1), "tokens_per_s": round(tr.tokens_seen / wall), "val_loss": round(val["loss"], 4),
              "val_bpb": round(val["bpb"], 4)}
    for stride in strides:  # the same final model, scored with overlapping windows
        cfg.train.eval_stride = stride
        result[f"val_bpb_stride{stride}"] = round(tr.validate(None)["bpb"], 4)
    (out / f"{name}.json").write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


def use_stdlib(path: str | None) -> None:
    if path:
        import moeforge.data.corpus as corpus

        corpus.stdlib_root = lambda: Path(path).resolve()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=420, help="seconds per variant; 0: the variants' own train.steps")
    ap.add_argument("--round", type=int, default=1, help="1: shapes in a time budget, 2-17: fixed-token variants of tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="sweep")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--stdlib", help="use this copy of a standard library as the default corpus (another machine's)")
    ap.add_argument("--strides", type=int, nargs="*", default=[],
                    help="also score each final model with overlapping evaluation windows every N tokens")
    ap.add_argument("--device", default="cpu", help="cpu (what the preset is for) or cuda (same numbers of tokens, faster)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from moeforge.data import default_cache_dir, load_tokenizer, prepare_data

    use_stdlib(args.stdlib)
    table = {1: VARIANTS, 2: VARIANTS_TOKENS, 3: VARIANTS_ROUND3, 4: VARIANTS_ROUND4, 5: VARIANTS_ROUND5,
             6: VARIANTS_ROUND6, 7: VARIANTS_ROUND7, 8: VARIANTS_ROUND8,
             9: VARIANTS_ROUND9, 10: VARIANTS_ROUND10,
             11: VARIANTS_ROUND11, 12: VARIANTS_ROUND12,
             13: VARIANTS_ROUND13, 14: VARIANTS_ROUND14, 15: VARIANTS_ROUND15,
             16: VARIANTS_ROUND16, 17: VARIANTS_ROUND17}[args.round]
    if args.round <= 5:
        table = {name: OLD_INIT + v for name, v in table.items()}  # a variant's own std comes later and wins
    if args.round <= 15:  # measured before the preset's zero initialisation (round 17)
        table = {name: ["train.zero_init=none"] + v for name, v in table.items()}
    for tok in sorted({o.split("=", 1)[1] for v in table.values() for o in v if o.startswith("train.tokenizer=")} | {""}):
        prepare_data(None, load_tokenizer(tok or None), default_cache_dir())  # tokenise once, before the workers
    from moeforge.train.trainer import validation_text, xz_bits_per_byte

    print(json.dumps({"xz -9 bits per byte on the validation text": round(xz_bits_per_byte(validation_text(None)), 4)}))
    names = args.only or list(table)
    procs = [mp.Process(target=run, args=(n, table[n], args.budget, args.threads, out, args.device, args.stdlib,
                                                tuple(args.strides))) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
