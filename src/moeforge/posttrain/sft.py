"""Supervised fine-tuning (SFT) on prompt/response pairs: DeepSeek-R1's cold start (§2.3.1), a few
thousand curated reasoning examples before reinforcement learning, and its distillation of reasoning
into smaller models (§2.4), which is SFT on a teacher's outputs.

Data: a JSONL file, one {"prompt": str, "response": str} object per line (other keys are ignored,
blank lines skipped). An example is tokenised as
    tokens(prompt) + tokens(response) + [end-of-text]
the prompt and the response separately, so the prompt's tokens are the ones `generate` and GRPO
feed the model. A line may instead hold a conversation, {"messages": [{"role": ..., "content": ...},
...]}, rendered by the tokenizer's chat template (posttrain/chat.py): every assistant turn is scored,
the system and user turns are not; `generate --chat` prompts the fine-tuned model the same way. Nothing is truncated: an example longer than --max-len (default: the model's context)
is an error naming its line. The last val_fraction of the examples (at least one) are held out.

Loss: next-token cross-entropy on the targets that are response tokens or the end-of-text; the
model's prediction of a prompt token (or of a later user turn of a conversation) is not scored (its
target is IGNORE_INDEX). The loss of a batch
is the mean over all its scored tokens, so each response token weighs the same, whatever the length
of the response it belongs to.

Batches: batch_size examples drawn from the training examples shuffled anew each epoch, each padded
on the right to the longest of its batch. A padded position has no target, and attention is causal,
so no real position sees the padding that follows it: an example's losses are the same alone or in
any batch (tested). With pack = N (`--pack N`) a batch's examples are packed instead, one after
another in rows of N positions (first fit, longest first), and attention stays within each example
(attention.document_mask): for examples of very different lengths, far fewer padded positions. The
loss is the same mean over the same scored tokens; RoPE is relative, so an example's losses differ
from its padded row's only by rounding (tested). The main model's next-token path is trained, and
with mtp_weight (`--mtp-weight W`) the MTP modules too (each depth's response-token loss, a mean
over its own targets across the ranks, weighted W / depth); the routing biases stay as the
checkpoint has them.

Optimisation: AdamW (posttrain/common.py), a linear warm-up, then constant or cosine (train/schedule.py),
the gradient clipped to norm 1. FP32, the forwards under BF16 autocast (precision "bf16"), or the
blocks' GEMMs in FP8 with DeepSeek-V3's recipe (precision "fp8": common.load_model switches the
model to FP8 as it loads it; the parameters, and so the checkpoints, stay the same). One
process (CPU or one GPU), or under torchrun data parallel, with expert parallelism (--ep) and FSDP
sharding (--sharding) for a model that does not fit one device (train_sft). The run folder holds
metrics.jsonl and checkpoints in the trainer's format (common.py), so `moeforge generate`, `eval`,
`convert` and `grpo --checkpoint` read it; `--resume` continues a run from its newest checkpoint.

Shape legend: B examples in a batch, S the longest example's length less one.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ParallelConfig
from ..data.tokenizer import Tokenizer, atomic_write_text
from ..errors import MoeforgeError
from ..model.mtp import IGNORE_INDEX, shift_tokens
from ..parallel.data import clip_coefficient, global_grad_norm, scale_gradients, sync_gradients
from ..train.checkpoint import file_sha256
from ..train.schedule import lr_at
from ..train.step import autocast
from .common import all_reduce_sum, build_adamw, checkpoint_due, init_data_parallel, open_run
from .chat import ChatTemplate, check_messages
from .records import read_objects, read_records, string_values, where
from .settings import SFTSettings

__all__ = ["SFTSettings", "Example", "read_examples", "read_data", "tokenize_examples", "split_examples", "collate", "pack",
           "response_loss", "response_losses", "mtp_targets", "heldout_loss", "BatchOrder", "write_examples", "train_sft"]


@dataclass(frozen=True)
class Example:
    """One tokenised example: `response` ends with the end-of-text token."""

    line: int  # its line in the data file
    prompt: list[int]
    response: list[int]
    unscored: tuple[tuple[int, int], ...] = ()  # spans [a, b) of the response that are context (user turns)


def read_examples(path: str | Path) -> list[tuple[int, str, str]]:
    """(line number, prompt, response) of each example of a JSONL file; MoeforgeError naming the file
    and line of the first problem."""
    return [(number, prompt, response)
            for number, (prompt, response) in read_records(path, ("prompt", "response"), "examples")]


def read_data(path: str | Path) -> list[tuple]:
    """SFT data: (line number, prompt, response) of each {"prompt", "response"} line, and (line number,
    turns) of each {"messages"} line (chat.check_messages); MoeforgeError naming the file and line."""
    rows = []
    for number, obj in read_objects(path, ("prompt", "response"), "examples"):
        if "messages" in obj:
            rows.append((number, check_messages(obj["messages"], where(Path(path), number))))
        else:
            rows.append((number, *string_values(path, number, obj, ("prompt", "response"))))
    return rows


def tokenize_examples(rows: list[tuple], tok: Tokenizer, max_len: int, path: str | Path,
                      limit: str) -> list[Example]:
    """Examples of read_examples' (or read_data's) rows, each at most max_len tokens (limit: what sets
    max_len, for the error)."""
    pairs = [r for r in rows if len(r) == 3]
    prompts = iter(tok.encode_batch([p for _, p, _ in pairs]))
    responses = iter(tok.encode_batch([r for _, _, r in pairs]))
    template = ChatTemplate(tok) if len(pairs) < len(rows) else None
    examples = []
    for row in rows:
        number = row[0]
        if len(row) == 3:
            prompt, response, unscored = next(prompts), next(responses) + [tok.eos_id], ()
        else:
            prompt, response, unscored = template.render(row[1])
        if not prompt:  # the first response token is predicted from the prompt's last one
            raise MoeforgeError(f"{where(Path(path), number)}: the prompt is empty")
        length = len(prompt) + len(response)
        if length > max_len:
            parts = (f"prompt {len(prompt)}, response {len(response) - 1}, end-of-text 1" if len(row) == 3 else
                     f"{template.name} chat template: first prompt {len(prompt)}, the rest {len(response)}")
            raise MoeforgeError(f"{where(Path(path), number)}: the example is {length} tokens ({parts}), more than "
                                f"{limit}; examples are not truncated")
        examples.append(Example(number, prompt, response, unscored))
    return examples


def split_examples(examples: list[Example], val_fraction: float, path: str | Path) -> tuple[list[Example], list[Example]]:
    """(training, validation): the last val_fraction of the examples, at least one, are held out."""
    n_val = max(1, round(val_fraction * len(examples)))
    if len(examples) - n_val < 1:
        raise MoeforgeError(f"{where(Path(path))} holds {len(examples)} example(s); SFT needs at least 2 "
                            f"(one to train on, one held out for validation)")
    return examples[:-n_val], examples[-n_val:]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [B, S]: each example's prompt + response as inputs, and as targets the next
    token where it is a response token (or the end-of-text), IGNORE_INDEX over the prompt and the
    padding. Inputs are padded with pad_id on the right."""
    S = max(len(e.prompt) + len(e.response) for e in examples) - 1
    inputs = torch.full((len(examples), S), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), S), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        seq = torch.tensor(e.prompt + e.response)
        inputs[i, :len(seq) - 1] = seq[:-1]
        # position t predicts token t + 1: the first response token is predicted at the prompt's last position
        targets[i, len(e.prompt) - 1:len(seq) - 1] = seq[len(e.prompt):]
        for a, b in e.unscored:  # a conversation's later user turns: context, not targets
            targets[i, len(e.prompt) - 1 + a:len(e.prompt) - 1 + b] = IGNORE_INDEX
    return inputs, targets


