"""Rejection sampling: SFT data from a teacher's own correct answers (DeepSeek-R1 §2.3.3 and §2.4).

After its reasoning-oriented RL, DeepSeek-R1 sampled several responses per prompt from the RL
checkpoint, kept only the correct ones, and fine-tuned on them: DeepSeek-V3-Base for R1's next
stage, and smaller models (Qwen, Llama) to distil R1's reasoning into them. Here:
- for each of n prompts of a task (tasks.py), sample `samples` completions from the teacher
  (grpo.sample_groups: the groups of a chunk of prompts decoded together from the MLA latent cache);
- keep a completion when the task's reward gives it 1 and it ended with the end-of-text token (a
  completion cut off at --max-new-tokens would teach the student to stop where the teacher had not);
- of each prompt's kept completions, write up to `keep` distinct ones, as {"prompt", "response"}
  lines of the file `moeforge sft` reads (without the end-of-text: SFT appends it).

Random draws, and data parallelism (sample_teacher under torchrun): the prompts are sampled a chunk
of CHUNK at a time, each chunk whole (one batch) and with a generator of its own
seeded from (seed, chunk index). A whole chunk, because a batch draws its rows' tokens together, so
a prompt's completions depend on the other prompts of its batch; a generator per chunk, so that they
do not depend on the chunks sampled before. Each rank samples a contiguous run of whole chunks
(prompt_share) and rank 0 gathers the pairs in prompt order: the file does not depend on the number
of ranks, only on the seed (and on the device's numerics, as any sampling does).
"""

from __future__ import annotations

import functools
import operator
import random
from dataclasses import astuple, dataclass
from pathlib import Path

import torch

from ..generate import check_length, release_decoder
from .chat import ChatTemplate
from .grpo import completion_texts, sample_groups

__all__ = ["CHUNK", "RejectionStats", "prompt_share", "rejection_sample", "gather", "sample_teacher"]

CHUNK = 32  # prompts sampled together with one generator: the unit of work of a rank


