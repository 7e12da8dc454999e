"""End-to-end tests of the `moeforge` command line: every subcommand on a real trained checkpoint,
the entry point in a subprocess, and the bad-input contract.

Bad input must end with exit status 2 and exactly one line on stderr, `moeforge CMD: error: ...`,
naming the problem, with no traceback, and must leave what is on disk as it was (compared as
{path: (kind, size, mtime_ns)} snapshots taken before and after).

Commands run in-process through `moeforge.cli.main` (fixture `cli`), except the two subprocess
tests that prove `python -m moeforge` itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeforge.data import load_tokenizer
from moeforge.train import checkpoint as ckpt

SRC = Path(__file__).resolve().parents[1] / "src"
# `PATH: loss L | B bits per byte (an optional note, e.g. a compression baseline) | N tokens, M bytes`
EVAL_LINE = re.compile(r"^(?P<what>.+): loss (?P<loss>\d+\.\d{4}) \| (?P<bpb>\d+\.\d{4}) bits per byte"
                       r"(?: \([^)]*\))? \| (?P<tokens>\d+) tokens, (?P<bytes>\d+) bytes$")


def final_validation(trained_run) -> dict:
    return [r for r in trained_run.metrics() if "val_loss" in r][-1]


def subprocess_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env["MOEFORGE_CACHE"] = str(tmp_path / "cache")
    return env


# ---------------------------------------------------------------------------------------------
# the entry point (real subprocesses)
# ---------------------------------------------------------------------------------------------
def test_entry_point_info_v3_671b(tmp_path):
    """`python -m moeforge info --preset v3-671b` exits 0 and prints the release's size: ~671B
    main-model parameters (MTP counted apart), ~37B active, more in total with MTP."""
    p = subprocess.run([sys.executable, "-m", "moeforge", "info", "--preset", "v3-671b"], capture_output=True,
                       text=True, env=subprocess_env(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    counts = {k: float(v) for k, v in re.findall(r"(\w+) parameters:\s+([\d.]+) B", p.stdout)}
    assert 670.5 < counts["main"] < 671.5, p.stdout
    assert 36.5 < counts["active"] < 38.5, p.stdout
    assert counts["total"] == pytest.approx(counts["main"] + counts["mtp"], abs=1e-3)
    assert "training FLOPs per token" in p.stdout


def test_entry_point_error_is_one_line_exit_2(tmp_path):
    """`python -m moeforge train --preset nope`: exit status 2, stderr is exactly the one line
    `moeforge train: error: unknown preset 'nope' (choose from: ...)`, nothing written."""
    before = sorted(os.listdir(tmp_path))
    p = subprocess.run([sys.executable, "-m", "moeforge", "train", "--preset", "nope", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=300)
    assert p.returncode == 2
    assert p.stderr.splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith("moeforge train: error: unknown preset 'nope' (choose from: ")
    assert "v3-671b" in p.stderr and "tiny" in p.stderr
    assert p.stdout == ""
    assert sorted(os.listdir(tmp_path)) == before


# ---------------------------------------------------------------------------------------------
# every subcommand on the trained run
# ---------------------------------------------------------------------------------------------
def test_generate_continues_the_prompt(cli, trained_run):
    """generate on a run folder prints the prompt followed by the new text; the same seed gives
    the same text; a step_N folder and greedy decoding (--temperature 0) work too."""
    args = ("generate", "--checkpoint", trained_run.out, "--prompt", "def ", "--max-new-tokens", 5)
    r = cli(*args)
    assert r.rc == 0, r.err
    assert r.err == ""
    assert r.out.startswith("def ") and len(r.out.rstrip("\n")) > len("def ")
    assert cli(*args).out == r.out  # seeded sampling
    r = cli("generate", "--checkpoint", trained_run.checkpoint(4), "--prompt", "import", "--max-new-tokens", 3,
            "--temperature", 0)
    assert r.rc == 0, r.err
    assert r.out.startswith("import")
    # --precision bf16 (BF16 autocast; on a CPU the steps run eagerly) continues the prompt too
    r = cli(*args, "--precision", "bf16")
    assert r.rc == 0, r.err
    assert r.out.startswith("def ") and len(r.out.rstrip("\n")) > len("def ")


def test_generate_speculative(cli, base_checkpoint):
    """generate --speculative --temperature 0 prints greedy decoding's text, then how many of the MTP
    module's drafts it kept; with a temperature it samples (the same seed, the same text)."""
    args = ("generate", "--checkpoint", base_checkpoint, "--prompt", "x = ", "--max-new-tokens", 6)
    plain, fast = cli(*args, "--temperature", 0), cli(*args, "--temperature", 0, "--speculative")
    assert plain.rc == fast.rc == 0, fast.err
    text, stats = fast.out.rstrip("\n").rsplit("\n", 1)
    assert text + "\n" == plain.out
    assert stats.startswith("speculative: ") and "drafts kept" in stats and "forwards" in stats
    sampled = cli(*args, "--speculative", "--seed", 3)
    assert sampled.rc == 0 and sampled.out.startswith("x = ") and sampled.out == cli(*args, "--speculative", "--seed", 3).out