def positions(e: Example) -> int:
    """The positions an example takes in a batch row: its tokens less the last (which is only a target)."""
    return len(e.prompt) + len(e.response) - 1


def pack(examples: list[Example], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, doc_ids) [R, length]: each example's collate row without its padding
    (positions(e) of them), placed one after another in rows of `length` positions, first fit in
    order of decreasing length (ties in batch order); the rest of a row is padding (pad_id, no
    target). doc_ids numbers the examples of a row from 0 and gives the padding a number of its own,
    for attention.document_mask."""
    order = sorted(range(len(examples)), key=lambda i: -positions(examples[i]))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = positions(examples[i])
        if n > length:
            raise ValueError(f"an example of {n} positions does not fit a packed row of {length}")
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            rows.append([])
            free.append(length)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= n
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.empty((len(rows), length), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for d, i in enumerate(members):
            part_inputs, part_targets = collate([examples[i]], pad_id)
            n = part_inputs.shape[1]
            inputs[r, at:at + n], targets[r, at:at + n] = part_inputs[0], part_targets[0]
            doc_ids[r, at:at + n] = d
            at += n
        doc_ids[r, at:] = len(members)  # the padding: a document of its own
    return inputs, targets, doc_ids


def batch_tensors(examples: list[Example], pad_id: int, pack_length: int = 0):
    """(inputs, targets, doc_ids) of a batch: collate's padded rows and None (causal attention), or
    with pack_length pack's rows and their document numbers."""
    return pack(examples, pack_length, pad_id) if pack_length else (*collate(examples, pad_id), None)


