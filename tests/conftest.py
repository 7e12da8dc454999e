"""Shared fixtures for the end-to-end tests (tests/test_train.py, tests/test_cli.py).

Speed: everything here trains a ~1.2M-parameter model on ~200 KB of text in a temporary folder,
with the token cache in a session-wide temporary MOEFORGE_CACHE (so shards are built once and
~/.cache/moeforge is never touched). One 8-step run (`trained_run`) is shared by every test that
only reads a checkpoint; tests that could modify it work on a copy (`run_copy`).

Fixtures that set MOEFORGE_CACHE do it with a monkeypatch scoped to the test (or to the
session fixture's own body), so other test modules never see it. Likewise torch runs on one
intra-op thread while these tests train (`one_thread`): for a model this small, two OpenMP
threads on a 2-core machine that is busy with anything else are 5-40x slower per step (threads
spin at barriers while their partner core is taken), one thread is ~0.1 s per step.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dist import DIST_MODEL

# A very small DeepSeek-V3 (every feature on: MLA with q compression, grouped sigmoid routing,
# shared + routed experts, MTP), short sequences and a context of 64 tokens (so a long prompt
# is easy to build). vocab_size stays 8192, the size of the shipped tokenizer.
TINY_OVERRIDES = [
    "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.n_routed_experts=8", "model.n_group=2", "model.topk_group=1",
    "model.num_experts_per_tok=2", "model.q_lora_rank=32", "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
    "model.num_attention_heads=2", "model.max_position_embeddings=64", "model.num_nextn_predict_layers=1",
    "train.seq_len=64", "train.batch_size=4", "train.eval_batches=2", "train.sample_tokens=8",
    # the training recipe these tests were written for (the preset now trains with Muon: test_muon.py)
    "train.optimizer=adamw", "train.lr=2e-3", "train.beta2=0.95", "train.zero_init=none",
]

# The schedules (lr, MTP weight lambda, bias-update gamma) are functions of step / train.steps.
# A run of `--steps 4` followed by `--resume --steps 8` can only match an uninterrupted 8-step run
# when no schedule depends on train.steps within those steps: constant lr, lambda never switches,
# gamma never stops. (With the defaults, a 4-step run switches lambda at step 3 and decays lr.)
STEPS_INDEPENDENT_SCHEDULE = [
    "train.warmup_steps=0", "train.min_lr_ratio=1.0",
    "train.mtp_lambda_switch=1.0", "train.bias_update_stop=1.0",
]

# The post-training tests' model (tests/test_posttrain.py, tests/test_sft.py): tests/dist.py's small
# DeepSeek-V3 with a context of 64 tokens.
POSTTRAIN_MODEL = [*DIST_MODEL, "train.seq_len=32"]

BASELINE_STEPS = 8
BASELINE_CHECKPOINT_EVERY = 4

# Standard-library modules whose sources make the test corpus: real Python text (like the
# default corpus), ~200 KB in all, one .txt document per module.
_CORPUS_MODULES = [
    "json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "bisect.py", "heapq.py", "shlex.py",
    "fnmatch.py", "glob.py", "keyword.py", "colorsys.py", "copy.py", "abc.py", "operator.py",
    "functools.py", "contextlib.py", "dataclasses.py", "enum.py",
]


def small_cfg(**kw):
    """A very small DeepSeek-V3 ModelConfig for in-process model tests (query compression, dense + MoE
    layers, grouped routing); keyword arguments override fields."""
    from moeforge.config import ModelConfig

    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                routed_scaling_factor=2.5, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig(**base)


def input_grads_trainable_and_frozen(fn, x, w, g) -> list:
    """fn(x, w) -> y, backpropagated from g once with w trainable and once frozen: the two input
    gradients; w gets a gradient in the first run only (checked)."""
    dxs = []
    for trainable in (True, False):
        xi = x.clone().requires_grad_()
        wi = w.clone().requires_grad_(trainable)
        fn(xi, wi).backward(g)
        assert (wi.grad is not None) == trainable
        dxs.append(xi.grad)
    return dxs


@dataclass
class Result:
    """What one in-process `moeforge` command did."""

    rc: int
    out: str
    err: str


@dataclass
class TrainedRun:
    """The shared baseline run: `train --steps 8` with a checkpoint every 4 steps."""

    out: Path  # the run folder (config.toml, metrics.jsonl, checkpoints/step_0000004, step_0000008)
    data: Path
    train_args: list[str]  # every argument of the run but --out and --steps

    def metrics(self) -> list[dict]:
        return read_metrics(self.out)

    def checkpoint(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step_{step:07d}"


def read_metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def without_seconds(records: list[dict]) -> list[dict]:
    """Metrics records without their wall time (the one field two equal runs do not share)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


