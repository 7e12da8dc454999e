"""Rejection sampling for distillation (posttrain/distill.py, `moeforge sft-data --teacher`).

- every pair written is a completion the task's reward accepts and that ended with the end-of-text
  token (a cut-off completion is never kept), at most `keep` distinct ones per prompt, and the counts
  add up; the same seed gives the same pairs;
- a teacher that never stops, or never answers right, gives no pairs: the command ends with one
  line and writes nothing; bad flags are one-line errors;
- data parallel: the ranks' shares of the prompts are whole chunks that follow each other in rank
  order and cover every prompt once; sampling a share gives that share's part of the one-process
  pairs and counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from conftest import POSTTRAIN_MODEL
from moeforge.config import load_config
from moeforge.data import load_tokenizer
from moeforge.model import build_model
from moeforge.posttrain.distill import RejectionStats, prompt_share, rejection_sample


class StopBias(nn.Module):
    """A teacher stand-in: the model with `bias` added to the end-of-text logit, so that its
    completions stop within a few tokens (a random model almost never emits the token)."""

    def __init__(self, model, eos_id: int, bias: float):
        super().__init__()
        self.inner, self.eos_id, self.bias = model, eos_id, bias
        self.cfg, self.embed = model.cfg, model.embed

    def new_caches(self, *args):
        return self.inner.new_caches(*args)

    def forward(self, tokens, caches=None, start_pos=0):
        logits = self.inner(tokens, caches, start_pos).clone()
        logits[..., self.eos_id] += self.bias
        return logits


@dataclass(frozen=True)
class EvenLength:
    """A toy task: reward 1 for a completion of an even number of characters. The prompts are distinct,
    so that the checks per prompt can tell the prompts of the pairs apart."""

    def prompts(self, n, rng):
        return [(f"{a}+1=", "") for a in rng.sample(range(1000), n)]

    def reward(self, completion: str, answer: str) -> float:
        return float(len(completion) % 2 == 0)


@pytest.fixture(scope="module")
def teacher():
    cfg = load_config(None, None, POSTTRAIN_MODEL)
    torch.manual_seed(1)
    model = build_model(cfg.model, "cpu").eval()
    tok = load_tokenizer(None)
    return model, tok


@pytest.mark.parametrize("keep", [1, 3])
def test_kept_pairs_are_accepted_stopped_and_distinct(teacher, keep):
    model, tok = teacher
    biased = StopBias(model, tok.eos_id, 6.0)
    task = EvenLength()
    calls = []
    pairs, stats = rejection_sample(biased, tok, task, 12, 6, 8, 1.0, seed=5, keep=keep,
                                    progress=lambda done, kept: calls.append((done, kept)), chunk=5)
    assert [done for done, _ in calls] == [5, 10, 12] and calls[-1][1] == len(pairs)
    assert stats.prompts == 12 and stats.samples == 72
    assert 0 < stats.correct < stats.stopped <= stats.samples  # the filter had something to reject
    assert stats.kept == len(pairs) and 0 < stats.prompts_kept <= 12
    prompts = [p for p, _ in task.prompts(12, __import__("random").Random(5))]
    per_prompt = {}
    for prompt, response in pairs:
        assert prompt in prompts and task.reward(response, "") == 1.0
        assert tok.eos_id not in tok.encode(response) and "<|endoftext|>" not in response
        per_prompt.setdefault(prompt, []).append(response)
    for responses in per_prompt.values():
        assert len(responses) <= keep and len(set(responses)) == len(responses)
    if keep == 3:
        assert max(len(r) for r in per_prompt.values()) > 1
    again, _ = rejection_sample(biased, tok, task, 12, 6, 8, 1.0, seed=5, keep=keep, chunk=5)
    assert again == pairs


def test_completions_cut_off_are_never_kept(teacher):
    """Without the bias the random model runs to --max-new-tokens every time: nothing stops, nothing
    is kept, though half the completions have an even length."""
    model, tok = teacher
    pairs, stats = rejection_sample(model, tok, EvenLength(), 6, 4, 5, 1.0, seed=0)
    assert stats.stopped == 0 and stats.correct == 0 and pairs == []


def test_sft_data_from_a_teacher_command(cli, expect_error, base_checkpoint, tmp_path):
    out = tmp_path / "d.jsonl"
    r = cli("sft-data", "--teacher", base_checkpoint, "--task", "arithmetic", "--n", "3", "--samples", "2",
            "--max-new-tokens", "4", "--out", out)
    expect_error(r, "sft-data", "no completion was accepted", "0 of 6 samples", "nothing written")
    assert not out.exists()
    for flags, fragment in ((["--samples", "0"], "--samples"), (["--keep", "0"], "--keep"),
                            (["--max-new-tokens", "0"], "--max-new-tokens"), (["--temperature", "0"], "--temperature")):
        expect_error(cli("sft-data", "--teacher", base_checkpoint, "--out", out, *flags), "sft-data", fragment)
    expect_error(cli("sft-data", "--teacher", tmp_path / "nowhere", "--out", out), "sft-data", "nowhere")
    assert not out.exists()
    # python_syntax has no worked examples, but a teacher's answers are fine for it
    r = cli("sft-data", "--task", "python_syntax", "--out", out)
    expect_error(r, "sft-data", "no worked examples", "--teacher")
    r = cli("sft-data", "--teacher", base_checkpoint, "--task", "python_syntax", "--n", "2", "--samples", "2",
            "--max-new-tokens", "3", "--out", out)
    assert r.rc == 2 and not out.exists()  # the random teacher never stops


def test_written_file_is_what_sft_reads(teacher, tmp_path):
    from moeforge.posttrain.sft import read_examples, write_examples

    model, tok = teacher
    pairs, _ = rejection_sample(StopBias(model, tok.eos_id, 6.0), tok, EvenLength(), 8, 4, 8, 1.0, seed=2, keep=2)
    path = write_examples(tmp_path / "t.jsonl", pairs)
    assert [(p, r) for _, p, r in read_examples(path)] == pairs
    assert all(set(json.loads(line)) == {"prompt", "response"} for line in path.read_text().splitlines())


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 90, 200])
@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
def test_prompt_shares_are_whole_chunks_in_rank_order(n, ranks):
    shares = [prompt_share(n, rank, ranks, chunk=32) for rank in range(ranks)]
    assert [i for share in shares for i in share] == list(range(n))  # every prompt once, in rank order
    chunks = [-(-len(share) // 32) for share in shares]
    assert all(share.start % 32 == 0 for share in shares if share)
    assert chunks == sorted(chunks, reverse=True) and chunks[0] - chunks[-1] <= 1  # as even as whole chunks go


def test_shares_sample_as_one_process_does(teacher):
    """Each rank's share, sampled alone, is exactly its part of the one-process pairs and counts:
    the draws of a chunk depend on (seed, chunk) only, not on the chunks sampled before it."""
    model, tok = teacher
    biased, task = StopBias(model, tok.eos_id, 6.0), EvenLength()
    whole, stats = rejection_sample(biased, tok, task, 12, 4, 8, 1.0, seed=3, keep=2, chunk=5)
    parts = [rejection_sample(biased, tok, task, 12, 4, 8, 1.0, seed=3, keep=2, chunk=5, rank=rank, ranks=3)
             for rank in range(3)]
    assert [part[1].prompts for part in parts] == [5, 5, 2]
    assert all(pairs for pairs, _ in parts)  # every share contributes
    assert [pair for pairs, _ in parts for pair in pairs] == whole
    assert sum((part_stats for _, part_stats in parts), RejectionStats(0, 0, 0, 0, 0, 0)) == stats
    other_seed, _ = rejection_sample(biased, tok, task, 12, 4, 8, 1.0, seed=4, keep=2, chunk=5)
    assert other_seed != whole
