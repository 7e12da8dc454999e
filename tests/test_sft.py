"""Supervised fine-tuning (posttrain/sft.py, `moeforge sft`, `moeforge sft-data`).

- collate: the targets are exactly the response tokens and the end-of-text, at the positions that
  predict them; the prompt and the padding are IGNORE_INDEX;
- the loss equals a hand-computed mean of -log p over the response positions of a full forward, and
  its gradient reaches the final hidden state only at those positions (never at a prompt position or
  the padding);
- an example's loss is the same alone and padded in a batch with a longer one;
- packing (--pack N): every example once, whole, in rows of N with its own document number; a packed
  batch's loss and gradients equal the padded batch's within rounding (and differ without the
  document mask); a packed run fine-tunes end to end through the command;
- bad data and settings end as one-line errors naming the file and line, with nothing written;
- the arithmetic generator is deterministic, and every worked step and answer it writes is right;
- end to end: 40 steps on 180 generated examples lower the held-out response loss of a
  random-initialised model by more than half; the checkpoint loads, `generate` and `grpo` read it;
- --resume: a run stopped and resumed ends bit for bit as the uninterrupted run; what would not
  continue the run (no checkpoint, another --checkpoint, --data or setting) is one line.
- under torchrun: 2 data-parallel ranks, 2 with the experts sliced over them (--ep 2) and 2 with FSDP
  (--sharding full) equal one process within FP32 rounding; the held-out loss keeps the ranks in step;
  the sliced and sharded runs' checkpoints load in one process and resume under the same layout (to
  the bit) and in one process; layouts that cannot run are one line.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil

import pytest
import torch

from conftest import POSTTRAIN_MODEL, interrupted_after, read_metrics, without_seconds
from moeforge.config import load_config
from moeforge.errors import MoeforgeError
from moeforge.model import build_model
from moeforge.model.mtp import IGNORE_INDEX
from moeforge.posttrain.settings import GRPOSettings, SFTSettings
from moeforge.posttrain.sft import Example, collate, pack, response_loss, train_sft, write_examples
from moeforge.posttrain.tasks import THINK_END, THINK_START, Arithmetic
from moeforge.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, None, POSTTRAIN_MODEL)
    torch.manual_seed(3)
    return build_model(cfg.model, "cpu")


def test_collate_scores_only_the_response():
    short = Example(1, [11, 12, 13], [21, 22, 0])  # 0: the end-of-text
    long = Example(2, [11], [21, 22, 23, 24, 0])
    inputs, targets = collate([short, long], pad_id=0)
    I = IGNORE_INDEX
    assert inputs.tolist() == [[11, 12, 13, 21, 22], [11, 21, 22, 23, 24]]
    assert targets.tolist() == [[I, I, 21, 22, 0], [21, 22, 23, 24, 0]]


def test_loss_is_the_mean_over_response_positions(model):
    torch.manual_seed(0)
    examples = [Example(1, [5, 9, 300, 41], [77, 78, 1]), Example(2, [7, 8], [90, 91, 92, 93, 94, 1]),
                Example(3, [12, 13, 14, 15, 16, 17], [1])]
    inputs, targets = collate(examples, pad_id=1)
    # by hand: -log p(token t+1 | tokens <= t) of a full forward, at each response position
    logp = model(inputs).log_softmax(-1)
    picked = []
    for i, e in enumerate(examples):
        seq = e.prompt + e.response
        picked += [-logp[i, t, seq[t + 1]] for t in range(len(e.prompt) - 1, len(seq) - 1)]
    want = torch.stack(picked).mean()
    got, n = response_loss(model, inputs, targets)
    assert n == len(picked) == 3 + 6 + 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # the gradient reaches the final hidden state exactly at the scored positions
    saved = {}
    hook = model.norm.register_forward_hook(lambda module, args, out: saved.__setitem__("h", out))
    try:
        loss, _ = response_loss(model, inputs, targets)
        saved["h"].retain_grad()
        loss.backward()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    reached = saved["h"].grad.abs().sum(-1) > 0  # [B, S]
    assert torch.equal(reached, targets != IGNORE_INDEX)


def test_padding_does_not_change_an_example_loss(model):
    a = Example(1, [5, 9, 300], [77, 78, 79, 1])
    b = Example(2, [31, 32, 33, 34, 35, 36, 37], [40, 41, 42, 43, 44, 45, 46, 47, 1])  # longer: a is padded

    def per_example(batch):
        inputs, targets = collate(batch, pad_id=1)
        losses = model(inputs, targets=targets)
        return losses.sum(1) / (targets != IGNORE_INDEX).sum(1)

    with torch.no_grad():
        alone, batched = per_example([a]), per_example([a, b])
        batch_loss, n = response_loss(model, *collate([a, b], pad_id=1))
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-6)
    # the batch's loss weighs each response token the same: 4 of a's, 9 of b's
    torch.testing.assert_close(batch_loss, (4 * batched[0] + 9 * batched[1]) / 13)
    assert n == 13


def test_pack_places_every_example_once():
    I = IGNORE_INDEX
    a = Example(1, [11, 12], [21, 0])  # 3 positions
    b = Example(2, [13], [22, 23, 24, 25, 0])  # 5
    c = Example(3, [14, 15, 16], [26, 0])  # 4
    d = Example(4, [17], [0])  # 1
    inputs, targets, doc_ids = pack([a, b, c, d], length=8, pad_id=0)
    # longest first, first fit: b (5) then a (3) fill row 0; c (4) opens row 1, d (1) follows it
    assert inputs.tolist() == [[13, 22, 23, 24, 25, 11, 12, 21], [14, 15, 16, 26, 17, 0, 0, 0]]
    assert targets.tolist() == [[22, 23, 24, 25, 0, I, 21, 0], [I, I, 26, 0, 0, I, I, I]]
    assert doc_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 2, 2, 2]]
    # each example's stretch of its row is its collate row, without the padding
    for e, (row, start) in zip([a, b, c, d], [(0, 5), (0, 0), (1, 0), (1, 4)]):
        want_inputs, want_targets = collate([e], pad_id=0)
        n = want_inputs.shape[1]
        assert inputs[row, start:start + n].tolist() == want_inputs[0].tolist()
        assert targets[row, start:start + n].tolist() == want_targets[0].tolist()
    with pytest.raises(ValueError, match="5 positions does not fit a packed row of 4"):
        pack([a, b], length=4, pad_id=0)


def test_packed_batch_equals_the_padded_batch(model):
    """The same examples padded (one row each) and packed (attention within each example): the same
    loss over the same scored tokens and the same gradients, up to rounding (RoPE is relative, and
    the packed positions are others); without the document mask the packed loss differs."""
    from moeforge.posttrain.sft import batch_tensors

    rng = random.Random(5)
    examples = [Example(i, [rng.randrange(2, 500) for _ in range(rng.randrange(1, 9))],
                        [rng.randrange(2, 500) for _ in range(rng.randrange(0, 12))] + [1]) for i in range(7)]

    def loss_and_grads(inputs, targets, doc_ids):
        model.zero_grad(set_to_none=True)
        loss, n = response_loss(model, inputs, targets, doc_ids)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), n, grads

    padded = loss_and_grads(*batch_tensors(examples, pad_id=1))
    inputs, targets, doc_ids = batch_tensors(examples, pad_id=1, pack_length=24)
    assert inputs.shape[0] < len(examples) and inputs.numel() < collate(examples, pad_id=1)[0].numel()
    packed = loss_and_grads(inputs, targets, doc_ids)
    assert packed[1] == padded[1]
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-6)
    assert packed[2].keys() == padded[2].keys()
    for k in padded[2]:
        torch.testing.assert_close(packed[2][k], padded[2][k], rtol=1e-4, atol=1e-6, msg=k)
    # the MTP module's losses too: its targets stop at each packed example's end, as the padding stops them
    from moeforge.posttrain.sft import response_losses

    with torch.no_grad():
        sums_padded, n_padded = response_losses(model, *batch_tensors(examples, pad_id=1), depth=1)
        sums_packed, n_packed = response_losses(model, inputs, targets, doc_ids, depth=1)
    # depth 1 scores position i's guess at token i + 2: every response token but after a 1-token prompt the first
    assert n_packed == n_padded and n_padded[1] == sum(len(e.response) - (len(e.prompt) == 1) for e in examples)
    torch.testing.assert_close(sums_packed, sums_padded, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # per target: without the mask the later examples of a row see the earlier ones
        from moeforge.model.attention import document_mask

        masked = model(inputs, targets=targets, mask=document_mask(doc_ids))
        unmasked = model(inputs, targets=targets)
    later = doc_ids > 0
    assert (masked - unmasked)[~later].abs().max() < 1e-5
    assert (masked - unmasked)[later].abs().max() > 1e-3


class TargetIdLoss(torch.nn.Module):
    """A stand-in model whose loss for a target is the target's token id, counting its forwards."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(1, 1)
        self.forwards = 0

    def forward(self, inputs, targets):
        self.forwards += 1
        return torch.where(targets != IGNORE_INDEX, targets.float(), 0.0)


