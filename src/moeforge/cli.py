"""The `moeforge` command line: thin wrappers that parse, call the library and report errors.

A MoeforgeError (bad input), an argparse usage error and an OSError (a path that cannot be read or
written) end as one line on stderr and exit status 2; running out of device memory as one line and
exit status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import MoeforgeError
from .host_memory import keep_freed_host_memory


EMA_HELP = "use the exponential moving average of the parameters saved with the checkpoint (train.ema_decay)"
SEED_MAX = 2**32 - 1  # the random generators' range (numpy's, which the trainer seeds too)


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors: "moeforge <command>: error: ..." (no usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _seed(text: str) -> int:
    """argparse type of --seed: an integer from 0 to SEED_MAX."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be from 0 to {SEED_MAX}, got {value}")
    return value


def _temperature(text: str) -> float:
    """argparse type of --temperature: a finite number, not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, not negative, got {text}")
    return value


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where to run (default: cuda when available, else cpu)")


def _check_at_least_one(args, *flags: str) -> None:
    for flag in flags:
        if getattr(args, flag) < 1:
            raise MoeforgeError(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")


def _check_top_p(top_p: float) -> None:
    if not 0 < top_p <= 1:
        raise MoeforgeError(f"--top-p must be in (0, 1], got {top_p}")


def _add_decode_precision(p: argparse.ArgumentParser, when: str = "") -> None:
    """--precision for a command that samples from a checkpoint (generate, score, sft-data --teacher)."""
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help=f"{when}numerics (default: bf16 on GPU, where each decoding step is replayed as a CUDA graph; "
                        f"fp32 on CPU)")


def _add_checkpoint_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="the config of a checkpoint or run folder (an imported Hugging Face model's "
                                        "too) instead of --preset/--config; key=value settings apply on top")


def _command_config(args):
    """The config of `info` and `plan`: a checkpoint's (--checkpoint), else --preset / --config (default
    tiny), with the key=value settings on top."""
    from .config import apply_overrides, load_config

    if args.checkpoint:
        if args.preset or args.config:
            raise MoeforgeError("--checkpoint gives the config: leave out --preset and --config")
        from .train import checkpoint as ckpt

        return apply_overrides(ckpt.load_checkpoint_config(ckpt.resolve_checkpoint(args.checkpoint)), args.overrides)
    return load_config(args.preset or (None if args.config else "tiny"), args.config, args.overrides)


def _add_compile_decoding(p: argparse.ArgumentParser, when: str = "") -> None:
    p.add_argument("--compile-decoding", action="store_true",
                   help=f"{when}run the decoding step through torch.compile (on a GPU in BF16 still replayed as a CUDA "
                        "graph): about twice the tokens/s, after a compilation of tens of seconds that the run pays "
                        "once; not with --speculative (docs/model.md)")


def _decode_mode(args) -> str:
    """generate.Decoder's mode for --compile-decoding."""
    if not getattr(args, "compile_decoding", False):
        return "auto"
    if args.speculative:
        raise MoeforgeError("--compile-decoding and --speculative: speculative decoding has no compiled step; "
                            "choose one")
    return "compiled"


def _add_task_prompt_flags(p: argparse.ArgumentParser, speculative_help: str) -> None:
    """--speculative, --compile-decoding and --chat for a command that decodes a task's prompts (grpo, score)."""
    p.add_argument("--speculative", action="store_true", help=speculative_help)
    _add_compile_decoding(p)
    p.add_argument("--chat", action="store_true",
                   help="each task prompt as a user turn of the tokenizer's chat template (for a model fine-tuned on "
                        "{\"messages\"} data; see generate --chat)")


def _add_post_run_flags(p: argparse.ArgumentParser, seed: int, seed_help: str, fp8: bool = False) -> None:
    """The flags every post-training run takes: --resume, --seed, --no-progress, --precision (fp8: with
    the FP8 recipe too) and --device."""
    from .posttrain.settings import PRECISIONS, SFT_PRECISIONS

    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (the same --checkpoint and settings; "
                        "--steps may be raised)")
    p.add_argument("--seed", type=_seed, default=seed, help=seed_help)
    p.add_argument("--no-progress", action="store_true", help="no line per step")
    p.add_argument("--precision", choices=SFT_PRECISIONS if fp8 else PRECISIONS, default="fp32",
                   help="bf16: the forwards under BF16 autocast" + ("; fp8: the blocks' GEMMs in FP8 with DeepSeek-V3's "
                                                                    "recipe (docs/fp8.md)" if fp8 else "")
                        + " (weights, gradients and AdamW stay FP32; default fp32)")
    _add_device(p)


