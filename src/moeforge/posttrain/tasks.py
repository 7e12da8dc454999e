"""Tasks with verifiable rewards for GRPO: prompts with a known answer, and a rule that scores a completion.

DeepSeek-R1-Zero was trained with rule-based rewards only (an accuracy reward from checking the final
answer, a format reward): no reward model to be gamed. A task here is the same contract:
    task.prompts(n, rng) -> [(prompt text, answer)]
    task.reward(completion text, answer) -> float
Any object with these two methods works with posttrain/grpo.py (`--task module:Class`), and
ProblemFile makes one of a JSONL file of prompts and answers (`--task FILE.jsonl`). A task whose completions give an
answer that can be compared with another's has task.extract(completion text) -> answer or None,
which a majority vote over samples uses (posttrain/score.py). A task that can also write worked
examples, for supervised fine-tuning before GRPO (DeepSeek-R1's cold start, posttrain/sft.py), has
    task.demonstrations(n, rng) -> [(prompt text, response text)]
where a response is a reasoning chain in a think block, then the answer: "<think>...</think>19".
"""

from __future__ import annotations

import ast
import importlib
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ..errors import MoeforgeError
from .records import read_records, where

__all__ = ["Arithmetic", "PythonSyntax", "TASKS", "THINK_START", "THINK_END", "get_task", "task_name", "final_answer",
           "format_reward"]

THINK_START, THINK_END = "<think>", "</think>"


_TAG = "(?:" + re.escape(THINK_START) + "|" + re.escape(THINK_END) + ")"
_FORMAT = re.compile(re.escape(THINK_START) + f"(?:(?!{_TAG}).)*" + re.escape(THINK_END)
                     + f"(?!.*{_TAG})" + r"[ \t]*\S", re.DOTALL)


def format_reward(completion: str) -> float:
    """DeepSeek-R1-Zero's format reward: 1 when the completion opens with a think block,
    "<think>...</think>", followed by an answer on the same line, and has no other think tag, else 0."""
    return 1.0 if _FORMAT.match(completion) else 0.0


def final_answer(completion: str) -> str:
    """The part of a completion that holds its answer: what follows the end of its think block
    ("<think>...</think>19" -> "19"), or the whole completion when it has no complete think block."""
    return completion.split(THINK_END, 1)[1] if THINK_END in completion else completion


@dataclass(frozen=True)
class Arithmetic:
    """Integer addition and subtraction: "12+7=" -> "19". Reward 1 when the answer's first integer
    (up to the first line break) equals the answer, else 0; the answer is what follows "</think>"
    when the completion has a think block (final_answer), else the whole completion.

    Demonstrations work the sum column by column, ones first, as on paper:
        "47+38=" -> "<think>7+8=15, 4+3+1=8 -> 85</think>85"         (+1: the carry)
        "45-18=" -> "<think>15-8=7, 4-1-1=2 -> 27</think>27"         (15: a borrowed ten, -1: paying it back)
    Every step is itself a true equation, and the digit each column writes is its result mod 10.
    """

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
        return 1.0 if self.extract(completion) == answer else 0.0

    @staticmethod
    def extract(completion: str) -> str | None:
        """The answer a completion gives: the first integer of its answer's first line, or None."""
        found = re.match(r"\s*(-?\d+)", final_answer(completion).split("\n", 1)[0])
        return found.group(1) if found is not None else None

    def demonstrations(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        return [(prompt, self.worked_solution(prompt)) for prompt, _ in self.prompts(n, rng)]

    @staticmethod
    def worked_solution(prompt: str) -> str:
        """The column-by-column working of "A+B=" or "A-B=" (A >= B), in a think block, then the result."""
        parsed = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt)
        if parsed is None or (parsed.group(2) == "-" and int(parsed.group(1)) < int(parsed.group(3))):
            raise ValueError(f"not an arithmetic prompt of this task: {prompt!r}")
        a, op, b = parsed.groups()
        width = max(len(a), len(b))
        columns = zip(map(int, reversed(a.zfill(width))), map(int, reversed(b.zfill(width))))  # ones first
        steps, written, carry = [], [], 0  # carry: +1 owed to the next column (a carry, or a borrow to repay)
        for x, y in columns:
            if op == "+":
                value = x + y + carry
                steps.append(f"{x}+{y}{'+1' if carry else ''}={value}")
                written.append(value % 10)
                carry = value // 10
            else:
                value = x - y - carry
                borrow = value < 0
                steps.append(f"{'1' if borrow else ''}{x}-{y}{'-1' if carry else ''}={value + 10 * borrow}")
                written.append(value + 10 * borrow)
                carry = int(borrow)
        if carry:  # an addition's last carry is the leading digit (a subtraction with A >= B repays every borrow)
            written.append(carry)
        result = int("".join(map(str, reversed(written))))
        return f"{THINK_START}{', '.join(steps)} -> {result}{THINK_END}{result}"


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