def test_compile_decoding_with_speculative_is_refused(cli, base_checkpoint, expect_error, tmp_path):
    """--compile-decoding compiles the plain decoding step; speculative decoding has none, so the two
    together end with one line before anything is loaded or written."""
    both = ("--compile-decoding", "--speculative")
    expect_error(cli("generate", "--checkpoint", base_checkpoint, "--prompt", "x", *both), "generate", "choose one")
    expect_error(cli("score", "--checkpoint", base_checkpoint, "--task", "arithmetic", *both), "score", "choose one")
    expect_error(cli("grpo", "--checkpoint", base_checkpoint, "--out", tmp_path / "g", *both), "grpo", "choose one")
    assert not (tmp_path / "g").exists()
    out = tmp_path / "d.jsonl"
    expect_error(cli("sft-data", "--teacher", base_checkpoint, "--out", out, *both), "sft-data", "choose one")
    expect_error(cli("sft-data", "--out", out, "--compile-decoding"), "sft-data", "--compile-decoding: only with --teacher")
    assert not out.exists()


def test_eval_checkpoint_reproduces_training_validation(cli, trained_run):
    """eval on the run folder prints `validation split: loss L | B bits per byte | ...`; compares
    L and B with the final validation record the trainer wrote to metrics.jsonl (same data, same
    weights; only the batching differs): equal to the printed 4 decimals."""
    r = cli("eval", "--checkpoint", trained_run.out)
    assert r.rc == 0, r.err
    m = EVAL_LINE.match(r.out.strip())
    assert m, r.out
    assert m["what"] == "validation split"
    val = final_validation(trained_run)
    assert float(m["loss"]) == pytest.approx(val["val_loss"], abs=2e-4)
    assert float(m["bpb"]) == pytest.approx(val["val_bpb"], abs=2e-4)
    assert 0 < float(m["bpb"]) < 8


def test_eval_stride_gives_every_target_more_context(cli, trained_run):
    """eval --stride N scores the same targets and bytes as back-to-back windows (each with at least
    seq_len - N tokens of context: test_data covers the windows); --stride of seq_len is the plain
    evaluation, a negative one a clear error."""
    def evaluate(*extra):
        r = cli("eval", "--checkpoint", trained_run.out, *extra)
        assert r.rc == 0, r.err
        return EVAL_LINE.match(r.out.strip())

    plain, overlapped, same = evaluate(), evaluate("--stride", 16), evaluate("--stride", 64)
    assert (overlapped["tokens"], overlapped["bytes"]) == (plain["tokens"], plain["bytes"])
    assert 0 < float(overlapped["bpb"]) < 8
    assert same.group(0) == plain.group(0)
    r = cli("eval", "--checkpoint", trained_run.out, "--stride", -1)
    assert r.rc != 0 and "--stride must be >= 0" in r.err


def test_eval_text_file(cli, trained_run, tmp_path):
    """eval --text FILE: compares the reported token count with the tokenizer's count for the file
    (every token after the first is a target, plus the EOS appended to the text) and the byte
    count with the file's size less its first token's bytes; --max-batches caps the tokens."""
    text = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20
    f = tmp_path / "sample.txt"
    f.write_text(text, encoding="utf-8")
    r = cli("eval", "--checkpoint", trained_run.out, "--text", f)
    assert r.rc == 0, r.err
    m = EVAL_LINE.match(r.out.strip())
    assert m, r.out
    assert m["what"] == str(f)
    tok = load_tokenizer(None)
    ids = tok.encode(text)
    assert int(m["tokens"]) == len(ids)
    assert int(m["bytes"]) == len(text.encode()) - len(tok.decode(ids[:1]).encode())
    assert float(m["loss"]) > 0

    r = cli("eval", "--checkpoint", trained_run.out, "--text", f, "--batch-size", 1, "--max-batches", 1)
    assert r.rc == 0, r.err
    assert int(EVAL_LINE.match(r.out.strip())["tokens"]) == 64  # one window of seq_len


def test_convert_writes_hf_folder(cli, trained_run, tmp_path):
    """convert --checkpoint RUN --out DIR --dtype fp32 writes config.json (DeepSeek-V3, the run's
    sizes) and safetensors; compares the exported embedding and expert 0 of layer 1 with the
    checkpoint's tensors: equal."""
    from moeforge import hf

    if not callable(getattr(hf, "save", None)):
        pytest.skip("moeforge.hf has no save() yet (hf.py is being written)")
    from safetensors.torch import load_file

    dst = tmp_path / "hf"
    r = cli("convert", "--checkpoint", trained_run.out, "--out", dst, "--dtype", "fp32")
    assert r.rc == 0, r.err
    assert str(dst) in r.out
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert (config["hidden_size"], config["num_hidden_layers"], config["n_routed_experts"]) == (64, 2, 8)
    tensors = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, "no safetensors written"
    weights = ckpt.load_checkpoint(trained_run.checkpoint(8), ("model.pt",))["model.pt"]
    assert torch.equal(tensors["model.embed_tokens.weight"], weights["embed.weight"])
    assert torch.equal(tensors["model.layers.1.mlp.experts.0.gate_proj.weight"], weights["layers.1.ffn.experts.w1"][0])
    # the run's tokenizer comes along, as transformers reads it: the same ids, the same end-of-text
    from transformers import AutoTokenizer

    from moeforge.data import load_tokenizer

    theirs, ours = AutoTokenizer.from_pretrained(dst), load_tokenizer(None)
    text = "def f(x):\n    return x + 1  # ok"
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert theirs.eos_token_id == ours.eos_id
    r = cli("convert", "--checkpoint", trained_run.out, "--out", dst)  # an earlier export is replaced
    assert r.rc == 0, r.err