def build_parser() -> argparse.ArgumentParser:
    from .config import preset_names
    from .posttrain.settings import GRPOSettings, SFTSettings
    from .posttrain.tasks import TASK_HELP

    parser = _Parser(prog="moeforge", description="Train, evaluate and convert DeepSeek-V3-class MoE models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (default: the tiny preset on the embedded corpus)",
                       description="Train a model. Settings come from a preset and/or a TOML file, then key=value overrides.")
    p.add_argument("--preset", help=f"a built-in preset: {', '.join(n + ' (default)' if n == 'tiny' else n for n in preset_names())}")
    p.add_argument("--config", help="a TOML file with [model] and [train] sections (applied after --preset)")
    p.add_argument("--out", help="run folder for metrics and checkpoints (default: the preset's, e.g. runs/tiny)")
    p.add_argument("--steps", type=int, help="number of optimizer steps (train.steps)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start a new run from this checkpoint's or run folder's weights (continued pre-training; "
                        "train.init_from): its model config and tokenizer, unless --preset, --config or model.* "
                        "settings are given, which must then match its model")
    _add_device(p)
    p.add_argument("--seed", type=_seed, help="random seed for initialisation and data order (train.seed)")
    p.add_argument("--data", help="a .txt/.jsonl/.parquet file or folder (default: the Python standard library sources)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: the byte-level BPE shipped with moeforge)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp8"],
                   help="numerics (default: fp32 on CPU, bf16 on GPU; fp8: DeepSeek-V3's FP8 GEMMs, emulated on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings such as model.num_hidden_layers=6 train.lr=3e-4")

    p = sub.add_parser("generate", help="sample text from a checkpoint", description="Sample text from a trained checkpoint (KV cache of the MLA latents).")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (step_N) or a run folder (its newest checkpoint)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=_temperature, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed (default 0)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user turn of the tokenizer's chat template (DeepSeek-V3's with a DeepSeek "
                        "tokenizer, else User:/Assistant: lines), as `sft` renders {\"messages\"} data; prints the answer")
    p.add_argument("--speculative", action="store_true",
                   help="the MTP module drafts the token after next, checked by the model in the same forward "
                        "(DeepSeek-V3 5.4.3): greedy decoding's tokens with --temperature 0, else speculative "
                        "sampling (each token distributed as plain sampling's); prints how many drafts it kept")
    _add_compile_decoding(p)
    _add_decode_precision(p)
    p.add_argument("--ema", action="store_true", help=EMA_HELP)
    _add_device(p)

    p = sub.add_parser("chat", help="talk with a checkpoint in its chat template, one line per turn",
                       description="A conversation with a checkpoint: each line read from stdin is a user turn, "
                                   "answered in the tokenizer's chat template (as `sft` renders {\"messages\"} data) "
                                   "with the conversation so far as context. An empty line or end of input ends it; "
                                   "/reset starts a new conversation.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (step_N) or a run folder (its newest checkpoint)")
    p.add_argument("--system", default="", help="a system message at the start of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer, in tokens (default 256)")
    p.add_argument("--temperature", type=_temperature, default=0.6, help="sampling temperature; 0 is greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed of the first answer, the next ones count on (default 0)")
    p.add_argument("--speculative", action="store_true", help="the MTP module drafts the token after next (see generate)")
    _add_compile_decoding(p)
    _add_decode_precision(p)
    p.add_argument("--ema", action="store_true", help=EMA_HELP)
    _add_device(p)

    p = sub.add_parser("eval", help="loss and bits per byte of a checkpoint", description="Report loss and bits per byte on the validation split or a text file.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (step_N) or a run folder (its newest checkpoint)")
    p.add_argument("--text", help="a UTF-8 text file to evaluate (default: the run's validation split)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (default: all)")
    p.add_argument("--stride", type=int, default=None,
                   help="overlapping windows every N tokens, each target with at least seq_len - N tokens of "
                        "context (default: the run's train.eval_stride; 0 = back-to-back windows)")
    p.add_argument("--ema", action="store_true", help=EMA_HELP)
    _add_device(p)

    p = sub.add_parser("convert", help="export to / import from / dequantise Hugging Face DeepSeek-V3 checkpoints",
                       description="Export a moeforge checkpoint as a Hugging Face DeepSeek-V3 folder (--checkpoint), "
                                   "rewrite a Hugging Face folder, dequantising FP8 weights (--hf), or import one as "
                                   "a moeforge run folder that every --checkpoint reads (--hf ... --to run).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a moeforge checkpoint folder or run folder to export")
    src.add_argument("--hf", help="a Hugging Face DeepSeek-V3 folder (config.json + safetensors) to dequantise or import")
    p.add_argument("--out", required=True, help="the folder to write: new, empty, or an earlier moeforge export "
                                                "(replaced); never a run or checkpoint folder (--to run: new or empty)")
    p.add_argument("--to", choices=["hf", "run"], default="hf",
                   help="with --hf: hf (default) writes a Hugging Face folder; run writes a moeforge run folder "
                        "(FP32 weights, the folder's tokenizer) for generate, eval, sft, grpo, score")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="dtype of the written Hugging Face weights (default bf16)")
    p.add_argument("--ema", action="store_true", help=EMA_HELP + "; with --checkpoint")

    p = sub.add_parser("bench", help="measure training-step speed, MFU and memory (optionally against transformers)",
                       description="Time training steps on random tokens after a warm-up and print tokens/s, TFLOP/s, "
                                   "MFU, peak memory, host syncs and the time split by part (docs/performance.md).")
    p.add_argument("--preset", help="a built-in preset (default bench)")
    p.add_argument("--config", help="a TOML file (applied after --preset)")
    p.add_argument("--seq-len", type=int, help="sequence length (train.seq_len)")
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step (train.batch_size)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp8"], help="numerics (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, for compilation and autotuning (default 3)")
    p.add_argument("--vs", choices=["hf", "fp32", "bf16", "fp8"],
                   help="also measure transformers' DeepseekV3ForCausalLM on the same settings (hf), or the same "
                        "steps in another precision (e.g. --precision fp8 --vs bf16), and print the ratio")
    p.add_argument("--no-split", action="store_true", help="skip the extra step that times each part")
    p.add_argument("--json", help="also write the results to this JSON file")
    _add_device(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings such as train.compile=true train.recompute=norm,swiglu train.loss_chunk=4096")

    p = sub.add_parser("info", help="parameter counts and FLOPs of a preset or config", description="Print parameter counts and training FLOPs per token of a config (built on the meta device, no memory).")
    p.add_argument("--preset", help="a built-in preset (default tiny)")
    p.add_argument("--config", help="a TOML file")
    _add_checkpoint_config(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides")

    p = sub.add_parser("grpo", help="post-train a checkpoint with GRPO on a task with verifiable rewards",
                       description="Reinforcement learning from rule-based rewards without a critic (GRPO, DeepSeek-R1): "
                                   "sample a group of completions per prompt, reward each, and push the policy towards "
                                   "the better ones, with a KL penalty to the starting model. See docs/posttrain.md.")
    p.add_argument("--checkpoint", required=True, help="the model to start from: a checkpoint or run folder")
    p.add_argument("--out", required=True, help="run folder for metrics.jsonl and checkpoints")
    p.add_argument("--task", default="arithmetic", help=f"the task and its reward: {TASK_HELP} (default arithmetic)")
    d = GRPOSettings()
    p.add_argument("--steps", type=int, default=d.steps, help=f"GRPO steps (default {d.steps})")
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step,
                   help=f"prompts per step (default {d.prompts_per_step})")
    p.add_argument("--group-size", type=int, default=d.group_size,
                   help=f"completions sampled per prompt (default {d.group_size})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"completion length limit (default {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"sampling temperature (default {d.temperature:g})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate, constant (default {d.lr:g})")
    p.add_argument("--beta", type=float, default=d.beta, help=f"weight of the KL to the starting model (default {d.beta:g})")
    p.add_argument("--clip", type=float, default=d.clip, help=f"the probability ratio's clip epsilon (default {d.clip:g})")
    p.add_argument("--updates", type=int, default=d.updates, help=f"optimizer steps per sampled batch (default {d.updates})")
    p.add_argument("--format-weight", type=float, default=d.format_weight,
                   help="add this times the format reward (1 for a completion that opens with one <think>...</think> "
                        f"block and then answers; DeepSeek-R1-Zero's) to the task's reward (default {d.format_weight:g})")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="a checkpoint every N steps besides the final one (default: the final one only)")
    _add_task_prompt_flags(p, "sample the groups with the MTP module drafting each completion's token after next "
                              "(the same distribution, fewer forwards); not with --ep or --sharding")
    _add_layout_flags(p)
    _add_post_run_flags(p, d.seed, "seed for prompts and sampling")

    p = sub.add_parser("sft", help="supervised fine-tuning of a checkpoint on prompt/response pairs",
                       description="Fine-tune a checkpoint on prompt/response pairs (DeepSeek-R1's cold start before "
                                   "GRPO, or distillation from a teacher's outputs): next-token loss on the response "
                                   "tokens only, AdamW with warm-up, a held-out loss at intervals. See docs/posttrain.md.")
    p.add_argument("--checkpoint", required=True, help="the model to start from: a checkpoint or run folder")
    p.add_argument("--data", required=True,
                   help='a JSONL file, one {"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": '
                        '...}, ...]} per line (moeforge sft-data writes the first kind)')
    p.add_argument("--out", required=True, help="run folder for metrics.jsonl and checkpoints")
    d = SFTSettings()
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"examples per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW's peak learning rate (default {d.lr:g})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"steps of linear warm-up (default {d.warmup})")
    p.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule,
                   help=f"the learning rate after the warm-up: cosine down to {d.min_lr_ratio:g} x --lr at the last step, "
                        f"or constant (default {d.schedule})")
    p.add_argument("--max-len", type=int, default=d.max_len,
                   help="the longest example allowed, prompt + response + end-of-text, in tokens; longer ones are "
                        "an error, not truncated (default: the model's context)")
    p.add_argument("--pack", type=int, default=d.pack, metavar="N",
                   help="pack each batch's examples into rows of N positions, attention within each example, instead "
                        "of padding each to the longest of its batch (for examples of very different lengths; "
                        "default 0: pad)")
    p.add_argument("--mtp-weight", type=float, default=d.mtp_weight, metavar="W",
                   help="fine-tune the MTP modules too, their response-token losses weighted W / depth (as "
                        "train.mtp_lambda; they then keep drafting for generate --speculative); default 0: MTP "
                        "modules left as they are")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"the last examples held out for the validation loss, at least one (default {d.val_fraction:g})")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"held-out loss every N steps, and before and after training (default {d.eval_every}; 0: "
                        f"before and after only)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="a checkpoint every N steps besides the final one (default: the final one only)")
    _add_layout_flags(p)
    _add_post_run_flags(p, d.seed, "seed for the order of the examples", fp8=True)

    p = sub.add_parser("sft-data", help="write SFT data: a task's worked examples, or a teacher's correct answers",
                       description="Write a JSONL file of prompt/response pairs for `moeforge sft` from a task of "
                                   "posttrain/tasks.py. Without --teacher: the task's worked examples, each response a "
                                   "chain in a <think> block, then the answer (arithmetic: '47+38=' -> "
                                   "'<think>7+8=15, 4+3+1=8 -> 85</think>85'). With --teacher: rejection sampling "
                                   "(DeepSeek-R1 2.3.3, 2.4): --samples completions of each of --n prompts sampled from the "
                                   "teacher checkpoint, of which those the task's reward accepts, and that stopped, are "
                                   "kept (--keep distinct ones per prompt). The file is written whole or not at all.")
    p.add_argument("--task", default="arithmetic", help=f"the task: {TASK_HELP} (default arithmetic)")
    p.add_argument("-n", "--n", type=int, default=2000,
                   help="number of examples, or of prompts with --teacher (default 2000; under torchrun write -n: "
                        "torchrun reads --n as an abbreviation of its own options)")
    p.add_argument("--out", required=True, help="the JSONL file to write (replaced if it exists)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for the problems and the sampling (default 0)")
    p.add_argument("--teacher", help="a checkpoint or run folder to sample the responses from (rejection sampling)")
    p.add_argument("--samples", type=int, help="with --teacher: completions per prompt (default 4)")
    p.add_argument("--keep", type=int, help="with --teacher: distinct correct completions kept per prompt, at most "
                                            "--samples (default 1)")
    p.add_argument("--speculative", action="store_true",
                   help="with --teacher: sample with the teacher's MTP module drafting (the same distribution)")
    _add_compile_decoding(p, "with --teacher: ")
    p.add_argument("--chat", action="store_true",
                   help="write one-exchange conversations ({\"messages\"} lines, which sft renders in the "
                        "tokenizer's chat template); with --teacher, ask the teacher in that template too")
    p.add_argument("--turns", type=int, default=1,
                   help="with --chat, worked examples only: exchanges per conversation (--n conversations of "
                        "--turns problems each; default 1)")
    p.add_argument("--max-new-tokens", type=int, help="with --teacher: the longest completion (default 48)")
    p.add_argument("--temperature", type=_temperature, help="with --teacher: sampling temperature (default 1)")
    p.add_argument("--no-progress", action="store_true", help="with --teacher: no line per 32 prompts sampled")
    _add_decode_precision(p, "with --teacher: ")
    _add_device(p)

    p = sub.add_parser("score", help="accuracy of a checkpoint on a task's problems (pass@1, pass@k, maj@k)",
                       description="Score a checkpoint on --n problems of a task (posttrain/tasks.py) with the task's "
                                   "reward: pass@1 (greedy with the default --temperature 0; with --samples k at a "
                                   "temperature, DeepSeek-R1's pass@1 estimate over k samples), pass@k and maj@k "
                                   "(majority vote of the k answers), the think format's rate, the share of "
                                   "completions that stopped, and their mean length. See docs/posttrain.md.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (step_N) or a run folder (its newest checkpoint)")
    p.add_argument("--task", default="arithmetic", help=f"the task: {TASK_HELP} (default arithmetic)")
    p.add_argument("--n", type=int, default=200, help="number of problems (default 200)")
    p.add_argument("--samples", type=int, default=1, help="completions per problem (default 1)")
    p.add_argument("--temperature", type=_temperature, default=0.0, help="sampling temperature; 0 is greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="the longest completion (default 48)")
    p.add_argument("--seed", type=_seed, default=1,
                   help="seed for the problems and the sampling (default 1; sft-data's default is 0)")
    p.add_argument("--exclude", metavar="FILE", help="an SFT data file (JSONL): problems whose prompt it holds are skipped")
    p.add_argument("--out", metavar="FILE", help="write the scores and every problem's completions and rewards as JSON")
    _add_task_prompt_flags(p, "decode with the MTP module drafting each completion's token after next (greedy: the "
                              "same completions; sampled: the same distribution), replayed as CUDA graphs on a GPU")
    _add_decode_precision(p)
    p.add_argument("--no-progress", action="store_true", help="no line per 64 problems scored")
    _add_device(p)

    p = sub.add_parser("plan", help="memory per GPU and compute time/cost of a training run",
                       description="Plan a run: the model-state memory (FP32 weights and gradients, optimizer state) of "
                                   "every GPU under the parallel.* layout, one micro-batch's activations per GPU (counted on "
                                   "fake tensors), and, with --tokens, GPU-hours, days and cost at an assumed MFU. "
                                   "Built on the meta device, no memory. See docs/plan.md.")
    p.add_argument("--preset", help="a built-in preset (default tiny)")
    p.add_argument("--config", help="a TOML file")
    _add_checkpoint_config(p)
    p.add_argument("--gpus", type=int, help="number of GPUs (default: parallel.pp x parallel.ep x parallel.dp, dp 0 as 1)")
    p.add_argument("--tokens", help="training tokens, e.g. 14.8T or 300B: adds time and cost")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="datasheet dense BF16 peak per GPU (default 989, H100/H200/H800 SXM)")
    p.add_argument("--gpu-memory", type=float, metavar="GIB", help="memory per GPU in GiB: says whether the states fit")
    p.add_argument("--price", type=float, metavar="USD", help="price of one GPU-hour: adds the cost")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides (model.*, train.*, parallel.*)")

    p = sub.add_parser("plot", help="plot runs' metrics (loss, validation, lr, gradient norm, reward, ...) to an image",
                       description="Draw the curves of one or more runs' metrics.jsonl (train, sft or grpo) in one "
                                   "figure, each run in its own colour, and print a line per run. Needs matplotlib.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (the --out of train, sft, grpo) or metrics.jsonl files")
    p.add_argument("--out", metavar="FILE", help="the image: .png, .pdf or .svg (default: RUN/metrics.png for one run; "
                                                  "required for several)")
    p.add_argument("--metrics", metavar="A,B,...",
                   help="the record keys to draw, comma-separated (default: those of loss, val_bpb, val_loss, mtp_loss, "
                        "reward, accuracy, kl, lr, grad_norm, tokens_per_s, imbalance, completion_tokens the runs have)")
    p.add_argument("--smooth", type=int, metavar="N",
                   help="per-step series drawn with a trailing mean over N steps (default: about 2%% of the steps; 1: none)")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="the horizontal axis (default step)")
    return parser