def test_heldout_loss_keeps_the_ranks_in_step(monkeypatch):
    """With N data ranks each scores examples rank::N, and every rank runs as many forwards as the
    largest share needs (expert-parallel and FSDP forwards talk to the other ranks): 5 examples in
    batches of 2 over 2 ranks are shares of 3 and 2, 2 forwards on each rank; rank 1's second is a
    stand-in whose loss is not counted. Each rank's sums are exactly its own examples' (the all-reduce
    left out here)."""
    from types import SimpleNamespace

    from moeforge.posttrain import sft

    monkeypatch.setattr(sft, "all_reduce_sum", lambda values, ctx, device: values)  # this rank's sums alone
    examples = [Example(i, [7], [10 * i + 1, 10 * i + 2]) for i in range(5)]
    for rank in (0, 1):
        model, share = TargetIdLoss(), examples[rank::2]
        got = sft.heldout_loss(model, examples, 2, 0, ctx=SimpleNamespace(data_rank=rank, data_ranks=2))
        assert model.forwards == 2
        assert got == pytest.approx(sum(sum(e.response) for e in share) / sum(len(e.response) for e in share),
                                    rel=1e-6)
    model = TargetIdLoss()
    assert sft.heldout_loss(model, examples, 2, 0) == pytest.approx(sum(10 * i + 1.5 for i in range(5)) / 5)
    assert model.forwards == 3  # one process: its 3 batches


def write_jsonl(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "1+2=", "response": "3"})