def test_convert_imports_hf_folder_as_a_run(cli, trained_run, tmp_path, expect_error, snapshot):
    """convert --hf DIR --out RUN --to run: a Hugging Face folder (here the export of the trained run)
    becomes a run folder that --checkpoint reads: the same weights, routing biases included, bit for
    bit; the folder's tokenizer copied and named by the config; `generate` gives the trained run's
    greedy text. Refusals: a non-empty --out, --dtype, --to run without --hf, a tokenizer larger
    than the model's vocabulary (nothing written). `train --init` continues from the import with its
    model and tokenizer, and `sft` fine-tunes it with that tokenizer."""
    from moeforge import hf
    from moeforge.config import load_config
    from moeforge.data.tokenizer import DEFAULT_TOKENIZER_PATH
    from moeforge.model import build_model
    from moeforge.train.checkpoint import load_trained_model

    exported, run = tmp_path / "hf", tmp_path / "imported"
    assert cli("convert", "--checkpoint", trained_run.out, "--out", exported, "--dtype", "fp32").rc == 0
    r = cli("convert", "--hf", exported, "--out", run, "--to", "run")
    assert r.rc == 0, r.err
    assert f"--checkpoint {run}" in r.out
    ours, cfg = load_trained_model(run, "cpu")
    theirs, trained_cfg = load_trained_model(trained_run.out, "cpu")
    assert cfg.model == trained_cfg.model and cfg.train.tokenizer == str(run / "tokenizer.json")
    assert (run / "tokenizer.json").read_bytes() == (exported / "tokenizer.json").read_bytes()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    texts = [cli("generate", "--checkpoint", c, "--prompt", "def f(", "--max-new-tokens", "12", "--temperature", "0").out
             for c in (run, trained_run.out)]
    assert texts[0] == texts[1] and texts[0].startswith("def f(")
    # info and plan read the imported config: the same counts as the trained run's
    counts = [cli("info", "--checkpoint", c).out for c in (run, trained_run.out)]
    assert counts[0] == counts[1] and "total parameters" in counts[0]
    planned = cli("plan", "--checkpoint", run, "--gpus", "2", "parallel.ep=2")
    assert planned.rc == 0 and "pp 1 x dp 1 x ep 2" in planned.out, planned.err
    expect_error(cli("info", "--checkpoint", run, "--preset", "tiny"), "info", "leave out --preset")
    # continued pre-training from the import: its model and its tokenizer
    cont = tmp_path / "continued"
    r = cli("train", "--init", run, "--out", cont, "--steps", "1", "--data", trained_run.data, "--no-progress",
            "train.seq_len=64", "train.batch_size=4", "train.eval_every=0", "train.sample_tokens=4")
    assert r.rc == 0, r.err
    cont_cfg = load_trained_model(cont, "cpu")[1]
    assert cont_cfg.model == cfg.model and cont_cfg.train.tokenizer == str(run / "tokenizer.json")
    # fine-tuning from the import keeps its tokenizer too
    data = tmp_path / "arith.jsonl"
    assert cli("sft-data", "--n", "8", "--out", data).rc == 0
    r = cli("sft", "--checkpoint", run, "--data", data, "--out", tmp_path / "sft", "--steps", "1", "--batch-size",
            "2", "--no-progress")
    assert r.rc == 0, r.err
    assert load_trained_model(tmp_path / "sft", "cpu")[1].train.tokenizer == str(run / "tokenizer.json")

    before = snapshot(tmp_path)
    expect_error(cli("convert", "--hf", exported, "--out", run, "--to", "run"), "convert", "not an empty folder")
    expect_error(cli("convert", "--hf", exported, "--out", tmp_path / "r2", "--to", "run", "--dtype", "bf16"),
                 "convert", "--dtype", "fp32")
    expect_error(cli("convert", "--checkpoint", trained_run.out, "--out", tmp_path / "r3", "--to", "run"),
                 "convert", "--to run imports a hugging face folder")
    assert snapshot(tmp_path) == before
    small = build_model(load_config("tiny", None, ["model.vocab_size=1000"]).model, "cpu")
    hf.save(small, tmp_path / "small-hf", tokenizer=DEFAULT_TOKENIZER_PATH)
    expect_error(cli("convert", "--hf", tmp_path / "small-hf", "--out", tmp_path / "r4", "--to", "run"), "convert",
                 "tokenizer.json' has 8192 tokens, more than the model's vocab_size 1000")
    assert not (tmp_path / "r4").exists()