def _check_output_file(path: str | None, flag: str) -> None:
    """A file to be written after the work (results): checked before it, by creating and removing a
    file next to it, so that a path that cannot be written fails before anything is computed."""
    import tempfile

    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise MoeforgeError(f"{flag} '{p}' is a folder; give a file name such as {p / 'results.json'}")
    if not p.parent.is_dir():
        raise MoeforgeError(f"{flag} '{p}': the folder '{p.parent}' does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise MoeforgeError(f"{flag} '{p}': cannot write in '{p.parent}' ({e.strerror})") from None


def _check_out_folder(out: Path) -> None:
    """--out must be a folder or creatable as one. Checked before any work, creating nothing."""
    p = out
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise MoeforgeError(f"--out '{out}': '{p}' exists and is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise MoeforgeError(f"--out '{out}': '{p}' is not writable")


def _start_from(cfg, args) -> None:
    """train --init CHECKPOINT: the run starts from that checkpoint's weights (train.init_from). Its
    model config and tokenizer become the run's, unless the command line chose a model (--preset,
    --config, model.* settings: the trainer then checks that it is the checkpoint's)."""
    from .config import validate
    from .train import checkpoint as ckpt

    start = ckpt.resolve_checkpoint(args.init)
    saved = ckpt.load_checkpoint_config(start)
    cfg.train.init_from = str(start.absolute())
    if not (args.preset or args.config or any(o.startswith("model.") for o in args.overrides)):
        cfg.model = saved.model
    if not cfg.train.tokenizer:
        cfg.train.tokenizer = saved.train.tokenizer
    validate(cfg)


def cmd_train(args) -> int:
    from .config import apply_overrides, load_config
    from .train import Trainer
    from .train import checkpoint as ckpt

    if args.init and args.resume:
        raise MoeforgeError("--init starts a new run from a checkpoint's weights and --resume continues a run in "
                            "--out; give one of them")
    overrides = list(args.overrides)
    for flag, key in (("out", "out"), ("steps", "steps"), ("device", "device"), ("seed", "seed"),
                      ("data", "data"), ("tokenizer", "tokenizer"), ("precision", "precision")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"train.{key}={value}")
    preset = args.preset or (None if args.config else "tiny")
    if args.resume and not args.preset and not args.config and args.out:
        # Resuming a run: its own saved config is the base, so the run continues as it was set up.
        root = Path(args.out) / "checkpoints"
        found = ckpt.list_checkpoints(root)
        if not found:  # the trainer's wording, whichever path resume takes
            raise MoeforgeError(f"--resume: no checkpoint under '{root}'")
        cfg = apply_overrides(ckpt.load_checkpoint_config(found[-1]), overrides)
    else:
        cfg = load_config(preset, args.config, overrides)
    if args.init:
        _start_from(cfg, args)
    # The checkpoints keep these paths: absolute, so that eval / generate / --resume find the data
    # and the tokenizer from any working directory.
    for key in ("data", "tokenizer"):
        if getattr(cfg.train, key):
            setattr(cfg.train, key, str(Path(getattr(cfg.train, key)).expanduser().absolute()))
    _check_out_folder(Path(cfg.train.out))
    trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress)
    try:
        result = trainer.train()
    finally:
        trainer.close()  # leaves the process group of a torchrun launch
    if not trainer.is_main:  # under torchrun, rank 0 reports
        return 0
    from .train.trainer import validation_text, xz_bits_per_byte

    print(f"validation: loss {result.val_loss:.4f} | {result.val_bpb:.4f} bits per byte "
          f"(xz -9 on the same text: {xz_bits_per_byte(validation_text(cfg.train.data or None)):.4f})")
    print(f"checkpoint: {result.out}")
    if result.sample:
        print("sample:\n" + result.sample)
    return 0


def cmd_generate(args) -> int:
    from .data import load_tokenizer
    from .train.checkpoint import load_trained_model

    _check_top_p(args.top_p)
    _decode_mode(args)
    if args.max_new_tokens < 0:
        raise MoeforgeError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 (Python keeps them as surrogates)
        raise MoeforgeError("--prompt is not valid UTF-8 text") from None
    model, cfg = load_trained_model(args.checkpoint, args.device, ema=args.ema)
    tok = load_tokenizer(cfg.train.tokenizer or None)
    if args.chat:
        from .posttrain.chat import ChatTemplate

        prompt = ChatTemplate(tok).prompt(args.prompt)
    else:
        prompt = tok.encode(args.prompt)
    if args.speculative:  # (printed once decoded)
        ids, stats = _complete(model, prompt, args, tok.eos_id, args.seed)
        print(tok.decode(ids) if args.chat else args.prompt + tok.decode(ids))
    else:  # printed as it is decoded
        if not args.chat:
            print(args.prompt, end="", flush=True)
        shown = _TextStream(tok)
        ids, stats = _complete(model, prompt, args, tok.eos_id, args.seed, shown)
        shown.close()
    if stats is not None:
        kept = f" ({100 * stats['accepted'] / stats['drafts']:.0f}%)" if stats["drafts"] else ""
        print(f"speculative: {stats['accepted']} of {stats['drafts']} drafts kept{kept}; {len(ids)} tokens in "
              f"{stats['forwards'] + 1} forwards (the prefill's included)")
    return 0


class _TextStream:
    """Prints a completion as its ids arrive (generate.generate's stream): the text of the ids so far
    less what is on the screen, held back while it ends in an incomplete UTF-8 character (decoded as
    U+FFFD). Byte-level BPE decodes a prefix of ids to a prefix of the text, so the lines printed are
    those of decoding the whole completion at once. skip: ids left out of the text (chat's end of
    text)."""

    def __init__(self, tok, skip: tuple[int, ...] = ()):
        self.tok, self.skip, self.ids, self.shown = tok, set(skip), [], ""

    def __call__(self, token: int) -> None:
        if token not in self.skip:
            self.ids.append(token)
            text = self.tok.decode(self.ids)
            if not text.endswith("\ufffd"):
                self._show(text)

    def _show(self, text: str) -> None:
        if text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def close(self) -> None:
        """The rest of the text (also an incomplete last character, as U+FFFD) and the line's end."""
        text = self.tok.decode(self.ids)
        if not text.startswith(self.shown):  # (a tokenizer whose prefixes decode otherwise: the whole again)
            print()
            self.shown = ""
        self._show(text)
        print(flush=True)


def _complete(model, prompt: list[int], args, stop_id: int, seed: int, stream=None):
    """The new ids after `prompt` under generate's and chat's flags (precision, --speculative,
    sampling), and the speculative counts (None without --speculative). stream: generate's (not with
    --speculative)."""
    from .generate import generate, generate_speculative
    from .train.step import autocast, resolve_precision

    device = model.embed.weight.device
    mode = _decode_mode(args)
    with autocast(device, resolve_precision(args.precision, device)):
        if args.speculative:
            return generate_speculative(model, prompt, args.max_new_tokens, stop_id=stop_id,
                                        temperature=args.temperature, top_p=args.top_p, seed=seed)
        return generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p, seed, stop_id=stop_id,
                        mode=mode, stream=stream), None


