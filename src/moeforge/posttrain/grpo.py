"""GRPO: reinforcement learning from verifiable rewards without a critic (DeepSeekMath §4.1, DeepSeek-R1 §2.2).

Per step, for each of P prompts q, sample G completions o_1..o_G from the current policy and score
them with the task's rule (tasks.py). The advantage of completion i is its reward normalised within
its group, the same for each of its tokens:
    A_i = (r_i - mean(r)) / (std(r) + 1e-4)          (population std over the G completions)
The objective, maximised, for token t of completion i:
    min(rho * A_i, clip(rho, 1 - eps, 1 + eps) * A_i) - beta * KL_t
    rho  = pi(o_t) / pi_old(o_t)                     pi_old: the policy that sampled the batch
    KL_t = pi_ref(o_t)/pi(o_t) - log(pi_ref(o_t)/pi(o_t)) - 1    (the k3 estimator: >= 0, unbiased)
averaged over the tokens of each completion, then over all P x G completions (DeepSeekMath's
1/G sum_i 1/|o_i| sum_t). pi_ref is the model the run started from, frozen. With `updates` = 1
(one optimizer step per sampled batch) rho is 1 in value and only its gradient acts; with more, the
later steps are off-policy and the clip bounds them.

The model is the single-device Transformer (one process, CPU or one GPU; under torchrun a
data-parallel replica per rank, or sliced and sharded over the ranks with --ep and --sharding as
SFT's is: train_grpo): sampling uses the MLA latent cache (generate.py's
sampler), the log-probabilities come from the model's per-target losses (head.token_losses: logits
only where a completion token is scored). The groups of all prompts of a step are sampled as one
batch, the shorter prompts left-padded (sample_groups). Checkpoints are the trainer's format, so
`moeforge generate`, `eval` and `convert` read them; the config is the starting checkpoint's.
`--resume` continues a run from its newest checkpoint (train_grpo).

Shape legend: G group size, Lp prompt length, N max new tokens.
"""

from __future__ import annotations

import copy
import functools
import random
import time
from pathlib import Path

import torch

from ..config import ParallelConfig
from ..errors import MoeforgeError
from ..generate import release_decoder, sample_rows
from ..model.mtp import IGNORE_INDEX
from ..parallel.data import clip_coefficient, global_grad_norm, scale_gradients, sync_gradients
from ..train.step import autocast
from .chat import ChatTemplate
from .common import all_gather_objects, all_reduce_sum, build_adamw, checkpoint_due, init_data_parallel, open_run
from .settings import GRPOSettings
from .tasks import format_reward, task_name

__all__ = ["GRPOSettings", "group_advantages", "kl_k3", "grpo_loss", "sample_group", "sample_groups",
           "completion_texts", "completion_logprobs", "by_prompt_length", "train_grpo"]


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [..., G] -> advantages [..., G]: each group's rewards less their mean, over their
    standard deviation (+1e-4, so a group of equal rewards gives 0, no signal)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + 1e-4)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi: r - log r - 1 with r = pi_ref / pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
              mask: torch.Tensor, clip: float, beta: float) -> tuple[torch.Tensor, dict]:
    """The negated GRPO objective (module doc) of B completions: logp, old_logp, ref_logp, mask [B, N]
    (mask: the completion's tokens, through its stop token), adv [B]. Returns (loss, statistics)."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None and beta > 0 else torch.zeros_like(logp)
    per_token = surrogate - beta * kl
    m = mask.float()
    lengths = m.sum(dim=1).clamp(min=1)
    objective = ((per_token * m).sum(dim=1) / lengths).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip).float()
        stats = {"kl": float(((kl * m).sum(dim=1) / lengths).mean()),
                 "clipped": float((clipped * m).sum() / m.sum().clamp(min=1))}
    return -objective, stats


@torch.no_grad()
def sample_group(model, prompt: list[int], group: int, max_new: int, temperature: float,
                 generator: torch.Generator, stop_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """G completions of one prompt, decoded together from the latent cache: (tokens [G, N], mask
    [G, N]). A row that emits stop_id keeps it (it is an action the policy took) and is masked after
    it; the masked places hold stop_id."""
    return sample_rows(model, [prompt] * group, max_new, temperature, 1.0, generator, stop_id)


@torch.no_grad()
def sample_groups(model, prompts: list[list[int]], group: int, max_new: int, temperature: float,
                  generator: torch.Generator, stop_id: int | None,
                  top_p: float = 1.0, lockstep=None, speculative: bool = False,
                  mode: str = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """sample_group for each prompt, all decoded as one batch (generate.sample_rows left-pads the
    shorter prompts): one forward per token for all P x G rows. Returns (tokens [G, N], mask [G, N])
    per prompt, in order. top_p < 1: nucleus sampling (GRPO samples the whole distribution).
    lockstep: the process group of a model whose forwards are collective (sample_rows). speculative:
    the MTP module drafts each row's token after next (sample_rows; the same distribution). mode:
    generate.Decoder's ("compiled": the step through torch.compile)."""
    tokens, mask = sample_rows(model, [p for p in prompts for _ in range(group)], max_new, temperature, top_p,
                               generator, stop_id, mode, lockstep=lockstep, speculative=speculative)
    return [(tokens[i * group:(i + 1) * group], mask[i * group:(i + 1) * group]) for i in range(len(prompts))]


