"""Rejection sampling for distillation (posttrain/distill.py, `moeforge sft-data --teacher`).

- every pair written is a completion the task's reward accepts and that ended with the end-of-text
  token (a cut-off completion is never kept), at most `keep` distinct ones per prompt, and the counts
  add up; the same seed gives the same pairs;
- a teacher that never stops, or never answers right, gives no pairs: the command ends with one
  line and writes nothing; bad flags are one-line errors;
- data parallel: the ranks' shares of the prompts are whole chunks that follow each other in rank
  order and cover every prompt once; sampling a share gives that share's part of the one-process
  pairs and counts; under torchrun (2 gloo ranks) `sft-data --teacher` writes the very file one
  process writes, and only that file, with the same counts, each rank having sampled only its share.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from torch import nn

from conftest import EvenLength, run_cli
from moeforge.data import load_tokenizer
from moeforge.posttrain.distill import RejectionStats, prompt_share, rejection_sample
from moeforge.train import checkpoint as ckpt


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


@pytest.fixture(scope="module")
def teacher(random_model):
    return random_model


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
    r = cli("sft-data", "--teacher", base_checkpoint, "--task", "arithmetic", "--n", "3", "--samples", "2",
            "--max-new-tokens", "4", "--out", out, "--speculative")  # sampled with the MTP module drafting
    expect_error(r, "sft-data", "no completion was accepted", "0 of 6 samples", "nothing written")
    expect_error(cli("sft-data", "--out", out, "--speculative"), "sft-data", "--speculative: only with --teacher")
    for flags, fragment in ((["--samples", "0"], "--samples"), (["--keep", "0"], "--keep"),
                            (["--max-new-tokens", "0"], "--max-new-tokens"), (["--temperature", "0"], "--temperature")):
        expect_error(cli("sft-data", "--teacher", base_checkpoint, "--out", out, *flags), "sft-data", fragment)
    expect_error(cli("sft-data", "--teacher", tmp_path / "nowhere", "--out", out), "sft-data", "nowhere")
    expect_error(cli("sft-data", "--teacher", base_checkpoint, "--out", out, "--samples", "2", "--keep", "3"),
                 "sft-data", "--keep 3", "--samples 2")
    expect_error(cli("sft-data", "--out", out, "--samples", "3", "--temperature", "0.5"), "sft-data",
                 "--samples, --temperature: only with --teacher")
    expect_error(cli("sft-data", "--teacher", base_checkpoint, "--out", out, "--temperature", "nan"), "sft-data",
                 "--temperature", "finite")
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


@pytest.fixture(scope="module")
def stopping_teacher(base_checkpoint, tmp_path_factory):
    """A checkpoint whose model samples near-uniform tokens and stops after each with probability
    ~1/4: base_checkpoint with every token's embedding set to 1 in dimension 0, which then dominates
    the final normalised hidden state (~sqrt(hidden size) there), and a head that reads that dimension
    into the end-of-text logit only (~8). About a third of its python_syntax completions are accepted."""
    model, cfg = ckpt.load_trained_model(base_checkpoint, "cpu")
    eos = load_tokenizer(cfg.train.tokenizer or None).eos_id
    with torch.no_grad():
        model.embed.weight[:, 0] = 1.0
        model.head.weight[:, 0] = 0.0
        model.head.weight[eos] = 0.0
        model.head.weight[eos, 0] = 8.0 / cfg.model.hidden_size ** 0.5
    root = tmp_path_factory.mktemp("stopping_teacher")
    ckpt.save_checkpoint(root / "checkpoints", 0, cfg, model.state_dict(), {}, {"step": 0}, 1)
    return root


def sft_data_rank(argv: list[str]) -> tuple[int, str, list[list[int]], list[str]]:
    """`moeforge sft-data ARGV` in this process (a rank of tests/dist.py, or the test's own process):
    its exit status, what it printed, the prompts (token ids) it sampled in order, and the files it wrote."""
    from moeforge.posttrain import distill, sft

    sampled: list[list[int]] = []
    written: list[str] = []
    sample_groups, write_examples = distill.sample_groups, sft.write_examples

    def recording_sample(model, prompts, *args, **kwargs):
        sampled.extend(prompts)
        return sample_groups(model, prompts, *args, **kwargs)

    def recording_write(path, pairs, **kwargs):
        written.append(str(path))
        return write_examples(path, pairs, **kwargs)

    printed = io.StringIO()
    distill.sample_groups, sft.write_examples = recording_sample, recording_write
    try:
        with contextlib.redirect_stdout(printed):
            rc = run_cli(argv)
    finally:
        distill.sample_groups, sft.write_examples = sample_groups, write_examples
    return rc, printed.getvalue(), sampled, written


def test_data_parallel_sft_data_writes_the_one_process_file(stopping_teacher, tmp_path, one_thread):
    """90 prompts are 3 chunks of 32 (the last of 26): rank 0 samples two, rank 1 one. The two ranks
    write the one-process file byte for byte, rank 0 alone and nothing else, with the same counts;
    rank 0 alone prints; each rank sampled its own share only, and rank 1's share has pairs in the file."""
    from dist import run_dist

    def argv(out):
        return ["sft-data", "--teacher", str(stopping_teacher), "--task", "python_syntax", "-n", "90", "--samples",
                "2", "--max-new-tokens", "6", "--seed", "7", "--device", "cpu", "--out", str(out)]

    one, dp = tmp_path / "one" / "d.jsonl", tmp_path / "dp" / "d.jsonl"
    one.parent.mkdir()
    dp.parent.mkdir()
    rc, printed, sampled, written = sft_data_rank(argv(one))
    assert rc == 0 and len(sampled) == 90 and written == [str(one)]
    progress = [int(line.split(", ")[1].split()[0]) for line in printed.splitlines()[:-1]]  # examples kept so far
    assert len(progress) == 3 and progress[2] > progress[1]  # the last chunk, rank 1's share, has pairs
    ranks = run_dist(sft_data_rank, 2, argv(dp), init=False, timeout=150)
    assert [r[0] for r in ranks] == [0, 0]
    assert [r[3] for r in ranks] == [[str(dp)], []] and list(dp.parent.iterdir()) == [dp]
    assert dp.read_bytes() == one.read_bytes()
    # the counts: the summary line, less the file's name
    assert ranks[0][1].splitlines()[-1].split(": ", 1)[1] == printed.splitlines()[-1].split(": ", 1)[1]
    assert ranks[1][1] == ""  # rank 0 reports
    assert [line.split(",")[0] for line in ranks[0][1].splitlines()[:-1]] == [
        "sft-data: 32/64 prompts sampled (rank 0's share of 90)", "sft-data: 64/64 prompts sampled (rank 0's share of 90)"]
    # each rank sampled its share, and only it
    assert [len(r[2]) for r in ranks] == [64, 26] and ranks[0][2] + ranks[1][2] == sampled


def test_chat_teacher_writes_conversations(teacher, tmp_path, monkeypatch):
    """rejection_sample(chat=True) asks the teacher each prompt as a user turn of the chat template,
    and write_examples(chat=True) writes the kept pairs as one-exchange conversations, which SFT
    reads back as the same prompt (the template's user turn) and response."""
    from moeforge.posttrain import distill
    from moeforge.posttrain.chat import ChatTemplate
    from moeforge.posttrain.sft import read_data, tokenize_examples, write_examples

    model, tok = teacher
    asked = []
    sample_groups = distill.sample_groups

    def recording(model, prompts, *args, **kwargs):
        asked.extend(prompts)
        return sample_groups(model, prompts, *args, **kwargs)

    monkeypatch.setattr(distill, "sample_groups", recording)
    task = EvenLength()
    pairs, _ = rejection_sample(StopBias(model, tok.eos_id, 6.0), tok, task, 6, 4, 8, 1.0, seed=2, chat=True)
    prompts = [p for p, _ in task.prompts(6, __import__("random").Random(2))]
    assert asked == [ChatTemplate(tok).prompt(p) for p in prompts] and pairs
    path = write_examples(tmp_path / "chat.jsonl", pairs, chat=True)
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"messages": [{"role": "user", "content": pairs[0][0]}, {"role": "assistant", "content": pairs[0][1]}]}
    examples = tokenize_examples(read_data(path), tok, 64, path, "64")
    assert examples[0].prompt == ChatTemplate(tok).prompt(pairs[0][0])
    assert examples[0].response == tok.encode(pairs[0][1]) + [tok.eos_id]