def cmd_chat(args) -> int:
    from .data import load_tokenizer
    from .posttrain.chat import ChatTemplate
    from .train.checkpoint import load_trained_model

    _check_top_p(args.top_p)
    _decode_mode(args)
    if args.max_new_tokens < 1:
        raise MoeforgeError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, cfg = load_trained_model(args.checkpoint, args.device, ema=args.ema)
    tok = load_tokenizer(cfg.train.tokenizer or None)
    template = ChatTemplate(tok)
    context = cfg.model.max_position_embeddings
    interactive = sys.stdin.isatty()
    exchanges: list[tuple[str, list[int]]] = []
    seed = args.seed
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        user = line.rstrip("\n")
        if not line or not user.strip():
            return 0
        if user.strip() == "/reset":
            exchanges = []
            print("(a new conversation)", flush=True)
            continue
        prompt = template.history_prompt(args.system, exchanges, user)
        while len(prompt) + args.max_new_tokens > context and exchanges:  # the oldest exchanges make room
            exchanges = exchanges[1:]
            prompt = template.history_prompt(args.system, exchanges, user)
            print("(the oldest exchange left the context)", file=sys.stderr, flush=True)
        if len(prompt) + args.max_new_tokens > context:
            print(f"(this message and --max-new-tokens {args.max_new_tokens} exceed the model's context of {context} "
                  f"tokens: say it shorter)", file=sys.stderr, flush=True)
            continue
        shown = None if args.speculative else _TextStream(tok, skip=(tok.eos_id,))  # printed as decoded
        ids, _ = _complete(model, prompt, args, tok.eos_id, seed, shown)
        seed += 1
        answer = [i for i in ids if i != tok.eos_id]  # (kept as the model's ids: the next turn's context)
        if shown is None:
            print(tok.decode(answer), flush=True)
        else:
            shown.close()
        exchanges.append((user, answer))