def test_info_in_process_with_overrides(cli):
    """info with overrides prints the four counts and FLOPs; compares: more layers -> more params."""
    def main_params(*overrides):
        r = cli("info", *overrides)
        assert r.rc == 0, r.err
        return float(re.search(r"main parameters:\s+([\d.]+) B", r.out).group(1))

    assert main_params("model.num_hidden_layers=8") > main_params("model.num_hidden_layers=4")
    # settings on both sides of a flag all apply, as they would in one run
    split = main_params("model.num_hidden_layers=8", "--preset", "tiny", "model.hidden_size=256")
    assert split == main_params("--preset", "tiny", "model.num_hidden_layers=8", "model.hidden_size=256")
    assert split > main_params("--preset", "tiny", "model.num_hidden_layers=8")
    r = cli("info", "model.num_hidden_layers=8", "--preset", "tiny", "--bogus")
    assert r.rc == 2 and "unrecognized arguments: --bogus" in r.err


HELP_FLAGS = {
    "train": ["--preset", "--config", "--out", "--steps", "--resume", "--init", "--device", "--seed", "--data", "--tokenizer",
              "--precision", "--no-progress", "key=value"],
    "generate": ["--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-p", "--seed", "--precision", "--device",
                 "--chat", "--speculative", "--compile-decoding"],
    "eval": ["--checkpoint", "--text", "--batch-size", "--max-batches", "--device"],
    "convert": ["--checkpoint", "--hf", "--out", "--to", "--dtype"],
    "info": ["--preset", "--config", "--checkpoint", "key=value"],
    "sft": ["--checkpoint", "--data", "--out", "--steps", "--batch-size", "--lr", "--warmup", "--schedule", "--max-len",
            "--val-fraction", "--eval-every", "--checkpoint-every", "--seed", "--device"],
    "sft-data": ["--task", "--n", "--out", "--seed", "--teacher", "--samples", "--precision", "--compile-decoding"],
    "score": ["--checkpoint", "--task", "--n", "--samples", "--temperature", "--top-p", "--max-new-tokens", "--seed",
              "--exclude", "--out", "--precision", "--compile-decoding", "--device"],
    "plot": ["RUN", "--out", "--metrics", "--smooth", "--x"],
    "chat": ["--checkpoint", "--system", "--max-new-tokens", "--temperature", "--top-p", "--seed", "--speculative",
             "--compile-decoding", "--precision", "--device"],
}


@pytest.mark.parametrize("command", sorted(HELP_FLAGS))
def test_help_lists_every_flag(cli, command):
    """`moeforge CMD --help` exits 0 and lists the flags the command is documented to take, and
    every option its parser actually defines."""
    from moeforge.cli import build_parser

    r = cli(command, "--help")
    assert r.rc == 0
    for flag in HELP_FLAGS[command]:
        assert flag in r.out, f"{flag} missing from `{command} --help`"
    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command").choices[command]
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in r.out


def test_top_level_help_lists_commands(cli):
    """`moeforge --help` exits 0 and names every subcommand."""
    r = cli("--help")
    assert r.rc == 0
    for command in HELP_FLAGS:
        assert command in r.out


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing on disk changed
# ---------------------------------------------------------------------------------------------
def test_missing_data_path(cli, expect_error, snapshot, tiny_overrides, tmp_path):
    """--data naming nothing: error naming the path; tmp_path (where --out would go) unchanged."""
    before = snapshot(tmp_path)
    r = cli("train", "--out", tmp_path / "out", "--steps", 1, "--data", tmp_path / "no-such-data", "--no-progress",
            *tiny_overrides)
    expect_error(r, "train", "data path", "no-such-data", "does not exist")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", ["no files", "only empty files"])
def test_empty_data_folder(cli, expect_error, snapshot, tiny_overrides, tmp_path, content):
    """A data folder with no .txt/.jsonl/.parquet (or only empty ones): error naming the folder;
    the folder and its files unchanged, no --out created."""
    data = tmp_path / "data"
    data.mkdir()
    if content == "only empty files":
        (data / "a.txt").write_text("")
        (data / "b.jsonl").write_text("")
    (data / "notes.md").write_text("not a data file")
    before = snapshot(tmp_path)
    r = cli("train", "--out", tmp_path / "out", "--steps", 1, "--data", data, "--no-progress", *tiny_overrides)
    expect_error(r, "train", str(data), "empty" if content == "only empty files" else "no .txt/.jsonl/.parquet")
    assert snapshot(tmp_path) == before


def test_unknown_preset(cli, expect_error, snapshot, tmp_path):
    """--preset v9-huge for train and info: error naming it and listing the presets; no --out."""
    before = snapshot(tmp_path)
    for command in ("train", "info"):
        r = cli(command, "--preset", "v9-huge", *(["--out", tmp_path / "out"] if command == "train" else []))
        expect_error(r, command, "unknown preset 'v9-huge'", "tiny")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("override, fragments", [
    ("model.topk_group=99", ["model.topk_group", "99", "n_group"]),
    ("model.hidden_size=-8", ["model.hidden_size", "positive"]),
    ("train.seq_len=128", ["train.seq_len", "max_position_embeddings"]),  # the context is 64
    ("model.hidden_size=big", ["model.hidden_size", "cannot parse 'big'"]),
    ("hidden_size=64", ["hidden_size=64", "SECTION.NAME=VALUE"]),
    ("model.hidden_size", ["model.hidden_size", "SECTION.NAME=VALUE"]),
    ("model.hidden_sizes=64", ["unknown setting 'model.hidden_sizes'"]),
    ("train.adam_moments=bf17", ["train.adam_moments", "fp32 or bf16", "bf17"]),
    ("train.fp8_norm_output=fp16", ["train.fp8_norm_output", "fp32 or bf16", "fp16"]),
])
def test_invalid_config_value_or_malformed_override(cli, expect_error, snapshot, tiny_overrides, data_dir, tmp_path,
                                                    override, fragments):
    """An invalid value or a malformed key=value: error naming the setting; no --out created."""
    before = snapshot(tmp_path)
    r = cli("train", "--out", tmp_path / "out", "--steps", 1, "--data", data_dir, "--no-progress",
            *tiny_overrides, override)
    expect_error(r, "train", *fragments)
    assert snapshot(tmp_path) == before