@pytest.mark.parametrize("lines, flags, fragments", [
    ([GOOD, '{"prompt": "1+1=", "response": "2"', GOOD], [], ["line 2", "invalid JSON"]),
    (["[1, 2]"], [], ["line 1", "expected an object"]),
    ([GOOD, GOOD, json.dumps({"prompt": "1+1="})], [], ["line 3", 'no "response"']),
    ([json.dumps({"prompt": 5, "response": "5"})], [], ["line 1", '"prompt" must be a string, got int']),
    ([GOOD, json.dumps({"prompt": "", "response": "0"})], [], ["line 2", "prompt is empty"]),
    ([GOOD, json.dumps({"prompt": "x=", "response": " y" * 70})], [], ["line 2", "more than the model's context of 64"]),
    ([GOOD, json.dumps({"prompt": "12+7=", "response": "19, and then some more"})], ["--max-len", "8"], ["line 2", "--max-len 8"]),
    ([GOOD], ["--max-len", "100"], ["--max-len 100", "context of 64"]),
    ([GOOD, GOOD], ["--pack", "65"], ["--pack 65", "context of 64"]),
    ([GOOD, json.dumps({"prompt": "12+7=", "response": "19, and then some more"})], ["--pack", "6"],
     ["line 2", "--pack 6 + 1"]),
    ([GOOD, GOOD], ["--pack", "-1"], ["--pack"]),
    ([], [], ["holds no examples"]),
    (["", "   "], [], ["holds no examples"]),
    ([GOOD], [], ["holds 1 example", "at least 2"]),
    ([GOOD, GOOD], ["--batch-size", "0"], ["--batch-size"]),
])
def test_bad_data_is_one_line(cli, expect_error, base_checkpoint, tmp_path, lines, flags, fragments):
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    r = cli("sft", "--checkpoint", base_checkpoint, "--data", data, "--out", tmp_path / "o", "--no-progress", *flags)
    line = expect_error(r, "sft", *fragments)
    if "line " in fragments[0] or "holds" in fragments[0]:
        assert "bad.jsonl" in line  # the file is named
    assert not (tmp_path / "o").exists()


def test_missing_and_unreadable_data(cli, expect_error, base_checkpoint, tmp_path):
    expect_error(cli("sft", "--checkpoint", base_checkpoint, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "o"),
                 "sft", "none.jsonl", "does not exist")
    (tmp_path / "latin1.jsonl").write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "x"}\n')
    expect_error(cli("sft", "--checkpoint", base_checkpoint, "--data", tmp_path / "latin1.jsonl", "--out", tmp_path / "o"),
                 "sft", "latin1.jsonl", "line 2", "UTF-8")
    assert not (tmp_path / "o").exists()


STEP = re.compile(r"(\d+)([+-])(\d+)(?:([+-])1)?=(\d+)")


def check_worked_example(prompt: str, response: str) -> None:
    """The chain's every step is a true equation, its columns make the answer, and the answer is right."""
    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
    answer = int(a) + int(b) if op == "+" else int(a) - int(b)
    chain = re.fullmatch(rf"{THINK_START}(.*) -> (\d+){THINK_END}(\d+)", response)
    assert chain is not None, response
    steps, in_think, final = chain.group(1).split(", "), int(chain.group(2)), int(chain.group(3))
    assert in_think == final == answer, (prompt, response)
    assert len(steps) == max(len(a), len(b))
    columns = []
    for step in steps:
        assert STEP.fullmatch(step), step
        lhs, rhs = step.split("=")
        assert eval(lhs) == int(rhs), step  # e.g. "4+3+1=8", "15-8=7" (a borrowed ten)
        columns.append(int(rhs))
    total = sum(v % 10 * 10 ** i for i, v in enumerate(columns))
    if op == "+":
        total += columns[-1] // 10 * 10 ** len(columns)  # the last carry
    assert total == answer, (prompt, response)
    assert Arithmetic().reward(response, str(answer)) == 1.0


def test_sft_data_is_deterministic_and_right(cli, expect_error, tmp_path):
    for name, seed in (("a.jsonl", 0), ("b.jsonl", 0), ("c.jsonl", 1)):
        r = cli("sft-data", "--task", "arithmetic", "--n", "500", "--out", tmp_path / name, "--seed", seed)
        assert r.rc == 0, r.err
    a, b, c = ((tmp_path / n).read_bytes() for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    assert a == b and a != c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]  # no temporary left
    rows = [json.loads(line) for line in a.decode().splitlines()]
    assert len(rows) == 500 and {"+" if "+" in row["prompt"] else "-" for row in rows} == {"+", "-"}
    for row in rows:
        check_worked_example(row["prompt"], row["response"])
    for prompt in ("99+99=", "100-1=", "50-5=", "0-0=", "3+4="):  # carries and borrows across every column
        check_worked_example(prompt, Arithmetic.worked_solution(prompt))
    expect_error(cli("sft-data", "--task", "python_syntax", "--out", tmp_path / "d.jsonl"), "sft-data",
                 "python_syntax", "no worked examples")
    expect_error(cli("sft-data", "--out", tmp_path), "sft-data", "is a folder")
    expect_error(cli("sft-data", "--n", "0", "--out", tmp_path / "d.jsonl"), "sft-data", "--n")
    assert not (tmp_path / "d.jsonl").exists()


