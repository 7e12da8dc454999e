"""Scoring a checkpoint on a task (posttrain/score.py, `moeforge score`).

- the scores of hand-written completions against counts made by hand: pass@1, pass@k, maj@k (ties
  to the answer seen first, completions without an answer left out of the vote), the format rate,
  the share that stopped, the mean length;
- score_task's greedy completions are generate()'s, problem by problem, and its pass@1 is the mean
  of their rewards; excluded prompts are skipped and replaced by the next ones drawn;
- `moeforge score` prints the scores and writes them with every completion; bad flags are one-line
  errors and write nothing.
"""

from __future__ import annotations

import json
import random

import pytest

from conftest import EvenLength
from moeforge.generate import generate
from moeforge.posttrain.score import aggregate, majority, score_task
from moeforge.posttrain.tasks import Arithmetic


def test_scores_of_known_completions():
    task = Arithmetic()
    answers = ["85", "27", "10"]
    texts = [["<think>7+8=15 -> 85</think>85", "84", "<think>x</think>85"],  # 2 right; vote 85
             ["26", "28", "27"],  # 1 right; a three-way tie goes to the first seen, 26: wrong
             ["no answer", "", "11\n10"]]  # none right, no answer to vote for but 11
    stopped = [[True, True, False], [True, False, False], [False, False, False]]
    lengths = [[10, 2, 6], [3, 3, 3], [4, 1, 5]]
    score, records = aggregate(task, answers, texts, stopped, lengths)
    assert score.problems == 3 and score.samples == 3
    assert score.pass_at_1 == pytest.approx(3 / 9)
    assert score.pass_at_k == pytest.approx(2 / 3)
    assert score.majority_at_k == pytest.approx(1 / 3)
    assert score.format == pytest.approx(2 / 9)
    assert score.stopped == pytest.approx(3 / 9)
    assert score.mean_tokens == pytest.approx(37 / 9)
    assert [r["majority"] for r in records] == ["85", "26", "11"]
    assert records[0]["rewards"] == [1.0, 0.0, 1.0]
    assert majority([None, "3", "4", "4", "3"]) == "3" and majority([None, None]) is None
    assert "maj@3 0.3333" in score.summary() and "pass@3 0.6667" in score.summary()


@pytest.fixture(scope="module")
def model_and_tok(random_model):
    return random_model


def test_greedy_score_is_the_mean_reward_of_generate(model_and_tok):
    model, tok = model_and_tok
    task = EvenLength()
    score, records = score_task(model, tok, task, 10, 1, 6, 0.0, 1.0, seed=3, chunk=4)
    problems = task.prompts(10, random.Random(3))
    rewards = []
    for (prompt, _), rec in zip(problems, records):
        ids = generate(model, tok.encode(prompt), 6, temperature=0.0, stop_id=tok.eos_id)
        text = tok.decode(i for i in ids if i != tok.eos_id)
        assert rec["prompt"] == prompt and rec["completions"] == [text]
        rewards.append(task.reward(text, ""))
    assert 0 < sum(rewards) < 10  # the check below is not trivially 0 or 1
    assert score.pass_at_1 == pytest.approx(sum(rewards) / 10) and score.majority_at_k is None
    # sampled: k completions per problem; the same seed gives the same completions
    a, rec_a = score_task(model, tok, task, 4, 3, 6, 1.0, 0.9, seed=5)
    b, rec_b = score_task(model, tok, task, 4, 3, 6, 1.0, 0.9, seed=5)
    assert a == b and rec_a == rec_b and all(len(r["completions"]) == 3 for r in rec_a)
    # excluded prompts are skipped; the next ones drawn take their places
    skip = {problems[0][0], problems[2][0]}
    _, kept = score_task(model, tok, task, 10, 1, 6, 0.0, 1.0, seed=3, exclude=skip)
    assert len(kept) == 10 and not skip & {r["prompt"] for r in kept}
    assert [r["prompt"] for r in kept[:8]] == [p for p, _ in problems if p not in skip]


def test_score_command(cli, expect_error, base_checkpoint, tmp_path):
    out = tmp_path / "score.json"
    r = cli("score", "--checkpoint", base_checkpoint, "--n", 5, "--max-new-tokens", 4, "--out", out, "--no-progress")
    assert r.rc == 0, r.err
    assert r.out.startswith("arithmetic: 5 problems x 1 samples: pass@1 ")
    saved = json.loads(out.read_text())
    assert saved["score"]["problems"] == 5 and len(saved["problems"]) == 5
    assert saved["settings"]["temperature"] == 0.0
    # --speculative (the MTP module drafting): greedy, the same completions and scores
    spec_out = tmp_path / "spec.json"
    r = cli("score", "--checkpoint", base_checkpoint, "--n", 5, "--max-new-tokens", 4, "--out", spec_out,
            "--no-progress", "--speculative")
    assert r.rc == 0, r.err
    spec = json.loads(spec_out.read_text())
    assert spec["problems"] == saved["problems"] and spec["score"] == saved["score"] and spec["settings"]["speculative"]
    # --chat: each prompt a user turn of the chat template; the completions are generate's on that prompt
    from moeforge.data import load_tokenizer
    from moeforge.generate import generate
    from moeforge.posttrain.chat import ChatTemplate
    from moeforge.train.checkpoint import load_trained_model

    chat_out = tmp_path / "chat.json"
    r = cli("score", "--checkpoint", base_checkpoint, "--n", 2, "--max-new-tokens", 4, "--out", chat_out,
            "--no-progress", "--chat")
    assert r.rc == 0, r.err
    chat = json.loads(chat_out.read_text())
    model, cfg = load_trained_model(base_checkpoint, "cpu")
    tok = load_tokenizer(cfg.train.tokenizer or None)
    for problem in chat["problems"]:
        ids = generate(model, ChatTemplate(tok).prompt(problem["prompt"]), 4, temperature=0.0, stop_id=tok.eos_id)
        assert problem["completions"] == [tok.decode([i for i in ids if i != tok.eos_id])]
    assert chat["settings"]["chat"] and chat["problems"][0]["completions"] != saved["problems"][0]["completions"]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": saved["problems"][0]["prompt"], "response": "x"}) + "\n")
    r = cli("score", "--checkpoint", base_checkpoint, "--n", 5, "--max-new-tokens", 4, "--exclude", data,
            "--samples", 2, "--temperature", 1, "--out", out, "--no-progress")
    assert r.rc == 0, r.err
    assert "pass@2" in r.out and "maj@2" in r.out and "excluding 1 prompts" in r.out
    again = json.loads(out.read_text())
    assert saved["problems"][0]["prompt"] not in [p["prompt"] for p in again["problems"]]
    before = out.read_text()
    for flags, fragment in [(["--samples", "2"], "--temperature 0"), (["--n", "0"], "--n"),
                            (["--top-p", "0"], "--top-p"), (["--temperature", "-1"], "--temperature"),
                            (["--task", "poetry"], "--task"), (["--exclude", tmp_path / "none.jsonl"], "none.jsonl"),
                            (["--out", tmp_path], "folder")]:
        expect_error(cli("score", "--checkpoint", base_checkpoint, "--out", out, *flags), "score", fragment)
    assert out.read_text() == before  # nothing written by a failed run