def test_invalid_config_file(cli, expect_error, snapshot, tmp_path):
    """--config that is not TOML, or holds a value of the wrong type: error naming file / field."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nhidden_size = \n")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[model]\nhidden_size = \"wide\"\n")
    before = snapshot(tmp_path)
    expect_error(cli("train", "--config", bad, "--out", tmp_path / "out"), "train", str(bad), "not valid TOML")
    expect_error(cli("info", "--config", wrong), "info", "model.hidden_size", "expected int")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", ["{not json", "{}", None])
def test_tokenizer_file_that_does_not_parse(cli, expect_error, snapshot, tiny_overrides, data_dir, tmp_path, content):
    """--tokenizer that is not JSON, is JSON but not a tokenizer, or is missing: error naming the
    file; the file unchanged, no --out created."""
    tok = tmp_path / "tokenizer.json"
    if content is not None:
        tok.write_text(content)
    before = snapshot(tmp_path)
    r = cli("train", "--out", tmp_path / "out", "--steps", 1, "--data", data_dir, "--tokenizer", tok,
            "--no-progress", *tiny_overrides)
    expect_error(r, "train", str(tok), "does not parse" if content is not None else "does not exist")
    assert snapshot(tmp_path) == before


def test_resume_with_another_model_config(cli, expect_error, snapshot, run_copy):
    """--resume with model.hidden_size=32 on a run trained with 64: error naming the field and
    both values; the run's checkpoints, config and metrics untouched."""
    before = snapshot(run_copy)
    r = cli("train", "--out", run_copy, "--resume", "--steps", 10, "--no-progress", "model.hidden_size=32")
    expect_error(r, "train", "another model config", "model.hidden_size", "64", "32")
    assert snapshot(run_copy) == before


