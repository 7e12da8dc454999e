"""GRPO (posttrain/grpo.py): its pieces against their definitions, and a run that learns a reward.

- group_advantages and the k3 KL estimator against their formulas (the estimator's mean under the
  policy equals the exact KL of two small categorical distributions);
- the loss's value and gradient: with the ratio at 1, d loss / d logp of a token is -A / (|o| B);
  a ratio past the clip on the side of its advantage passes no gradient;
- the grouped sampler decodes what generate() decodes (greedy, so every row is the same) and masks
  after the stop token; completion_logprobs equals a full forward's log-softmax;
- on a random-initialised small model, 40 GRPO steps raise a reward that needs a shift of the first
  token's distribution (the completion starts with a lowercase letter) from about 0.4 to about 0.9
  (the mean of the last 10 steps); the final checkpoint loads like any other;
- `moeforge grpo`: a run on the CLI, and bad settings as one-line errors;
- --resume: a run stopped and resumed ends bit for bit as the uninterrupted run (one process, and
  2 data-parallel ranks), pi_ref stays the starting model; what would not continue the run is one line.
- --ep 2 and --sharding full on 2 ranks: the replicas' completions and rewards exactly, their losses
  and weights within rounding, with the ranks decoding and running their forwards in step; a resume
  under the layout ends bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil

import pytest
import torch

from conftest import POSTTRAIN_MODEL as MODEL
from conftest import interrupted_after, read_metrics, without_seconds
from moeforge.config import load_config
from moeforge.errors import MoeforgeError
from moeforge.generate import generate
from moeforge.model import build_model
from moeforge.posttrain.grpo import (by_prompt_length, completion_logprobs, group_advantages, grpo_loss, kl_k3,
                                     sample_group, sample_groups, train_grpo)
from moeforge.posttrain.settings import GRPOSettings
from moeforge.posttrain.tasks import Arithmetic, PythonSyntax, format_reward
from moeforge.train import checkpoint as ckpt


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = group_advantages(r)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)  # mean 0.5, std 0.5
    assert torch.equal(a[1], torch.zeros(4))  # equal rewards: no signal


def test_kl_k3_is_an_unbiased_estimate_of_the_kl():
    pi = torch.tensor([0.5, 0.3, 0.2])
    ref = torch.tensor([0.2, 0.5, 0.3])
    est = (pi * kl_k3(pi.log(), ref.log())).sum()  # its expectation under pi
    exact = (pi * (pi / ref).log()).sum()
    assert float(est) == pytest.approx(float(exact), rel=1e-6)
    assert torch.all(kl_k3(pi.log(), ref.log()) >= 0) and float(kl_k3(pi.log(), pi.log()).abs().max()) == 0


def test_grpo_loss_value_and_gradient():
    torch.manual_seed(0)
    B, N = 3, 5
    logp = (-torch.rand(B, N)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, clip=0.2, beta=0.0)
    assert float(loss.detach()) == pytest.approx(-float(adv.mean()), rel=1e-6)  # ratio 1: -mean(A)
    loss.backward()
    lengths = mask.sum(dim=1, keepdim=True).float()
    expected = torch.where(mask, -adv.unsqueeze(1) / (lengths * B), torch.zeros(B, N))
    torch.testing.assert_close(logp.grad, expected)
    # a ratio of e^0.5 > 1.2 with a positive advantage is clipped: no gradient through those tokens
    logp.grad = None
    old = logp.detach() - 0.5
    loss, stats = grpo_loss(logp, old, None, adv.abs(), mask, clip=0.2, beta=0.0)
    loss.backward()
    assert float(logp.grad.abs().max()) == 0 and stats["clipped"] == 1.0
    # the KL term: its gradient pulls logp towards ref_logp
    logp.grad = None
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach() - 1.0, torch.zeros(B), mask, clip=0.2, beta=1.0)
    loss.backward()
    assert stats["kl"] == pytest.approx(math.exp(-1) + 1 - 1, rel=1e-5)  # r - log r - 1 at r = 1/e
    assert torch.all(logp.grad[mask] > 0)  # lowering logp towards the reference lowers the loss


def test_sampler_and_logprobs_match_the_plain_paths():
    cfg = load_config(None, None, MODEL)
    torch.manual_seed(1)
    model = build_model(cfg.model, "cpu").eval()
    prompt = [5, 17, 300, 42]
    gen = torch.Generator().manual_seed(0)
    tokens, mask = sample_group(model, prompt, 3, 6, 0.0, gen, stop_id=None)  # greedy
    assert mask.all() and (tokens == tokens[0]).all()
    assert tokens[0].tolist() == generate(model, prompt, 6, temperature=0.0)
    stop = tokens[0, 2].item()  # the third greedy token as the stop token: the rows stop there
    tokens, mask = sample_group(model, prompt, 2, 6, 0.0, gen, stop_id=stop)
    assert mask[:, :3].all() and not mask[:, 3:].any() and (tokens[:, 3:] == stop).all()
    # sample_groups: prompts of two lengths, each length's groups decoded as one batch, in prompt order,
    # greedy tokens as each group alone (and the stop handled per row)
    prompts = [[5, 17, 300, 42], [9, 8], [77, 1, 2, 3], [4, 4]]
    got = sample_groups(model, prompts, 2, 6, 0.0, gen, stop_id=stop)
    for p, (tokens, mask) in zip(prompts, got):
        want_tokens, want_mask = sample_group(model, p, 2, 6, 0.0, gen, stop_id=stop)
        assert torch.equal(tokens, want_tokens) and torch.equal(mask, want_mask)
    assert got[0][1][:, 3:].sum() == 0  # the first prompt's rows stopped where they stop alone
    # completion_logprobs: the scored positions of a full forward's log-softmax
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    got = completion_logprobs(model, prompt, tokens, mask)
    seq = torch.cat([torch.tensor([prompt] * 2), tokens], dim=1)
    full = model(seq[:, :-1]).float().log_softmax(-1).gather(-1, seq[:, 1:].unsqueeze(-1)).squeeze(-1)
    want = torch.where(mask, full[:, len(prompt) - 1:], torch.zeros_like(got))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_groups_joined_by_prompt_length_give_the_per_prompt_gradient():
    """A step's loss over the groups joined by prompt length (one forward per length, each part
    weighted by its share of the rows) has the gradient of the mean of the per-prompt losses."""
    cfg = load_config(None, None, MODEL)
    torch.manual_seed(2)
    model = build_model(cfg.model, "cpu")
    gen = torch.Generator().manual_seed(0)
    prompts = [[5, 17, 300, 42], [9, 8], [77, 1, 2, 3]]
    batch = []
    for p in prompts:
        tokens = torch.randint(0, cfg.model.vocab_size, (3, 5), generator=gen)
        mask = torch.rand(3, 5, generator=gen) > 0.3
        mask[:, 0] = True
        batch.append((p, tokens, mask, torch.randn(3, generator=gen)))
    parts = by_prompt_length(batch)
    assert [t.shape[0] for _, t, _, _ in parts] == [6, 3]  # lengths 4 (two prompts) and 2
    assert torch.equal(parts[0][0][3], torch.tensor(prompts[2])) and torch.equal(parts[0][1][3:], batch[2][1])

    def grads(entries, weights):
        model.zero_grad()
        for (p, tokens, mask, adv), w in zip(entries, weights):
            logp = completion_logprobs(model, p, tokens, mask)
            loss, _ = grpo_loss(logp, logp.detach() - 0.1, None, adv, mask, clip=0.2, beta=0.0)
            (loss * w).backward()
        return [q.grad.clone() for q in model.parameters() if q.grad is not None]

    per_prompt = grads(batch, [1 / 3] * 3)
    joined = grads(parts, [6 / 9, 3 / 9])
    assert len(per_prompt) == len(joined) > 0
    for a, b in zip(joined, per_prompt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class LowercaseStart:
    """A reward the random model earns about 40% of the time: the completion starts with a lowercase letter."""

    def prompts(self, n, rng):
        return [(f"x{rng.randint(0, 99)} = ", "") for _ in range(n)]

    def reward(self, completion, answer):
        return 1.0 if completion[:1].islower() else 0.0


def test_grpo_raises_the_reward(base_checkpoint, tmp_path):
    settings = GRPOSettings(steps=40, prompts_per_step=4, group_size=8, max_new_tokens=4, lr=3e-2, beta=0.04)
    records = train_grpo(base_checkpoint, tmp_path / "rl", LowercaseStart(), settings, device="cpu", progress=False)
    assert len(records) == 40
    # At this learning rate a run is chaotic: float-level changes (the order of a sum) give another
    # trajectory, and some runs reach 1.0, then fall back for a while (once every group's rewards are
    # equal only the KL term acts, pulling towards the start). Seed 0's run learns; the check is on
    # the last 10 steps' mean, not on one step.
    first = sum(r["reward"] for r in records[:5]) / 5
    last = sum(r["reward"] for r in records[-10:]) / 10
    assert first < 0.6 and last > 0.8, (first, last)
    assert records[-1]["kl"] > 0  # the policy moved away from the starting model
    model, cfg = ckpt.load_trained_model(tmp_path / "rl", "cpu")  # the trainer's checkpoint format
    assert cfg.model == load_config(None, None, MODEL).model
    assert len((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()) == 40


def test_tasks_rewards():
    rng = random.Random(0)
    (q, a), = Arithmetic().prompts(1, rng)
    assert eval(q[:-1]) == int(a)  # "12+7=" -> "19"
    assert Arithmetic().reward(f" {a}\nmore", a) == 1.0 and Arithmetic().reward(f"{a}0", a) == 0.0
    t = PythonSyntax()
    assert t.prompts(1, rng)[0][0].startswith("def ")
    assert [t.reward(c, "") for c in ["return x", "pass  # ok", "if x:", "", "x = (", "for i in"]] == [1, 1, 0, 0, 0, 0]


def test_arithmetic_reward_reads_the_answer_after_the_think_block():
    t = Arithmetic()
    assert t.reward("<think>7+8=15, 4+3+1=8 -> 85</think>85", "85") == 1.0
    assert t.reward("<think>7+8=15, 4+3+1=8 -> 85</think> 85\nmore", "85") == 1.0
    assert t.reward("<think>85</think>84", "85") == 0.0  # the answer counts, not the working
    assert t.reward("<think>7+8=15 -> 85</think>", "85") == 0.0  # no answer after the block
    assert t.reward("<think>85", "85") == 0.0  # an unfinished think block: no answer at all
    assert t.reward("85<think>", "85") == 1.0  # no think block: the first integer, as before


def test_format_reward():
    good = ["<think>7+8=15 -> 15</think>15", "<think>a\nb</think> 85 and more", "<think></think>x"]
    bad = ["85", "<think>a</think>", "<think>a</think>\n85", " <think>a</think>85", "x<think>a</think>85",
           "<think><think>a</think>85", "<think>a</think></think>85", "<think>a</think>85<think>", "<think>85"]
    assert [format_reward(c) for c in good] == [1.0] * 3
    assert [format_reward(c) for c in bad] == [0.0] * len(bad)


def test_grpo_reward_adds_the_weighted_format_reward(base_checkpoint, tmp_path, monkeypatch):
    """reward = the task's + format_weight x format_reward, per completion (so also in each step's
    means). A random model never writes a think block, so a stand-in format rule (an even number of
    characters) gives the format term something to count."""
    from moeforge.posttrain import grpo

    monkeypatch.setattr(grpo, "format_reward", lambda text: float(len(text) % 2 == 0))
    settings = GRPOSettings(steps=3, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-3,
                            format_weight=0.5)
    records = train_grpo(base_checkpoint, tmp_path / "f", LowercaseStart(), settings, device="cpu", progress=False)
    for r in records:
        assert r["reward"] == pytest.approx(r["accuracy"] + 0.5 * r["format"], abs=1e-6)
    assert any(0 < r["format"] < 1 for r in records)
    plain = train_grpo(base_checkpoint, tmp_path / "p", LowercaseStart(), dataclasses.replace(settings, format_weight=0),
                       device="cpu", progress=False)
    assert all(r["reward"] == r["accuracy"] for r in plain)


def test_grpo_command(cli, base_checkpoint, tmp_path, expect_error):
    r = cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "g", "--task", "python_syntax",
            "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--no-progress")
    assert r.rc == 0, r.err
    assert "reward" in r.out and (tmp_path / "g" / "checkpoints").is_dir()
    # --speculative: the groups sampled with the MTP module drafting (generate.sample_rows' tests)
    r = cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "spec", "--task", "python_syntax", "--steps", "1",
            "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "6", "--no-progress", "--speculative",
            "--chat")  # (and the prompts as user turns of the chat template)
    assert r.rc == 0, r.err
    record = json.loads((tmp_path / "spec" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < record["completion_tokens"] <= 6
    expect_error(cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "h", "--group-size", "1"),
                 "grpo", "--group-size")
    expect_error(cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "h", "--task", "chess"),
                 "grpo", "--task", "arithmetic")
    expect_error(cli("grpo", "--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "h"), "grpo", "does not exist")
    expect_error(cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "h", "--max-new-tokens", "64"),
                 "grpo", "context")
    expect_error(cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "h", "--format-weight", "-1"),
                 "grpo", "--format-weight")
    for flag in ("--beta", "--format-weight", "--lr", "--temperature"):
        expect_error(cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "h", flag, "nan"), "grpo", flag)
    assert not (tmp_path / "h").exists()
    # a run that stops before its first checkpoint (here its task's prompt is too long for the model)
    # leaves a folder that a new run may start in again; --resume there says so
    (tmp_path / "long.jsonl").write_text('{"prompt": "' + "x " * 200 + '", "answer": "1"}\n')
    expect_error(cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "s", "--task", tmp_path / "long.jsonl",
                     "--steps", "1", "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "4"),
                 "grpo", "exceeds the model's context")
    expect_error(cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "s", "--resume"), "grpo",
                 "no checkpoint", "without --resume")
    r = cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "s", "--steps", "1", "--prompts-per-step", "1",
            "--group-size", "2", "--max-new-tokens", "4", "--no-progress")
    assert r.rc == 0, r.err
    assert [rec["step"] for rec in read_metrics(tmp_path / "s")] == [1]
    # a metrics.jsonl that is not a run's is not touched
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.jsonl").write_text("my own notes\n")
    expect_error(cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "mine"), "grpo", "already holds a run")
    assert (tmp_path / "mine" / "metrics.jsonl").read_text() == "my own notes\n"


def final_weights(run) -> dict:
    return ckpt.load_trained_model(run, "cpu")[0].state_dict()


def test_grpo_resume_continues_the_run_bit_for_bit(base_checkpoint, tmp_path, one_thread):
    """A run stopped after step 3 (its last checkpoint at step 2, --checkpoint-every 2) and resumed
    ends as the uninterrupted run: the same weights to the bit and the same metrics, step 3's record
    once. Each restored piece decides something checked here: a fresh prompt rng would give step 3
    step 1's prompts, a fresh generator other completions, the resumed weights as pi_ref a KL of 0 at
    step 3 (the uninterrupted run's is above 0), fresh AdamW moments other weights after step 3."""
    s = GRPOSettings(steps=4, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-2, checkpoint_every=2)
    whole = train_grpo(base_checkpoint, tmp_path / "whole", LowercaseStart(), s, device="cpu", progress=False)
    with interrupted_after(3):
        train_grpo(base_checkpoint, tmp_path / "part", LowercaseStart(), s, device="cpu", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "part" / "checkpoints")] == ["step_0000002"]
    rest = train_grpo(base_checkpoint, tmp_path / "part", LowercaseStart(), s, device="cpu", progress=False,
                      resume=True)
    assert [r["step"] for r in rest] == [3, 4] and whole[2]["kl"] > 0
    assert without_seconds(read_metrics(tmp_path / "part")) == without_seconds(whole)
    want, got = final_weights(tmp_path / "whole"), final_weights(tmp_path / "part")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_grpo_resume_refuses_what_would_not_continue_the_run(cli, expect_error, base_checkpoint, tmp_path):
    """--resume with no checkpoint, another --task or setting, or a starting checkpoint (pi_ref) that
    has changed or is gone is one line; without --resume a used --out is refused with a pointer to
    --resume. A resume with a larger --steps goes on from the last step."""
    start, out = tmp_path / "start", tmp_path / "g"
    shutil.copytree(base_checkpoint, start)
    args = ["--checkpoint", start, "--out", out, "--task", "python_syntax", "--prompts-per-step", "1",
            "--group-size", "2", "--max-new-tokens", "4", "--no-progress"]
    expect_error(cli("grpo", *args, "--steps", "1", "--resume"), "grpo", "--resume", "no checkpoint under")
    assert cli("grpo", *args, "--steps", "1").rc == 0
    expect_error(cli("grpo", *args, "--steps", "2"), "grpo", "already holds a run", "pass --resume")
    expect_error(cli("grpo", *args, "--steps", "2", "--task", "arithmetic", "--resume"), "grpo",
                 "--task python_syntax, not with --task arithmetic")
    expect_error(cli("grpo", *args, "--steps", "2", "--group-size", "4", "--resume"), "grpo", "--group-size 2, not 4")
    expect_error(cli("grpo", *args, "--steps", "1", "--resume"), "grpo", "done 1 steps", "--steps above 1")
    r = cli("grpo", *args, "--steps", "2", "--resume")
    assert r.rc == 0 and "at step 2" in r.out, r.err
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    # the starting checkpoint saved again with other weights, then removed: pi_ref cannot be the starting model
    cfg = ckpt.load_checkpoint_config(ckpt.resolve_checkpoint(start))
    torch.manual_seed(1)
    ckpt.save_checkpoint(start / "checkpoints", 0, cfg, build_model(cfg.model, "cpu").state_dict(), {}, {"step": 0}, 1)
    expect_error(cli("grpo", *args, "--steps", "3", "--resume"), "grpo", "starting checkpoint", "has changed")
    shutil.rmtree(start)
    expect_error(cli("grpo", *args, "--steps", "3", "--resume"), "grpo", "starting checkpoint", "is gone")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def grpo_rank_weights(checkpoint: str, out: str, settings: GRPOSettings,
                      resume: bool = False) -> tuple[list[dict], dict]:
    """One rank of a data-parallel `train_grpo` (tests/dist.py runs it in each process): its records and
    its replica's final weights (the model handed to build_adamw, kept)."""
    from moeforge.posttrain import grpo

    held = {}
    real = grpo.build_adamw

    def keep(model, cfg, **kw):
        held["model"] = model
        return real(model, cfg, **kw)

    grpo.build_adamw = keep
    records = train_grpo(checkpoint, out, LowercaseStart(), settings, device="cpu", progress=False, resume=resume)
    return records, {k: v.detach().clone() for k, v in held["model"].state_dict().items()}


