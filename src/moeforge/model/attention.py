"""Multi-head Latent Attention (MLA), DeepSeek-V3 report §2.1.1.

Two forms of the same function:
- training form: up-project the latent to per-head keys and values, then causal SDPA;
- absorbed form (decoding with a cache): only the normalised latent c_kv and the rotated shared
  rope key are cached (kv_lora_rank + qk_rope_head_dim values per token and layer); wkv_b's key
  part is absorbed into the query and its value part applied after attention.

Shape legend: B batch, S new positions, T cached positions, D hidden, H heads,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank, Q q_lora_rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, apply_rope, softmax_scale


@dataclass
class LatentCache:
    """Per-layer decoding cache: normalised KV latent and rotated rope key."""

    kv: torch.Tensor  # [B, T_max, C]
    pe: torch.Tensor  # [B, T_max, R]
    # Left-padded prompts (generate.Decoder): the first slot of each row that holds a real token [B];
    # the slots before it are hidden from every other position, and positions count from it. None:
    # every row starts at slot 0.
    start: torch.Tensor | None = None

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> "LatentCache":
        return cls(torch.zeros(batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype),
                   torch.zeros(batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype))

    def write(self, kv: torch.Tensor, pe: torch.Tensor, start_pos: "int | torch.Tensor"):
        """Store the new positions' kv [B, S, C] and pe [B, S, R] from slot start_pos on. Returns the
        cached kv [B, T, C] and pe [B, T, R] that the new positions attend over, and a boolean mask
        [B or 1, S, T] of the slots each new position must not see (None: it sees all T).

        start_pos an int: T is start_pos + S (only the written slots), causal within the new ones.
        start_pos an integer tensor on the cache's device, 0-dim (every row's) or [B] (a slot of each
        row's own: speculative decoding's rows move on by one or two tokens): T is the whole cache and
        each new position's later slots are masked, so the shapes and addresses of a decode step do
        not depend on the position and the step can be captured as a CUDA graph.
        With `start` (left padding), a row's slots before its start are masked too, except each
        padding slot's own: a padding position then attends to itself alone, so its values stay
        finite (a row of nothing but masked scores would give NaN, and NaN times a zero weight is
        NaN in the real positions' sums)."""
        B, S = kv.shape[:2]
        if isinstance(start_pos, torch.Tensor):
            queries = start_pos.view(-1, 1) + torch.arange(S, device=self.kv.device)  # [1 or B, S]
            if queries.shape[0] == 1:
                self.kv[:B].index_copy_(1, queries[0], kv.to(self.kv.dtype))
                self.pe[:B].index_copy_(1, queries[0], pe.to(self.pe.dtype))
            else:
                self.kv[:B].scatter_(1, queries[:, :, None].expand(kv.shape), kv.to(self.kv.dtype))
                self.pe[:B].scatter_(1, queries[:, :, None].expand(pe.shape), pe.to(self.pe.dtype))
            slots = torch.arange(self.kv.shape[1], device=self.kv.device)
            kv_all, pe_all = self.kv[:B], self.pe[:B]
        else:
            end = start_pos + S
            self.kv[:B, start_pos:end] = kv.to(self.kv.dtype)
            self.pe[:B, start_pos:end] = pe.to(self.pe.dtype)
            kv_all, pe_all = self.kv[:B, :end], self.pe[:B, :end]
            if S == 1 and self.start is None:
                return kv_all, pe_all, None
            slots = torch.arange(end, device=kv.device)
            queries = torch.arange(start_pos, end, device=kv.device)[None]
        hidden = slots[None, None, :] > queries[:, :, None]  # [1 or B, S, T]: causal
        if self.start is not None:
            padding = slots[None, None, :] < self.start[:B, None, None]  # [B, 1, T]
            hidden = hidden | (padding & (slots[None, None, :] != queries[:, :, None]))
        return kv_all, pe_all, hidden


def document_mask(doc_ids: torch.Tensor, flex: bool | None = None):
    """Causal attention within documents: position i attends to j <= i when doc_ids[b, j] == doc_ids[b, i].

    doc_ids: [B, S] (see document_ids). flex (default: on CUDA) gives a FlexAttention BlockMask
    (blocks that are entirely masked are skipped); otherwise the same relation as a boolean
    [B, 1, S, S] mask for SDPA, the reference the FlexAttention path is tested against.
    """
    B, S = doc_ids.shape
    if doc_ids.is_cuda if flex is None else flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, kv):
            return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

        return create_block_mask(same_document_causal, B, None, S, S, device=doc_ids.device)
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :])).unsqueeze(1)


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, S] -> the index of each token's document in its row: a new document starts after every
    EOS (the EOS itself ends the document before it)."""
    eos = (tokens == eos_id).int()
    return eos.cumsum(dim=1) - eos


_flex_attention = None


def attention(q, k, v, scale: float, mask=None) -> torch.Tensor:
    """q, k: [B, H, S, N+R], v: [B, H, S, V] -> [B, H, S, V]. mask None: causal SDPA (PyTorch picks
    its fastest exact kernel; cuDNN for MLA's unequal head dims on Hopper, docs/performance.md)."""
    global _flex_attention
    if mask is None:
        dv = v.shape[-1]
        if not q.is_cuda and dv < q.shape[-1]:
            # On the CPU, SDPA's flash kernel needs equal head dims (else the slower math path runs):
            # zero columns of v give zero output columns, sliced off (fwd+bwd 1.3-1.8x faster at tiny).
            v = F.pad(v, (0, q.shape[-1] - dv))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :dv]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_attention is None:  # FlexAttention is fast only compiled; compiled once per process
        _flex_attention = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    return _flex_attention(q, k, v, block_mask=mask, scale=scale)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope
        if cfg.q_lora_rank > 0:  # query compression (V3)
            self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:  # plain query projection (V2-Lite)
            self.wq = nn.Linear(cfg.hidden_size, self.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.hidden_size, self.kv_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(self.kv_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)
        self.scale = softmax_scale(cfg)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        return q.unflatten(-1, (self.n_heads, self.nope + self.rope))  # [B, S, H, N+R]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, start_pos: "int | torch.Tensor" = 0, mask=None) -> torch.Tensor:
        """x: [B, S, D]; cos/sin: [S, R/2] for positions start_pos..start_pos+S-1; mask: None (causal)
        or a document_mask(...) of the same B and S (training form only). start_pos may be a device
        tensor when decoding one position with a cache (LatentCache.write)."""
        q_nope, q_pe = self.query(x).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        kv, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope], dim=-1)  # [B, S, C], [B, S, R]
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)  # [B, S, 1, R]: one rope key shared by all heads
        kv = self.kv_norm(kv)
        if cache is None:
            return self._train_form(q_nope, q_pe, kv, k_pe, mask)
        return self._absorbed_form(q_nope, q_pe, kv, k_pe.squeeze(2), cache, start_pos)

    def _train_form(self, q_nope, q_pe, kv, k_pe, mask=None) -> torch.Tensor:
        B, S, H, _ = q_nope.shape
        k_nope, v = self.wkv_b(kv).unflatten(-1, (H, self.nope + self.v_dim)).split([self.nope, self.v_dim], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, H, N+R]
        k = torch.cat([k_nope, k_pe.expand(B, S, H, self.rope)], dim=-1)  # [B, S, H, N+R]
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, mask)  # [B, H, S, V]
        return self.wo(o.transpose(1, 2).flatten(2))

    def _absorbed_form(self, q_nope, q_pe, kv, k_pe, cache: LatentCache, start_pos) -> torch.Tensor:
        H = q_nope.shape[2]
        kv_all, pe_all, hidden = cache.write(kv, k_pe, start_pos)  # [B, T, C], [B, T, R], [S, T] or None
        # (a weight kept in FP8, fp8/stored.py, is dequantised first)
        w = self.wkv_b.dense_weight() if hasattr(self.wkv_b, "dense_weight") else self.wkv_b.weight
        w = w.unflatten(0, (H, self.nope + self.v_dim))  # [H, N+V, C]
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]
        q_lat = torch.einsum("bshn,hnc->bshc", q_nope, w_uk.to(q_nope.dtype))  # query in latent space
        scores = (torch.einsum("bshc,btc->bsht", q_lat, kv_all.to(q_lat.dtype))
                  + torch.einsum("bshr,btr->bsht", q_pe, pe_all.to(q_pe.dtype))) * self.scale
        if hidden is not None:
            scores = scores.masked_fill(hidden.unsqueeze(2), float("-inf"))  # [B or 1, S, 1, T]
        probs = scores.float().softmax(dim=-1).to(q_lat.dtype)
        o_lat = torch.einsum("bsht,btc->bshc", probs, kv_all.to(probs.dtype))
        o = torch.einsum("bshc,hvc->bshv", o_lat, w_uv.to(o_lat.dtype))  # [B, S, H, V]
        return self.wo(o.flatten(2))
