"""AdamW with BF16 moments (train.adam_moments=bf16, train/adamw.py): the update formula, the
moments' storage, state round trips, and training through the CLI with a resume."""

import copy
import math

import torch

from moeforge.train.adamw import AdamWBF16Moments

BETAS, EPS, LR = (0.9, 0.95), 1e-8, 1e-2


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 7, generator=g).requires_grad_(), torch.randn(9, generator=g).requires_grad_()]


def _grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) * (10.0 ** (step % 3 - 1)) for p in params]


def _optimizer(params, cls=AdamWBF16Moments, **kw):
    groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
    return cls(groups, lr=LR, betas=BETAS, eps=EPS, **kw)


def test_update_follows_the_adamw_formula_with_bf16_moments():
    """Six steps (gradients over three decades, clipping scale on some steps, weight decay on one
    group) against AdamW written out in float64 whose moments are rounded to BF16 after each step,
    as stored: the moments equal bit for bit, the parameters to FP32 rounding."""
    params = _params()
    opt = _optimizer(params)
    ref = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    for step in range(1, 7):
        grads = _grads(step, params)
        scale = 2.0 if step % 2 else None
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.grad_scale = None if scale is None else torch.tensor(scale)
        opt.step()
        for i, (g, wd) in enumerate(zip(grads, (0.1, 0.0))):
            g = g.double() / (scale or 1.0)
            m_new = m[i] + (1 - BETAS[0]) * (g - m[i])
            v_new = BETAS[1] * v[i] + (1 - BETAS[1]) * g * g
            ref[i] = ref[i] * (1 - LR * wd) - LR / (1 - BETAS[0] ** step) * m_new / (
                v_new.sqrt() / math.sqrt(1 - BETAS[1] ** step) + EPS)
            m[i], v[i] = m_new.bfloat16().double(), v_new.bfloat16().double()
    for i, p in enumerate(params):
        st = opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16 and float(st["step"]) == 6
        assert torch.equal(st["exp_avg"].double(), m[i]) and torch.equal(st["exp_avg_sq"].double(), v[i])
        torch.testing.assert_close(p.detach().double(), ref[i], rtol=1e-5, atol=1e-6)


def test_close_to_torch_adamw_and_state_round_trip():
    """Within BF16 rounding of torch's AdamW after 10 steps; a state dict saved by either optimizer
    loads into the other (moments cast: BF16 here, FP32 there), and a resumed BF16-moment optimizer
    continues exactly as the uninterrupted one."""
    a, b = _params(), _params()
    opt_a, opt_b = _optimizer(a), _optimizer(b, torch.optim.AdamW)
    for step in range(1, 11):
        for pa, pb, g in zip(a, b, _grads(step, a)):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=2e-3, atol=2e-4)
    # resume from a saved state: same next step, to the bit
    c = [p.detach().clone().requires_grad_() for p in a]
    opt_c = _optimizer(c)
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as saved and read back
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt_c.state.values())
    for pa, pc, g in zip(a, c, _grads(11, a)):
        pa.grad, pc.grad = g.clone(), g.clone()
    opt_a.step()
    opt_c.step()
    assert all(torch.equal(pa, pc) for pa, pc in zip(a, c))
    # FP32 moments (torch's) load as BF16, and BF16 ones load into torch's AdamW as FP32
    opt_c.load_state_dict(opt_b.state_dict())
    assert all(s["exp_avg_sq"].dtype == torch.bfloat16 for s in opt_c.state.values())
    opt_b.load_state_dict(opt_a.state_dict())
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt_b.state.values())


def test_trains_and_resumes_through_the_cli(cli, trained_run, tmp_path):
    """`train.adam_moments=bf16`: the saved optimizer state holds BF16 moments, the loss falls, and
    4 + 4 steps with a resume equal 8 uninterrupted steps, loss by loss."""
    from conftest import read_metrics

    from moeforge.train import checkpoint as ckpt

    def step_losses(records):
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    def run(out, *args):
        r = cli("train", "--out", out, *args, "--no-progress")
        assert r.rc == 0, r.err

    args = (*trained_run.train_args, "train.adam_moments=bf16")
    run(tmp_path / "full", "--steps", 8, *args)
    run(tmp_path / "split", "--steps", 4, *args)
    run(tmp_path / "split", "--resume", "--steps", 8)
    full, split = step_losses(read_metrics(tmp_path / "full")), step_losses(read_metrics(tmp_path / "split"))
    assert split == full and full[8] < full[1]
    state = ckpt.load_checkpoint(ckpt.resolve_checkpoint(tmp_path / "full"), ("optimizer.pt",))["optimizer.pt"]
    assert {s["exp_avg"].dtype for s in state["state"].values()} == {torch.bfloat16}


def test_batching_of_parameters_does_not_change_the_update(monkeypatch):
    """Parameters are updated in batches of at most CHUNK elements: a batch per parameter (CHUNK
    smaller than every parameter) gives bit-identical parameters and moments."""
    from moeforge.train import adamw

    results = []
    for chunk in (adamw.CHUNK, 4):
        monkeypatch.setattr(adamw, "CHUNK", chunk)
        params = _params(seed=3)
        opt = _optimizer(params)
        for step in range(1, 4):
            for p, g in zip(params, _grads(step, params)):
                p.grad = g
            opt.step()
        results.append([t.clone() for p in params for t in (p.detach(), *(opt.state[p][k] for k in adamw.MOMENTS))])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert [len(b) for b in adamw._batches([torch.zeros(3), torch.zeros(5), torch.zeros(2)], 7)] == [1, 2]


def test_lr_as_a_device_scalar_gives_the_same_update():
    """A captured step (train.cuda_graph) gives the optimizer its lr as a 0-dim tensor: the same
    parameters and moments as the number, to FP32 rounding of lr * weight decay (the tensor path
    computes it in FP32, the number in FP64). The BF16 moments do not depend on lr: identical."""
    runs = []
    for as_tensor in (False, True):
        params = _params(seed=4)
        opt = _optimizer(params)
        for step in range(1, 5):
            for p, g in zip(params, _grads(step, params)):
                p.grad = g
            for group in opt.param_groups:
                group["lr"] = torch.tensor(LR / step) if as_tensor else LR / step
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa.state[a][k], ob.state[b][k])