def cmd_eval(args) -> int:
    import numpy as np

    from .data import default_cache_dir, load_tokenizer, prepare_data
    from .train.checkpoint import load_trained_model
    from .train.step import resolve_precision
    from .train.trainer import evaluate, validation_text, xz_bits_per_byte

    if args.batch_size < 1:
        raise MoeforgeError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_batches is not None and args.max_batches < 1:
        raise MoeforgeError(f"--max-batches must be >= 1, got {args.max_batches}")
    if args.stride is not None and args.stride < 0:
        raise MoeforgeError(f"--stride must be >= 0, got {args.stride}")
    if args.text:
        path = Path(args.text)
        if not path.exists():
            raise MoeforgeError(f"text file '{path}' does not exist")
        if not path.is_file():
            raise MoeforgeError(f"text file '{path}' is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise MoeforgeError(f"text file '{path}' is not UTF-8 text (byte {e.start})") from None
        if not text.strip():
            raise MoeforgeError(f"text file '{path}' is empty")
    model, cfg = load_trained_model(args.checkpoint, args.device, ema=args.ema)
    if args.stride is not None and args.stride > cfg.train.seq_len:
        raise MoeforgeError(f"--stride {args.stride}: must be at most the model's training sequence length "
                            f"({cfg.train.seq_len}: back-to-back windows)")
    tok = load_tokenizer(cfg.train.tokenizer or None)
    if args.text:
        ids = tok.encode(text)
        if len(ids) < 2:  # the first token is only context: nothing of the text would be scored
            raise MoeforgeError(f"text file '{path}' is too short to score ({len(ids)} token)")
        tokens = np.asarray(ids + [tok.eos_id], dtype=np.int64)
        what = str(path)
    else:
        data = prepare_data(cfg.train.data or None, tok, default_cache_dir())
        tokens, what = data.val, "validation split"
        text = validation_text(cfg.train.data or None)
    device = model.embed.weight.device
    res = evaluate(model, tokens, tok.token_bytes, cfg.train.seq_len, args.batch_size, device,
                   resolve_precision(cfg.train.precision, device), args.max_batches,
                   stride=cfg.train.eval_stride if args.stride is None else args.stride)
    xz = "xz -9" if args.max_batches is None else "xz -9 on the whole text"
    print(f"{what}: loss {res['loss']:.4f} | {res['bpb']:.4f} bits per byte ({xz}: {xz_bits_per_byte(text):.4f}) | "
          f"{res['tokens']} tokens, {res['bytes']} bytes")
    return 0


def cmd_convert(args) -> int:
    import torch

    from . import hf
    from .train.checkpoint import load_trained_model

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if args.ema and not args.checkpoint:
        raise MoeforgeError("--ema applies to --checkpoint (a moeforge checkpoint), not to --hf")
    if args.to == "run":
        if not args.hf:
            raise MoeforgeError("--to run imports a Hugging Face folder: give it with --hf")
        if args.dtype:
            raise MoeforgeError("--dtype applies to Hugging Face output; a run's weights are FP32 (--to run)")
        checkpoint = hf.import_run(args.hf, args.out)
        print(f"wrote {args.out} (checkpoint {checkpoint.name}): pass --checkpoint {args.out} to generate, eval, "
              f"sft, grpo or score")
        return 0
    if args.checkpoint:
        model, cfg = load_trained_model(args.checkpoint, "cpu", ema=args.ema)
        from .data.tokenizer import DEFAULT_TOKENIZER_PATH

        hf.save(model, args.out, dtype=dtype, tokenizer=cfg.train.tokenizer or DEFAULT_TOKENIZER_PATH)
    else:
        hf.convert(args.hf, args.out, dtype=dtype)
    print(f"wrote {args.out}")
    return 0


def cmd_bench(args) -> int:
    from . import parallel
    from .config import load_config

    if args.steps < 1 or args.warmup < 0:
        raise MoeforgeError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    _check_output_file(args.json, "--json")
    overrides = list(args.overrides)
    for flag, key in (("seq_len", "seq_len"), ("batch_size", "batch_size"), ("precision", "precision"),
                      ("device", "device")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"train.{key}={value}")
    cfg = load_config(args.preset or (None if args.config else "bench"), args.config, overrides)
    t = cfg.train
    pctx = parallel.init_distributed(cfg.parallel, t.device)  # None unless launched by torchrun
    try:
        return _bench(args, cfg, pctx)
    finally:
        if pctx is not None:
            pctx.destroy()


def _bench(args, cfg, pctx) -> int:
    import dataclasses
    import json

    import torch

    from . import bench, parallel
    from .config import validate
    from .train.speed import compile_on
    from .train.step import resolve_device, resolve_precision

    t = cfg.train
    device = pctx.device if pctx is not None else resolve_device(t.device)
    main_rank = pctx is None or pctx.is_main
    precision = resolve_precision(t.precision, device)
    if args.vs == "hf" and precision == "fp8":
        raise MoeforgeError("--vs hf: transformers has no FP8 training path to compare with; use --precision bf16")
    if args.vs == "hf" and pctx is not None:
        raise MoeforgeError("--vs hf: runs in one process (not under torchrun)")
    other = None  # --vs PRECISION: the same settings in that precision
    if args.vs not in (None, "hf"):
        if args.vs == precision:
            raise MoeforgeError(f"--vs {args.vs}: the run's precision is {precision} already; "
                                f"choose another (--precision)")
        other = dataclasses.replace(cfg, train=dataclasses.replace(t, precision=args.vs))
        validate(other)
    if t.cuda_graph is True:  # (before anything is printed or built)
        for c in [cfg] + ([other] if other is not None else []):
            bench.check_graph_bench(c, device, pctx, args.warmup)
    if pctx is not None:
        parallel.check_batch_sizes(t.micro_batch, pctx)
    layout = (f" | {pctx.world_size} ranks = dp {pctx.dp} x ep {pctx.ep}, sharding {pctx.sharding}"
              if pctx is not None else "")
    print_ = print if main_rank else (lambda *a, **k: None)  # rank 0 reports
    n_micro = t.batch_size // t.micro_batch
    accumulated = f" ({n_micro} micro-batches of {t.micro_batch})" if n_micro > 1 else ""
    print_(f"bench: {t.batch_size} x {t.seq_len} tokens per step{accumulated}, precision {precision}, "
           f"compile {compile_on(cfg, device, pctx)}{', cuda_graph True' if bench.captures_step(cfg, device, pctx, args.warmup) else ''}, "
           f"recompute {t.recompute or 'none'}, "
           f"loss_chunk {t.loss_chunk}, device {device}{layout} | "
           f"{bench.describe_peak(device)}", flush=True)
    results = [bench.bench_moeforge(cfg, args.steps, args.warmup, split=not args.no_split, pctx=pctx,
                                    name=f"moeforge {precision}" if other is not None else "moeforge")]
    notes: list[str] = []
    print_(bench.format_result(results[0]), flush=True)
    if other is not None:
        bench.free_memory(device)
        torch._dynamo.reset()  # (the first model's compiled blocks: the second compiles its own)
        print_(f"bench: the same steps with precision {args.vs}", flush=True)
        results.append(bench.bench_moeforge(other, args.steps, args.warmup, split=not args.no_split, pctx=pctx,
                                            name=f"moeforge {args.vs}"))
        print_(bench.format_result(results[1]), flush=True)
        first, second = results
        mem = (f", peak memory {first.peak_mem_gib / second.peak_mem_gib:.2f}x"
               if first.peak_mem_gib and second.peak_mem_gib else "")
        print_(f"{precision} / {args.vs}: {first.tokens_per_s / second.tokens_per_s:.2f}x tokens/s{mem} "
               f"(one run each, one after the other)")
    if args.vs == "hf":
        bench.free_memory(device)
        if cfg.model.num_nextn_predict_layers:
            print_("note: transformers does not run the MTP modules; moeforge's FLOPs include them", flush=True)
        try:
            results.append(bench.bench_hf(cfg, args.steps, args.warmup))
        except Exception as e:  # moeforge's result stands; say why there is no comparison
            if not is_out_of_memory(e):
                raise
            bench.free_memory(device)
            notes.append(f"transformers ran out of memory with these settings ({oom_summary(e)})")
            print_(f"transformers: {notes[-1]}; no ratio (try a smaller train.micro_batch_size for both)")
        else:
            print_(bench.format_result(results[1]))
            ours, theirs = results
            mem = (f", peak memory {ours.peak_mem_gib / theirs.peak_mem_gib:.2f}x"
                   if ours.peak_mem_gib and theirs.peak_mem_gib else "")
            print_(f"moeforge / transformers: {ours.tokens_per_s / theirs.tokens_per_s:.2f}x tokens/s{mem}")
    if args.json and main_rank:
        from .data.tokenizer import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"config": cfg.to_dict(),
                                                       "results": [r.to_dict() for r in results],
                                                       "notes": notes}, indent=1))
    return 0