_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def normalise_answer(text: str) -> str:
    """An answer in a form that compares: stripped, without a final period, a number written as its
    value ("1,000" and "1000.0" -> "1000", "0.50" -> "0.5"), other text case-folded with runs of
    whitespace made one space."""
    text = " ".join(text.strip().rstrip(".").split())
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text.casefold()
    if not value.is_finite():
        return text.casefold()
    value = value.normalize()
    return format(value.quantize(Decimal(1)) if value == value.to_integral_value() else value, "f")


@dataclass(frozen=True)
class ProblemFile:
    """Problems of one's own from a JSONL file, one {"prompt": ..., "answer": ...} per line (other keys
    are ignored). Reward 1 when the completion's answer (the first line after "</think>", or of the
    whole completion without a think block) equals the problem's answer, both normalised
    (normalise_answer: "1,000" matches "1000.0", "Paris." matches "paris"), else 0.

    prompts(n, rng) draws n distinct problems of the file (a GRPO step, or `score`); the file needs
    at least n."""

    path: str
    problems: tuple[tuple[str, str], ...]
    digest: str  # SHA-256 of the file: a resumed GRPO run checks that the problems are the same

    @classmethod
    def load(cls, path: str | Path) -> "ProblemFile":
        path = Path(path)
        rows = read_records(path, ("prompt", "answer"), "problems")
        for number, (prompt, answer) in rows:
            if not prompt:
                raise MoeforgeError(f"{where(path, number)}: the prompt is empty")
            if not normalise_answer(answer):
                raise MoeforgeError(f"{where(path, number)}: the answer is empty")
        from ..train.checkpoint import file_sha256  # (imported here: the task list stays light for --help)

        return cls(str(path), tuple(values for _, values in rows), file_sha256(path))

    @property
    def name(self) -> str:
        return f"{self.path} (SHA-256 {self.digest[:16]})"

    def prompts(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        if n > len(self.problems):
            raise MoeforgeError(f"{where(Path(self.path))} holds {len(self.problems)} problems, fewer than the {n} "
                                f"asked for")
        return rng.sample(self.problems, n)

    def reward(self, completion: str, answer: str) -> float:
        return 1.0 if self.extract(completion) == normalise_answer(answer) else 0.0

    @staticmethod
    def extract(completion: str) -> str | None:
        """The completion's answer, normalised (None when it gives none)."""
        return normalise_answer(final_answer(completion).split("\n", 1)[0]) or None


TASKS = {"arithmetic": Arithmetic, "python_syntax": PythonSyntax}

TASK_HELP = ("a built-in task (arithmetic, python_syntax), a JSONL file of {\"prompt\", \"answer\"} problems, "
             "or module:Class for a task of one's own (docs/posttrain.md)")


def task_name(task) -> str:
    """The name get_task knows `task` by (a problem file's path and digest; the class's name for a task
    of one's own): what a resumed GRPO run checks."""
    if isinstance(task, ProblemFile):
        return task.name
    return next((name for name, cls in TASKS.items() if type(task) is cls), type(task).__qualname__)


def get_task(spec: str):
    """The task `spec` names: a built-in task; a problem file (a path ending in .jsonl, or an existing
    file: ProblemFile); or "module:attribute", an importable task class (made with no arguments) or
    task object, which must have prompts() and reward()."""
    if spec in TASKS:
        return TASKS[spec]()
    if spec.endswith(".jsonl") or Path(spec).is_file():
        return ProblemFile.load(spec)
    module, colon, attr = spec.partition(":")
    if not colon or not module or not attr:
        raise MoeforgeError(f"--task: expected one of {', '.join(sorted(TASKS))}, a .jsonl problem file or "
                            f"module:Class, got {spec!r}")
    try:
        found = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise MoeforgeError(f"--task {spec}: cannot import {module} ({e})") from None
    except AttributeError:
        raise MoeforgeError(f"--task {spec}: {module} has no {attr}") from None
    task = found() if isinstance(found, type) else found
    missing = [m for m in ("prompts", "reward") if not callable(getattr(task, m, None))]
    if missing:
        raise MoeforgeError(f"--task {spec}: not a task (no {' or '.join(m + '()' for m in missing)}; "
                            f"posttrain/tasks.py has the contract)")
    return task
