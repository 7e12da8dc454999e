"""GRPO's settings (no torch import here: the command line reads the defaults for its help)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoeforgeError

__all__ = ["GRPOSettings"]


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
    grad_clip: float = 1.0
    seed: int = 0
    keep_checkpoints: int = 2

    def validate(self) -> None:
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "updates", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise MoeforgeError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise MoeforgeError(f"--group-size: GRPO compares completions within a group; need 2 or more, "
                                f"got {self.group_size}")
        if not self.temperature > 0:
            raise MoeforgeError(f"--temperature: must be positive to sample a group, got {self.temperature}")
        for name in ("lr", "clip"):
            if not getattr(self, name) > 0:
                raise MoeforgeError(f"--{name}: must be positive, got {getattr(self, name)}")
        for name in ("beta", "grad_clip"):
            if getattr(self, name) < 0:
                raise MoeforgeError(f"--{name.replace('_', '-')}: must not be negative, got {getattr(self, name)}")
