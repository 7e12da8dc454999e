"""Rejection sampling: SFT data from a teacher's own correct answers (DeepSeek-R1 §2.3.3 and §2.4).

After its reasoning-oriented RL, DeepSeek-R1 sampled several responses per prompt from the RL
checkpoint, kept only the correct ones, and fine-tuned on them: DeepSeek-V3-Base for R1's next
stage, and smaller models (Qwen, Llama) to distil R1's reasoning into them. Here:
- for each of n prompts of a task (tasks.py), sample `samples` completions from the teacher
  (grpo.sample_groups: the groups of prompts of one length decoded together from the MLA latent cache);
- keep a completion when the task's reward gives it 1 and it ended with the end-of-text token (a
  completion cut off at --max-new-tokens would teach the student to stop where the teacher had not);
- of each prompt's kept completions, write up to `keep` distinct ones, as {"prompt", "response"}
  lines of the file `moeforge sft` reads (without the end-of-text: SFT appends it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .grpo import completion_texts, sample_groups

__all__ = ["RejectionStats", "rejection_sample"]


@dataclass(frozen=True)
class RejectionStats:
    prompts: int
    samples: int  # completions sampled
    stopped: int  # ... that ended with the end-of-text token
    correct: int  # ... that stopped and had reward 1
    kept: int  # pairs written (at most `keep` distinct per prompt)
    prompts_kept: int  # prompts with at least one pair

    def summary(self) -> str:
        return (f"{self.kept} examples from {self.prompts_kept} of {self.prompts} prompts; "
                f"{self.correct} of {self.samples} samples correct ({self.correct / self.samples:.1%}), "
                f"{self.stopped} stopped")


@torch.no_grad()
def rejection_sample(model, tok, task, n: int, samples: int, max_new: int, temperature: float, seed: int,
                     keep: int = 1, progress=None, chunk: int = 32) -> tuple[list[tuple[str, str]], RejectionStats]:
    """(prompt, response) pairs of the teacher `model` on n prompts of `task`, and the counts (module doc).
    The prompts are sampled `chunk` at a time (grpo.sample_groups: one batch per prompt length);
    progress: None, or called as progress(prompts done, pairs kept) after each chunk."""
    rng = random.Random(seed)
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    problems = task.prompts(n, rng)
    pairs: list[tuple[str, str]] = []
    stopped = correct = prompts_kept = 0
    for start in range(0, n, chunk):
        part = problems[start:start + chunk]
        groups = sample_groups(model, [tok.encode(prompt) for prompt, _ in part], samples, max_new, temperature, gen,
                               tok.eos_id)
        for (prompt, answer), (tokens, mask) in zip(part, groups):
            ended = (tokens == tok.eos_id) & mask  # the completion's stop token, if it emitted one
            chosen: list[str] = []
            for text, stop in zip(completion_texts(tok, tokens, mask), ended.any(dim=1).tolist()):
                stopped += stop
                if stop and task.reward(text, answer) == 1.0:
                    correct += 1
                    if text not in chosen and len(chosen) < keep:
                        chosen.append(text)
            pairs += [(prompt, text) for text in chosen]
            prompts_kept += bool(chosen)
        if progress is not None:
            progress(start + len(part), len(pairs))
    return pairs, RejectionStats(n, n * samples, stopped, correct, len(pairs), prompts_kept)
