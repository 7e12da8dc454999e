"""Schedules over optimizer steps: learning rate, bias update speed gamma, MTP weight lambda, batch size.

DeepSeek-V3 (report §4.2): linear warmup, constant, then cosine decay ("wsd" here); gamma 0.001 then 0
for the last tokens; lambda 0.3 then 0.1; batch size ramped up over the first tokens.
"""

from __future__ import annotations

import math

from ..config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    floor = t.lr * t.min_lr_ratio
    start = t.warmup_steps if t.schedule == "cosine" else max(t.warmup_steps, int(t.decay_start * t.steps))
    if step < start:
        return t.lr
    span = max(1, t.steps - start)
    progress = min(1.0, (step - start) / span)
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def bias_update_speed_at(step: int, t: TrainConfig) -> float:
    return t.bias_update_speed if step < t.bias_update_stop * t.steps else 0.0


def mtp_lambda_at(step: int, t: TrainConfig) -> float:
    return t.mtp_lambda if step < t.mtp_lambda_switch * t.steps else t.mtp_lambda_late


def batch_size_at(step: int, t: TrainConfig) -> int:
    """Global sequences per step; a linear ramp from batch_size_start, in whole micro-batches."""
    if not t.batch_size_start or step >= t.batch_ramp_steps:
        return t.batch_size
    size = t.batch_size_start + (t.batch_size - t.batch_size_start) * step / max(1, t.batch_ramp_steps)
    return max(t.micro_batch, int(size) // t.micro_batch * t.micro_batch)