def test_data_parallel_grpo_keeps_the_replicas_equal(base_checkpoint, tmp_path):
    """Under torchrun each rank samples its share of the step's prompts and the gradients are averaged:
    the replicas stay equal to the bit, every rank reports the same metrics (over all completions),
    rank 0 alone writes them and the checkpoint, whose weights are the replicas'; prompts that do not
    split evenly are refused."""
    from dist import DistError, run_dist

    s = GRPOSettings(steps=3, prompts_per_step=4, group_size=4, max_new_tokens=4, lr=1e-2)
    ranks = run_dist(grpo_rank_weights, 2, str(base_checkpoint), str(tmp_path / "dp"), s, init=False, timeout=150)
    (rec0, w0), (rec1, w1) = ranks
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rec0] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rec1]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    base, _ = ckpt.load_trained_model(base_checkpoint, "cpu")
    assert not torch.equal(w0["layers.0.attn.wkv_a.weight"], base.state_dict()["layers.0.attn.wkv_a.weight"])
    saved, _ = ckpt.load_trained_model(tmp_path / "dp", "cpu")
    assert all(torch.equal(v, w0[k]) for k, v in saved.state_dict().items())
    lines = (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(0 <= r["reward"] <= 1 and r["reward_std"] >= 0 for r in rec0)
    with pytest.raises(DistError, match="--prompts-per-step 3 does not split evenly over the 2"):
        run_dist(grpo_rank_weights, 2, str(base_checkpoint), str(tmp_path / "bad"),
                 dataclasses.replace(s, prompts_per_step=3), init=False)


def test_data_parallel_grpo_resumes(base_checkpoint, tmp_path):
    """2 ranks: 2 steps, then --resume --steps 4, equal 4 steps: the same metrics, and every rank's
    weights equal to the bit. Each rank samples on from its own saved generator (rank 0 gathers them
    all into the checkpoint: one rank's restored on both would sample other completions on the
    other). A 2-rank run does not resume in one process (its ranks' generators)."""
    from dist import run_dist

    s = GRPOSettings(steps=4, prompts_per_step=4, group_size=4, max_new_tokens=4, lr=1e-2)
    whole = run_dist(grpo_rank_weights, 2, str(base_checkpoint), str(tmp_path / "whole"), s, init=False, timeout=150)
    run_dist(grpo_rank_weights, 2, str(base_checkpoint), str(tmp_path / "part"), dataclasses.replace(s, steps=2),
             init=False, timeout=150)
    rest = run_dist(grpo_rank_weights, 2, str(base_checkpoint), str(tmp_path / "part"), s, resume=True, init=False,
                    timeout=150)
    for (records, weights), (want_records, want_weights) in zip(rest, whole):
        assert [r["step"] for r in records] == [3, 4]
        assert without_seconds(records) == without_seconds(want_records[2:])
        assert all(torch.equal(weights[k], want_weights[k]) for k in want_weights)
    assert without_seconds(read_metrics(tmp_path / "part")) == without_seconds(whole[0][0])
    with pytest.raises(MoeforgeError, match="made with 2 data-parallel rank"):
        train_grpo(base_checkpoint, tmp_path / "part", LowercaseStart(), dataclasses.replace(s, steps=5), device="cpu",
                   progress=False, resume=True)


class LowercaseStartVaried(LowercaseStart):
    """LowercaseStart with prompts of 1 to 4 words: the ranks' shares of a step have different numbers
    of prompt lengths, so different numbers of log-probability forwards of their own."""

    def prompts(self, n, rng):
        return [(" ".join(["x"] * rng.randint(1, 4)) + " = ", "") for _ in range(n)]


def grpo_layout_rank(checkpoint: str, out: str, settings: GRPOSettings, ep: int, sharding: str,
                     resume: bool = False) -> tuple[list[dict], dict]:
    """One rank of `train_grpo --ep --sharding` (tests/dist.py runs it in each process): its records and
    the run's final weights, gathered to the single-process tensors."""
    from conftest import with_full_weights
    from moeforge.posttrain import grpo

    return with_full_weights(grpo, lambda: train_grpo(checkpoint, out, LowercaseStartVaried(), settings, device="cpu",
                                                      progress=False, resume=resume, ep=ep, sharding=sharding))


LAYOUT_SETTINGS = GRPOSettings(steps=3, prompts_per_step=8, group_size=3, max_new_tokens=6, lr=1e-3, beta=0.04,
                               checkpoint_every=2, keep_checkpoints=3)


@pytest.fixture(scope="module")
def replicas_reference(base_checkpoint, tmp_path_factory):
    """(records, final weights) of 2 data-parallel replicas, which the sliced and sharded runs match."""
    from dist import run_dist

    out = tmp_path_factory.mktemp("grpo_dp") / "dp"
    (records, weights), _ = run_dist(grpo_layout_rank, 2, str(base_checkpoint), str(out), LAYOUT_SETTINGS, 1, "none",
                                     init=False, timeout=150)
    return records, weights


@pytest.mark.parametrize("layout", ["ep2", "fsdp_full"])
def test_sliced_and_sharded_grpo_equals_the_replicas(layout, replicas_reference, base_checkpoint, tmp_path):
    """2 ranks with the routed experts sliced over them (--ep 2) or FSDP2 shards of everything
    (--sharding full), the reference model held the same way: every forward is collective, so the
    ranks decode in step and run as many log-probability forwards and backwards (their prompts have
    different lengths: a rank with fewer lengths repeats one, uncounted). Each rank samples with the
    generator a replica would, so the completions, rewards and token counts are the replicas' and
    the losses, KL, gradient norms and final weights theirs within FP32 rounding. The checkpoints
    load in one process with the final weights, and a resume from the step-2 checkpoint (the
    reference read again in the run's layout) ends as the uninterrupted run to the bit."""
    from dist import run_dist

    ep, sharding = {"ep2": (2, "none"), "fsdp_full": (1, "full")}[layout]
    want, want_weights = replicas_reference
    s, out = LAYOUT_SETTINGS, tmp_path / "whole"
    (records, weights), (records1, _) = run_dist(grpo_layout_rank, 2, str(base_checkpoint), str(out), s, ep, sharding,
                                                 init=False, timeout=150)
    assert without_seconds(records) == without_seconds(records1)
    assert [r["step"] for r in records] == [1, 2, 3]
    for a, b in zip(records, want):
        for key in ("reward", "accuracy", "format", "completion_tokens"):
            assert a[key] == b[key], (layout, key, a, b)
        for key in ("loss", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (layout, key, a, b)
    assert any(r["kl"] > 0 for r in records[1:])  # the reference is in play
    for name, w in want_weights.items():  # (AdamW takes a step of up to lr for a gradient entry near zero
        # whatever its rounding: a few entries may differ by a small part of lr = 1e-3)
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=5e-5, msg=name)
    saved, _ = ckpt.load_trained_model(out, "cpu")
    assert all(torch.equal(v, weights[k]) for k, v in saved.state_dict().items())

    shutil.copytree(out, tmp_path / "part")  # stopped after the step-2 checkpoint
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_0000003")
    (rest, rest_weights), _ = run_dist(grpo_layout_rank, 2, str(base_checkpoint), str(tmp_path / "part"), s, ep,
                                       sharding, resume=True, init=False, timeout=150)
    assert without_seconds(rest) == without_seconds(records[2:])
    assert all(torch.equal(rest_weights[k], weights[k]) for k in weights)