def test_sft_learns_and_writes_a_checkpoint(base_checkpoint, tmp_path, one_thread, cli):
    data = write_examples(tmp_path / "arith.jsonl", Arithmetic().demonstrations(200, random.Random(0)))
    s = SFTSettings(steps=40, batch_size=16, lr=3e-3, warmup=5, val_fraction=0.1, eval_every=20, checkpoint_every=20)
    records = train_sft(base_checkpoint, data, tmp_path / "sft", s, device="cpu", progress=False)
    evals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [step for step, _ in evals] == [0, 20, 40]
    (_, before), (_, after) = evals[0], evals[-1]
    assert after < 0.5 * before, evals  # from about ln(vocab) = 9.0 to about 3.3
    assert read_metrics(tmp_path / "sft") == records
    assert all({"loss", "tokens", "lr", "grad_norm", "seconds"} <= set(r) for r in records[1:])
    assert records[1]["lr"] == pytest.approx(3e-3 / 5) and records[6]["lr"] == pytest.approx(3e-3)  # warm-up
    assert records[-1]["lr"] < records[6]["lr"]  # then the cosine
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "sft" / "checkpoints")] == ["step_0000020", "step_0000040"]

    tuned, cfg = ckpt.load_trained_model(tmp_path / "sft", "cpu")
    base, _ = ckpt.load_trained_model(base_checkpoint, "cpu")
    assert cfg.model == load_config(None, None, POSTTRAIN_MODEL).model
    old, new = base.state_dict(), tuned.state_dict()
    assert not torch.equal(old["layers.0.attn.wkv_a.weight"], new["layers.0.attn.wkv_a.weight"])
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("mtp."))  # MTP is not trained here

    r = cli("generate", "--checkpoint", tmp_path / "sft", "--prompt", "12+7=", "--max-new-tokens", "6",
            "--temperature", "0")
    assert r.rc == 0 and r.out.startswith("12+7="), r.err
    r = cli("grpo", "--checkpoint", tmp_path / "sft", "--out", tmp_path / "rl", "--steps", "1",
            "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "8", "--no-progress")
    assert r.rc == 0, r.err


def test_mtp_fine_tuning(base_checkpoint, tmp_path, one_thread):
    """--mtp-weight W: the MTP module is fine-tuned on the response tokens too (its loss, logged as
    mtp_loss, falls; its weights change, as they do not without it), and the main model's first step
    is the run without it's plus the MTP term's gradient (the same loss at step 1)."""
    data = write_examples(tmp_path / "arith.jsonl", Arithmetic().demonstrations(80, random.Random(0)))
    s = SFTSettings(steps=10, batch_size=8, lr=3e-3, warmup=2, val_fraction=0.1, eval_every=0)
    plain = train_sft(base_checkpoint, data, tmp_path / "plain", s, device="cpu", progress=False)
    mtp = train_sft(base_checkpoint, data, tmp_path / "mtp", dataclasses.replace(s, mtp_weight=0.3), device="cpu",
                    progress=False)
    assert "mtp_loss" not in plain[1] and mtp[1]["loss"] == pytest.approx(plain[1]["loss"], rel=1e-6)
    falls = [r["mtp_loss"] for r in mtp[1:]]
    assert all(b < a for a, b in zip(falls, falls[1:])) and falls[-1] < 0.9 * falls[0], falls
    base = final_weights(base_checkpoint)
    for run, changed in (("plain", False), ("mtp", True)):
        got = final_weights(tmp_path / run)
        assert any(not torch.equal(got[k], base[k]) for k in base if k.startswith("mtp.")) == changed, run


def test_sft_command(cli, base_checkpoint, tmp_path):
    data = tmp_path / "d.jsonl"
    assert cli("sft-data", "--n", "20", "--out", data).rc == 0
    r = cli("sft", "--checkpoint", base_checkpoint, "--data", data, "--out", tmp_path / "o", "--steps", "2",
            "--batch-size", "4", "--warmup", "0", "--schedule", "constant", "--no-progress")
    assert r.rc == 0, r.err
    assert re.search(r"held-out loss [\d.]+ before, [\d.]+ after 2 steps", r.out), r.out
    records = read_metrics(tmp_path / "o")
    assert [r["step"] for r in records] == [0, 1, 2] and records[1]["lr"] == records[2]["lr"] == SFTSettings().lr
    assert ckpt.list_checkpoints(tmp_path / "o" / "checkpoints")[-1].name == "step_0000002"
    r = cli("sft", "--checkpoint", base_checkpoint, "--data", data, "--out", tmp_path / "o", "--steps", "2")
    assert r.rc == 2 and "already holds a run" in r.err  # no second run mixed into the first
    assert read_metrics(tmp_path / "o") == records
    # packed: the same steps on the same batches, the losses the padded run's up to rounding
    r = cli("sft", "--checkpoint", base_checkpoint, "--data", data, "--out", tmp_path / "p", "--steps", "2",
            "--batch-size", "4", "--warmup", "0", "--schedule", "constant", "--no-progress", "--pack", "64")
    assert r.rc == 0, r.err
    packed = read_metrics(tmp_path / "p")
    for a, b in zip(packed, records):
        for key in ("val_loss", "loss", "grad_norm", "tokens"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4), key


def final_weights(run) -> dict:
    return ckpt.load_trained_model(run, "cpu")[0].state_dict()


def test_resume_continues_the_run_bit_for_bit(base_checkpoint, tmp_path, one_thread):
    """A run stopped after step 3 (its last checkpoint at step 2, step 3's record already written)
    and resumed ends as the uninterrupted run: the same weights to the bit and the same metrics, step
    3's record once. Each restored piece decides something checked here: the weights and the batch
    order step 3's loss (a fresh order would draw step 1's examples again: 38 of the epoch's 54 are
    left after step 2), the AdamW moments the weights after step 3, the token count every record,
    and the step the learning rate (mid-cosine)."""
    data = write_examples(tmp_path / "arith.jsonl", Arithmetic().demonstrations(60, random.Random(0)))
    s = SFTSettings(steps=5, batch_size=8, lr=3e-3, warmup=2, val_fraction=0.1, eval_every=2, checkpoint_every=2,
                    keep_checkpoints=5)
    whole = train_sft(base_checkpoint, data, tmp_path / "whole", s, device="cpu", progress=False)
    with interrupted_after(3):
        train_sft(base_checkpoint, data, tmp_path / "part", s, device="cpu", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "part" / "checkpoints")] == ["step_0000002"]
    assert [r["step"] for r in read_metrics(tmp_path / "part")] == [0, 1, 2, 3]
    rest = train_sft(base_checkpoint, data, tmp_path / "part", s, device="cpu", progress=False, resume=True)
    assert [r["step"] for r in rest] == [3, 4, 5]
    assert without_seconds(read_metrics(tmp_path / "part")) == without_seconds(whole)
    assert len({r["lr"] for r in whole[3:]}) == 3  # the steps after the resume: each its own lr (the cosine)
    want, got = final_weights(tmp_path / "whole"), final_weights(tmp_path / "part")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_refuses_what_would_not_continue_the_run(cli, expect_error, base_checkpoint, tmp_path):
    """--resume with no checkpoint, with another --checkpoint, --data (path or contents) or setting,
    or without steps left is one line and changes nothing; without --resume a used --out is refused
    with a pointer to --resume. A resume with a larger --steps goes on from the last step."""
    data, other = tmp_path / "d.jsonl", tmp_path / "other.jsonl"
    assert cli("sft-data", "--n", "20", "--out", data).rc == 0
    assert cli("sft-data", "--n", "20", "--seed", "1", "--out", other).rc == 0
    out = tmp_path / "o"
    run = ["--checkpoint", base_checkpoint, "--out", out, "--warmup", "0", "--no-progress"]
    args = [*run, "--data", data, "--batch-size", "4"]
    expect_error(cli("sft", *args, "--steps", "2", "--resume"), "sft", "--resume", "no checkpoint under")
    assert not out.exists()
    assert cli("sft", *args, "--steps", "2").rc == 0
    records = read_metrics(out)
    expect_error(cli("sft", *args, "--steps", "3"), "sft", "already holds a run", "pass --resume")
    expect_error(cli("sft", *run, "--data", other, "--batch-size", "4", "--steps", "3", "--resume"), "sft",
                 "--data", "other.jsonl")
    expect_error(cli("sft", *args, "--steps", "3", "--batch-size", "2", "--resume"), "sft", "--batch-size 4, not 2")
    expect_error(cli("sft", *args, "--steps", "3", "--seed", "1", "--resume"), "sft", "--seed 0, not 1")
    expect_error(cli("sft", "--checkpoint", tmp_path / "elsewhere", *args[2:], "--steps", "3", "--resume"), "sft",
                 "--checkpoint", "elsewhere")
    expect_error(cli("sft", *args, "--steps", "2", "--resume"), "sft", "done 2 steps", "--steps above 2")
    saved = data.read_bytes()
    data.write_bytes(other.read_bytes())
    expect_error(cli("sft", *args, "--steps", "3", "--resume"), "sft", "--data contents of SHA-256")
    data.write_bytes(saved)
    assert read_metrics(out) == records
    r = cli("sft", *args, "--steps", "3", "--resume", "--eval-every", "1")
    assert r.rc == 0 and "resumed after step 2; held-out loss" in r.out, r.err
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3] and read_metrics(out)[:3] == records
    assert ckpt.list_checkpoints(out / "checkpoints")[-1].name == "step_0000003"


