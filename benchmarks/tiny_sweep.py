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
        stdlib: str | None) -> None:
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
    (out / f"{name}.json").write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


def use_stdlib(path: str | None) -> None:
    if path:
        import moeforge.data.corpus as corpus

        corpus.stdlib_root = lambda: Path(path).resolve()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=420, help="seconds per variant; 0: the variants' own train.steps")
    ap.add_argument("--round", type=int, default=1, help="1: shapes in a time budget, 2-6: fixed-token variants of tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="sweep")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--stdlib", help="use this copy of a standard library as the default corpus (another machine's)")
    ap.add_argument("--device", default="cpu", help="cpu (what the preset is for) or cuda (same numbers of tokens, faster)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from moeforge.data import default_cache_dir, load_tokenizer, prepare_data

    use_stdlib(args.stdlib)
    table = {1: VARIANTS, 2: VARIANTS_TOKENS, 3: VARIANTS_ROUND3, 4: VARIANTS_ROUND4, 5: VARIANTS_ROUND5,
             6: VARIANTS_ROUND6}[args.round]
    if args.round <= 5:
        table = {name: OLD_INIT + v for name, v in table.items()}  # a variant's own std comes later and wins
    for tok in sorted({o.split("=", 1)[1] for v in table.values() for o in v if o.startswith("train.tokenizer=")} | {""}):
        prepare_data(None, load_tokenizer(tok or None), default_cache_dir())  # tokenise once, before the workers
    from moeforge.train.trainer import validation_text, xz_bits_per_byte

    print(json.dumps({"xz -9 bits per byte on the validation text": round(xz_bits_per_byte(validation_text(None)), 4)}))
    names = args.only or list(table)
    procs = [mp.Process(target=run, args=(n, table[n], args.budget, args.threads, out, args.device, args.stdlib)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
