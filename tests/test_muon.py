"""Muon (train/muon.py): the Newton-Schulz orthogonalisation, its batched fast path against the
per-matrix reference, one optimizer step against a direct implementation of the update, which
parameters it takes, and training with it (resume, errors)."""

from __future__ import annotations

import pytest
import torch

from moeforge.config import load_config
from moeforge.errors import MoeforgeError
from moeforge.model import build_model
from moeforge.train import checkpoint as ckpt
from moeforge.train.muon import Muon, orthogonalize, orthogonalize_all, update_scale
from moeforge.train.step import build_optimizer, optimizer_groups, uses_muon

from conftest import STEPS_INDEPENDENT_SCHEDULE


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (48, 48), (3, 40, 24)])
def test_orthogonalize_approximates_the_polar_factor(shape):
    """Newton-Schulz keeps g's singular vectors and maps its singular values into about [0.68, 1.13]
    (the quintic's fixed band), so the result points the way of U V^T."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.6 and sv.max() < 1.2, (sv.min(), sv.max())
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cos = (o * polar).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.97).all(), cos
    # scale-free: the iteration starts from g / ||g||
    torch.testing.assert_close(orthogonalize(g * 1000), o, rtol=1e-4, atol=1e-5)


def test_orthogonalize_all_equals_one_matrix_at_a_time():
    """The batched fast path (equal shapes stacked, tall ones transposed) against the reference."""
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(s, generator=gen) for s in
               [(64, 128), (128, 64), (4, 64, 128), (80, 128), (64, 128), (4, 128, 64), (30,)[:0] + (7, 9)]]
    fast = orthogonalize_all(tensors)
    for t, f in zip(tensors, fast):
        ref = torch.stack([orthogonalize(m) for m in t.reshape(-1, *t.shape[-2:])]).reshape(t.shape)
        assert f.shape == t.shape
        torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-5)


def test_muon_step_matches_the_update_rule():
    """Two steps on one matrix and one vector against the rule written out: Nesterov momentum,
    orthogonalised direction scaled by 0.2 sqrt(max(rows, cols)), decoupled weight decay; the vector
    gets AdamW; gradients divided by grad_scale."""
    gen = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(32, 48, generator=gen))
    v = torch.nn.Parameter(torch.randn(48, generator=gen))
    lr, mu, wd, scale = 0.02, 0.8, 0.1, 2.0
    opt = Muon([{"params": [w], "muon": True, "weight_decay": wd}, {"params": [v], "weight_decay": 0.0}],
               lr=lr, betas=(0.9, 0.99), eps=1e-8, momentum=mu)
    ref_v = torch.nn.Parameter(v.detach().clone())
    ref_adam = torch.optim.AdamW([ref_v], lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    w_ref, buf = w.detach().clone(), torch.zeros_like(w)
    for _ in range(2):
        gw, gv = torch.randn(w.shape, generator=gen), torch.randn(v.shape, generator=gen)
        w.grad, v.grad = gw.clone(), gv.clone()
        opt.grad_scale = scale
        opt.step()
        g = gw / scale
        buf = mu * buf + (1 - mu) * g
        direction = (1 - mu) * g + mu * buf
        w_ref = w_ref * (1 - lr * wd) - lr * 0.2 * 48 ** 0.5 * orthogonalize(direction)
        ref_v.grad = gv / scale
        ref_adam.step()
        torch.testing.assert_close(w.detach(), w_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.detach(), ref_v.detach(), rtol=1e-5, atol=1e-6)
    assert update_scale(w.shape) == pytest.approx(0.2 * 48 ** 0.5)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    cfg = load_config("tiny", overrides=["model.num_nextn_predict_layers=1", "train.optimizer=muon"])
    model = build_model(cfg.model, "meta")
    muon, adam_matrices, vectors = optimizer_groups(model, None, "muon")
    assert "layers.1.ffn.experts.w1" in muon and "layers.0.attn.wkv_b.weight" in muon
    assert "mtp.0.eh_proj.weight" in muon and "layers.1.ffn.shared_experts.w2.weight" in muon
    assert set(adam_matrices) == {"embed.weight", "head.weight"} | {n for n in adam_matrices if n.endswith(".gate.weight")}
    assert "layers.1.ffn.gate.weight" in adam_matrices and "mtp.0.block.ffn.gate.weight" in adam_matrices
    assert all(not uses_muon(n, p) and p.ndim == 1 for n, p in model.named_parameters() if n in vectors)
    params = dict(model.named_parameters())
    assert len(muon) + len(adam_matrices) + len(vectors) == len(params)
    # under pipeline parallelism the optimizer sees the stages' names, with a prefix
    w = params["embed.weight"]
    assert not uses_muon("0.embed.weight", w) and not uses_muon("1.layers.2.ffn.gate.weight", w)
    assert uses_muon("1.layers.2.attn.wo.weight", w)
    opt = build_optimizer(model, load_config("tiny", overrides=["train.optimizer=muon", "train.lr=1e-2",
                                                                "train.muon_lr=5e-3"]))
    assert [g["muon"] for g in opt.param_groups] == [True, False, False]
    assert opt.param_groups[0]["lr_scale"] == pytest.approx(0.5)


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer=sgd"], "train.optimizer: expected adamw or muon"),
    (["train.optimizer=muon", "train.adam_moments=bf16"], "train.adam_moments=bf16: only with train.optimizer=adamw"),
    (["train.muon_momentum=1.0"], "train.muon_momentum"),
    (["train.muon_lr=-1"], "train.muon_lr"),
])
def test_bad_optimizer_settings_are_refused(overrides, message):
    with pytest.raises(MoeforgeError, match=message):
        load_config("tiny", overrides=overrides)


def test_muon_training_resumes_bit_identically_and_keeps_its_optimizer(cli, trained_run, tmp_path):
    """4 + 4 steps with a resume in between give the losses and the momentum buffers of 8 steps in
    one go; a checkpoint made with Muon does not resume with AdamW (one clear line)."""
    args = [a for a in trained_run.train_args] + ["train.optimizer=muon", "train.muon_lr=5e-3"]
    assert set(STEPS_INDEPENDENT_SCHEDULE) <= set(args)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli("train", "--out", whole, "--steps", 8, *args).rc == 0
    assert cli("train", "--out", split, "--steps", 4, *args).rc == 0
    r = cli("train", "--out", split, "--resume", "--steps", 8, "--no-progress")
    assert r.rc == 0, r.err
    from test_train import read_metrics, step_losses

    a, b = step_losses(read_metrics(whole)), step_losses(read_metrics(split))
    assert sorted(a) == list(range(1, 9)) and a == b
    assert a[8] < a[1]
    opt_a = ckpt.load_checkpoint(whole / "checkpoints" / "step_0000008", ("optimizer.pt",))["optimizer.pt"]
    opt_b = ckpt.load_checkpoint(split / "checkpoints" / "step_0000008", ("optimizer.pt",))["optimizer.pt"]
    assert any("momentum_buffer" in st for st in opt_a["state"].values())
    for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    r = cli("train", "--out", split, "--resume", "--steps", 9, "--no-progress", "train.optimizer=adamw")
    assert r.rc != 0 and "does not fit train.optimizer=adamw" in r.err and "Traceback" not in r.err