class Interrupted(Exception):
    """Stands for whatever stops a run (Ctrl-C, a lost machine) in the resume tests."""


@contextmanager
def interrupted_after(step: int):
    """Within the block, a post-training run stops (Interrupted, expected) just after writing the
    record of `step` to metrics.jsonl: the records after its last checkpoint stay in the file, as
    after a real interruption."""
    from moeforge.posttrain import common

    class Sink(common.MetricsSink):
        def write(self, record: dict) -> None:
            super().write(record)
            if record["step"] == step:
                raise Interrupted(f"after step {step}")

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Interrupted):
        mp.setattr(common, "MetricsSink", Sink)
        yield


def with_full_weights(stage_module, run):
    """(run(), the single-process state dict of the model that stage_module.open_run opened during
    it, gathered from this rank's slices and shards): for a post-training rank under tests/dist.py."""
    from moeforge.parallel import full_state_dict

    opened = []
    real = stage_module.open_run

    def keep(*args, **kwargs):
        opened.append(real(*args, **kwargs))
        return opened[-1]

    stage_module.open_run = keep
    try:
        result = run()
    finally:
        stage_module.open_run = real
    return result, full_state_dict(opened[0].model, opened[0].pctx)


def run_cli(argv: list) -> int:
    """moeforge.cli.main in-process; argparse's SystemExit (--help, usage errors) becomes its code."""
    from moeforge.cli import main

    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        return e.code if isinstance(e.code, int) else 1


