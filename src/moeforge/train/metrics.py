"""Throughput accounting (FLOPs per token, MFU) and the metrics sinks: console, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from ..config import ModelConfig

# Datasheet dense BF16 peaks (FLOP/s) used for MFU; the name is matched against the device name.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (activated matmul parameters) + causal attention, MTP included.

    Matmul parameters: every Linear a token passes through (attention projections, dense FFN or
    shared + K routed experts, router, output head; per MTP depth also eh_proj, a block and the head
    again). The embedding is a lookup and costs nothing. Attention scores and the weighted sum cost
    2 * S * H * (qk_head_dim + v_head_dim) FLOPs per token and layer forward, halved by causality,
    and x3 for forward + backward.
    """
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    q = (D * cfg.q_lora_rank + cfg.q_lora_rank * H * qk) if cfg.q_lora_rank else D * H * qk
    attn = q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + v) + H * v * D
    dense = 3 * D * cfg.intermediate_size
    moe = 3 * D * cfg.moe_intermediate_size * (cfg.n_shared_experts + cfg.num_experts_per_tok) + D * cfg.n_routed_experts
    head = D * cfg.vocab_size
    L, depth = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    n_dense = cfg.first_k_dense_replace
    params = n_dense * (attn + dense) + (L - n_dense) * (attn + moe) + head
    params += depth * (2 * D * D + attn + (moe if cfg.is_moe_layer(L) else dense) + head)
    attn_core = 3 * (L + depth) * seq_len * H * (qk + v)  # 2*S*H*(qk+v) / 2 (causal) * 3 (fwd+bwd)
    return 6 * params + attn_core


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class Clock:
    """Markers on the device timeline: CUDA events on a GPU (recorded without a host wait), the host's
    clock on a CPU, where the work has run by the time a marker is taken."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def wait(self, mark) -> None:
        """Wait until the device has reached the marker (nothing to wait for on a CPU)."""
        if self.cuda:
            mark.synchronize()

    def ms(self, a, b) -> float:
        """Milliseconds between two markers (on a GPU both must have been reached)."""
        return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)


class MetricsSink:
    """Appends one JSON object per step to OUT/metrics.jsonl, mirrors scalars to TensorBoard if installed."""

    def __init__(self, out: Path, tensorboard: bool = True):
        self.path = out / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def is_run_metrics(path: Path) -> bool:
    """Whether a metrics.jsonl holds a run's records (JSON objects with a step) and nothing else: a
    file of that name that moeforge did not write is never replaced or trimmed."""
    try:
        return all("step" in json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, ValueError, TypeError):
        return False


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the records of metrics.jsonl up to `last_step` (a resumed run's checkpoint: records a run
    wrote after its last checkpoint before it stopped are dropped, as the resumed run writes them
    again); the file is replaced whole. No file: nothing to do."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except ValueError:
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)