def test_bf16_autocast_fine_tuning(base_checkpoint, tmp_path, one_thread, cli):
    """--precision bf16 runs the forwards under BF16 autocast: the held-out loss before training is
    FP32's within BF16 rounding but not equal to it (autocast was on), and training lowers it as in
    FP32; GRPO samples and trains the same way. A precision other than fp32/bf16 is refused."""
    data = write_examples(tmp_path / "arith.jsonl", Arithmetic().demonstrations(120, random.Random(0)))
    runs = {}
    for precision in ("fp32", "bf16"):
        s = SFTSettings(steps=12, batch_size=8, lr=3e-3, warmup=2, val_fraction=0.1, eval_every=0,
                        precision=precision)
        runs[precision] = train_sft(base_checkpoint, data, tmp_path / precision, s, device="cpu", progress=False)
    before = {p: r[0]["val_loss"] for p, r in runs.items()}
    assert before["bf16"] != before["fp32"] and before["bf16"] == pytest.approx(before["fp32"], rel=2e-2)
    assert runs["bf16"][-1]["val_loss"] < 0.8 * before["bf16"]
    r = cli("grpo", "--checkpoint", tmp_path / "bf16", "--out", tmp_path / "rl", "--steps", "1", "--prompts-per-step",
            "1", "--group-size", "2", "--max-new-tokens", "4", "--precision", "bf16", "--no-progress")
    assert r.rc == 0, r.err
    with pytest.raises(MoeforgeError, match="--precision"):
        SFTSettings(precision="fp16").validate()
    with pytest.raises(MoeforgeError, match="--precision"):
        GRPOSettings(precision="fp8").validate()  # (GRPO samples: no FP8 there)


