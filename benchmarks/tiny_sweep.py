"""Which tiny model learns the most in a fixed CPU budget? Runs configs side by side, 2 threads each.

Each variant measures its step time over a few steps, sets train.steps so that the whole
schedule (warmup, constant, cosine decay) fits the wall-clock budget, trains, and reports the
validation loss and bits per byte on the whole held-out split.

    PYTHONPATH=src python benchmarks/tiny_sweep.py --budget 420 --threads 2 --out results/
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

VARIANTS = {
    "tiny": [],
    "d128": ["model.hidden_size=128", "model.intermediate_size=384", "model.moe_intermediate_size=64", "model.q_lora_rank=64"],
    "d128-nomtp": ["model.hidden_size=128", "model.intermediate_size=384", "model.moe_intermediate_size=64",
                   "model.q_lora_rank=64", "model.num_nextn_predict_layers=0"],
    "d128-L2": ["model.hidden_size=128", "model.intermediate_size=384", "model.moe_intermediate_size=64",
                "model.q_lora_rank=64", "model.num_hidden_layers=2"],
    "d256-L2": ["model.hidden_size=256", "model.intermediate_size=768", "model.moe_intermediate_size=128",
                "model.q_lora_rank=128", "model.num_hidden_layers=2"],
    "tiny-lr6e-3": ["train.lr=6e-3"],
    "tiny-seq512": ["train.seq_len=512", "train.batch_size=8"],
    "d128-lr6e-3": ["model.hidden_size=128", "model.intermediate_size=384", "model.moe_intermediate_size=64",
                    "model.q_lora_rank=64", "train.lr=6e-3"],
}


def run(name: str, overrides: list[str], budget: float, threads: int, out: Path) -> None:
    import torch

    torch.set_num_threads(threads)
    from moeforge.config import load_config
    from moeforge.train.trainer import Trainer

    cfg = load_config("tiny", overrides=[f"train.out={out}/{name}", "train.eval_every=0",
                                         "train.checkpoint_every=0", "train.steps=100000"] + overrides)
    tr = Trainer(cfg, progress=False)
    start = time.time()
    for _ in range(3):
        tr.train_step()
    per_step = (time.time() - start) / 3
    cfg.train.steps = max(10, int(budget / per_step))
    while tr.step < cfg.train.steps and time.time() - start < budget * 1.15:
        tr.train_step()
    wall = time.time() - start
    val = tr.validate(None)
    result = {"variant": name, "steps": tr.step, "planned_steps": cfg.train.steps, "tokens": tr.tokens_seen,
              "wall_s": round(wall, 1), "tokens_per_s": round(tr.tokens_seen / wall), "val_loss": round(val["loss"], 4),
              "val_bpb": round(val["bpb"], 4)}
    (out / f"{name}.json").write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=420)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="sweep")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from moeforge.data import default_cache_dir, load_tokenizer, prepare_data

    prepare_data(None, load_tokenizer(None), default_cache_dir())  # tokenise once before the workers start
    names = args.only or list(VARIANTS)
    procs = [mp.Process(target=run, args=(n, VARIANTS[n], args.budget, args.threads, out)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
