"""Tasks with verifiable rewards for GRPO: prompts with a known answer, and a rule that scores a completion.

DeepSeek-R1-Zero was trained with rule-based rewards only (an accuracy reward from checking the final
answer, a format reward): no reward model to be gamed. A task here is the same contract:
    task.prompts(n, rng) -> [(prompt text, answer)]
    task.reward(completion text, answer) -> float
Any object with these two methods works with posttrain/grpo.py.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass

from ..errors import MoeforgeError

__all__ = ["Arithmetic", "PythonSyntax", "TASKS", "get_task"]


@dataclass(frozen=True)
class Arithmetic:
    """Integer addition and subtraction: "12+7=" -> "19". Reward 1 when the completion's first
    integer (up to the first line break) equals the answer, else 0."""

    digits: int = 2  # operands have up to this many digits

    def prompts(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        out = []
        hi = 10 ** self.digits - 1
        for _ in range(n):
            a, b = rng.randint(0, hi), rng.randint(0, hi)
            if rng.random() < 0.5:
                out.append((f"{a}+{b}=", str(a + b)))
            else:
                a, b = max(a, b), min(a, b)
                out.append((f"{a}-{b}=", str(a - b)))
        return out

    def reward(self, completion: str, answer: str) -> float:
        found = re.match(r"\s*(-?\d+)", completion.split("\n", 1)[0])
        return 1.0 if found is not None and found.group(1) == answer else 0.0


@dataclass(frozen=True)
class PythonSyntax:
    """Write the first statement of a Python function: the prompt is a `def` line with an indented
    body to come; reward 1 when the completion's first line is a non-empty statement that parses as
    the first line of a function body (ast.parse, inside `def f():`), else 0. The reward a compiler gives, for a model that
    was pre-trained on Python (the default corpus)."""

    names: tuple[str, ...] = ("parse", "load", "total", "merge", "clean", "check", "count", "split", "render",
                              "update", "find", "encode")
    args: tuple[str, ...] = ("self", "x", "path", "items, key", "self, name", "data, n=0", "text", "a, b", "obj")

    def prompts(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        return [(f"def {rng.choice(self.names)}({rng.choice(self.args)}):\n    ", "") for _ in range(n)]

    def reward(self, completion: str, answer: str) -> float:
        line = completion.split("\n", 1)[0]
        if not line.strip():
            return 0.0
        try:
            ast.parse("def f():\n    " + line + "\n")
        except (SyntaxError, ValueError):
            return 0.0
        return 1.0


TASKS = {"arithmetic": Arithmetic, "python_syntax": PythonSyntax}


def get_task(name: str):
    if name not in TASKS:
        raise MoeforgeError(f"--task: expected one of {', '.join(sorted(TASKS))}, got {name!r}")
    return TASKS[name]()