@dataclass(frozen=True)
class RejectionStats:
    prompts: int
    samples: int  # completions sampled
    stopped: int  # ... that ended with the end-of-text token
    correct: int  # ... that stopped and had reward 1
    kept: int  # pairs written (at most `keep` distinct per prompt)
    prompts_kept: int  # prompts with at least one pair

    def __add__(self, other: RejectionStats) -> RejectionStats:
        """The counts of two sets of prompts together (the shares of two ranks)."""
        return RejectionStats(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def summary(self) -> str:
        return (f"{self.kept} examples from {self.prompts_kept} of {self.prompts} prompts; "
                f"{self.correct} of {self.samples} samples correct ({self.correct / self.samples:.1%}), "
                f"{self.stopped} stopped")


def prompt_share(n: int, rank: int = 0, ranks: int = 1, chunk: int = CHUNK) -> range:
    """The indices of the prompts (of n) that `rank` of `ranks` samples: a contiguous run of whole
    chunks, the first (chunks mod ranks) ranks one chunk more than the others (a rank has none when
    there are fewer chunks than ranks). The shares follow each other in rank order."""
    base, extra = divmod(-(-n // chunk), ranks)
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)
    return range(min(first * chunk, n), min(last * chunk, n))


def _chunk_generator(seed: int, index: int, device) -> torch.Generator:
    """The generator of chunk `index`, from (seed, index) alone: the same whichever rank samples the
    chunk (random.Random seeds a string through SHA-512, whatever the process's hash seed)."""
    return torch.Generator(device=device).manual_seed(random.Random(f"{seed}/{index}").getrandbits(63))


@torch.no_grad()
def rejection_sample(model, tok, task, n: int, samples: int, max_new: int, temperature: float, seed: int,
                     keep: int = 1, progress=None, chunk: int = CHUNK, rank: int = 0,
                     ranks: int = 1, speculative: bool = False,
                     chat: bool = False, mode: str = "auto") -> tuple[list[tuple[str, str]], RejectionStats]:
    """(prompt, response) pairs of the teacher `model` on n prompts of `task`, and the counts (module doc).
    rank, ranks: the pairs and counts of this rank's share of the n prompts only (prompt_share; every
    rank draws the same n prompts, and checks them all, so that a prompt too long for the context
    fails every rank before any samples). The prompts are sampled `chunk` at a time (module doc);
    progress: None, or called as progress(prompts of the share done, pairs kept) after each chunk.
    mode: generate.Decoder's ("compiled": the step through torch.compile)."""
    problems = task.prompts(n, random.Random(seed))
    encode = ChatTemplate(tok).prompt if chat else tok.encode  # chat: the prompts as user turns
    ids = [encode(prompt) for prompt, _ in problems]
    check_length(model, max(map(len, ids), default=0), max_new)
    share = prompt_share(n, rank, ranks, chunk)
    device = model.embed.weight.device
    pairs: list[tuple[str, str]] = []
    stopped = correct = prompts_kept = 0
    for start in range(share.start, share.stop, chunk):
        stop = min(start + chunk, share.stop)
        groups = sample_groups(model, ids[start:stop], samples, max_new, temperature,
                               _chunk_generator(seed, start // chunk, device), tok.eos_id, speculative=speculative,
                               mode=mode)
        for (prompt, answer), (tokens, mask) in zip(problems[start:stop], groups):
            chosen, ended, right = _accepted(tok, task, answer, tokens, mask, keep)
            stopped, correct = stopped + ended, correct + right
            pairs += [(prompt, text) for text in chosen]
            prompts_kept += bool(chosen)
        if progress is not None:
            progress(stop - share.start, len(pairs))
    release_decoder()  # (kept from chunk to chunk: generate.reused_decoder)
    return pairs, RejectionStats(len(share), len(share) * samples, stopped, correct, len(pairs), prompts_kept)


def _accepted(tok, task, answer: str, tokens: torch.Tensor, mask: torch.Tensor,
              keep: int) -> tuple[list[str], int, int]:
    """Of one prompt's completions (tokens, mask [G, N]): up to `keep` distinct ones that stopped and
    that the task's reward accepts, and how many stopped and how many of those were accepted."""
    ended = (tokens == tok.eos_id) & mask  # the completion's stop token, if it emitted one
    chosen: list[str] = []
    stopped = correct = 0
    for text, stop in zip(completion_texts(tok, tokens, mask), ended.any(dim=1).tolist()):
        stopped += stop
        if stop and task.reward(text, answer) == 1.0:
            correct += 1
            if text not in chosen and len(chosen) < keep:
                chosen.append(text)
    return chosen, stopped, correct


def gather(pairs: list[tuple[str, str]], stats: RejectionStats,
           ctx) -> tuple[list[tuple[str, str]], RejectionStats] | None:
    """On rank 0, every rank's pairs in rank order (which is prompt order: prompt_share) and the summed
    counts; None on the other ranks. One process (ctx None): the pairs and counts as given."""
    if ctx is None:
        return pairs, stats
    import torch.distributed as dist

    parts = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object((pairs, stats), parts, dst=0)
    if parts is None:
        return None
    return [pair for part, _ in parts for pair in part], functools.reduce(operator.add, (s for _, s in parts))


def sample_teacher(teacher: str | Path, task, n: int, samples: int, max_new: int, temperature: float, seed: int,
                   keep: int = 1, device: str | None = None, progress: bool = True,
                   precision: str = "fp32", speculative: bool = False,
                   chat: bool = False, mode: str = "auto") -> tuple[list[tuple[str, str]], RejectionStats] | None:
    """rejection_sample of the checkpoint (or run folder) `teacher`: (pairs, counts), with a line per
    chunk sampled when `progress`; speculative: sampled with its MTP module drafting (sample_rows). precision "bf16" (or "auto" on a GPU): the teacher runs under BF16
    autocast, where a GPU replays each decoding step as a CUDA graph (generate.Decoder; mode: its mode).

    Under torchrun, data parallel: every rank loads the whole teacher on its own device, samples its
    share of the prompts (prompt_share), and rank 0 gathers the pairs and sums the counts; rank 0
    returns them and prints the progress lines (of its own share), the other ranks return None. The
    output is the one process's (module doc). The process group is left at the end."""
    from ..data import load_tokenizer
    from ..train.checkpoint import load_trained_model
    from ..train.step import autocast, resolve_precision
    from .common import init_data_parallel

    ctx, device, rank, ranks = init_data_parallel(device)
    try:
        model, cfg = load_trained_model(teacher, device)
        share = len(prompt_share(n, rank, ranks))
        where = f" (rank 0's share of {n})" if ranks > 1 else ""

        def report(done: int, kept: int) -> None:
            print(f"sft-data: {done}/{share} prompts sampled{where}, {kept} examples kept", flush=True)

        where_to = model.embed.weight.device
        with autocast(where_to, resolve_precision(precision, where_to)):
            pairs, stats = rejection_sample(model.eval(), load_tokenizer(cfg.train.tokenizer or None), task, n,
                                            samples, max_new, temperature, seed, keep,
                                            report if progress and rank == 0 else None, rank=rank, ranks=ranks,
                                            speculative=speculative, chat=chat, mode=mode)
        return gather(pairs, stats, ctx)
    finally:
        if ctx is not None:
            ctx.destroy()