def mtp_targets(targets: torch.Tensor, depth: int, doc_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The MTP modules' targets of a batch, depth k = 1..depth: the target k positions on, where that is
    still a scored target of the same example (doc_ids: packed rows), else IGNORE_INDEX."""
    out = []
    for k in range(1, depth + 1):
        t = shift_tokens(targets, k, IGNORE_INDEX)
        if doc_ids is not None:
            t = t.masked_fill(shift_tokens(doc_ids, k, -1) != doc_ids, IGNORE_INDEX)
        out.append(t)
    return out


def response_losses(model, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None,
                    depth: int = 0) -> tuple[torch.Tensor, list[int]]:
    """(summed cross-entropy over the scored targets [1 + depth], their numbers): the main model's
    first, then the first `depth` MTP modules' (targets: mtp_targets); one forward, logits computed
    only where a target is scored (the model's per-target losses). doc_ids (packed rows, see pack):
    attention stays within each document."""
    kwargs = {}
    if doc_ids is not None:
        from ..model.attention import document_mask

        kwargs["mask"] = document_mask(doc_ids)
    ahead = mtp_targets(targets, depth, doc_ids)
    if ahead:
        kwargs["mtp_targets"] = ahead
    per = model(inputs, targets=targets, **kwargs)  # [B, S] (or [1 + depth, B, S]), 0 at IGNORE_INDEX
    per = per if ahead else per.unsqueeze(0)
    return per.sum(dim=(1, 2)), [int((t != IGNORE_INDEX).sum()) for t in (targets, *ahead)]


def response_loss(model, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the scored targets, their number): the main model's, response_losses."""
    sums, counts = response_losses(model, inputs, targets, doc_ids)
    return sums[0] / counts[0], counts[0]


@torch.no_grad()
def heldout_loss(model, examples: list[Example], batch_size: int, pad_id: int, precision: str = "fp32",
                 ctx=None) -> float:
    """Mean response-token loss over `examples` (each response token weighs the same), in eval mode;
    precision "bf16": the forwards under BF16 autocast. With a data-parallel context each rank scores
    examples[rank::ranks] and the sums are all-reduced. Every rank runs the same number of forwards
    (those of the largest share, rank 0's): a rank whose share has run out scores a stand-in batch
    (the first example) and does not count it, since an expert-parallel forward exchanges tokens
    with the other ranks and an FSDP forward gathers weights with them."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    ranks = 1 if ctx is None else ctx.data_ranks
    share = examples[0 if ctx is None else ctx.data_rank::ranks]
    total, count = 0.0, 0
    for i in range(0, -(-len(examples) // ranks), batch_size):
        part = share[i:i + batch_size]
        inputs, targets = collate(part or examples[:1], pad_id)
        with autocast(device, precision):
            loss, n = response_loss(model, inputs.to(device), targets.to(device))
        if part:
            total += float(loss) * n
            count += n
    model.train(was_training)
    total, count = all_reduce_sum([total, count], ctx, device)
    return total / count


def layout_text(ctx) -> str:
    """How the ranks hold the model, for the first progress line ("" for one process)."""
    if ctx is None:
        return ""
    return f" | {ctx.world_size} ranks: dp {ctx.dp} x ep {ctx.ep}, sharding {ctx.sharding}"


class BatchOrder:
    """Indices of batch_size examples at a time, from an endless run of shuffled epochs. Its state
    (the rng's, and what is left of the epoch) goes into the checkpoints, so that a resumed run draws
    the batches the uninterrupted run would have."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.rng = random.Random(seed)
        self.pending: list[int] = []

    def next(self) -> list[int]:
        while len(self.pending) < self.batch_size:
            epoch = list(range(self.n))
            self.rng.shuffle(epoch)
            self.pending += epoch
        batch, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
        return batch

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.pending = list(state["pending"])


def write_examples(path: str | Path, pairs: list[tuple[str, str]], chat: bool = False, turns: int = 1) -> Path:
    """The JSONL file train_sft reads, written whole or not at all (a temporary file, then a rename):
    {"prompt", "response"} lines, or with chat conversations ({"messages"}) of `turns` consecutive
    pairs each, a prompt the user's turn and its response the assistant's."""
    path = Path(path)
    if path.is_dir():
        raise MoeforgeError(f"--out '{path}' is a folder; give a file name such as {path / 'sft.jsonl'}")
    if not chat:
        lines = [{"prompt": p, "response": r} for p, r in pairs]
    else:
        lines = [{"messages": [m for p, r in pairs[i:i + turns]
                               for m in ({"role": "user", "content": p}, {"role": "assistant", "content": r})]}
                 for i in range(0, len(pairs), turns)]
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
    return path


def train_sft(checkpoint: str | Path, data: str | Path, out: str | Path, s: SFTSettings, device: str | None = None,
              progress: bool = True, resume: bool = False, ep: int = 1, sharding: str = "none") -> list[dict]:
    """Fine-tune the model of `checkpoint` on the examples of `data` for s.steps steps; write
    OUT/metrics.jsonl (a record per step, with val_loss at step 0, every s.eval_every steps and at the
    last) and checkpoints. Returns the records it wrote: step 0's (the held-out loss before training;
not on a resume) and one per step it ran.

    resume: continue the run in `out` from its newest checkpoint (common.py): the weights, the AdamW
    state, the step (and with it the learning rate's place in its schedule; a larger --steps
    stretches a cosine over the new length), the scored tokens so far and the batch order. The
    held-out split follows from the data and the settings, which must be the run's: --data (its path
    and its SHA-256) and every setting but --steps, --eval-every and --checkpoint-every. The number
    of ranks and their layout may change (a step is the one-process step on the whole batch, and
    every layout reads the checkpoints of any other).

    Under torchrun, N ranks: each takes examples rank::N of each batch; its loss is weighted by its
    share of the batch's scored tokens and the gradients are averaged over the ranks, so a step is
    the one-process step on the whole batch. How the ranks hold the model (the trainer's layouts,
    docs/parallelism.md): ep, the routed experts sliced over groups of `ep` ranks, tokens sent to
    them by all-to-all (dp = N / ep replicas of each slice); sharding "none", every rank holds its
    parameters whole and the gradients are all-reduced (parallel.sync_gradients: the experts' over
    their dp replicas only), "zero2" or "full", FSDP2 shards of parameters, gradients and AdamW
    state, the gradients reduce-scattered (the parameters gathered per layer for each forward, and
    with "full" again for the backward). The gradient norm is the one-process gradient's under every
    layout (parallel.global_grad_norm). Rank 0 writes the metrics; it writes the checkpoints of
    replicas, while each rank writes its own pieces of a sliced or sharded model (PostRun.save)."""
    s.validate()
    ctx, device, rank, ranks = init_data_parallel(device, s.batch_size, "--batch-size",
                                                  ParallelConfig(ep=ep, sharding=sharding))
    lead = rank == 0
    rows = read_data(data)
    digest = file_sha256(data)  # a resume checks the file is the run's
    run = open_run(checkpoint, out, device, "sft", s, {"data": str(Path(data).resolve()), "data_sha256": digest},
                   resume, ctx, s.precision)
    model, cfg, tok = run.model, run.cfg, run.tok
    context = cfg.model.max_position_embeddings
    if s.max_len > context:
        raise MoeforgeError(f"--max-len {s.max_len} exceeds the model's context of {context} tokens")
    if s.pack > context:
        raise MoeforgeError(f"--pack {s.pack} exceeds the model's context of {context} tokens")
    longest, limit = s.max_len or context, f"--max-len {s.max_len}" if s.max_len else f"the model's context of {context} tokens"
    if s.pack and s.pack + 1 < longest:  # an example takes its length less one positions of a row
        longest, limit = s.pack + 1, f"--pack {s.pack} + 1 (a packed row holds an example's tokens less the last)"
    examples = tokenize_examples(rows, tok, longest, data, limit)
    train, val = split_examples(examples, s.val_fraction, data)
    depth = len(model.mtp) if s.mtp_weight > 0 else 0
    if s.mtp_weight > 0 and not depth:
        raise MoeforgeError(f"--mtp-weight {s.mtp_weight:g}: the model has no MTP modules to fine-tune")
    optimizer, run_cfg = build_adamw(model, cfg, lr=s.lr, warmup_steps=s.warmup, steps=s.steps, schedule="cosine",
                                     min_lr_ratio=1.0 if s.schedule == "constant" else s.min_lr_ratio)
    run.restore(optimizer)
    torch.manual_seed(s.seed)
    batches = BatchOrder(len(train), s.batch_size, s.seed)
    tokens = 0
    if run.progress is not None:
        batches.load_state_dict(run.progress["batches"])
        tokens = run.progress["tokens"]
    device = model.embed.weight.device
    sink = run.metrics(lead)  # (with data parallelism, rank 0 writes the metrics and checkpoints)
    progress = progress and lead
    try:
        records = []
        if run.step == 0:
            records.append({"step": 0, "tokens": 0,
                            "val_loss": heldout_loss(model, val, s.batch_size, tok.eos_id, s.precision, ctx)})
            if sink is not None:
                sink.write(records[0])
        if progress:
            state = (f"held-out loss {records[0]['val_loss']:.4f} before training" if run.step == 0
                     else f"resumed after step {run.step}")
            print(f"sft: {len(train)} training and {len(val)} held-out examples{layout_text(ctx)} | {state}", flush=True)
        for step in range(run.step + 1, s.steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(step - 1, run_cfg.train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets, doc_ids = batch_tensors([train[i] for i in batches.next()[rank::ranks]], tok.eos_id,
                                                     s.pack)
            model.train()
            with autocast(device, s.precision):
                sums, local_n = response_losses(model, inputs.to(device), targets.to(device),
                                                None if doc_ids is None else doc_ids.to(device), depth)
            totals = all_reduce_sum([*sums.detach().tolist(), *local_n], ctx, device)
            loss_sums, n = totals[:depth + 1], totals[depth + 1:]  # over every rank: the sums and their counts
            loss_value = loss_sums[0] / n[0]  # the mean over every rank's scored tokens
            if not math.isfinite(loss_value):
                raise MoeforgeError(f"the loss became {loss_value} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            # this rank's share of the means (/ ranks: sync_gradients, or FSDP's reduce-scatter, divides
            # the sum of the ranks' gradients by their number); the MTP depths' weighted as in pre-training
            objective = sums[0] / (n[0] / ranks)
            for k in range(1, depth + 1):
                if n[k]:
                    objective = objective + sums[k] / (n[k] / ranks) * (s.mtp_weight / depth)
            objective.backward()
            sync_gradients(model, ctx)  # (FSDP: reduce-scattered in the backward already)
            grad_norm = global_grad_norm(model, ctx)  # the one-process gradient's, under any layout
            if s.grad_clip > 0:
                scale_gradients(model, clip_coefficient(grad_norm, s.grad_clip))
            optimizer.step()
            tokens += int(n[0])
            rec = {"step": step, "loss": loss_value, "tokens": tokens, "lr": lr, "grad_norm": float(grad_norm),
                   "seconds": time.perf_counter() - t0}
            if depth:  # the MTP depths' mean losses, averaged
                rec["mtp_loss"] = sum(loss_sums[k] / n[k] for k in range(1, depth + 1) if n[k]) / depth
            if step == s.steps or (s.eval_every and step % s.eval_every == 0):
                rec["val_loss"] = heldout_loss(model, val, s.batch_size, tok.eos_id, s.precision, ctx)
            records.append(rec)
            if sink is not None:
                sink.write(rec)
            if checkpoint_due(step, s):  # (every rank: a sharded model's ranks each write their pieces)
                run.save(step, optimizer, s, s.keep_checkpoints, tokens=tokens, batches=batches.state_dict())
            if progress:
                val_text = f" | held-out {rec['val_loss']:.4f}" if "val_loss" in rec else ""
                mtp_text = f" | mtp {rec['mtp_loss']:.4f}" if depth else ""
                print(f"sft step {step}/{s.steps} | loss {rec['loss']:.4f}{mtp_text}{val_text} | lr {lr:.2e} | "
                      f"gnorm {rec['grad_norm']:.2f} | {int(n[0])} tokens | {rec['seconds']:.2f} s", flush=True)
    except BaseException:
        run.wait_for_checkpoints(report=False)  # a save in flight completes; the run's error is the one to report
        raise
    finally:
        if sink is not None:
            sink.close()
    run.wait_for_checkpoints()  # (the last checkpoint is written in the background)
    return records