def completion_texts(tok, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The text of each completion of sample_group [G, N]: its tokens up to its stop, without the stop."""
    return [tok.decode([i for i, m in zip(row.tolist(), keep.tolist()) if m and i != tok.eos_id])
            for row, keep in zip(tokens, mask)]


def completion_logprobs(model, prompt: "list[int] | torch.Tensor", tokens: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of each completion token [G, N] (0 where masked), through the model's
    per-target losses: one forward of prompt + completion, logits only at the scored positions.
    prompt: one prompt for every row, or a prompt per row [G, Lp] (all of one length)."""
    G, N = tokens.shape
    prompts = prompt if isinstance(prompt, torch.Tensor) else torch.tensor([prompt] * G, device=tokens.device)
    Lp = prompts.shape[1]
    seq = torch.cat([prompts, tokens], dim=1)  # [G, Lp + N]
    targets = torch.full_like(seq, IGNORE_INDEX)[:, 1:]
    targets[:, Lp - 1:] = torch.where(mask, tokens, torch.full_like(tokens, IGNORE_INDEX))
    losses = model(seq[:, :-1], targets=targets)  # [G, Lp + N - 1], 0 where ignored
    return -losses[:, Lp - 1:]


def by_prompt_length(batch: list) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A step's groups (prompt ids, tokens [G, N], mask, advantages [G], ...) joined by prompt length:
    (prompt per row [R, Lp], tokens [R, N], mask, advantages [R]) for each length, in order of first
    appearance. The rows of one length make one forward (the prompts and the completions each line
    up), so a step takes a forward per prompt length instead of one per prompt."""
    joined: dict[int, list] = {}
    for ids, tokens, mask, adv, *_ in batch:
        joined.setdefault(len(ids), []).append((ids, tokens, mask, adv))
    out = []
    for groups in joined.values():
        prompts = torch.tensor([ids for ids, tokens, _, _ in groups for _ in range(tokens.shape[0])],
                               device=groups[0][1].device)
        out.append((prompts, *(torch.cat([g[i] for g in groups]) for i in (1, 2, 3))))
    return out


def in_step(parts: list, ctx) -> list[tuple[tuple, bool]]:
    """by_prompt_length's parts, each with whether it counts, padded to as many as the rank with the
    most has (over ctx's data ranks) with uncounted copies of the first: a model whose forwards (and
    backwards) are collective needs every rank to run the same number (ctx None: the parts as they are)."""
    most = len(parts)
    if ctx is not None:
        import torch.distributed as dist

        n = torch.tensor([most], dtype=torch.float64, device=parts[0][1].device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=ctx.dp_ep_group)
        most = int(n.item())
    return [(part, True) for part in parts] + [(parts[0], False)] * (most - len(parts))


def train_grpo(checkpoint: str | Path, out: str | Path, task, s: GRPOSettings, device: str | None = None,
               progress: bool = True, resume: bool = False, ep: int = 1, sharding: str = "none") -> list[dict]:
    """Post-train the model of `checkpoint` with GRPO on `task` (tasks.py) for s.steps steps; write
    OUT/metrics.jsonl (one record per step) and checkpoints (every s.checkpoint_every steps and at
    the end). Returns the records of the steps it ran.

    resume: continue the run in `out` from its newest checkpoint (common.py): the weights, the AdamW
    state, the step, the prompt rng and every rank's sampling generator, so the rest of the run
    samples what the uninterrupted run would have. The task, the number of ranks (each samples with
    its own generator) and every setting but --steps and --checkpoint-every must be the run's.
    pi_ref is the starting model, not the resumed one: it is read again from the starting checkpoint
    that the run's checkpoints record (its path, and its manifest's SHA-256, which must not have
    changed). Saving the reference in every checkpoint instead would add the model's size to each;
    the starting checkpoint is an input of the run, like SFT's --data.

    Under torchrun, data parallel: every rank holds the whole model (and the reference), samples the
    groups of prompts rank::N of each step's prompts, and the gradients are averaged over the ranks
    (each rank's loss is the mean over as many completions), so the objective is the mean over all
    P x G completions; the metrics are over all of them; rank 0 writes the metrics and the checkpoints.
    Each rank samples with its own generator (seed + rank).

    ep, sharding (`moeforge grpo --ep --sharding`): the model and the reference sliced and sharded
    over the ranks as SFT's are (routed experts over groups of ep ranks, FSDP2 shards), for a model
    that does not fit one device. Their forwards are collective, so the ranks decode in step (as
    many tokens as the longest decoding among them) and run as many log-probability forwards and
    backwards (a rank with fewer prompt lengths repeats one, uncounted); a step computes what the
    data-parallel step does. Every rank writes its pieces of each checkpoint."""
    s.validate()
    ctx, device, rank, ranks = init_data_parallel(device, s.prompts_per_step, "--prompts-per-step",
                                                  ParallelConfig(ep=ep, sharding=sharding))
    run = open_run(checkpoint, out, device, "grpo", s, {"task": task_name(task), "ranks": ranks}, resume, ctx,
                   s.precision)
    model, cfg, tok = run.model, run.cfg, run.tok
    if s.max_new_tokens >= cfg.model.max_position_embeddings:
        raise MoeforgeError(f"--max-new-tokens {s.max_new_tokens} leaves no room for a prompt in the model's context "
                            f"of {cfg.model.max_position_embeddings} tokens")
    collective = ctx if run.sharded else None  # forwards that need every rank (in_step, lockstep)
    if s.speculative and collective is not None:
        raise MoeforgeError("--speculative samples in one process; with --ep or --sharding the ranks decode in step "
                            "(use data parallelism, or leave --speculative out)")
    if s.speculative and not model.mtp:
        raise MoeforgeError("--speculative drafts with the MTP module, and this model has none")
    encode = ChatTemplate(tok).prompt if s.chat else tok.encode
    ref = None
    if s.beta > 0:
        ref = (run.starting_model(device, s.precision) if run.resumed or run.sharded
               else copy.deepcopy(model)).eval().requires_grad_(False)
    optimizer, _ = build_adamw(model, cfg, lr=s.lr)
    run.restore(optimizer)
    torch.manual_seed(s.seed)
    rng = random.Random(s.seed)
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(s.seed + rank)
    if run.progress is not None:
        rng.setstate(run.progress["prompts"])
        gen.set_state(run.progress["generators"][rank])
    amp = functools.partial(autocast, device, s.precision)  # BF16 forwards with --precision bf16
    sink = run.metrics(rank == 0)
    progress = progress and rank == 0
    records = []
    try:
        for step in range(run.step + 1, s.steps + 1):
            t0 = time.perf_counter()
            batch = []  # (prompt ids, tokens, mask, advantages, [reward, task reward, format reward] x G)
            problems = task.prompts(s.prompts_per_step, rng)[rank::ranks]  # the same prompts on every rank
            prompt_ids = [encode(prompt) for prompt, _ in problems]
            with amp():
                groups = sample_groups(model, prompt_ids, s.group_size, s.max_new_tokens, s.temperature, gen,
                                       tok.eos_id, lockstep=collective.dp_ep_group if collective else None,
                                       speculative=s.speculative, mode="compiled" if s.compile_decoding else "auto")
            for ids, (_, answer), (tokens, mask) in zip(prompt_ids, problems, groups):
                texts = completion_texts(tok, tokens, mask)
                accuracy = torch.tensor([task.reward(text, answer) for text in texts])
                form = torch.tensor([format_reward(text) for text in texts])
                rewards = accuracy + s.format_weight * form
                batch.append((ids, tokens, mask, group_advantages(rewards).to(tokens.device),
                              torch.stack([rewards, accuracy, form])))
            parts = in_step(by_prompt_length(batch), collective)  # a forward per prompt length, not per prompt
            rows = sum(tokens.shape[0] for (_, tokens, _, _), counts in parts if counts)
            with torch.no_grad(), amp():  # pi_old: with one update per batch, the first update's own logp
                old = ([completion_logprobs(model, *part[:3]) for part, _ in parts]
                       if s.updates > 1 else [None] * len(parts))
                refs = [completion_logprobs(ref, *part[:3]) if ref is not None else None for part, _ in parts]
            model.train()
            for _ in range(s.updates):
                optimizer.zero_grad(set_to_none=True)
                stats = {"kl": 0.0, "clipped": 0.0}
                loss_sum = 0.0
                for ((prompts, tokens, mask, adv), counts), old_lp, ref_lp in zip(parts, old, refs):
                    with amp():
                        logp = completion_logprobs(model, prompts, tokens, mask)
                    old_lp = logp.detach() if old_lp is None else old_lp
                    loss, st = grpo_loss(logp, old_lp, ref_lp, adv, mask, s.clip, s.beta)
                    share = tokens.shape[0] / rows if counts else 0.0
                    (loss * share).backward()  # the mean over this rank's completions
                    loss_sum += float(loss.detach()) * share
                    for k in stats:
                        stats[k] += st[k] * share
                sync_gradients(model, ctx)  # ... averaged over the ranks: over all P x G completions
                grad_norm = global_grad_norm(model, ctx)  # the whole gradient's, under any layout
                if s.grad_clip > 0:
                    scale_gradients(model, clip_coefficient(grad_norm, s.grad_clip))
                grad_norm = float(grad_norm)
                optimizer.step()
            rewards, accuracy, form = torch.cat([r for *_, r in batch], dim=1).double()
            lengths = torch.cat([m.sum(dim=1) for _, _, m, _, _ in batch]).double()
            count, r1, r2, acc, fmt, length, loss_sum, kl, clipped = all_reduce_sum(
                [rewards.numel(), float(rewards.sum()), float(rewards.square().sum()), float(accuracy.sum()),
                 float(form.sum()), float(lengths.sum()), loss_sum, stats["kl"], stats["clipped"]], ctx, device)
            mean = r1 / count
            rec = {"step": step, "reward": mean, "reward_std": max(r2 / count - mean * mean, 0.0) ** 0.5,
                   "accuracy": acc / count, "format": fmt / count, "loss": loss_sum / ranks, "kl": kl / ranks,
                   "clipped": clipped / ranks, "grad_norm": grad_norm, "completion_tokens": length / count,
                   "seconds": time.perf_counter() - t0}
            records.append(rec)
            if sink is not None:
                sink.write(rec)
            if checkpoint_due(step, s):  # (every rank: a sliced or sharded model's ranks each write their pieces)
                generators = all_gather_objects(gen.get_state(), ctx)  # every rank's, in rank order
                run.save(step, optimizer, s, s.keep_checkpoints, prompts=rng.getstate(), generators=generators)
            if progress:
                print(f"grpo step {step}/{s.steps} | reward {rec['reward']:.3f} | kl {rec['kl']:.4f} | "
                      f"loss {rec['loss']:+.4f} | {rec['completion_tokens']:.1f} tokens | {rec['seconds']:.1f} s",
                      flush=True)
    except BaseException:
        run.wait_for_checkpoints(report=False)  # a save in flight completes; the run's error is the one to report
        raise
    finally:
        release_decoder()  # (the decoder kept from step to step: generate.reused_decoder)
        if sink is not None:
            sink.close()
    run.wait_for_checkpoints()  # (the last checkpoint is written in the background)
    return records
