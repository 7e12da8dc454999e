"""Scoring a checkpoint on a task: the accuracy numbers DeepSeek-R1 reports, from sampled completions.

For each of n problems of a task (tasks.py), k completions are decoded (grpo.sample_groups: 64
problems at a time in one batch) and scored with the task's reward:
- pass@1: the mean reward over all n x k completions; with k samples at a temperature this is
  DeepSeek-R1's pass@1 estimate (1/k sum_i p_i per problem, averaged), with --temperature 0 and
  k = 1 the greedy accuracy;
- pass@k: the share of problems with at least one completion of reward 1 (what rejection sampling
  can keep, distill.py);
- maj@k (R1's cons@k): the share of problems whose most frequent answer, among the completions that
  give one (task.extract), earns reward 1; ties go to the answer seen first. Only for tasks with
  task.extract;
- the think format's rate (tasks.format_reward), the share of completions that stopped (ended with
  the end-of-text token rather than at --max-new-tokens), and their mean length in tokens.
The problems come from random.Random(seed), the same generator `sft-data` and `grpo` draw them from:
use another seed than the training data's, and `exclude` to drop prompts that are in a data file.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from ..errors import MoeforgeError
from ..generate import release_decoder
from .chat import ChatTemplate
from .grpo import completion_texts, sample_groups
from .tasks import format_reward

__all__ = ["TaskScore", "aggregate", "score_task"]


@dataclass(frozen=True)
class TaskScore:
    problems: int
    samples: int  # completions per problem
    pass_at_1: float
    pass_at_k: float
    majority_at_k: float | None  # None: the task has no extract()
    format: float
    stopped: float
    mean_tokens: float

    def summary(self) -> str:
        k = self.samples
        parts = [f"pass@1 {self.pass_at_1:.4f}"]
        if k > 1:
            parts.append(f"pass@{k} {self.pass_at_k:.4f}")
            if self.majority_at_k is not None:
                parts.append(f"maj@{k} {self.majority_at_k:.4f}")
        parts += [f"format {self.format:.4f}", f"stopped {self.stopped:.4f}", f"{self.mean_tokens:.1f} tokens"]
        return f"{self.problems} problems x {k} samples: " + ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def majority(answers: list[str | None]) -> str | None:
    """The most frequent answer that is not None (ties: the one seen first), or None if there is none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def aggregate(task, answers: list[str], texts: list[list[str]], stopped: list[list[bool]],
              lengths: list[list[int]]) -> tuple[TaskScore, list[dict]]:
    """The scores (module doc) of n problems' completions: answers [n], texts, stopped, lengths [n][k];
    and one record per problem (its answer, completions, rewards and majority answer)."""
    n, k = len(texts), len(texts[0])
    rewards = [[task.reward(t, a) for t in row] for row, a in zip(texts, answers)]
    voted = [majority([task.extract(t) for t in row]) if hasattr(task, "extract") else None for row in texts]
    records = [{"answer": a, "completions": row, "rewards": r, "majority": v}
               for a, row, r, v in zip(answers, texts, rewards, voted)]
    score = TaskScore(
        problems=n, samples=k,
        pass_at_1=sum(map(sum, rewards)) / (n * k),
        pass_at_k=sum(max(r) == 1.0 for r in rewards) / n,
        majority_at_k=(sum(v is not None and task.reward(v, a) == 1.0 for v, a in zip(voted, answers)) / n
                       if hasattr(task, "extract") else None),
        format=sum(format_reward(t) for row in texts for t in row) / (n * k),
        stopped=sum(map(sum, stopped)) / (n * k),
        mean_tokens=sum(map(sum, lengths)) / (n * k))
    return score, records


@torch.no_grad()
def score_task(model, tok, task, n: int, samples: int, max_new: int, temperature: float, top_p: float, seed: int,
               exclude: set[str] = frozenset(), chunk: int = 64, progress=None,
               speculative: bool = False, chat: bool = False, mode: str = "auto") -> tuple[TaskScore, list[dict]]:
    """Score `model` on the first n problems of task.prompts(..., random.Random(seed)) whose prompt is
    not in `exclude`, with `samples` completions each (module doc). Returns the scores and a record per
    problem (with its prompt). progress: None, or called as progress(problems done) after each chunk.
    speculative: decode with the MTP module drafting (generate.sample_rows): greedy, the same
    completions; sampled, the same distribution. chat: each prompt as a user turn of the tokenizer's
    chat template (posttrain/chat.py), for a model fine-tuned on conversations. mode: generate.Decoder's
    ("compiled": the step through torch.compile; the decoder is kept from chunk to chunk)."""
    rng = random.Random(seed)
    problems = [p for p in task.prompts(n, rng) if p[0] not in exclude]
    drawn = n
    while len(problems) < n:  # excluded problems replaced by the next ones drawn, not by one already in
        seen = {p for p, _ in problems}
        for p in task.prompts(n, rng):
            if p[0] not in exclude and p[0] not in seen and len(problems) < n:
                problems.append(p)
                seen.add(p[0])
        drawn += n
        if drawn >= 100 * n and len(problems) < n:
            raise MoeforgeError(f"only {len(problems)} of {drawn} problems drawn are not excluded; ask for fewer "
                                f"(--n) or exclude fewer")
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    texts, stopped, lengths = [], [], []
    for start in range(0, n, chunk):
        part = problems[start:start + chunk]
        encode = ChatTemplate(tok).prompt if chat else tok.encode
        groups = sample_groups(model, [encode(p) for p, _ in part], samples, max_new, temperature, gen,
                               tok.eos_id, top_p, speculative=speculative, mode=mode)
        for tokens, mask in groups:
            texts.append(completion_texts(tok, tokens, mask))
            stopped.append(((tokens == tok.eos_id) & mask).any(dim=1).tolist())
            lengths.append(mask.sum(dim=1).tolist())
        if progress is not None:
            progress(start + len(part))
    release_decoder()  # (kept from chunk to chunk: generate.reused_decoder)
    score, records = aggregate(task, [a for _, a in problems], texts, stopped, lengths)
    for (prompt, _), rec in zip(problems, records):
        rec["prompt"] = prompt
    return score, records
