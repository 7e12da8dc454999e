"""Text generation with the MLA latent cache (only c_kv and the rope key are cached), temperature and top-p."""

from __future__ import annotations

import torch

from .errors import MoeforgeError
from .model.transformer import Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [B, V] -> token ids [B]. temperature 0 is greedy; top_p keeps the smallest nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keep tokens until the mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0, stop_id: int | None = None) -> list[int]:
    """Prefill the prompt once, then decode one token at a time from the cache. Returns new tokens."""
    if not prompt:
        raise MoeforgeError("the prompt is empty")
    limit = model.cfg.max_position_embeddings
    if len(prompt) + max_new_tokens > limit:
        raise MoeforgeError(f"prompt ({len(prompt)} tokens) plus --max-new-tokens ({max_new_tokens}) exceeds "
                            f"the model's context of {limit} tokens")
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    caches = model.new_caches(1, len(prompt) + max_new_tokens)
    tokens = torch.tensor([prompt], device=device)
    logits = model(tokens, caches, 0)[:, -1]
    out: list[int] = []
    pos = len(prompt)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gen)
        out.append(int(nxt))
        if stop_id is not None and out[-1] == stop_id:
            break
        logits = model(nxt.view(1, 1), caches, pos)[:, -1]
        pos += 1
    model.train(was_training)
    return out