def cmd_info(args) -> int:
    from .model import build_model, count_parameters
    from .train.metrics import flops_per_token

    cfg = _command_config(args)
    counts = count_parameters(build_model(cfg.model, "meta"))
    for k, v in counts.items():
        print(f"{k:>8} parameters: {v / 1e9:10.4f} B")
    print(f"training FLOPs per token at seq_len {cfg.train.seq_len}: {flops_per_token(cfg.model, cfg.train.seq_len) / 1e9:.3f} GFLOP")
    return 0


def _add_layout_flags(p) -> None:
    """--ep and --sharding: how the ranks of a post-training stage under torchrun hold the model."""
    from .posttrain.settings import SHARDINGS

    p.add_argument("--ep", type=int, default=1,
                   help="under torchrun: slice the routed experts over groups of EP ranks (expert parallelism; "
                        "default 1)")
    p.add_argument("--sharding", choices=SHARDINGS, default="none",
                   help="under torchrun: none (every rank holds its parameters whole), zero2 or full (FSDP2 shards "
                        "of parameters, gradients and AdamW state; full also frees the gathered weights after each "
                        "layer's forward) (default none)")


def _settings(cls, args):
    """A post-training settings dataclass from the flags named like its fields (the rest keep their defaults)."""
    import dataclasses

    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _report_post_training(args, summary: str) -> int:
    """The last line of a post-training command (rank 0 only under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{summary}; checkpoint in {Path(args.out) / 'checkpoints'}")
    return 0


def cmd_grpo(args) -> int:
    from .posttrain.grpo import GRPOSettings, train_grpo
    from .posttrain.tasks import get_task

    task = get_task(args.task)
    records = train_grpo(args.checkpoint, Path(args.out), task, _settings(GRPOSettings, args), device=args.device,
                         progress=not args.no_progress, resume=args.resume, ep=args.ep, sharding=args.sharding)
    first, last = records[0], records[-1]
    later = f", {last['reward']:.3f} at step {last['step']}" if last is not first else ""
    return _report_post_training(args, f"grpo: reward {first['reward']:.3f} at step {first['step']}{later}")


def cmd_sft(args) -> int:
    from .posttrain.sft import SFTSettings, train_sft

    records = train_sft(args.checkpoint, args.data, Path(args.out), _settings(SFTSettings, args), device=args.device,
                        progress=not args.no_progress, resume=args.resume, ep=args.ep, sharding=args.sharding)
    first, last = records[0], records[-1]
    after = f"{last['val_loss']:.4f} after {last['step']} steps"
    summary = (f"held-out loss {first['val_loss']:.4f} before, {after}" if first["step"] == 0
               else f"resumed after step {first['step'] - 1}; held-out loss {after}")
    return _report_post_training(args, f"sft: {summary}")


def cmd_sft_data(args) -> int:
    import random

    from .posttrain.sft import write_examples
    from .posttrain.tasks import get_task

    task = get_task(args.task)
    _check_at_least_one(args, "n")
    if not Path(args.out).is_dir():  # (a folder: write_examples says so, naming a file to give)
        _check_output_file(args.out, "--out")
    teacher_flags = [f"--{k.replace('_', '-')}" for k in TEACHER_DEFAULTS if getattr(args, k) is not None]
    teacher_flags += ["--speculative"] if args.speculative else []
    teacher_flags += ["--compile-decoding"] if args.compile_decoding else []
    if args.teacher is not None and args.turns != 1:
        raise MoeforgeError("--turns: only for the worked examples (a teacher's answers are one exchange each)")
    if args.teacher is not None:
        for key, default in TEACHER_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, default)
        return _sft_data_from_teacher(args, task)
    if teacher_flags:
        raise MoeforgeError(f"{', '.join(teacher_flags)}: only with --teacher (sampling a checkpoint's answers)")
    if not hasattr(task, "demonstrations"):
        raise MoeforgeError(f"--task {args.task}: has no worked examples to write (arithmetic has; "
                            f"--teacher samples a checkpoint's answers instead)")
    if args.turns < 1 or (args.turns > 1 and not args.chat):
        raise MoeforgeError(f"--turns {args.turns}: must be >= 1, and above 1 only with --chat (conversations)")
    pairs = task.demonstrations(args.n * args.turns, random.Random(args.seed))
    path = write_examples(args.out, pairs, chat=args.chat, turns=args.turns)
    what = f"conversations of {args.turns} exchanges" if args.turns > 1 else "examples"
    print(f"wrote {args.n} {args.task} {what} to {path}")
    return 0


TEACHER_DEFAULTS = {"samples": 4, "keep": 1, "max_new_tokens": 48, "temperature": 1.0}  # sft-data --teacher's


def _sft_data_from_teacher(args, task) -> int:
    from .posttrain.distill import sample_teacher
    from .posttrain.sft import write_examples

    _check_at_least_one(args, "samples", "keep", "max_new_tokens")
    mode = _decode_mode(args)
    if args.keep > args.samples:
        raise MoeforgeError(f"--keep {args.keep}: more than the --samples {args.samples} sampled per prompt")
    if args.temperature <= 0:
        raise MoeforgeError(f"--temperature: must be positive for sampling, got {args.temperature}")
    result = sample_teacher(args.teacher, task, args.n, args.samples, args.max_new_tokens, args.temperature, args.seed,
                            args.keep, args.device, progress=not args.no_progress, precision=args.precision,
                            speculative=args.speculative, chat=args.chat, mode=mode)
    if result is None:  # under torchrun, a rank other than 0: rank 0 writes
        return 0
    pairs, stats = result
    if not pairs:
        raise MoeforgeError(f"--teacher {args.teacher}: no completion was accepted ({stats.summary()}); nothing written")
    path = write_examples(args.out, pairs, chat=args.chat)
    print(f"wrote {path}: {stats.summary()}")
    return 0


def cmd_score(args) -> int:
    import json
    import time

    from .data import load_tokenizer
    from .data.tokenizer import atomic_write_text
    from .posttrain.score import score_task
    from .posttrain.sft import read_examples
    from .posttrain.tasks import get_task
    from .train.checkpoint import load_trained_model
    from .train.step import autocast, resolve_precision

    task = get_task(args.task)
    _check_at_least_one(args, "n", "samples", "max_new_tokens")
    if args.temperature < 0:
        raise MoeforgeError(f"--temperature: must not be negative, got {args.temperature:g}")
    if args.samples > 1 and args.temperature == 0:
        raise MoeforgeError(f"--samples {args.samples} with --temperature 0: greedy completions are all the same; "
                            f"give a temperature (DeepSeek-R1 used 0.6 with --top-p 0.95)")
    _check_top_p(args.top_p)
    mode = _decode_mode(args)
    _check_output_file(args.out, "--out")
    exclude = {prompt for _, prompt, _ in read_examples(args.exclude)} if args.exclude else set()
    model, cfg = load_trained_model(args.checkpoint, args.device)
    tok = load_tokenizer(cfg.train.tokenizer or None)
    device = model.embed.weight.device

    def progress(done: int) -> None:
        print(f"score: {done}/{args.n} problems", flush=True)

    started = time.perf_counter()
    with autocast(device, resolve_precision(args.precision, device)):
        score, records = score_task(model.eval(), tok, task, args.n, args.samples, args.max_new_tokens,
                                    args.temperature, args.top_p, args.seed, exclude,
                                    progress=None if args.no_progress else progress, speculative=args.speculative,
                                    chat=args.chat, mode=mode)
    seconds = time.perf_counter() - started
    if args.out is not None:
        settings = {k: getattr(args, k) for k in ("checkpoint", "task", "n", "samples", "temperature", "top_p",
                                                  "max_new_tokens", "seed", "exclude", "speculative", "chat")}
        atomic_write_text(Path(args.out), json.dumps({"settings": settings, "score": score.to_dict(),
                                                      "seconds": seconds, "problems": records}, indent=1) + "\n")
    print(f"{args.task}: {score.summary()}" + (f" (excluding {len(exclude)} prompts of {args.exclude})"
                                                 if args.exclude else "") + f"; sampled in {seconds:.1f} s")
    return 0


def cmd_plan(args) -> int:
    from .plan import compute_plan, format_count, model_state_memory, parse_count

    cfg = _command_config(args)
    p, t = cfg.parallel, cfg.train
    gpus = args.gpus if args.gpus is not None else p.pp * p.ep * max(1, p.dp)
    if gpus < 1:
        raise MoeforgeError(f"--gpus: must be at least 1, got {gpus}")
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise MoeforgeError(f"--gpu-memory: must be positive, got {args.gpu_memory:g}")
    if args.price is not None and args.price < 0:
        raise MoeforgeError(f"--price: must not be negative, got {args.price:g}")
    try:
        tokens = parse_count(args.tokens) if args.tokens else None
    except MoeforgeError as e:
        raise MoeforgeError(f"--tokens: {e}") from None
    compute = compute_plan(cfg, tokens, gpus, args.mfu, args.peak_tflops) if tokens is not None else None
    ranks = model_state_memory(cfg, gpus)
    dp = gpus // (p.pp * p.ep)
    opt = "muon + adamw (fp32 moments)" if t.optimizer == "muon" else f"adamw ({t.adam_moments} moments)"
    n_gpus = f"{gpus} GPU" + ("s" if gpus > 1 else "")
    print(f"layout: {n_gpus} = pp {p.pp} x dp {dp} x ep {p.ep}"
          + (f" | schedule {p.schedule}" if p.pp > 1 else "") + f" | sharding {p.sharding} | optimizer {opt}")
    print("model states per GPU, the largest rank of each pipeline stage (FP32 weights and gradients, optimizer "
          "state; activations, FP8 weight copies and buffers not included):")
    gib = 2 ** 30
    rows = []
    for pp_rank in range(p.pp):
        r = max((r for r in ranks if r.pp_rank == pp_rank), key=lambda r: r.total)
        rows.append((format_count(r.params), f"{r.weights / gib:.2f}", f"{r.grads / gib:.2f}",
                     f"{r.optimizer / gib:.2f}", f"{r.total / gib:.2f}"))
    print(f"  {'pipeline rank':>13}  {'parameters':>11}  {'weights GiB':>11}  {'grads GiB':>9}  {'optimizer GiB':>13}  "
          f"{'total GiB':>9}")
    for name, (params, w, g, o, tot) in _rank_ranges(rows):
        print(f"  {name:>13}  {params:>11}  {w:>11}  {g:>9}  {o:>13}  {tot:>9}")
    largest = max(ranks, key=lambda r: r.total)
    line = f"largest: {largest.total / gib:.2f} GiB (pipeline rank {largest.pp_rank})"
    if args.gpu_memory is not None:
        left = args.gpu_memory - largest.total / gib
        line += (f": fits in {args.gpu_memory:g} GiB, {left:.2f} GiB left for activations and buffers" if left > 0
                 else f": does NOT fit in {args.gpu_memory:g} GiB (short by {-left:.2f} GiB)")
    print(line)
    _plan_activations(cfg, ranks, dp, args.gpu_memory)
    if compute is not None:
        c = compute
        print(f"compute: {c.flops_per_token / 1e9:.2f} GFLOP per token (seq_len {t.seq_len}) x {format_count(c.tokens)} tokens "
              f"= {c.total_flops:.4g} FLOP")
        cost = f", ${c.gpu_hours * args.price:,.0f} at ${args.price:g} per GPU-hour" if args.price is not None else ""
        hours = f"{c.gpu_hours:,.0f}" if c.gpu_hours >= 100 else f"{c.gpu_hours:.3g}"
        print(f"at {100 * c.mfu:.1f}% MFU of {args.peak_tflops:g} TFLOP/s: {c.tokens_per_gpu_second:,.0f} tokens/s per "
              f"GPU, {hours} GPU-hours, {c.days:,.3g} days on {n_gpus}{cost}")
    return 0


def _rank_ranges(rows: list) -> list[tuple[str, object]]:
    """Per pipeline rank rows -> (rank or "first-last", row), consecutive equal rows as one range."""
    out, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[start]:
            out.append((str(start) if i - 1 == start else f"{start}-{i - 1}", rows[start]))
            start = i
    return out


def _plan_activations(cfg, ranks, dp: int, gpu_memory) -> None:
    """`moeforge plan`'s activation lines: one micro-batch's per pipeline rank, under a pipeline those
    alive at the schedule's peak, and the largest rank's total with its model states
    (plan.activation_memory, plan.in_flight_peaks)."""
    from .plan import activation_memory, in_flight_peaks, rank_activations, stage_activations

    p, t = cfg.parallel, cfg.train
    data_ranks = dp * p.ep
    per_gpu = -(-t.micro_batch // data_ranks)
    split = (f"train.micro_batch_size {t.micro_batch} over dp x ep = {data_ranks} ranks: {per_gpu} per GPU"
             + ("" if t.micro_batch % data_ranks == 0 else ", rounded up: training needs it divisible")
             if data_ranks > 1 else f"train.micro_batch_size {t.micro_batch}")
    try:
        count = activation_memory(cfg, per_gpu)
    except MoeforgeError as e:
        print(f"{e}")
        return
    gib = 2 ** 30
    how = "BF16 autocast" if count.counted_as == "bf16" else "FP32"
    extra = (" (FP8: counted as BF16, FP8-saved Linear inputs take less)" if t.precision == "fp8" else "")
    print(f"activations of one micro-batch ({per_gpu} x {t.seq_len} tokens per GPU; {split}), saved for backward "
          f"in an eager step in {how}{extra}, counted on fake tensors"
          + (", each block keeping its input (recompute full)" if count.recompute_full else "")
          + (f", the routed experts' weight copies for {cfg.model.n_routed_experts // p.ep} of "
             f"{cfg.model.n_routed_experts} experts and balanced routing" if p.ep > 1 else "") + ":")
    per_rank = rank_activations(cfg, count, p.ep)
    states = [max(r.total for r in ranks if r.pp_rank == i) for i in range(p.pp)]
    n_micro = t.batch_size // t.micro_batch
    peaks = in_flight_peaks(cfg, stage_activations(cfg, count, p.ep), n_micro) if p.pp > 1 else None
    if peaks is not None:  # the schedule's peak: several micro-batches alive on each rank
        print(f"  {'pipeline rank':>13}  {'one micro-batch GiB':>19}  {'at the schedule peak GiB':>24}  "
              f"{'with model states GiB':>21}")
        held = [b + count.recomputed(p.ep) for b, _ in peaks]
        rows = [(f"{a / gib:.2f}", f"{h / gib:.2f} ({k})", f"{(h + st) / gib:.2f}")
                for a, (_, k), h, st in zip(per_rank, peaks, held, states)]
        for name, (a, h, total) in _rank_ranges(rows):
            print(f"  {name:>13}  {a:>19}  {h:>24}  {total:>21}")
        what = (f"at the {p.schedule} schedule's peak over {n_micro} micro-batches (in brackets: micro-batch "
                f"stages alive then; each counted until its last backward pass)")
    else:
        print(f"  {'pipeline rank':>13}  {'activations GiB':>15}  {'with model states GiB':>21}")
        held = per_rank
        rows = [(f"{a / gib:.2f}", f"{(a + st) / gib:.2f}") for a, st in zip(per_rank, states)]
        for name, (a, total) in _rank_ranges(rows):
            print(f"  {name:>13}  {a:>15}  {total:>21}")
        what = "with one micro-batch" if p.pp == 1 else "with one micro-batch (the schedule's order not modelled)"
    worst = max(range(p.pp), key=lambda i: held[i] + states[i])
    line = f"largest {what}: {(held[worst] + states[worst]) / gib:.2f} GiB (pipeline rank {worst})"
    if gpu_memory is not None:
        left = gpu_memory - (held[worst] + states[worst]) / gib
        line += (f": fits in {gpu_memory:g} GiB, {left:.2f} GiB left" if left > 0
                 else f": does NOT fit in {gpu_memory:g} GiB (short by {-left:.2f} GiB)")
    print(line)


def cmd_plot(args) -> int:
    from .plot import plot_runs, read_runs, summary

    if args.out is None and len(args.runs) > 1:
        raise MoeforgeError("several runs need --out FILE (.png, .pdf or .svg)")
    runs = read_runs(args.runs)
    out = Path(args.out) if args.out else runs[0].path.parent / "metrics.png"
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    panels = plot_runs(runs, out, metrics, args.smooth, args.x)
    for run in runs:
        print(summary(run, args.smooth))
    print(f"wrote {out} ({', '.join(key for key, _ in panels)})")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval, "convert": cmd_convert, "bench": cmd_bench,
            "info": cmd_info, "plan": cmd_plan, "grpo": cmd_grpo, "sft": cmd_sft, "sft-data": cmd_sft_data,
            "score": cmd_score, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")) or "=" in argv[0]:
        argv = ["train", *argv]  # `moeforge [flags] [key=value ...]` is `moeforge train ...`
    args, extra = parser.parse_known_args(argv)
    # key=value settings may come before and after flags (argparse alone takes one run of them)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        print(f"moeforge {args.command or ''}: error: unrecognized arguments: {' '.join(extra)}".replace("  ", " "),
              file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in ("train", "eval", "generate", "bench"):
        keep_freed_host_memory()  # fewer page faults per step on a CPU (host_memory.py)
    try:
        return COMMANDS[args.command](args)
    except MoeforgeError as e:
        # One line, whatever the message holds (some wrap a library's multi-line text).
        message = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"moeforge {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path that cannot be read or written (the rest of such a failure is the OS's)
        where = f" '{e.filename}'" if e.filename is not None else ""
        print(f"moeforge {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        print(f"moeforge {args.command}: error: {out_of_memory_message(e)}", file=sys.stderr)
        return 1


def is_out_of_memory(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def oom_summary(e: BaseException) -> str:
    """torch's first two sentences of an out-of-memory error: which device, and what it tried to allocate."""
    lines = str(e).strip().splitlines()
    return ". ".join(lines[0].split(". ")[:2]) if lines else "out of memory"


def out_of_memory_message(e: BaseException) -> str:
    """One line: what ran out, and the settings that lower memory."""
    return (f"{oom_summary(e)} | lower train.micro_batch_size, or turn on train.compile, train.recompute=full, "
            f"train.loss_chunk or train.adam_moments=bf16 (docs/performance.md)")


if __name__ == "__main__":
    sys.exit(main())