# ---------------------------------------------------------------------------------------------
# environment and data
# ---------------------------------------------------------------------------------------------
class _OneThread:
    """torch.set_num_threads(1) inside the block, the previous count restored after."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def single_process(fn, cache_dir: Path):
    """fn() on one intra-op thread with MOEFORGE_CACHE -> cache_dir: the reference run that the
    multi-process tests compare with (module-scoped fixtures cannot use monkeypatch)."""
    with _OneThread(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEFORGE_CACHE", str(cache_dir))
        return fn()


@pytest.fixture
def one_thread():
    with _OneThread():
        yield


@pytest.fixture(scope="session")
def mf_cache_dir(tmp_path_factory) -> Path:
    """One token cache for the whole session (shards of the test corpus are built once)."""
    return tmp_path_factory.mktemp("moeforge-cache")


@pytest.fixture
def mf_env(monkeypatch, mf_cache_dir) -> Path:
    """MOEFORGE_CACHE -> the session cache, for this test only."""
    monkeypatch.setenv("MOEFORGE_CACHE", str(mf_cache_dir))
    return mf_cache_dir


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A folder of ~200 KB of Python source as .txt files (split by file: 1 validation file)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("data")
    total = 0
    for name in _CORPUS_MODULES:
        src = root / name
        if src.is_file():
            text = src.read_text(encoding="utf-8")
            (out / (name.replace("/", "_")[:-3] + ".txt")).write_text(text, encoding="utf-8")
            total += len(text)
    assert total > 100_000, f"test corpus too small ({total} chars): stdlib at {root} lacks the modules"
    return out


@pytest.fixture
def tiny_overrides() -> list[str]:
    """key=value overrides for a ~1.2M-parameter model with a 64-token context (a fresh list)."""
    return list(TINY_OVERRIDES)


# ---------------------------------------------------------------------------------------------
# the shared trained run
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir, mf_cache_dir) -> TrainedRun:
    """One real 8-step training run through the CLI, shared by all tests that only read it.

    Checkpoints at steps 4 and 8 (keep_checkpoints=2 keeps both), a mid-run validation at step 4.
    Tests must not modify it: take `run_copy` instead.
    """
    out = tmp_path_factory.mktemp("baseline") / "run"
    args = ["--data", data_dir, "--no-progress", *TINY_OVERRIDES, *STEPS_INDEPENDENT_SCHEDULE,
            f"train.checkpoint_every={BASELINE_CHECKPOINT_EVERY}", f"train.eval_every={BASELINE_CHECKPOINT_EVERY}"]
    with pytest.MonkeyPatch.context() as mp, _OneThread():
        mp.setenv("MOEFORGE_CACHE", str(mf_cache_dir))
        rc = run_cli(["train", "--out", out, "--steps", BASELINE_STEPS, *args])
    assert rc == 0, "the baseline training run failed"
    return TrainedRun(out=out, data=data_dir, train_args=[str(a) for a in args])


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory) -> Path:
    """POSTTRAIN_MODEL, random-initialised (seed 0), saved as a training checkpoint: a run folder to
    start post-training from. Tests only read it."""
    from moeforge.config import load_config
    from moeforge.model import build_model
    from moeforge.train import checkpoint as ckpt

    cfg = load_config(None, None, POSTTRAIN_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu")
    root = tmp_path_factory.mktemp("posttrain_base")
    ckpt.save_checkpoint(root / "checkpoints", 0, cfg, model.state_dict(), {}, {"step": 0}, 1)
    return root


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the baseline run folder (the saved configs still name the same data)."""
    dst = tmp_path / "run-copy"
    shutil.copytree(trained_run.out, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# running commands and checking their effects
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def cli(capsys, mf_env, one_thread):
    """cli(*argv) -> Result(rc, out, err): one in-process `moeforge` command with its own output."""

    def run(*argv) -> Result:
        capsys.readouterr()  # drop anything printed before
        rc = run_cli(list(argv))
        out, err = capsys.readouterr()
        return Result(rc, out, err)

    return run


@pytest.fixture
def expect_error():
    """expect_error(result, command, *fragments) -> the error line, after checking the contract of
    a bad-input failure: exit status 2, stdout aside, exactly one line on stderr of the form
    `moeforge COMMAND: error: ...` that names the problem (each fragment, case-insensitively),
    and no traceback."""

    def check(result: Result, command: str, *fragments: str) -> str:
        assert "Traceback" not in result.err, result.err
        lines = result.err.splitlines()
        assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{result.err}"
        line = lines[0]
        assert line.startswith(f"moeforge {command}: error: "), line
        for fragment in fragments:
            assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
        assert result.rc == 2, f"exit status {result.rc}, expected 2 ({line})"
        return line

    return check


def snapshot_tree(root: Path) -> dict[str, tuple]:
    """Every file and folder under root (root included): relative path -> (kind, size, mtime_ns)."""
    root = Path(root)
    if not root.exists():
        return {}
    snap = {".": ("dir", 0, root.stat().st_mtime_ns)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            kind = "dir" if p.is_dir() else "file"
            snap[p.relative_to(root).as_posix()] = (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns)
    return snap


@pytest.fixture
def snapshot():
    """snapshot(folder) -> {relative path: (kind, size, mtime_ns)}; compare two with ==."""
    return snapshot_tree


@dataclass(frozen=True)
class EvenLength:
    """A toy task that a random model's completions pass about half the time: reward 1 for a
    completion of an even number of characters. The prompts are distinct, so that checks per prompt
    can tell them apart (tests/test_distill.py, tests/test_score.py)."""

    def prompts(self, n, rng):
        return [(f"{a}+1=", "") for a in rng.sample(range(1000), n)]

    def reward(self, completion: str, answer: str) -> float:
        return float(len(completion) % 2 == 0)


@pytest.fixture(scope="session")
def random_model():
    """(POSTTRAIN_MODEL random-initialised with seed 1, in eval mode, on the CPU; the default
    tokenizer). Tests only read it."""
    from moeforge.config import load_config
    from moeforge.data import load_tokenizer
    from moeforge.model import build_model

    cfg = load_config(None, None, POSTTRAIN_MODEL)
    torch.manual_seed(1)
    return build_model(cfg.model, "cpu").eval(), load_tokenizer(None)