def test_truncated_checkpoint_is_reported_as_corrupt(cli, expect_error, snapshot, run_copy):
    """model.pt of the newest checkpoint cut in half: generate, eval and train --resume each
    report the corrupt file; nothing is modified or deleted (the older, intact checkpoint still
    generates)."""
    newest = run_copy / "checkpoints" / "step_0000008"
    model_pt = newest / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[: model_pt.stat().st_size // 2])
    before = snapshot(run_copy)
    for argv in (("generate", "--checkpoint", run_copy, "--prompt", "def ", "--max-new-tokens", 2),
                 ("eval", "--checkpoint", run_copy),
                 ("eval", "--checkpoint", newest),
                 ("train", "--out", run_copy, "--resume", "--steps", 10, "--no-progress")):
        expect_error(cli(*argv), argv[0], "corrupt", "model.pt", "step_0000008")
        assert snapshot(run_copy) == before, argv
    r = cli("generate", "--checkpoint", run_copy / "checkpoints" / "step_0000004", "--prompt", "def ",
            "--max-new-tokens", 2)
    assert r.rc == 0, r.err
    assert snapshot(run_copy) == before


def _rewrite_as_distributed(run: Path, step: int) -> Path:
    """Rewrite a run's single-process checkpoint in the torch.distributed.checkpoint format a torchrun
    run writes (DCP saves without a process group too), through the same save path."""
    import shutil

    from moeforge.model import build_model
    from moeforge.parallel import dcp
    from moeforge.train.step import build_optimizer

    root = run / "checkpoints"
    path = root / f"step_{step:07d}"
    cfg, parts = ckpt.load_checkpoint_config(path), ckpt.load_checkpoint(path)
    model = build_model(cfg.model, "cpu", init=False)
    model.load_state_dict(parts["model.pt"])
    optimizer = build_optimizer(model, cfg)
    optimizer.load_state_dict(parts["optimizer.pt"])
    shutil.rmtree(path)
    staged = ckpt.prepare_staging(root, step)
    dcp.save(staged / "dcp", model, optimizer, None)
    return ckpt.save_checkpoint(root, step, cfg, None, None, parts["state.pt"], keep=3, staged=staged)


def test_distributed_checkpoint_through_the_cli(cli, expect_error, snapshot, trained_run, run_copy):
    """A DCP checkpoint: `eval` prints exactly what the single-process checkpoint gives, `train --resume`
    continues from it, and a damaged DCP file is reported as corrupt (one line, exit 2, nothing changed)."""
    path = _rewrite_as_distributed(run_copy, 8)
    assert (path / "dcp" / ".metadata").is_file() and not (path / "model.pt").exists()
    reference = cli("eval", "--checkpoint", trained_run.out, "--max-batches", 2)
    r = cli("eval", "--checkpoint", run_copy, "--max-batches", 2)
    assert r.rc == 0 and reference.rc == 0, r.err
    assert r.out.split("|")[:2] == reference.out.split("|")[:2]  # loss and bits per byte, to the printed digit
    damaged = next(p for p in (path / "dcp").iterdir() if p.suffix == ".distcp")
    original = damaged.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    damaged.write_bytes(bytes(data))
    before = snapshot(run_copy)
    for argv in (("eval", "--checkpoint", run_copy),
                 ("train", "--out", run_copy, "--resume", "--steps", 10, "--no-progress")):
        expect_error(cli(*argv), argv[0], "corrupt", damaged.name, "step_0000008")
        assert snapshot(run_copy) == before, argv
    damaged.write_bytes(original)  # repaired: the run continues from it
    r = cli("train", "--out", run_copy, "--resume", "--steps", 9, "--no-progress")
    assert r.rc == 0, r.err
    assert ckpt.list_checkpoints(run_copy / "checkpoints")[-1].name == "step_0000009"


def test_prompt_longer_than_the_context(cli, expect_error, snapshot, trained_run):
    """The run's context is 64 tokens (model.max_position_embeddings=64): a prompt of n tokens
    may ask for exactly 64 - n new tokens; 65 - n, or a prompt of more than 64 tokens, is an
    error naming both numbers."""
    before = snapshot(trained_run.out)
    prompt = "def f(x):\n    return x\n"
    n = len(load_tokenizer(None).encode(prompt))
    r = cli("generate", "--checkpoint", trained_run.out, "--prompt", prompt, "--max-new-tokens", 64 - n,
            "--temperature", 0)
    assert r.rc == 0, r.err
    r = cli("generate", "--checkpoint", trained_run.out, "--prompt", prompt, "--max-new-tokens", 65 - n)
    expect_error(r, "generate", f"a prompt of {n} tokens", "context of 64 tokens")

    long_prompt = "for i in range(10):\n    print(i)\n" * 30
    assert len(load_tokenizer(None).encode(long_prompt)) > 64
    r = cli("generate", "--checkpoint", trained_run.out, "--prompt", long_prompt, "--max-new-tokens", 1)
    expect_error(r, "generate", "exceeds", "context of 64 tokens")
    assert snapshot(trained_run.out) == before


def test_train_into_out_with_checkpoints_needs_resume(cli, expect_error, snapshot, run_copy, trained_run):
    """Training into a run folder that holds checkpoints, without --resume, is refused; all its
    files (checkpoints, config.toml, metrics.jsonl) stay as they were."""
    before = snapshot(run_copy)
    r = cli("train", "--out", run_copy, "--steps", 8, *trained_run.train_args)
    expect_error(r, "train", str(run_copy), "already holds checkpoints", "--resume")
    assert snapshot(run_copy) == before


def test_resume_with_fewer_steps_than_done_is_refused(cli, expect_error, snapshot, run_copy):
    """`train --resume --steps N` below the steps the run has done (8) is one line, and changes nothing
    (it used to rewrite the checkpoint and record the lower count in the run's config)."""
    before = snapshot(run_copy)
    expect_error(cli("train", "--out", run_copy, "--resume", "--steps", 5, "--no-progress"), "train",
                 "has done 8 steps already", "--steps above 8")
    assert snapshot(run_copy) == before


def test_train_never_overwrites_files_that_are_not_a_runs(cli, expect_error, snapshot, tmp_path, tiny_overrides,
                                                          data_dir):
    """A new run in a folder without checkpoints refuses a config.toml or metrics.jsonl that moeforge
    did not write (the user's own files of those names), leaving them as they were."""
    for name, text in (("config.toml", "my own notes\n"), ("metrics.jsonl", "my metrics\n")):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text(text)
        before = snapshot(out)
        r = cli("train", "--out", out, "--steps", 1, *tiny_overrides, f"train.data={data_dir}")
        expect_error(r, "train", f"holds a {name} that is not a moeforge run's")
        assert snapshot(out) == before


def test_output_paths_that_cannot_be_written(cli, expect_error, snapshot, trained_run, tmp_path):
    """Results written after the work (score --out, bench --json) are checked first; a folder that
    cannot be made (under a file) is one line, never a traceback."""
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    expect_error(cli("score", "--checkpoint", trained_run.out, "--task", "arithmetic", "--n", "1", "--out",
                     tmp_path / "nowhere" / "s.json"), "score", "does not exist")
    expect_error(cli("bench", "--preset", "tiny", "--steps", "1", "--json", tmp_path / "nowhere" / "b.json"), "bench",
                 "--json", "does not exist")
    expect_error(cli("convert", "--checkpoint", trained_run.out, "--out", tmp_path / "file" / "hf"), "convert",
                 str(tmp_path / "file"))
    expect_error(cli("sft-data", "--n", "2", "--out", tmp_path / "file" / "d.jsonl"), "sft-data", "does not exist")
    assert snapshot(tmp_path) == before


def test_bare_moeforge_with_flags_is_train(cli, expect_error):
    """`moeforge [flags]` is `moeforge train [flags]`, as `moeforge` alone is."""
    expect_error(cli("--preset", "nope"), "train", "unknown preset 'nope'")
    expect_error(cli("--bogus"), "train", "unrecognized arguments: --bogus")


def test_resume_without_checkpoint(cli, expect_error, snapshot, tmp_path, tiny_overrides, data_dir):
    """--resume into a folder without checkpoints (missing, or holding only a crash leftover),
    from the run's own config and with --preset: the same error naming the folder; nothing
    created or removed."""
    (tmp_path / "run" / "checkpoints" / ".tmp-step_0000004-1").mkdir(parents=True)
    before = snapshot(tmp_path)
    for out in (tmp_path / "missing", tmp_path / "run"):
        r = cli("train", "--out", out, "--resume", "--no-progress")
        expect_error(r, "train", "--resume", "no checkpoint", str(out))
        r = cli("train", "--out", out, "--resume", "--no-progress", "--data", data_dir, "--preset", "tiny",
                *tiny_overrides)
        expect_error(r, "train", "--resume", "no checkpoint", str(out))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, fragments", [
    (("generate", "--checkpoint", "{tmp}/nowhere", "--prompt", "x"), ["'{tmp}/nowhere'", "does not exist"]),
    (("generate", "--checkpoint", "{tmp}", "--prompt", "x"), ["'{tmp}'", "no complete checkpoint"]),
    (("eval", "--checkpoint", "{tmp}/nowhere"), ["'{tmp}/nowhere'", "does not exist"]),
    (("convert", "--checkpoint", "{tmp}/nowhere", "--out", "{tmp}/hf"), ["'{tmp}/nowhere'", "does not exist"]),
])
def test_missing_checkpoint(cli, expect_error, snapshot, tmp_path, argv, fragments):
    """--checkpoint naming nothing, or a folder without checkpoints: error naming the path."""
    before = snapshot(tmp_path)
    r = cli(*(a.format(tmp=tmp_path) for a in argv))
    expect_error(r, argv[0], *(f.format(tmp=tmp_path) for f in fragments))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("extra, fragments", [
    (("generate", "--prompt", "def ", "--top-p", "0"), ["--top-p"]),
    (("generate", "--prompt", "def ", "--max-new-tokens", "-1"), ["--max-new-tokens"]),
    (("generate", "--prompt", ""), ["prompt is empty"]),
    (("eval", "--text", "{tmp}/missing.txt"), ["{tmp}/missing.txt", "does not exist"]),
    (("eval", "--text", "{tmp}/empty.txt"), ["{tmp}/empty.txt", "empty"]),
    (("eval", "--batch-size", "0"), ["--batch-size", ">= 1"]),
    (("eval", "--max-batches", "0"), ["--max-batches", ">= 1"]),
    (("eval", "--text", "{tmp}"), ["'{tmp}'", "not a file"]),
    (("eval", "--text", "{tmp}/one.txt"), ["{tmp}/one.txt", "too short to score"]),
    (("eval", "--text", "{tmp}/latin1.txt"), ["{tmp}/latin1.txt", "not UTF-8", "byte 3"]),
    (("eval", "--stride", "100000"), ["--stride 100000", "at most", "64"]),
    (("generate", "--prompt", "def ", "--temperature", "nan"), ["--temperature", "finite"]),
    (("generate", "--prompt", "def ", "--temperature", "-1"), ["--temperature", "not negative"]),
    (("generate", "--prompt", "def ", "--seed", "-5"), ["--seed", "from 0 to 4294967295"]),
    (("generate", "--prompt", "def ", "--seed", str(10**20)), ["--seed"]),
    (("generate", "--prompt", "caf\udce9"), ["--prompt", "not valid UTF-8"]),
    (("generate",), ["the following arguments are required: --prompt"]),
    (("generate", "--prompt", "def ", "--bogus"), ["unrecognized arguments: --bogus"]),
])
def test_bad_generate_and_eval_arguments(cli, expect_error, snapshot, trained_run, tmp_path, extra, fragments):
    """Out-of-range generate/eval arguments and bad --text files: error naming the argument; the
    run and tmp_path unchanged."""
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "one.txt").write_text("a")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    before = snapshot(trained_run.out), snapshot(tmp_path)
    command, *rest = extra
    r = cli(command, "--checkpoint", trained_run.out, *(a.format(tmp=tmp_path) for a in rest))
    expect_error(r, command, *(f.format(tmp=tmp_path) for f in fragments))
    assert (snapshot(trained_run.out), snapshot(tmp_path)) == before


