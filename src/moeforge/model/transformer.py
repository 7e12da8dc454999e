"""The DeepSeek-V3 transformer: Block and Transformer, single-device, read top to bottom.

Construction order (see build_model): build on the meta device (no memory, so a 671B config
can be counted), then move to real storage with to_empty, then initialise (or load weights).
Parallelism and precision are applied by functions to a built model, never inside this file.

Shape legend: B batch, S sequence, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA, LatentCache
from .head import OutputHead
from .layers import FeedForward, RMSNorm, rope_cos_sin
from .moe import MoE, Router, Experts
from .mtp import IGNORE_INDEX, MTPModule, shift_tokens


class Block(nn.Module):
    """Pre-norm residual block: x + MLA(norm(x)), then x + FFN(norm(x)) (dense SwiGLU or DeepSeekMoE)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache: LatentCache | None = None, start_pos: "int | torch.Tensor" = 0, mask=None):
        """x: [B, S, D] -> (x [B, S, D], balance loss of this block (0 for dense))."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos, mask)
        if isinstance(self.ffn, MoE):
            y, balance = self.ffn(self.ffn_norm(x))
        else:
            y, balance = self.ffn(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + y, balance


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = OutputHead(cfg.hidden_size, cfg.vocab_size)
        # MTP module k holds the block of layer num_hidden_layers + k - 1 (as in the release).
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, cfg.num_hidden_layers + k))
                                 for k in range(cfg.num_nextn_predict_layers))
        self._rope_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, R/2] on `device`, sliced from a table built once per device: building it
        copies the frequencies from the host, which would otherwise synchronise every training step."""
        key = str(device)
        if key not in self._rope_cache or self._rope_cache[key][0].shape[0] < length:
            self._rope_cache[key] = rope_cos_sin(self.cfg, max(length, self.cfg.max_position_embeddings), device)
        cos, sin = self._rope_cache[key]
        return cos[:length], sin[:length]

    # ---- the main model ----
    def hidden(self, tokens: torch.Tensor, caches: list[LatentCache] | None = None, start_pos: "int | torch.Tensor" = 0,
               mask=None):
        """tokens: [B, S] -> (final normalised hidden [B, S, D], summed balance loss, cos, sin).
        mask: None (causal) or attention.document_mask(...) for packed documents. start_pos: an int,
        or with caches a tensor on the device, 0-dim or [B] (a slot of each row's own): a decode step
        whose shapes do not depend on the position (LatentCache.write). Caches with a `start`
        (left-padded rows) give each row positions of its own."""
        B, S = tokens.shape
        first = caches[0].start if caches is not None else None  # left padding: [B] first real slots
        per_row = isinstance(start_pos, torch.Tensor) and start_pos.dim() == 1
        if first is not None or per_row:  # positions of each row's own: cos, sin [B, S, R/2]
            cos, sin = self.rope(caches[0].kv.shape[1], tokens.device)
            at = start_pos.view(-1, 1) if isinstance(start_pos, torch.Tensor) else start_pos
            slots = at + torch.arange(S, device=tokens.device)  # [S], [1, S] or [B, S]
            positions = slots if first is None else (slots - first[:, None]).clamp(min=0)  # (padding: any)
            positions = positions.expand(B, S)
            cos, sin = cos[positions], sin[positions]
        elif isinstance(start_pos, torch.Tensor):
            cos, sin = self.rope(caches[0].kv.shape[1], tokens.device)
            positions = start_pos.view(1) + torch.arange(S, device=tokens.device)
            cos, sin = cos.index_select(0, positions), sin.index_select(0, positions)
        else:
            cos, sin = self.rope(start_pos + S, tokens.device)
            cos, sin = cos[start_pos:], sin[start_pos:]
        h = self.embed(tokens)
        balance = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            h, b = layer(h, cos, sin, caches[i] if caches is not None else None, start_pos, mask)
            balance = balance + b
        return self.norm(h), balance, cos, sin

    def forward(self, tokens: torch.Tensor, caches: list[LatentCache] | None = None, start_pos: "int | torch.Tensor" = 0,
                targets: torch.Tensor | None = None, mask=None, mtp_targets: list[torch.Tensor] | None = None):
        """tokens: [B, S] -> logits [B, S, V] (FP32). With caches: decode positions start_pos..
        With targets [B, S] (evaluation): per-target losses [B, S] in FP32 instead, 0 at IGNORE_INDEX.
        mask: None (causal) or attention.document_mask(...) (packed documents; see hidden).
        mtp_targets (with targets): the MTP modules' targets, one [B, S] per depth k (usually
        shift_tokens(targets, k, IGNORE_INDEX)); then per-target losses [1 + K, B, S], the main
        model's first (supervised fine-tuning of the MTP modules, posttrain/sft.py)."""
        h, _, cos, sin = self.hidden(tokens, caches, start_pos, mask)
        if targets is not None:
            losses = self.head.token_losses(h, targets)
            if mtp_targets is None:
                return losses
            out = [losses]
            for k, (module, t) in enumerate(zip(self.mtp, mtp_targets, strict=True), start=1):
                h, _ = module(h, self.embed(shift_tokens(tokens, k, 0)), cos, sin, mask)
                out.append(self.head.token_losses(h, t))
            return torch.stack(out)
        return self.head(h)

    # ---- training objective ----
    def losses(self, inputs: torch.Tensor, targets: torch.Tensor, mask=None) -> dict[str, torch.Tensor]:
        """Main next-token loss, per-depth MTP losses and the summed balance loss (weights applied by the trainer).

        inputs, targets: [B, S] with targets[i] = inputs[i + 1] (IGNORE_INDEX where there is none).
        mask: None (causal) or attention.document_mask(...) (attention stays within documents).
        """
        h, balance, cos, sin = self.hidden(inputs, mask=mask)
        out = {"main": self.head(h, targets)}
        mtp = []
        for k, module in enumerate(self.mtp, start=1):
            h, b = module(h, self.embed(shift_tokens(inputs, k, 0)), cos, sin, mask)
            mtp.append(self.head(h, shift_tokens(targets, k, IGNORE_INDEX)))
            balance = balance + b
        out["mtp"] = torch.stack(mtp) if mtp else h.new_zeros(0)
        out["balance"] = balance
        return out

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def new_caches(self, batch: int, max_len: int, dtype=None) -> list[LatentCache]:
        p = self.embed.weight
        return [LatentCache.empty(self.cfg, batch, max_len, p.device, dtype or p.dtype) for _ in self.layers]