def test_fp8_fine_tuning(base_checkpoint, tmp_path, one_thread, cli):
    """--precision fp8: the blocks' GEMMs in FP8 with DeepSeek-V3's recipe (on a CPU the exact
    emulation): the held-out loss before training is FP32's within FP8 rounding and not equal to it,
    training lowers it as in FP32, ending within a few percent of the FP32 run, and the checkpoint is
    an ordinary one (the same parameters; generate reads it). Under --resume the run continues bit for
    bit (the model is built in FP8 again)."""
    from moeforge.fp8.linear import FP8Linear

    data = write_examples(tmp_path / "arith.jsonl", Arithmetic().demonstrations(120, random.Random(0)))
    runs = {}
    s = SFTSettings(steps=12, batch_size=8, lr=3e-3, warmup=2, val_fraction=0.1, eval_every=0, checkpoint_every=6,
                    keep_checkpoints=3)
    for precision in ("fp32", "fp8"):
        runs[precision] = train_sft(base_checkpoint, data, tmp_path / precision, dataclasses.replace(s, precision=precision),
                                    device="cpu", progress=False)
    before = {p: r[0]["val_loss"] for p, r in runs.items()}
    after = {p: r[-1]["val_loss"] for p, r in runs.items()}
    assert before["fp8"] != before["fp32"] and before["fp8"] == pytest.approx(before["fp32"], rel=1e-2)
    assert after["fp8"] < 0.8 * before["fp8"] and after["fp8"] == pytest.approx(after["fp32"], rel=5e-2), (before, after)
    tuned, _ = ckpt.load_trained_model(tmp_path / "fp8", "cpu")
    assert not any(isinstance(m, FP8Linear) for m in tuned.modules())
    assert set(tuned.state_dict()) == set(final_weights(tmp_path / "fp32"))
    r = cli("generate", "--checkpoint", tmp_path / "fp8", "--prompt", "12+7=", "--max-new-tokens", "4")
    assert r.rc == 0, r.err

    shutil.copytree(tmp_path / "fp8", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_0000012")
    rest = train_sft(base_checkpoint, data, tmp_path / "part", dataclasses.replace(s, precision="fp8"), device="cpu",
                     progress=False, resume=True)
    assert without_seconds(rest) == without_seconds(runs["fp8"][7:])
    assert all(torch.equal(v, final_weights(tmp_path / "fp8")[k]) for k, v in final_weights(tmp_path / "part").items())


def sft_rank(checkpoint: str, data: str, out: str, settings: SFTSettings) -> list[dict]:
    """One rank of a data-parallel `train_sft` (tests/dist.py runs it in each process)."""
    return train_sft(checkpoint, data, out, settings, device="cpu", progress=False)


def test_data_parallel_sft_equals_one_process(base_checkpoint, tmp_path, one_thread):
    """Under torchrun each rank fine-tunes on its share of every batch (examples rank::ranks) and the
    gradients are averaged over the ranks, weighted so that the step's loss is still the mean over
    all the batch's scored tokens: the losses, held-out losses and final weights of 2 ranks equal one
    process's within FP32 summation order; rank 0 alone writes the run folder."""
    from dist import DistError, run_dist

    data = write_examples(tmp_path / "arith.jsonl", Arithmetic().demonstrations(60, random.Random(0)))
    s = SFTSettings(steps=6, batch_size=8, lr=1e-3, warmup=2, val_fraction=0.2, eval_every=3)
    ranks = run_dist(sft_rank, 2, str(base_checkpoint), str(data), str(tmp_path / "dp"), s, init=False, timeout=150)
    single = train_sft(base_checkpoint, data, tmp_path / "one", s, device="cpu", progress=False)
    assert [(r.get("loss"), r.get("val_loss")) for r in ranks[0]] == [(r.get("loss"), r.get("val_loss")) for r in ranks[1]]
    for got, want in zip(ranks[0], single):
        assert got["step"] == want["step"] and got.get("tokens") == want.get("tokens")
        for key in ("loss", "val_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), (key, got, want)
    assert read_metrics(tmp_path / "dp") == ranks[0]
    dp_model, _ = ckpt.load_trained_model(tmp_path / "dp", "cpu")
    one_model, _ = ckpt.load_trained_model(tmp_path / "one", "cpu")
    for (name, a), b in zip(dp_model.state_dict().items(), one_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(DistError, match="--batch-size 7 does not split evenly over the 2"):
        run_dist(sft_rank, 2, str(base_checkpoint), str(data), str(tmp_path / "bad"),
                 dataclasses.replace(s, batch_size=7), init=False)


def test_data_parallel_mtp_fine_tuning_equals_one_process(base_checkpoint, tmp_path, one_thread):
    """--mtp-weight on 2 data-parallel ranks: each depth's loss is weighted by the global count of its
    targets (the ranks' counts differ), so the losses, MTP losses and final weights are one process's
    within FP32 summation order."""
    from dist import run_dist

    data = write_examples(tmp_path / "arith.jsonl", Arithmetic().demonstrations(60, random.Random(1)))
    s = SFTSettings(steps=4, batch_size=8, lr=1e-3, warmup=1, val_fraction=0.2, eval_every=0, mtp_weight=0.3)
    ranks = run_dist(sft_rank, 2, str(base_checkpoint), str(data), str(tmp_path / "dp"), s, init=False, timeout=150)
    single = train_sft(base_checkpoint, data, tmp_path / "one", s, device="cpu", progress=False)
    for got, want in zip(ranks[0], single):
        for key in ("loss", "mtp_loss", "val_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), (key, got, want)
    dp_weights, one_weights = final_weights(tmp_path / "dp"), final_weights(tmp_path / "one")
    for name, w in one_weights.items():
        torch.testing.assert_close(dp_weights[name], w, rtol=1e-4, atol=1e-5, msg=name)


# --ep and --sharding: the model sliced and sharded over the ranks, against one process
LAYOUTS = {"ep2": (2, "none"), "fsdp_full": (1, "full")}  # name: (--ep, --sharding), on 2 ranks
# 45 examples: 36 to train on, 9 held out, which 2 ranks split 5 + 4: with batches of 4, rank 0 scores
# 2 batches and rank 1 one (it runs a second forward in step with rank 0, not counted)
LAYOUT_SETTINGS = SFTSettings(steps=4, batch_size=4, lr=1e-3, warmup=1, val_fraction=0.2, eval_every=2,
                              checkpoint_every=2, keep_checkpoints=5)


def sft_layout_rank(checkpoint: str, data: str, out: str, settings: SFTSettings, ep: int, sharding: str,
                    resume: bool = False) -> tuple[list[dict], dict]:
    """One rank of `train_sft --ep --sharding` (tests/dist.py runs it in each process): its records and
    the run's final weights, gathered to the single-process tensors."""
    from conftest import with_full_weights
    from moeforge.posttrain import sft

    return with_full_weights(sft, lambda: train_sft(checkpoint, data, out, settings, device="cpu", progress=False,
                                                    resume=resume, ep=ep, sharding=sharding))


@pytest.fixture(scope="module")
def layout_reference(base_checkpoint, tmp_path_factory):
    """(data, records, final weights, run folder) of the one-process run the layouts are compared with."""
    from conftest import single_process

    root = tmp_path_factory.mktemp("sft_layouts")
    data = write_examples(root / "arith.jsonl", Arithmetic().demonstrations(45, random.Random(0)))
    records = single_process(lambda: train_sft(base_checkpoint, data, root / "one", LAYOUT_SETTINGS, device="cpu",
                                               progress=False), root)
    return data, records, final_weights(root / "one"), root / "one"


def assert_records_close(got: list[dict], want: list[dict], what: str) -> None:
    """The same steps and token counts; losses, held-out losses and gradient norms within FP32
    summation order (each rank computes on its share of the rows, the reductions add in another order)."""
    assert [(r["step"], r["tokens"]) for r in got] == [(r["step"], r["tokens"]) for r in want], what
    for a, b in zip(got, want):
        assert set(a) == set(b), what
        for key in ("loss", "val_loss", "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (what, key, a, b)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_sft_equals_one_process(layout, layout_reference, base_checkpoint, tmp_path, cli):
    """2 ranks with the routed experts sliced over them (--ep 2: the all-to-all dispatcher; gradients
    all-reduced, the experts' over their dp replicas only) or with FSDP2 shards of everything
    (--sharding full: gradients reduce-scattered): the losses, held-out losses (9 examples, which the
    ranks score in 2 and 1 batches: every rank still runs 2 forwards), gradient norms before clipping
    (clipping is active) and final weights equal one process's within FP32 rounding. The checkpoints
    are DCP pieces of every rank: they load in one process (load_trained_model) with the run's final
    weights to the bit, and `grpo --checkpoint` reads them. A resume from the step-2 checkpoint under
    the same layout ends as the uninterrupted run to the bit, and one in one process within FP32
    rounding; the one-process run's step-2 checkpoint (model.pt, optimizer.pt) resumes under the
    layout, sliced and sharded, within FP32 rounding of its own end."""
    import shutil

    from dist import run_dist

    ep, sharding = LAYOUTS[layout]
    data, want, want_weights, one_run = layout_reference
    s, out = LAYOUT_SETTINGS, tmp_path / "whole"
    (records, weights), (records1, weights1) = run_dist(sft_layout_rank, 2, str(base_checkpoint), str(data), str(out),
                                                        s, ep, sharding, init=False, timeout=150)
    assert without_seconds(records) == without_seconds(records1)
    assert all(torch.equal(weights[k], weights1[k]) for k in weights)
    assert any(r["grad_norm"] > s.grad_clip for r in want[1:])  # the clipping changes the steps
    assert_records_close(records, want, layout)
    assert read_metrics(out) == records
    for name, w in want_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=1e-5, msg=name)

    found = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in found] == ["step_0000002", "step_0000004"] and all(ckpt.is_distributed(p) for p in found)
    saved = final_weights(out)
    assert set(saved) == set(weights) and all(torch.equal(saved[k], weights[k]) for k in weights)
    base = final_weights(base_checkpoint)
    assert all(torch.equal(saved[k], base[k]) for k in base if k.startswith("mtp."))  # MTP is not trained here

    r = cli("grpo", "--checkpoint", out, "--out", tmp_path / "rl", "--steps", "1", "--prompts-per-step", "1",
            "--group-size", "2", "--max-new-tokens", "4", "--no-progress")
    assert r.rc == 0, r.err

    for part, run in (("same", out), ("one", out), ("from_one", one_run)):  # stopped after the step-2 checkpoint
        shutil.copytree(run, tmp_path / part)
        shutil.rmtree(tmp_path / part / "checkpoints" / "step_0000004")
    rest = run_dist(sft_layout_rank, 2, str(base_checkpoint), str(data), str(tmp_path / "same"), s, ep, sharding,
                    resume=True, init=False, timeout=150)
    assert [r["step"] for r in rest[0][0]] == [3, 4]
    assert without_seconds(read_metrics(tmp_path / "same")) == without_seconds(records)
    assert all(torch.equal(rest[0][1][k], weights[k]) for k in weights)
    one = train_sft(base_checkpoint, data, tmp_path / "one", s, device="cpu", progress=False, resume=True)
    assert_records_close(one, records[3:], f"{layout} resumed in one process")
    for name, w in final_weights(tmp_path / "one").items():
        torch.testing.assert_close(w, weights[name], rtol=1e-4, atol=1e-5, msg=name)
    (rest, rest_weights), _ = run_dist(sft_layout_rank, 2, str(base_checkpoint), str(data), str(tmp_path / "from_one"),
                                       s, ep, sharding, resume=True, init=False, timeout=150)
    assert_records_close(rest, want[3:], f"one process resumed under {layout}")
    for name, w in want_weights.items():
        torch.testing.assert_close(rest_weights[name], w, rtol=1e-4, atol=1e-5, msg=name)


def sft_layout_errors(checkpoint: str, odd_checkpoint: str, data: str, out: str, s: SFTSettings) -> list[str]:
    """One rank: the MoeforgeError of each layout 2 ranks cannot run (tests/dist.py runs it in each process)."""
    import torch.distributed as dist

    cases = [(checkpoint, s, 3, "none"), (odd_checkpoint, s, 2, "none"),
             (checkpoint, dataclasses.replace(s, batch_size=3), 2, "full")]
    errors = []
    for start, settings, ep, sharding in cases:
        with pytest.raises(MoeforgeError) as e:
            train_sft(start, data, out, settings, device="cpu", progress=False, ep=ep, sharding=sharding)
        errors.append(str(e.value))
    dist.barrier()  # (rank 0 holds the store: it leaves after the other rank has set up its last groups)
    return errors


@pytest.mark.parametrize("variant", ["pack", "fp8", "pack_fsdp"])
def test_packed_or_fp8_sft_under_expert_parallelism(variant, layout_reference, base_checkpoint, tmp_path):
    """With the experts sliced over 2 ranks: --pack (each rank packs its own share of a batch, its own
    number of rows, and the all-to-all carries whatever tokens they hold), or --precision fp8 (the
    FP8 experts' emulated GEMMs on each rank's slice); and --pack under FSDP2 (--sharding full, each
    rank's own rows through the sharded model): the losses, held-out losses and gradient norms
    equal the same one-process run's within FP32 rounding (FP8: within 0.1%, the Wgrads' tiles
    along the tokens hold other tokens). The packed run's equal the padded run's (layout_reference)
    within rounding too."""
    from dist import run_dist

    data, padded, _, _ = layout_reference
    change = {"pack": {"pack": 64}, "fp8": {"precision": "fp8"}, "pack_fsdp": {"pack": 64}}[variant]
    ep, sharding = (1, "full") if variant == "pack_fsdp" else (2, "none")
    s = dataclasses.replace(LAYOUT_SETTINGS, checkpoint_every=0, **change)
    one = train_sft(base_checkpoint, data, tmp_path / "one", s, device="cpu", progress=False)
    (records, _), (records1, _) = run_dist(sft_layout_rank, 2, str(base_checkpoint), str(data), str(tmp_path / "ep2"),
                                           s, ep, sharding, init=False, timeout=150)
    assert without_seconds(records) == without_seconds(records1)
    if variant.startswith("pack"):
        assert_records_close(records, one, f"packed, {variant}")
    else:  # every Wgrad quantises 1x128 tiles along the tokens, and each rank tiles its own (an expert's
        # arrive in another order through the all-to-all): other tiles, other FP8 rounding of the gradients
        assert [(r["step"], r["tokens"]) for r in records] == [(r["step"], r["tokens"]) for r in one]
        for a, b in zip(records, one):
            for key in ("loss", "val_loss", "grad_norm"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-3), ("fp8, --ep 2", key, a, b)
    if variant.startswith("pack"):
        for a, b in zip(one, padded):
            for key in ("loss", "val_loss", "grad_norm"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-4), ("packed against padded", key)
    else:  # (FP8 rounds: not the FP32 run's)
        assert one[0]["val_loss"] != padded[0]["val_loss"]


def test_layouts_that_cannot_run_are_one_line(cli, expect_error, base_checkpoint, tmp_path):
    """--ep and --sharding: without torchrun; an --ep that does not divide the ranks or the model's
    routed experts; a batch that does not split over the dp x ep ranks. Nothing is written."""
    from dist import run_dist

    data = tmp_path / "d.jsonl"
    assert cli("sft-data", "--n", "20", "--out", data).rc == 0
    run = ["--checkpoint", base_checkpoint, "--data", data, "--out", tmp_path / "o", "--steps", "1", "--no-progress"]
    expect_error(cli("sft", *run, "--ep", "2"), "sft", "--ep 2: ", "torchrun")
    expect_error(cli("sft", *run, "--sharding", "zero2"), "sft", "--sharding zero2: ", "torchrun")
    assert not (tmp_path / "o").exists()
    assert cli("sft", *run, "--ep", "1", "--sharding", "none").rc == 0  # what one process is anyway

    cfg = load_config(None, None, [*POSTTRAIN_MODEL, "model.n_routed_experts=3", "model.n_group=1", "model.topk_group=1"])
    odd = tmp_path / "odd"
    ckpt.save_checkpoint(odd / "checkpoints", 0, cfg, build_model(cfg.model, "cpu").state_dict(), {}, {"step": 0}, 1)
    errors = run_dist(sft_layout_errors, 2, str(base_checkpoint), str(odd), str(data), str(tmp_path / "bad"),
                      SFTSettings(steps=1, batch_size=4), init=False)
    assert errors[0] == errors[1] == [
        "--ep 3 does not divide the 2 ranks torchrun started",
        "--ep 2 does not divide the model's 3 routed experts",
        "--batch-size 3 does not split evenly over the 2 data-parallel ranks (dp 1 x ep 2)"]
    assert not (tmp_path / "bad").exists()
