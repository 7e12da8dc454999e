"""The post-training stages' settings, GRPO's and SFT's (no torch import here: the command line reads
the defaults for its help)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoeforgeError

__all__ = ["GRPOSettings", "SFTSettings"]


PRECISIONS = ("fp32", "bf16")
SFT_PRECISIONS = (*PRECISIONS, "fp8")  # SFT also trains with DeepSeek-V3's FP8 recipe (not GRPO, which samples)
SHARDINGS = ("none", "zero2", "full")  # how `moeforge sft`'s ranks may hold the model (common.check_layout)


def _check_precision(settings, allowed: tuple[str, ...] = PRECISIONS) -> None:
    if settings.precision not in allowed:
        raise MoeforgeError(f"--precision: expected {', '.join(allowed[:-1])} or {allowed[-1]}, "
                            f"got {settings.precision!r}")


def _check_minimum(settings, names: tuple[str, ...], minimum: float) -> None:
    """Each named setting is a finite number of at least `minimum`, or a MoeforgeError naming its
    command-line flag."""
    for name in names:
        value = getattr(settings, name)
        if not (minimum <= value < float("inf")):  # (NaN fails both)
            need = "not be negative" if minimum == 0 else f"be at least {minimum}"
            raise MoeforgeError(f"--{name.replace('_', '-')}: must {need} (and finite), got {value}")


@dataclass(frozen=True)
class GRPOSettings:
    steps: int = 100
    prompts_per_step: int = 8  # P
    group_size: int = 8  # G
    max_new_tokens: int = 16  # N
    temperature: float = 1.0
    lr: float = 1e-5  # AdamW, constant
    beta: float = 0.04  # weight of the KL to the starting model (DeepSeekMath: 0.04)
    clip: float = 0.2  # epsilon of the ratio's clip
    updates: int = 1  # optimizer steps per sampled batch
    format_weight: float = 0.0  # reward = the task's + format_weight x tasks.format_reward (R1-Zero's format reward)
    # sample the groups with the MTP module drafting each row's token after next (generate.sample_rows):
    # the same distribution, fewer main-model forwards; one process or data parallel (not --ep/--sharding)
    speculative: bool = False
    # the decoding step through torch.compile (generate.Decoder "compiled"): about 2x the tokens/s on a
    # GPU after one compilation; the decoder is kept from step to step (generate.reused_decoder)
    compile_decoding: bool = False
    chat: bool = False  # each task prompt as a user turn of the tokenizer's chat template (posttrain/chat.py)
    precision: str = "fp32"  # "bf16": the forwards (sampling included) under BF16 autocast; weights and AdamW FP32
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # a checkpoint every N steps as well as the final one; 0: the final one only
    keep_checkpoints: int = 2

    def validate(self) -> None:
        _check_minimum(self, ("steps", "prompts_per_step", "group_size", "max_new_tokens", "updates",
                              "keep_checkpoints"), 1)
        if self.group_size < 2:
            raise MoeforgeError(f"--group-size: GRPO compares completions within a group; need 2 or more, "
                                f"got {self.group_size}")
        if not 0 < self.temperature < float("inf"):
            raise MoeforgeError(f"--temperature: must be positive (and finite) to sample a group, got {self.temperature}")
        for name in ("lr", "clip"):
            if not 0 < getattr(self, name) < float("inf"):
                raise MoeforgeError(f"--{name}: must be positive (and finite), got {getattr(self, name)}")
        _check_minimum(self, ("beta", "grad_clip", "format_weight", "checkpoint_every"), 0)
        _check_precision(self)
        if self.speculative and self.compile_decoding:
            raise MoeforgeError("--compile-decoding and --speculative: speculative decoding has no compiled step; "
                                "choose one")


@dataclass(frozen=True)
class SFTSettings:
    steps: int = 300
    batch_size: int = 16  # examples per optimizer step, each padded to the longest of its batch
    lr: float = 1e-3  # AdamW's peak learning rate
    warmup: int = 20  # steps of linear warm-up from lr / warmup to lr
    schedule: str = "cosine"  # after the warm-up: "cosine" down to min_lr_ratio * lr at the last step, or "constant"
    min_lr_ratio: float = 0.1
    max_len: int = 0  # the longest example (prompt + response + end-of-text), in tokens; 0: the model's context
    pack: int = 0  # > 0: pack each batch's examples into rows of this many positions, attention within each; 0: pad
    # > 0: the MTP modules are fine-tuned too, their response-token losses added with weight mtp_weight / depth
    # (as train.mtp_lambda in pre-training), so that they keep drafting for the fine-tuned model; 0: left as they are
    mtp_weight: float = 0.0
    val_fraction: float = 0.05  # the last examples of the file, at least one, are held out for validation
    eval_every: int = 50  # held-out loss every N steps (and before the first and after the last); 0: only those two
    checkpoint_every: int = 0  # a checkpoint every N steps as well as the final one; 0: the final one only
    keep_checkpoints: int = 2
    seed: int = 0  # the order of the examples
    grad_clip: float = 1.0  # the global gradient norm's bound; 0: no clipping
    # "bf16": the forwards under BF16 autocast; "fp8": the blocks' GEMMs in FP8 (fp8/, DeepSeek-V3's recipe;
    # on a GPU around BF16 autocast, on a CPU the exact emulation); weights and AdamW FP32 in every case
    precision: str = "fp32"

    def validate(self) -> None:
        _check_minimum(self, ("steps", "batch_size", "keep_checkpoints"), 1)
        _check_minimum(self, ("warmup", "max_len", "pack", "mtp_weight", "eval_every", "checkpoint_every", "grad_clip"), 0)
        if not 0 < self.lr < float("inf"):
            raise MoeforgeError(f"--lr: must be positive (and finite), got {self.lr}")
        if self.schedule not in ("cosine", "constant"):
            raise MoeforgeError(f"--schedule: expected cosine or constant, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise MoeforgeError(f"--min-lr-ratio: must be in [0, 1], got {self.min_lr_ratio}")
        _check_precision(self, SFT_PRECISIONS)
        if not 0 < self.val_fraction < 1:
            raise MoeforgeError(f"--val-fraction: must be in (0, 1), got {self.val_fraction}")