def test_convert_refuses_a_non_empty_folder(cli, expect_error, snapshot, trained_run, tmp_path):
    """convert --out into a folder holding other files: error, the folder's files untouched."""
    from moeforge import hf

    if not callable(getattr(hf, "save", None)):
        pytest.skip("moeforge.hf has no save() yet (hf.py is being written)")
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    r = cli("convert", "--checkpoint", trained_run.out, "--out", dst)
    expect_error(r, "convert", str(dst), "not empty")
    assert snapshot(tmp_path) == before
    assert (dst / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_cuda_requested_without_cuda(cli, expect_error, snapshot, trained_run, tmp_path, command):
    """--device cuda on a machine without CUDA: error saying so; nothing created."""
    before = snapshot(tmp_path)
    if command == "train":
        argv = ("train", "--out", tmp_path / "out", "--device", "cuda", "--data", trained_run.data, "--no-progress")
    else:
        argv = (command, "--checkpoint", trained_run.out, "--device", "cuda", *(["--prompt", "x"] if command == "generate" else []))
    expect_error(cli(*argv), command, "cuda", "no CUDA device")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["out is a file", "out is under a file"])
def test_out_that_cannot_be_a_folder(cli, expect_error, snapshot, tiny_overrides, data_dir, tmp_path, where):
    """--out naming a file (or a path below a file) is refused up front, naming the file, before
    any data is read; the file is untouched."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker if where == "out is a file" else blocker / "run"
    before = snapshot(tmp_path)
    r = cli("train", "--out", out, "--steps", 1, "--data", data_dir, "--no-progress", *tiny_overrides)
    expect_error(r, "train", f"'{blocker}'", "not a folder")
    assert snapshot(tmp_path) == before


def _rewrite_in_manifest(step_dir: Path, name: str) -> None:
    """Make the manifest agree with the current bytes of `name` (a consistent but foreign file)."""
    import hashlib

    manifest = json.loads((step_dir / "manifest.json").read_text())
    data = (step_dir / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


class _RunsCode:
    """Unpickling this calls os.mkdir(path): stands in for code hidden in a downloaded checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("payload", ["code", "list"])
