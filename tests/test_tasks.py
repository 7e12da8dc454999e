"""Tasks of one's own (posttrain/tasks.py): a JSONL problem file (`--task FILE.jsonl`) and an importable
task (`--task module:Class`).

- answers compare after normalisation (numbers by value, "1,000" = "1000.0"; text case-folded);
- a problem file reads its problems, draws distinct ones, rewards the answer after the think block,
  and names bad lines in one-line errors; its name carries the file's digest, so a resumed GRPO run
  refuses a changed file;
- get_task resolves each kind of spec and rejects the others with one line;
- `moeforge score` and `moeforge grpo` run on a problem file.
"""

from __future__ import annotations

import json
import random

import pytest

from moeforge.errors import MoeforgeError
from moeforge.posttrain.tasks import Arithmetic, ProblemFile, get_task, normalise_answer, task_name


@pytest.mark.parametrize("a, b, same", [
    ("1,000", "1000.0", True), ("0.50", ".5", True), ("-12", "-12.00", True), ("12,345.5", "12345.50", True),
    ("Paris.", " paris", True), ("New  York", "new york", True), ("1,2", "12", False), ("3/4", "0.75", False),
    ("7", "70", False), ("x", "y", False)])
def test_answers_compare_after_normalisation(a, b, same):
    assert (normalise_answer(a) == normalise_answer(b)) is same


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_problem_file(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": f"Q{i}: ", "answer": f"{i * 1000:,}", "source": "x"} for i in range(6)])
    task = ProblemFile.load(path)
    assert len(task.problems) == 6 and task.problems[2] == ("Q2: ", "2,000")
    drawn = task.prompts(6, random.Random(0))
    assert sorted(drawn) == sorted(task.problems)  # distinct: all six
    assert task.prompts(3, random.Random(1)) == task.prompts(3, random.Random(1))
    with pytest.raises(MoeforgeError, match="holds 6 problems, fewer than the 7"):
        task.prompts(7, random.Random(0))
    assert task.reward("<think>2 thousands</think>2000\nmore", "2,000") == 1.0
    assert task.reward("2000.0", "2,000") == 1.0  # no think block: the first line of the whole completion
    assert task.reward("<think>2000</think>200", "2,000") == 0.0  # the answer counts, not the chain
    assert task.reward("<think>unfinished 2000", "2,000") == 0.0
    assert task.extract("<think>a</think> 1,000.") == "1000" and task.extract("") is None
    # the name carries the contents: a changed file is another task for a resumed run
    before = task_name(task)
    assert str(path) in before
    write(path, [{"prompt": "Q: ", "answer": "1"}])
    assert task_name(ProblemFile.load(path)) != before
    assert task_name(Arithmetic()) == "arithmetic"


@pytest.mark.parametrize("lines, fragment", [
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'], 'line 2: no "answer"'),
    (['{"prompt": "a", "answer": 1}'], '"answer" must be a string'),
    (['{"prompt": "", "answer": "1"}'], "line 1: the prompt is empty"),
    (['{"prompt": "a", "answer": " . "}'], "line 1: the answer is empty"),
    (['{"prompt": "a", "answer": "1"', ""], "line 1: invalid JSON"),
    (["", " "], "holds no problems"),
])
def test_problem_file_errors_name_the_line(tmp_path, lines, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(MoeforgeError, match=fragment):
        get_task(str(path))


def test_get_task_specs(tmp_path):
    assert isinstance(get_task("arithmetic"), Arithmetic)
    assert isinstance(get_task("moeforge.posttrain.tasks:Arithmetic"), Arithmetic)  # a class: made
    path = write(tmp_path / "problems.txt", [{"prompt": "a", "answer": "1"}])
    assert isinstance(get_task(str(path)), ProblemFile)  # an existing file, whatever its suffix
    for spec, fragment in [("chess", "expected one of"), (str(tmp_path / "none.jsonl"), "does not exist"),
                           ("no_such_module_x:Task", "cannot import no_such_module_x"),
                           ("moeforge.posttrain.tasks:Nope", "has no Nope"),
                           ("json:JSONDecoder", "not a task (no prompts() or reward();")]:
        with pytest.raises(MoeforgeError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            get_task(spec)


def test_commands_on_a_problem_file(cli, expect_error, base_checkpoint, tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": f"{i}*2=", "answer": str(2 * i)} for i in range(6)])
    r = cli("score", "--checkpoint", base_checkpoint, "--task", path, "--n", 6, "--max-new-tokens", 3, "--no-progress")
    assert r.rc == 0, r.err
    assert r.out.startswith(f"{path}: 6 problems x 1 samples: pass@1 ")
    expect_error(cli("score", "--checkpoint", base_checkpoint, "--task", path, "--n", 7), "score", "fewer than the 7")
    args = ("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "g", "--task", path, "--prompts-per-step", 2,
            "--group-size", 2, "--max-new-tokens", 3, "--no-progress")
    r = cli(*args, "--steps", 1)
    assert r.rc == 0, r.err
    write(path, [{"prompt": f"{i}*3=", "answer": str(3 * i)} for i in range(6)])  # other problems in the same file
    expect_error(cli(*args, "--steps", 2, "--resume"), "grpo", "--resume", "--task")