def zero_initialised(name: str, parts: tuple[str, ...] | list[str]) -> bool:
    """Whether `parts` (config.ZERO_INIT_PARTS) start the parameter `name` at zero: "proj" the matrices that
    write into the residual stream (attention output wo, dense FFN, shared and routed experts' w2,
    MTP blocks' included), "head" the output head."""
    if "head" in parts and name == "head.weight":
        return True
    return "proj" in parts and name.endswith((".wo.weight", ".w2.weight", "experts.w2"))


def initial_values(cfg: ModelConfig, std: float | None = None,
                   zero: tuple[str, ...] | list[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full-size initial value) of every parameter and persistent buffer, one at a time.

    Normal(0, std) for every matrix (DeepSeek-V3: 0.006), ones for norms, zero routing bias. The
    values are drawn on the CPU from torch's default generator, in module order, whatever device the
    model lives on: one GPU, many GPUs in any parallel layout and the CPU all start from the same
    weights (a CUDA generator would draw other numbers), and a parallel rank holds at most one full
    tensor at a time while it keeps its own slice of each.

    zero: parts that start at zero instead (zero_initialised; the training setting train.zero_init).
    They are still drawn and then cleared, so every other tensor gets the same values as without.
    """
    std = cfg.initializer_range if std is None else std
    with torch.device("meta"):
        ref = Transformer(cfg)
    names = {id(t): n for n, t in (*ref.named_parameters(), *ref.named_buffers())}

    def normal(t):
        name = names[id(t)]
        value = torch.empty(t.shape).normal_(0.0, std)
        return name, value.zero_() if zero_initialised(name, zero) else value

    for m in ref.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            yield normal(m.weight)
        elif isinstance(m, RMSNorm):
            yield names[id(m.weight)], torch.ones(m.weight.shape)
        elif isinstance(m, Router):
            yield normal(m.weight)
            yield names[id(m.e_score_correction_bias)], torch.zeros(m.e_score_correction_bias.shape)
        elif isinstance(m, Experts):
            for w in (m.w1, m.w2, m.w3):
                yield normal(w)


@torch.no_grad()
def init_weights(model: Transformer, std: float | None = None, zero: tuple[str, ...] | list[str] = ()) -> None:
    """Give a single-device model its initial weights (initial_values) and clear its routing counts."""
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    for name, value in initial_values(model.cfg, std, zero):
        own[name].copy_(value)
    for m in model.moe_layers():
        m.tokens_per_expert.zero_()


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", init: bool = True) -> Transformer:
    """meta -> (later: convert / parallelise) -> to_empty -> init. Parameters are FP32 masters."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device)
    if init:
        init_weights(model)
    else:  # non-persistent state still needs a defined value before loading persistent state
        for m in model.moe_layers():
            m.tokens_per_expert.zero_()
    return model


def count_parameters(model: Transformer) -> dict[str, int]:
    """Total, main-model (without MTP) and activated-per-token parameter counts."""
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    routed_main = sum(p.numel() for m in model.layers.modules() if isinstance(m, Experts) for p in m.parameters())
    main = total - mtp
    inactive = routed_main * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
    return {"total": total, "main": main, "mtp": mtp, "active": int(main - inactive)}