def test_checkpoint_with_foreign_model_pt(cli, expect_error, snapshot, run_copy, tmp_path, payload):
    """model.pt replaced by a pickle that runs code when loaded (or by a plain list), with a
    manifest that matches it: generate and eval refuse it with one line naming model.pt, and the
    code never runs (its folder is not created)."""
    step = run_copy / "checkpoints" / "step_0000008"
    marker = tmp_path / "code-ran"
    torch.save({"embed.weight": _RunsCode(str(marker))} if payload == "code" else [1, 2, 3], step / "model.pt")
    _rewrite_in_manifest(step, "model.pt")
    before = snapshot(run_copy)
    for argv in (("generate", "--checkpoint", run_copy, "--prompt", "def "), ("eval", "--checkpoint", run_copy)):
        line = expect_error(cli(*argv), argv[0], "model.pt", "step_0000008")
        assert ("refused" if payload == "code" else "not a state dict") in line
        assert not marker.exists(), "unpickling model.pt ran code"
    assert snapshot(run_copy) == before


def test_relative_data_path_works_from_another_directory(cli, trained_run, tiny_overrides, tmp_path, monkeypatch):
    """Train with a relative --data (cwd = the data's parent), then `eval --checkpoint` from
    another working directory: the checkpoint's config names the data by its absolute path, and
    eval reads the same validation split (same token count as evaluating where it was trained)."""
    monkeypatch.chdir(trained_run.data.parent)
    out = tmp_path / "run"
    r = cli("train", "--out", out, "--steps", 1, "--data", trained_run.data.name, "--no-progress", *tiny_overrides,
            "train.sample_tokens=0")
    assert r.rc == 0, r.err
    assert ckpt.load_checkpoint_config(ckpt.resolve_checkpoint(out)).train.data == str(trained_run.data)
    here = cli("eval", "--checkpoint", out, "--max-batches", 1)
    monkeypatch.chdir(tmp_path)
    there = cli("eval", "--checkpoint", out, "--max-batches", 1)
    assert there.rc == 0, there.err
    assert there.out == here.out


def test_ema_checkpoint_through_the_cli(cli, expect_error, snapshot, trained_run, tiny_overrides, data_dir, tmp_path):
    """A run with train.ema_decay saves the EMA; --ema makes eval, generate and convert use it (the
    model's parameters are the saved average, not the last weights); a checkpoint without an EMA
    is refused in one line, and --ema with --hf too."""
    out = tmp_path / "ema-run"
    r = cli("train", "--out", out, "--steps", 3, "--data", data_dir, "--no-progress", *tiny_overrides,
            "train.ema_decay=0.5", "train.sample_tokens=0", "train.eval_batches=1")
    assert r.rc == 0, r.err
    state = ckpt.load_checkpoint(ckpt.resolve_checkpoint(out), ("state.pt",))["state.pt"]
    model, _ = ckpt.load_trained_model(out, "cpu", ema=True)
    last, _ = ckpt.load_trained_model(out, "cpu")
    for name, p in model.named_parameters():
        assert torch.equal(p, state["ema"][name]), name
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), last.parameters()))
    r = cli("eval", "--checkpoint", out, "--ema", "--max-batches", 1)
    assert r.rc == 0 and EVAL_LINE.match(r.out.strip()), r.err
    r = cli("generate", "--checkpoint", out, "--ema", "--prompt", "def ", "--max-new-tokens", 2)
    assert r.rc == 0 and r.out.startswith("def "), r.err
    r = cli("convert", "--checkpoint", out, "--ema", "--out", tmp_path / "hf", "--dtype", "fp32")
    assert r.rc == 0, r.err
    from moeforge import hf

    exported = hf.load(tmp_path / "hf")
    for (name, p), q in zip(model.named_parameters(), exported.parameters()):
        assert torch.equal(p, q), name
    before = snapshot(trained_run.out)
    expect_error(cli("eval", "--checkpoint", trained_run.out, "--ema"), "eval", "no parameter EMA", "ema_decay")
    expect_error(cli("convert", "--hf", trained_run.out, "--ema", "--out", tmp_path / "x"), "convert", "--ema")
    assert snapshot(trained_run.out) == before
